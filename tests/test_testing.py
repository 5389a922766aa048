"""The float64 dense yardstick agrees with SDPA and with the reference when nothing is skipped;
the A/B round order alternates."""

import math

import torch

from blasst_cute.reference import blasst_attention
from blasst_cute.testing import dense_attention, lse_err, rel_err, round_order


def test_dense_attention_matches_sdpa_and_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 9, 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 9, 2, 8, generator=g, dtype=torch.float64)
    out, lse = dense_attention(q, k, v, causal=True)
    mask = torch.arange(9)[None, :] <= torch.arange(7)[:, None] + 2
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
        attn_mask=mask).transpose(1, 2)
    assert rel_err(out, sdpa) < 1e-12
    ref, ref_lse, _ = blasst_attention(q, k, v, causal=True, block_m=4, block_n=2)
    assert rel_err(out, ref) < 1e-12 and lse_err(lse, ref_lse) < 1e-5


def test_rows_without_keys_and_lse_err():
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    out, lse = dense_attention(q, k, v, causal=True)
    assert (out[0, :2] == 0).all() and torch.isinf(lse[0, 0, :2]).all()
    assert lse_err(lse, lse) == 0.0 and lse_err(torch.zeros_like(lse), lse) == math.inf


def test_round_order_alternates_and_balances_positions():
    names = ["dense", "fa4", "skip0", "sparse"]
    rounds = [round_order(iter(names), r) for r in range(4)]  # any iterable, e.g. dict items
    assert rounds[0] == rounds[2] == names and rounds[1] == rounds[3] == names[::-1]
    # over an even number of rounds every variant's mean place in the round is the same
    mean_place = {n: sum(r.index(n) for r in rounds) / len(rounds) for n in names}
    assert len(set(mean_place.values())) == 1


def test_tee_log_prints_and_appends(tmp_path, capsys):
    from blasst_cute.testing import tee_log
    path = tmp_path / "x.log"
    log = tee_log(str(path))
    log("a")
    log()
    log("b")
    assert path.read_text() == "a\n\nb\n"
    assert capsys.readouterr().out == "a\n\nb\n"


def test_alternated_medians_orders_rounds_and_takes_medians(monkeypatch):
    from blasst_cute import testing
    calls, readings = [], {"a": iter([5.0, 1.0, 3.0]), "b": iter([2.0, 9.0, 4.0])}
    fns = [lambda: "a", lambda: "b"]

    def fake_time_per_call(fn, iters, warmup):
        name = fn()
        calls.append((name, iters, warmup))
        return next(readings[name])

    monkeypatch.setattr(testing, "time_per_call", fake_time_per_call)
    assert testing.alternated_medians(fns, rounds=3, iters=7, warmup=2) == [3.0, 4.0]
    assert [c[0] for c in calls] == ["a", "b", "b", "a", "a", "b"]
    assert all(c[1:] == (7, 2) for c in calls)


def test_alternated_medians_takes_a_timer():
    from blasst_cute import testing
    seen = []

    def timer(entry, iters, warmup):
        seen.append((entry, iters, warmup))
        return {"x": 2.0, "y": 1.0}[entry[0]]

    assert testing.alternated_medians([["x"], ["y"]], rounds=2, iters=5, warmup=3,
                                      timer=timer) == [2.0, 1.0]
    assert [e[0][0] for e in seen] == ["x", "y", "y", "x"]
    assert all(e[1:] == (5, 3) for e in seen)
