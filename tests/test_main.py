"""The demo (``python -m blasst_cute``) runs on the CPU and reports what it promises."""

import subprocess
import sys


def test_help():
    r = subprocess.run([sys.executable, "-m", "blasst_cute", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--prefill-factor" in r.stdout


def test_demo_small_cpu(capsys):
    from blasst_cute.__main__ import main
    assert main(["--seqlen", "1024", "--heads-q", "4", "--heads-kv", "2", "--head-dim", "64", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "prefill (causal)" in out and "decode" in out and "tile sparsity" in out
    assert "relative error vs dense float64 attention" in out and "P·V sparsity" in out
