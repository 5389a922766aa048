"""Dense decode kernel time against the split count, where the launcher uses few or no splits.

    python perf/decode_split_sweep.py [--shapes 64,32768,64,4 ...] [--splits 1,2,3,4,6,8]
        [--rounds 3]

The launcher (launch_decode.decode_num_splits) splits a sequence's key tiles over several CTAs
only while there are fewer than num_SMs / 2 (batch x kv head x q-tile) work units. This times
the dense build (CUDA graphs cycling input sets past the L2, paged cache, page 64, one new
token) at the launcher's split count and at each count of --splits, the counts in alternation
(--rounds rounds, reversed on odd rounds; median), and prints each time against the launcher's.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import decode_matrix as dm  # noqa: E402

from blasst_cute.kernels import launch_decode  # noqa: E402
from blasst_cute.testing import alternated_medians, capture_cycle  # noqa: E402

DEFAULT_SHAPES = ["8,32768,32,8", "16,32768,32,8", "32,32768,32,8", "64,32768,32,8",
                  "128,32768,32,8", "32,8192,32,8", "64,8192,32,8", "16,131072,32,8",
                  "16,32768,64,4", "32,32768,64,4", "64,32768,64,4", "128,32768,64,4",
                  "64,8192,64,4", "8,131072,64,4"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="B,L,Hq,Hk")
    ap.add_argument("--splits", default="1,2,3,4,6,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=8, help="calls per CUDA graph")
    args = ap.parse_args()
    counts = [int(x) for x in args.splits.split(",")]
    print(f"card: {torch.cuda.get_device_name()}; dense build, page 64, one new token")
    print("| B | L | Hq/Hk | units | launcher S | S | time us | GB/s | vs launcher |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        B, L, hq, hk = (int(x) for x in shape.split(","))
        sets, kv_bytes = dm.dense_sets(B, L, hq, hk)
        s0 = sets[0]
        S0 = launch_decode.plan_decode_sm90(s0["q"], s0["kc"], s0["bt"])["num_splits"]
        units = B * hk * -(-(hq // hk) // 64)
        n_tiles = L // 128
        variants = {S0: None}
        for S in counts:
            if S != S0 and n_tiles // S >= launch_decode.MIN_TILES_PER_SPLIT:
                variants[S] = S
        outs = [torch.empty_like(s["q"]) for s in sets]
        lses = [torch.empty(B, hq, 1, dtype=torch.float32, device="cuda") for _ in sets]
        graphs = {}
        for S, ns in variants.items():
            fns = [lambda i=i, ns=ns: launch_decode.run_decode_sm90(
                sets[i]["q"], sets[i]["kc"], sets[i]["vc"], outs[i], lses[i],
                cache_seqlens=sets[i]["lens"], block_table=sets[i]["bt"], num_splits=ns)
                for i in range(len(sets))]
            graphs[S] = capture_cycle(fns, args.calls)
        per_graph = alternated_medians([g.replay for g in graphs.values()], args.rounds, iters=5)
        med = {S: t / args.calls * 1e6 for S, t in zip(graphs, per_graph)}
        for S in sorted(med):
            print(f"| {B} | {L} | {hq}/{hk} | {units} | {S0} | {S} | {med[S]:.1f} | "
                  f"{kv_bytes / (med[S] * 1e-6) / 1e9:.0f} | {med[S0] / med[S]:.3f}x |",
                  flush=True)
        graphs = sets = outs = lses = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
