"""Quick GPU smoke of the 2-CTA K/V multicast prefill (cluster_m=2 / cluster_h=2) before the
full tests.

    python perf/diag/prefill_cluster_smoke.py
Runs d128 32/8 at L=4096 (B=2) and L=1000 (odd q-tile count) dense and skipping, without and
with a cluster (q-tile pairs non-causal, q-head pairs causal and not) on poisoned outputs, and
checks that the outputs, LSE and skip counters are bitwise equal and fully written.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from blasst_cute.kernels import launch  # noqa: E402
from blasst_cute.workloads import synthetic_qkv  # noqa: E402


def run(q, k, v, factor, causal, tuning):
    B, L, H = q.shape[0], q.shape[1], q.shape[2]
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, L), float("nan"), device="cuda")
    vis = torch.zeros(B, H, dtype=torch.int32, device="cuda")
    skp = torch.zeros_like(vis)
    launch.run_prefill_sm90(q, k, v, out, lse, causal=causal, softmax_scale=q.shape[-1] ** -0.5,
                            threshold_scale_factor=factor, visited=vis, skipped=skp, tuning=tuning)
    torch.cuda.synchronize()
    return out, lse, vis, skp


def main():
    print(torch.cuda.get_device_name(), flush=True)
    ok_all = True
    for B, L in [(2, 4096), (1, 1000)]:
        q, k, v = synthetic_qkv(B, L, L, 32, 8, 128, device="cuda", seed=L)
        for causal, pair in [(False, "cluster_m"), (False, "cluster_h"), (True, "cluster_h")]:
            for factor in (None, 0.3 * L):
                r1 = run(q, k, v, factor, causal, {pair: 1})
                r2 = run(q, k, v, factor, causal, {pair: 2})
                same = all(torch.equal(a, b) for a, b in zip(r1, r2))
                nan = int(torch.isnan(r2[0]).sum() + torch.isnan(r2[1]).sum())
                sp = float(r2[3].sum()) / max(1, float(r2[2].sum()))
                ok = same and nan == 0
                ok_all &= ok
                print(f"{'PASS' if ok else 'FAIL'} B={B} L={L} causal={causal} {pair}=2 "
                      f"factor={factor}: bitwise={same} unwritten={nan} sparsity={sp:.3f}",
                      flush=True)
    sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
    main()
