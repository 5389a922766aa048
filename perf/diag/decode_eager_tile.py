"""Eager decode calls (blasst_cute.decode, host + kernel, back to back, one sync) with the
short-cache 64-key tiles on and off (launch_decode.SHORT_CACHE_TILE_N), alternating, dense and at
0 % skipped. GPU host: python perf/diag/decode_eager_tile.py [--shapes B,L,Hq,Hk ...]"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import blasst_cute  # noqa: E402
from blasst_cute.kernels import launch_decode  # noqa: E402
from blasst_cute.testing import time_per_call  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--shapes", nargs="+", default=["1,8192,64,4", "1,4096,32,8", "1,2048,64,4"])
ap.add_argument("--calls", type=int, default=200)
ap.add_argument("--rounds", type=int, default=4)
args = ap.parse_args()
print(f"card: {torch.cuda.get_device_name()}")
print("| B | L | Hq/Hk | factor | tile 64 on: us/call | off: us/call | on / off |")
print("|---|---|---|---|---|---|---|")
for shape in args.shapes:
    B, L, hq, hk = (int(x) for x in shape.split(","))
    page = 64
    kc = torch.randn(B * L // page, page, hk, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    bt = torch.arange(B * L // page, device="cuda", dtype=torch.int32).view(B, -1)
    q = torch.randn(B, 1, hq, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
    blasst_cute.set_content_checks(False)
    for factor in (None, 1e-6):
        res = {64: [], 0: []}
        outs = {}
        for r in range(args.rounds):
            for setting in ((64, 0) if r % 2 == 0 else (0, 64)):
                launch_decode.SHORT_CACHE_TILE_N = setting
                launch_decode.clear_cache()

                def call():
                    return blasst_cute.decode(q, kc, vc, cache_seqlens=lens, block_table=bt,
                                              threshold_scale_factor=factor)
                outs[setting] = call().float()
                res[setting].append(time_per_call(call, args.calls, warmup=10) * 1e6)
        on, off = sorted(res[64])[len(res[64]) // 2], sorted(res[0])[len(res[0]) // 2]
        err = (outs[64] - outs[0]).abs().max().item()
        print(f"| {B} | {L} | {hq}/{hk} | {factor} | {on:.1f} | {off:.1f} | {on / off:.3f} "
              f"(max |diff| {err:.1e}) |", flush=True)
    launch_decode.SHORT_CACHE_TILE_N = 64
