"""GPU check: a prefill kernel loaded from the disk cache in a fresh process computes the same output.

    python tests/kernels/gpu_compile_cache_check.py   (twice: the second run must load, not compile)
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import blasst_cute  # noqa: E402
from blasst_cute.kernels import compile_cache  # noqa: E402
from blasst_cute.workloads import synthetic_qkv  # noqa: E402

q, k, v = synthetic_qkv(1, 2048, 2048, 8, 2, 128, device="cuda", seed=1)
d = compile_cache.disk_cache_dir()
before = len(list(d.glob("*.o"))) if d and d.exists() else 0
t0 = time.perf_counter()
out = blasst_cute.prefill(q, k, v, causal=True, threshold_scale_factor=100.0)
torch.cuda.synchronize()
t1 = time.perf_counter()
ref = blasst_cute.prefill(q, k, v, causal=True, threshold_scale_factor=100.0, backend="reference")
err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
after = len(list(d.glob("*.o")))
print(f"first call {t1 - t0:.2f} s, cache entries {before} -> {after}, rel err vs reference {err:.2e}")
assert err < 2e-2
