"""Sparse decode with one sequence repeated over the batch against different sequences.

    python perf/decode_mixed.py [--shapes 64,32768,32,8 ...] [--mixed 16] [--targets 0.7 0.9]

The benchmarks (perf/decode_matrix.py, tests/kernels/gpu_mla_decode_smoke.py) repeat one
synthetic sequence over the batch, so every CTA skips the same tiles. In a real batch each
sequence skips its own share, and a launch lasts as long as its slowest CTAs. For each shape this
times (CUDA-graph replays) dense and the skip build at the factors closest to each target tile
sparsity (over the whole batch), once with the repeated sequence and once with --mixed different
ones, and prints the speedups over the same workload's dense time.
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

GRID = [1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["64,32768,32,8"], help="B,L,Hq,Hk")
    ap.add_argument("--mixed", type=int, default=16, help="different sequences in the batch")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.9])
    args = ap.parse_args()
    print(f"card: {torch.cuda.get_device_name()}")
    print("| B | L | Hq/Hk | sequences | variant | sparsity | time us | vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        B, L, hq, hk = (int(x) for x in shape.split(","))
        for mixed in (1, args.mixed):
            s = dm.synthetic_set(B, L, hq, hk, mixed=mixed)
            sp = {f: dm.sparsity(s, f) for f in GRID}
            label = "one, repeated" if mixed == 1 else f"{min(mixed, B)} different"
            t_dense = dm.graph_ms(dm.blasst_fn(s, None)) * 1e3
            print(f"| {B} | {L} | {hq}/{hk} | {label} | dense | | {t_dense:.1f} | 1.00x |",
                  flush=True)
            for f, spf in dm.target_factors(sp, GRID, tuple(args.targets)):
                t = dm.graph_ms(dm.blasst_fn(s, f)) * 1e3
                print(f"| {B} | {L} | {hq}/{hk} | {label} | skip f={f:g} | {spf * 100:.1f}% | "
                      f"{t:.1f} | {t_dense / t:.2f}x |", flush=True)
            s = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
