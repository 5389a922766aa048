"""Causal prefill, B=4 L=8k 32/8: blasst (API, direct launch, no LPT, 128-row tiles at hdim 64)
against FA4 on 1 and 3 rotated input sets, interleaved (GPU host, part2 for FA4).

    python perf/diag/prefill_causal_sets.py
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import blasst_cute  # noqa: E402
from blasst_cute.kernels import launch  # noqa: E402
from blasst_cute.workloads import synthetic_qkv  # noqa: E402


def bench(fn, sets, iters=20):
    for s in sets:
        fn(*s)
    torch.cuda.synchronize()
    ts = []
    for i in range(iters):
        s = sets[i % len(sets)]
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(*s); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)

def direct(tuning):
    def run(q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], device='cuda')
        launch.run_prefill_sm90(q, k, v, out, lse, causal=True, softmax_scale=q.shape[-1] ** -0.5,
                                tuning=tuning)
    return run

try:
    from flash_attn.cute.interface import flash_attn_func
    fa4 = lambda q, k, v: flash_attn_func(q, k, v, causal=True)
except ImportError:  # FA4 not installed (carry .gpu/part2)
    fa4 = None
for D in (64, 128):
    B, L = 4, 8192
    sets = [synthetic_qkv(B, L, L, 32, 8, D, dtype=torch.bfloat16, device='cuda', seed=s) for s in range(3)]
    for n in (1, 3):
        ss = sets[:n]
        r = {}
        r['api'] = bench(lambda q, k, v: blasst_cute.prefill(q, k, v, causal=True), ss)
        r['direct'] = bench(direct(None), ss)
        r['lpt0'] = bench(direct(dict(lpt=False)), ss)
        if D == 64:
            r['m128'] = bench(direct(dict(tile_m=128)), ss)
        if fa4:
            r['fa4'] = bench(fa4, ss)
        r['api2'] = bench(lambda q, k, v: blasst_cute.prefill(q, k, v, causal=True), ss)
        print(f"D={D} sets={n} " + " ".join(f"{k}={v:.3f}" for k, v in r.items()), flush=True)
