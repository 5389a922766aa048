"""Calibration: fits, exact tile counting with the production geometries, the schema, the CLI."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from blasst_cute import calibrate as C
from blasst_cute import dispatch
from blasst_cute.integrations.hf_models import PromptCapture
from blasst_cute.reference import skip_counts
from blasst_cute.sparse_config import FORMULA, SkipSoftmaxConfig
from blasst_cute.workloads import synthetic_qkv


# -- fits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["log", "linear"])
def test_fit_exponential_recovers_coefficients(space):
    s = np.linspace(0.0, 1.0, 41)
    f = 12.5 * np.exp(6.0 * s)
    fit = C.fit_exponential(f, s, space=space)
    assert fit.a == pytest.approx(12.5, rel=1e-6) and fit.b == pytest.approx(6.0, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0) and fit.r2_log == pytest.approx(1.0)
    assert fit.n == int(((s >= 0.1) & (s <= 0.9)).sum())  # only s in [0.1, 0.9]
    assert fit.sparsity(fit.factor(0.42)) == pytest.approx(0.42)


def test_fit_linear_space_differs_from_log_on_noisy_data():
    rng = np.random.default_rng(0)
    s = np.linspace(0.1, 0.9, 30)
    f = 5.0 * np.exp(7.0 * s) * np.exp(rng.normal(0, 0.3, s.size))
    lin, log = C.fit_exponential(f, s, space="linear"), C.fit_exponential(f, s, space="log")
    assert lin.r2 >= log.r2 - 1e-12 and log.r2_log >= lin.r2_log - 1e-12  # each is optimal in its space


def test_fit_needs_points_in_range():
    with pytest.raises(ValueError, match="at least 2 points"):
        C.fit_exponential([1.0, 2.0, 3.0], [0.0, 0.05, 0.95])
    with pytest.raises(ValueError, match="space"):
        C.fit_exponential([1.0, 2.0], [0.2, 0.3], space="cubic")


@pytest.mark.parametrize("p", [1.0, 1.7])
def test_fit_length_exponent(p):
    s, L = np.meshgrid(np.linspace(0.1, 0.9, 9), [1024, 2048, 4096, 8192])
    lam = 30.0 * np.exp(5.0 * s) / L**p
    fit = C.fit_length_exponent(lam.ravel(), L.ravel(), s.ravel())
    assert fit.p == pytest.approx(p, abs=1e-9) and fit.b == pytest.approx(5.0)
    assert fit.p_is_one == (p == 1.0)
    assert fit.factor(0.5, 4096) / 4096 == pytest.approx(30.0 * math.exp(2.5) / 4096**p)
    if p == 1.0:
        assert fit.rms_log_p1 == pytest.approx(0.0, abs=1e-9)
    else:
        assert fit.rms_log_p1 > fit.rms_log


# -- counting ------------------------------------------------------------------------------------


def _capture(L, steps, seed=0, hq=4, hk=2, d=64):
    q, k, _ = synthetic_qkv(1, L + steps, L + steps, hq, hk, d, dtype=torch.float32, seed=seed)
    return q, k


def test_count_prefill_uses_the_prefill_geometry():
    q, k = _capture(512, 0)
    lams = [1e-4, 1e-2, 0.5]
    vis, skp = C.count_prefill(q, k, lams, 0.125)
    geom = dispatch.prefill_geometry(64, 64, True, torch.bfloat16)
    v_ref, s_ref = skip_counts(
        q, k, factors=[x * 512 for x in lams], causal=True, softmax_scale=0.125, **geom.kwargs()
    )
    assert vis.tolist() == v_ref.sum((1, 2)).tolist() and skp.tolist() == s_ref.sum((1, 2)).tolist()


@pytest.mark.parametrize("prompt_len", [250, 256, 1000])
def test_count_decode_batching_is_exact(prompt_len):
    """Steps batched by last key tile (last key repeated) == one skip_counts call per step."""
    steps = 9
    q, k = _capture(prompt_len, steps, seed=3)
    lams = [1e-3, 3e-2, 0.3, 0.9]
    vis, skp = C.count_decode(q, k, prompt_len, lams, 0.125)
    v_ref = np.zeros(len(lams), np.int64)
    s_ref = np.zeros(len(lams), np.int64)
    for j in range(steps):
        lk = prompt_len + j + 1
        geom = dispatch.decode_geometry((1, 1, 4, 64), (1, lk, 2, 64))  # what blasst_cute.decode uses
        v, s = skip_counts(
            q[:, prompt_len + j : prompt_len + j + 1],
            k[:, :lk],
            factors=[x * lk for x in lams],
            causal=True,
            softmax_scale=0.125,
            **geom.kwargs(),
        )
        v_ref += v.sum((1, 2)).numpy()
        s_ref += s.sum((1, 2)).numpy()
    assert vis.tolist() == v_ref.tolist() and skp.tolist() == s_ref.tolist()
    assert skp.sum() > 0


def test_sparsity_at_interpolates_in_log_lambda():
    pts = [C.SweepPoint("prefill", 100, lam, lam * 100, 100, sk) for lam, sk in ((1e-3, 10), (1e-1, 50))]
    assert C.sparsity_at(pts, 1e-3) == pytest.approx(0.1)
    assert C.sparsity_at(pts, 1e-2) == pytest.approx(0.3)
    assert C.sparsity_at(pts, 1.5) == 0.0  # λ >= 1: nothing skipped


# -- the whole procedure -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captures():
    caps = []
    for L in (512, 1024):
        q, k = _capture(L, 4, seed=L)
        caps.append(PromptCapture(prompt_len=L, q=[q, q.flip(2)], k=[k, k.flip(2)], scale=0.125))
    return caps


@pytest.fixture(scope="module")
def result(captures):
    return C.calibrate(captures, model_name="synthetic", progress=False)


def test_calibrate_end_to_end(result):
    assert set(result.fits) == {"prefill", "decode"}
    assert result.lengths == [512, 1024] and result.decode_steps == 4
    assert result.geometry["prefill"] == dispatch.prefill_geometry(64, 64, True, torch.bfloat16).kwargs()
    assert (
        result.geometry["decode (batch 1, 512 keys)"]
        == dispatch.decode_geometry((1, 1, 4, 64), (1, 513, 2, 64)).kwargs()
    )
    for ph in ("prefill", "decode"):
        f = result.fits[ph]
        assert f.a > 0 and f.b > 0 and f.n >= 2
        assert set(result.length_fits) == {"prefill", "decode"}
        for t in result.targets:  # every scheme evaluated at every length
            assert len([e for e in result.evaluation if e.phase == ph and e.target == t]) == 6
    md = C.markdown(result, {"prefill": 0.5, "decode": 0.5})
    assert "| λ |" in md and "Length exponent" in md and "max abs(s − t)" in md
    assert json.loads(json.dumps(result.to_json()))["model"] == "synthetic"


def test_unreachable_targets_are_reported(result):
    un = result.unreachable()
    for ph, t, L, why in un:
        assert result.fits[ph].factor(t) / L >= 1 or t > result.max_sparsity[ph][L]
    # Whatever the fit says for the largest target, λ >= 1 at some length must be flagged.
    big = [(ph, L) for ph in result.fits for L in result.lengths if result.fits[ph].factor(0.9) >= L]
    assert all(any(u[0] == ph and u[1] == 0.9 and u[2] == L for u in un) for ph, L in big)
    md = C.markdown(result)
    assert ("cannot reach" in md) == bool(un)


def test_config_from_result_round_trips(result, tmp_path):
    cfg = result.config({"prefill": 0.5, "decode": 0.3}, ignore=["model.layers.0.*"])
    assert cfg.factor("prefill") == pytest.approx(result.fits["prefill"].factor(0.5))
    back = SkipSoftmaxConfig.from_config(cfg.write(tmp_path))
    assert back == cfg


def test_plot_writes_png(result, tmp_path):
    pytest.importorskip("matplotlib")
    path = C.plot(result, str(tmp_path / "p.png"))
    data = open(path, "rb").read()
    assert data[:4] == b"\x89PNG" and len(data) < 150_000


def test_cli_on_saved_captures(captures, tmp_path, capsys):
    caps_file = tmp_path / "caps.pt"
    torch.save([c.to_dict() for c in captures], caps_file)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    rc = C.main(
        [
            "--captures",
            str(caps_file),
            "--write-config",
            str(tmp_path),
            "--report",
            str(tmp_path / "r.md"),
            "--json",
            str(tmp_path / "r.json"),
            "--prefill-target",
            "0.4",
            "--quiet",
        ]
    )
    assert rc == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 8  # other content kept
    group = cfg["sparse_attention_config"]["config_groups"]["group_0"]
    assert group["algorithm"] == "skip_softmax" and group["threshold_scale_factor"]["formula"] == FORMULA
    assert group["target_sparsity"] == {"prefill": 0.4, "decode": 0.5}
    assert "config.json block" in capsys.readouterr().out
    assert "### Fit" in (tmp_path / "r.md").read_text()


def test_subcommand_help_and_demo_help_still_work():
    r = subprocess.run(
        [sys.executable, "-m", "blasst_cute", "calibrate", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "--fit-space" in r.stdout
    r = subprocess.run([sys.executable, "-m", "blasst_cute", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--prefill-factor" in r.stdout and "calibrate" in r.stdout


def test_calibrate_rejects_bad_input(captures):
    with pytest.raises(ValueError, match="empty"):
        C.calibrate([], progress=False)
    with pytest.raises(ValueError, match="targets"):
        C.calibrate(captures, targets=[1.5], progress=False)
    with pytest.raises(ValueError, match="phases"):
        C.calibrate(captures, phases=["train"], progress=False)
    with pytest.raises(ValueError, match="prompt_len"):
        PromptCapture.from_dict({"q": [], "k": []})


def test_progress_bar_writes_lines():
    import io

    buf = io.StringIO()
    bar = C.Progress(4, "x", stream=buf)
    for _ in range(4):
        bar.update()
    assert "4/4" in buf.getvalue()


# -- schema --------------------------------------------------------------------------------------


def test_schema_variants_and_errors(tmp_path):
    group = {
        "algorithm": "skip_softmax",
        "threshold_scale_factor": {"formula": FORMULA, "coefficients": {"a": 2.0, "b": 3.0}},
        "target_sparsity": 0.5,
    }
    cfg = SkipSoftmaxConfig.from_config({"sparse_attention_config": {"config_groups": {"g": group}}})
    assert cfg.coefficients == {"prefill": (2.0, 3.0), "decode": (2.0, 3.0)}
    assert cfg.factor("decode") == pytest.approx(2.0 * math.exp(1.5)) and cfg.factor("prefill", 0.0) == 0.0
    other = {"algorithm": "sparse_softmax", "n": 2}
    merged = cfg.merge_into(
        {"sparse_attention_config": {"config_groups": {"group_0": other, "group_1": group}}}
    )
    groups = merged["sparse_attention_config"]["config_groups"]
    assert groups["group_0"]["algorithm"] == "skip_softmax" and groups["group_1"] == other
    bad = dict(group, threshold_scale_factor={"formula": "a * b", "coefficients": {"a": 1, "b": 1}})
    with pytest.raises(NotImplementedError, match="formula"):
        SkipSoftmaxConfig.from_group(bad)
    with pytest.raises(ValueError, match="at most one"):
        SkipSoftmaxConfig.from_config({"config_groups": {"a": group, "b": group}})
    with pytest.raises(ValueError, match="no config group"):
        SkipSoftmaxConfig.from_config({"config_groups": {"a": other}})
    with pytest.raises(ValueError, match="target_sparsity"):
        cfg.factor("prefill", 1.0)
    with pytest.raises(ValueError, match="phase"):
        cfg.factor("train", 0.5)
    with pytest.raises(ValueError, match="does not exist"):
        SkipSoftmaxConfig.from_config(str(tmp_path / "missing.json"))
    assert SkipSoftmaxConfig({"prefill": (1.0, 1.0)}, ignore=["layers.3.*"]).ignores(
        "model.layers.3.self_attn"
    )


def test_counts_match_the_runtime_stats():
    """What calibration counts is what blasst_cute.prefill/decode report at run time."""
    import blasst_cute

    L, steps = 384, 3
    q, k = _capture(L, steps, seed=5)
    lam = 0.05
    vis, skp = C.count_prefill(q[:, :L], k[:, :L], [lam], 0.125)
    _, st = blasst_cute.prefill(
        q[:, :L],
        k[:, :L],
        k[:, :L],
        causal=True,
        softmax_scale=0.125,
        threshold_scale_factor=lam * L,
        return_stats=True,
    )
    assert (int(vis[0]), int(skp[0])) == (int(st.visited.sum()), int(st.skipped.sum()))
    vis, skp = C.count_decode(q, k, L, [lam], 0.125)
    tot_v = tot_s = 0
    for j in range(steps):
        lk = L + j + 1
        _, st = blasst_cute.decode(
            q[:, L + j : L + j + 1],
            k[:, :lk],
            k[:, :lk],
            softmax_scale=0.125,
            cache_seqlens=torch.tensor([lk], dtype=torch.int32),
            threshold_scale_factor=lam * lk,
            return_stats=True,
        )
        tot_v += int(st.visited.sum())
        tot_s += int(st.skipped.sum())
    assert (int(vis[0]), int(skp[0])) == (tot_v, tot_s)
