"""Shared by the perf-script tests: load a script under perf/ as a module, without a GPU."""

import importlib.util
import os
import sys

import pytest

PERF = os.path.join(os.path.dirname(__file__), "..", "..", "perf")


@pytest.fixture
def perf_script():
    """``perf_script("diag/mla_sparse_model.py")``: that script as a module (its import-time code
    sees only its own path in sys.argv)."""
    def load(relpath: str):
        path = os.path.join(PERF, relpath)
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        argv, sys.argv = sys.argv, [path]
        try:
            spec.loader.exec_module(mod)
        finally:
            sys.argv = argv
        return mod
    return load
