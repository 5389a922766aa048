"""Small decode shapes (issue #4's latency-bound corner): split count and merge variants, kernel
time against a copy of the same bytes, and where the host time of a call goes.

    python perf/decode_small.py [--out DIR] [--no-host]

Kernel time = CUDA-graph replay of many back-to-back calls, cycling through input sets larger
than the L2 together (so K/V come from DRAM), divided by the number of calls: the launch gap is
amortized, the kernel's ramp-up and merge tail are not. The reference "copy" moves the same
number of DRAM bytes (a device copy of half the K+V bytes: read half, write half), timed the
same way. Every variant's output is checked against the dense float32 attention first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import blasst_cute  # noqa: E402
from blasst_cute import dispatch  # noqa: E402
from blasst_cute.kernels import launch_decode  # noqa: E402
from blasst_cute.testing import rel_err, time_graph_cycle  # noqa: E402
from decode_matrix import dense_sets  # noqa: E402

SHAPES = [  # (B, L, Hq, Hk)
    (1, 8192, 32, 8), (1, 8192, 64, 4), (1, 32768, 32, 8), (1, 32768, 64, 4),
    (8, 8192, 32, 8), (8, 8192, 64, 4), (8, 32768, 64, 4), (1, 131072, 64, 4), (1, 131072, 32, 8),
]
CALLS_PER_GRAPH = 16


def graph_us(fns):
    return time_graph_cycle(fns, CALLS_PER_GRAPH) * 1e6


def copy_us(nbytes, n_sets):
    srcs = [torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda") for _ in range(n_sets)]
    dsts = [torch.empty_like(x) for x in srcs]
    return graph_us([lambda a=a, b=b: b.copy_(a) for a, b in zip(srcs, dsts)])


def variants_for(B, L, hq, hk):
    geo = launch_decode.decode_geometry_sm90(hq // hk, 1, 64, B, hk, L, torch.cuda.get_device_properties(0).multi_processor_count)
    s0 = geo["num_splits"]
    units = B * hk
    out = [("default", dict(num_splits=None, tuning=None))]
    if s0 > 1:
        out.append(("combine kernel", dict(num_splits=None, tuning={"fused_merge": False})))
    n_tiles = L // 128
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for s in sorted({min(n_tiles, sms // units), min(n_tiles, 2 * sms // units), max(1, s0 // 2)}):
        if s >= 1 and s != s0:
            out.append((f"splits={s}", dict(num_splits=s, tuning=None)))
    return s0, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-host", action="store_true")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    lines = [f"# decode small shapes — {dev} — {time.strftime('%Y-%m-%dT%H:%M:%S')}", ""]

    def log(m=""):
        print(m, flush=True)
        lines.append(m)

    log("| B | L | Hq/Hk | variant | splits | kernel us | K+V GB/s | copy same bytes us | kernel/copy | rel err |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for B, L, hq, hk in SHAPES:
        sets, kv_bytes = dense_sets(B, L, hq, hk)
        ref = torch.nn.functional.scaled_dot_product_attention(
            sets[0]["q"].float().transpose(1, 2), sets[0]["k"].float().transpose(1, 2),
            sets[0]["v"].float().transpose(1, 2), enable_gqa=True).transpose(1, 2)
        cu = copy_us(kv_bytes, len(sets))
        s0, variants = variants_for(B, L, hq, hk)
        outs = [torch.empty_like(s["q"]) for s in sets]
        lses = [torch.empty(B, hq, 1, dtype=torch.float32, device="cuda") for _ in sets]
        for name, kw in variants:
            try:
                def call(i, kw=kw):
                    s = sets[i]
                    launch_decode.run_decode_sm90(s["q"], s["kc"], s["vc"], outs[i], lses[i],
                                                  cache_seqlens=s["lens"], block_table=s["bt"], **kw)
                outs[0].fill_(float("nan"))
                geo = launch_decode.run_decode_sm90(sets[0]["q"], sets[0]["kc"], sets[0]["vc"], outs[0],
                                                    lses[0], cache_seqlens=sets[0]["lens"],
                                                    block_table=sets[0]["bt"], **kw)
                torch.cuda.synchronize()
                err = rel_err(outs[0].float(), ref)
                us = graph_us([lambda i=i: call(i) for i in range(len(sets))])
                gbps = kv_bytes / (us * 1e-6) / 1e9
                rows.append(dict(B=B, L=L, hq=hq, hk=hk, variant=name, splits=geo["num_splits"],
                                 kernel_us=us, copy_us=cu, err=err))
                log(f"| {B} | {L} | {hq}/{hk} | {name} | {geo['num_splits']} | {us:.1f} | {gbps:.0f} | "
                    f"{cu:.1f} | {cu / us:.2f} | {err:.1e} |")
            except Exception as e:  # noqa: BLE001
                log(f"| {B} | {L} | {hq}/{hk} | {name} | ERROR {type(e).__name__}: {str(e)[:150]} |")
        sets = None
        torch.cuda.empty_cache()

    if not args.no_host:
        log("")
        log("## Host time per call (B=1 L=1024 32/8, page 64; CPU time of 2000 back-to-back calls)")
        sets, _ = dense_sets(1, 1024, 32, 8)
        s = sets[0]
        q, kc, vc, lens, bt = s["q"], s["kc"], s["vc"], s["lens"], s["bt"]
        out = torch.empty_like(q)
        lse = torch.empty(1, 32, 1, dtype=torch.float32, device="cuda")
        blasst_cute.set_content_checks(False)
        dcall = dispatch.DecodeCall(q=q, k_cache=kc, v_cache=vc, cache_seqlens=lens, block_table=bt,
                                   softmax_scale=None, threshold_scale_factor=None, want_stats=False,
                                   want_lse=False, signature=None)
        cands = {
            "blasst_cute.decode": lambda: blasst_cute.decode(q, kc, vc, cache_seqlens=lens, block_table=bt),
            "blasst_cute.decode f=100": lambda: blasst_cute.decode(q, kc, vc, cache_seqlens=lens, block_table=bt,
                                                                  threshold_scale_factor=100.0),
            "dispatch.run_decode": lambda: dispatch.run_decode(dcall, "auto"),
            "launch_decode.decode_sm90": lambda: launch_decode.decode_sm90(q, kc, vc, cache_seqlens=lens,
                                                                           block_table=bt, want_lse=False),
            "run_decode_sm90 (prealloc)": lambda: launch_decode.run_decode_sm90(
                q, kc, vc, out, lse, cache_seqlens=lens, block_table=bt),
            "torch.empty out": lambda: torch.empty((1, 1, 32, 128), dtype=torch.bfloat16, device="cuda"),
            "torch add (1 kernel)": lambda: torch.add(lens, 1),
        }
        for name, fn in cands.items():
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            best = None
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(2000):
                    fn()
                t = (time.perf_counter() - t0) / 2000 * 1e6
                torch.cuda.synchronize()
                best = t if best is None else min(best, t)
            log(f"- {name}: {best:.2f} us")
            rows.append(dict(host=name, us=best))

    with open(os.path.join(args.out, "decode_small.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "decode_small.json"), "w") as f:
        json.dump(dict(device=dev, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
