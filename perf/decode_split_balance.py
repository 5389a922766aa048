"""Why split-KV decode at batch 1 gains less from skipping than its average sparsity says (CPU).

    python perf/decode_split_balance.py [--seqlen 131072] [--factors 60000 130000]

The sm90 decode kernel at B=1 cuts each kv head's key tiles into num_splits contiguous chunks,
one CTA each, and every split restarts its running max (the issue's spec). A CTA always reads
all its K tiles and only its kept V tiles, so the launch lasts as long as the CTA that keeps the
most. This runs the reference on each split's slice (same tiles, same lambda) and prints the
mean and the largest number of kept tiles per CTA, with the time bounds (K + kept V) / (K + V)
relative to dense: balanced (mean) and slowest CTA.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from blasst_cute.kernels.launch_decode import decode_geometry_sm90  # noqa: E402
from blasst_cute.reference import blasst_attention_paged  # noqa: E402
from blasst_cute.workloads import WorkloadSpec, synthetic_qkv  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=131072)
    ap.add_argument("--heads", type=int, nargs=2, default=(32, 8))
    ap.add_argument("--factors", type=float, nargs="+", default=[60000.0, 130000.0])
    ap.add_argument("--local-logit", type=float, default=None, help="WorkloadSpec.local_logit")
    a = ap.parse_args()
    L, (hq, hk) = a.seqlen, a.heads
    spec = WorkloadSpec() if a.local_logit is None else WorkloadSpec(local_logit=a.local_logit)
    geo = decode_geometry_sm90(hq // hk, 1, 64, 1, hk, L, 132)
    S, bn = geo["num_splits"], geo["block_n"]
    tiles = -(-L // bn)
    per = -(-tiles // S)
    q, k, v = synthetic_qkv(1, 1, L, hq, hk, 128, dtype=torch.float32, seed=7, spec=spec)
    for f in a.factors:
        kept = torch.zeros(S, hk)
        for s in range(S):
            lo, hi = s * per * bn, min((s + 1) * per * bn, L)
            n = hi - lo
            _, _, st = blasst_attention_paged(
                q, k[:, lo:hi], v[:, lo:hi], cache_seqlens=torch.tensor([n]),
                threshold_scale_factor=f * n / L,  # the same lambda = factor / L
                block_m=geo["block_m"], block_n=bn, pack_gqa=True, order="forward", num_splits=1,
                rows_per_decision=geo["rows_per_decision"], split_tiles=None)
            kept[s] = (st.visited - st.skipped).float()[0]
        mean_k, max_k = kept.mean().item(), kept.max().item()
        print(f"L={L} {hq}/{hk} splits={S} factor={f:g}: sparsity {1 - mean_k / per:.3f}; kept V "
              f"tiles per CTA mean {mean_k:.1f}, max {max_k:.0f} of {per}; time vs dense >= "
              f"{(per + mean_k) / (2 * per):.3f} balanced, {(per + max_k) / (2 * per):.3f} slowest CTA")


if __name__ == "__main__":
    main()
