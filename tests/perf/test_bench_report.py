"""The benchmark's reporting runs without a GPU (the timing itself needs one)."""

import importlib.util
import json

import pytest


def test_prefill_flops_counts_bottom_right_causal_pairs(perf_script):
    bench = perf_script("bench.py")
    assert bench.prefill_flops(1, 1, 4, 4, 8, 8, False) == 2 * 16 * 16
    assert bench.prefill_flops(1, 1, 4, 4, 8, 8, True) == 2 * 10 * 16
    assert bench.prefill_flops(1, 1, 2, 4, 8, 8, True) == 2 * (3 + 4) * 16


def test_report_files(tmp_path, perf_script):
    bench = perf_script("bench.py")
    peers = {"sdpa-flash": {"ms": 2.0, "tflops": 300.0}, "fa4": {"error": "ImportError: no flash_attn"}}
    rows = [dict(phase="prefill", batch=1, seqlen=4096, heads_q=32, heads_kv=8, head_dim=128, causal=True,
                 factor=f, peers=peers, ms=ms, sparsity=s, tflops_dense_equiv=600 / ms, ideal=1 / (1 - s / 2))
            for f, ms, s in ((0, 2.1, 0.0), (1000, 1.5, 0.6))]
    rows[1].update(pv_sparsity=0.5, ideal_pv=1 / (1 - 0.25))
    rows.append(dict(rows[0], factor=5000, error="NotImplementedError: no kernel"))
    del rows[-1]["ms"]
    meta = {"date": "2026-11-26T00:00:00+00:00", "gpu": "test", "torch": "x"}
    bench.write_results(rows, meta, str(tmp_path), "t")
    md = (tmp_path / "t.md").read_text()
    assert "0.95x" in md and "n/a: NotImplementedError" in md and "fa4: ImportError" in md
    assert "| P·V skipped | ideal at P·V s |" in md and "| 0.500 | 1.33x |" in md
    assert md.count("| — | — |") >= 1  # the dense point has no P·V counts
    assert json.loads((tmp_path / "t.json").read_text())["rows"][1]["sparsity"] == 0.6
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "t.png").stat().st_size > 1000
    else:
        pytest.skip("matplotlib not installed: no plot")


def test_report_with_head_dim_v(tmp_path, perf_script):
    # MLA prefill (q/k 192, v 128): the shape names both dims and the ideal counts P·V's share
    bench = perf_script("bench.py")
    peers = {"fa4": {"ms": 2.0, "tflops": 500.0}}
    rows = [dict(phase="prefill", batch=4, seqlen=8192, heads_q=32, heads_kv=32, head_dim=192,
                 head_dim_v=128, causal=True, factor=f, peers=peers, ms=ms, sparsity=s,
                 tflops_dense_equiv=1000 / ms, ideal=1 / (1 - s * 128 / 320))
            for f, ms, s in ((0, 2.2, 0.0), (1000, 1.6, 0.8))]
    bench.write_results(rows, {"date": "2026-12-06T00:00:00+00:00", "gpu": "test"},
                        str(tmp_path), "m", with_plot=False)
    md = (tmp_path / "m.md").read_text()
    assert "d=192/128 causal" in md and "| ideal 1/(1-s*128/320) |" in md
    assert "| 1.47x |" in md  # 1 / (1 - 0.8 * 0.4)
