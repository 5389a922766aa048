"""The accuracy harness's command line and configuration (the model runs are in
tests/integrations/test_transformers.py)."""

import subprocess
import sys

import pytest

from blasst_cute import eval as E
from blasst_cute.sparse_config import SkipSoftmaxConfig


def test_eval_help():
    r = subprocess.run(
        [sys.executable, "-m", "blasst_cute", "eval", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "--targets" in r.stdout


def test_run_configs_factors_and_reachability():
    cal = SkipSoftmaxConfig({"prefill": (100.0, 5.0), "decode": (1.0, 8.0)})
    cfgs = E.run_configs(cal, [0.5, 0.9], ["prefill", "decode"])
    assert [c.name for c in cfgs] == ["dense", "prefill@0.5", "prefill@0.9", "decode@0.5", "decode@0.9"]
    p9 = cfgs[2]
    assert p9.factor == pytest.approx(100.0 * 2.718281828459045**4.5)
    assert p9.runs_dense_at(4096) and not p9.runs_dense_at(16384)  # λ >= 1 at 4k: nothing to skip
    assert cfgs[0].runs_dense_at(1024)
