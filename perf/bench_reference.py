"""Times the pure-torch reference on the CPU: Lq = Lk = 8192, 8 heads, head dim 128 (target < 1 min)."""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from blasst_cute.reference import blasst_attention  # noqa: E402
from blasst_cute.workloads import synthetic_qkv  # noqa: E402


def main():
    q, k, v = synthetic_qkv(1, 8192, 8192, 8, 8, 128, dtype=torch.bfloat16, seed=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for causal in (False, True):
        t0 = time.perf_counter()
        _, _, st = blasst_attention(q, k, v, causal=causal, threshold_scale_factor=1000.0)
        print(f"causal={causal}: {time.perf_counter() - t0:.1f} s, sparsity {st.sparsity:.3f}")


if __name__ == "__main__":
    main()
