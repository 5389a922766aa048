"""MLA decode at B=1: kernel time (CUDA graph, input sets cycled past the L2) against the split
cap and the combine form (grouped vs one warp per chunk). Diagnostic for the split heuristic.

    python perf/diag/mla_split_sweep.py [--caps 32 64 128] [--lens 4096 32768]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import blasst_cute  # noqa: E402
from blasst_cute.kernels import launch_mla  # noqa: E402
from blasst_cute.testing import round_order, time_graph_cycle  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--caps", type=int, nargs="*", default=[32, 64, 128])
ap.add_argument("--lens", type=int, nargs="*", default=[4096, 32768])
ap.add_argument("--heads", type=int, default=128)
ap.add_argument("--rounds", type=int, default=3)
args = ap.parse_args()

H, D, page = args.heads, 576, 64
for L in args.lens:
    n_sets = max(2, (160 << 20) // (L * D * 2))  # > the L2 together
    sets = []
    for _ in range(n_sets):
        kv = torch.randn(L // page, page, D, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(1, 1, H, D, device="cuda", dtype=torch.bfloat16)
        bt = torch.randperm(L // page, device="cuda", dtype=torch.int32).view(1, -1)
        sets.append((q, kv, bt))
    lens = torch.full((1,), L, device="cuda", dtype=torch.int32)
    variants = [(cap, grouped) for cap in args.caps for grouped in (True, False)]
    times = {v: [] for v in variants}
    outs = {}
    calls = {}  # variant -> (one call per input set, its split count)
    for cap, grouped in variants:
        launch_mla.MAX_SPLITS, launch_mla.GROUPED_MERGE = cap, grouped
        launch_mla._plans.clear()
        fns = [lambda s=s: blasst_cute.decode_mla(s[0], s[1], cache_seqlens=lens, block_table=s[2],
                                                  softmax_scale=0.1) for s in sets]
        outs[(cap, grouped)] = fns[0]().float()
        splits = next(iter(launch_mla._plans.values())).splits
        calls[(cap, grouped)] = (fns, splits)
    for r in range(args.rounds):
        for v in round_order(variants, r):
            launch_mla.MAX_SPLITS, launch_mla.GROUPED_MERGE = v
            launch_mla._plans.clear()
            times[v].append(time_graph_cycle(calls[v][0]) * 1e6)
    ref = outs[variants[0]]
    for v in variants:
        t = sorted(times[v])[len(times[v]) // 2]
        err = (outs[v] - ref).abs().max().item()
        print(f"B=1 L={L} H={H} cap={v[0]:>3} splits={calls[v][1]:>3} "
              f"{'grouped' if v[1] else 'per-chunk'}: {t:7.1f} us  max|diff| vs first {err:.1e}",
              flush=True)
