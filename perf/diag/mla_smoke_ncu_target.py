"""Nsight Compute target: the MLA decode benchmark's workload
(tests/kernels/gpu_mla_decode_smoke.py: one synthetic sequence repeated over the batch,
shuffled paged cache, page 64), one launch per factor (0 = dense), each between
cudaProfilerStart/Stop after a warm-up. Prints the geometry and each factor's tile sparsity.
On the GPU host, from the repo root:

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \
        --section WarpStateStats --metrics sm__cycles_elapsed.max,smsp__cycles_active.avg \
        python perf/diag/mla_smoke_ncu_target.py 64 32768 16 0,4054,17320      (B L H factors)

(perf/results/mla-decode-h100-small-heads.md, section 2.)
"""
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))
sys.path.insert(0, ROOT)
from gpu_mla_decode_smoke import D, DV, make_mla_cache, synth  # noqa: E402
from blasst_cute.kernels import launch_mla  # noqa: E402

B, L, H = map(int, sys.argv[1:4])
factors = [float(x) for x in sys.argv[4].split(",")]
q1, kv1 = synth(1, 1, L, H, 7)
q = q1.expand(B, *q1.shape[1:]).contiguous()
kv = kv1.expand(B, *kv1.shape[1:]).contiguous()
_, kvc, bt = make_mla_cache(B, L, 64, seed=1, kv=kv)
del kv
lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
out = torch.empty(B, 1, H, DV, dtype=q.dtype, device="cuda")
lse = torch.empty(B, H, 1, device="cuda")
geo = launch_mla.plan_mla_decode_sm90(q, kvc, bt, None)
S = geo["num_splits"]
ws = (torch.empty(S, B, 1, H, DV, device="cuda"), torch.empty(S, B, H, 1, device="cuda"))
print("geo", geo, flush=True)


def call(f, cnt=(None, None)):
    launch_mla.run_mla_decode_sm90(q, kvc, out, lse, cache_seqlens=lens, block_table=bt,
                                   softmax_scale=D ** -0.5, threshold_scale_factor=f or None,
                                   workspace=ws, visited=cnt[0], skipped=cnt[1])


for f in factors:
    if f:
        cnt = [torch.zeros(B, dtype=torch.int32, device="cuda") for _ in range(2)]
        call(f, cnt)
        print(f"factor {f:g}: sparsity {float(cnt[1].sum()) / float(cnt[0].sum()):.4f}", flush=True)
for f in factors:
    for _ in range(3):
        call(f)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    call(f)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
