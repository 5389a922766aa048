"""Decode kernel variants side by side under Nsight Compute at locked clocks (issue #4): where the
skip build's extra time at 0 % skipped goes at small shapes, kernel by kernel (the decode kernel
and the combine kernel of one call), without the launch overlap of a CUDA graph.

On the GPU host, from the repo root:

    python perf/diag/decode_ncu_variants.py OUTDIR --batch 1 --seqlen 8192 --heads-q 64 \
        --heads-kv 4 --variant dense:0:{} --variant skip0:1e-6:{} \
        --variant skip0_nopdl:1e-6:'{"use_pdl": false}'

Each --variant is NAME:FACTOR:TUNING (factor 0 = the dense build; TUNING = launch_decode's
run_decode_sm90 knobs as JSON). The script re-runs itself under `ncu --clock-control base`,
profiles one call per variant after a warm-up (paged cache, page 64, random inputs), checks
each variant's output bits against the first variant's, and prints one row per kernel launch:
duration, SM cycles (max over SMs), instructions and DRAM bytes read. The raw CSV is kept in
OUTDIR.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncu_variants_common import (  # noqa: E402
    add_common_args,
    parse,
    read_metrics,
    run,
    variant_lines,
)

METRICS = (
    "gpu__time_duration.sum",
    "sm__cycles_elapsed.max",
    "smsp__inst_executed.sum",
    "dram__bytes_read.sum",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--heads-q", type=int, default=64)
    p.add_argument("--heads-kv", type=int, default=4)
    p.add_argument("--page-size", type=int, default=64)
    return parse(p, argv)


def run_target(a):
    """The profiled process: two warm-up calls and one profiled call per variant, in order."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    from blasst_cute.kernels import launch_decode
    from blasst_cute.workloads import synthetic_qkv, to_paged

    q, k, v = synthetic_qkv(a.batch, 1, a.seqlen, a.heads_q, a.heads_kv, 128, device="cuda")
    kc, vc, bt = to_paged(k, v, a.page_size)
    lens = torch.full((a.batch,), a.seqlen, dtype=torch.int32, device="cuda")
    base = None
    for name, factor, tuning in a.variants:
        out = torch.full_like(q, float("nan"))
        lse = torch.empty(a.batch, a.heads_q, 1, dtype=torch.float32, device="cuda")

        def call():
            launch_decode.run_decode_sm90(q, kc, vc, out, lse, cache_seqlens=lens, block_table=bt,
                                          softmax_scale=128 ** -0.5,
                                          threshold_scale_factor=factor or None,
                                          tuning=tuning or None)
        for _ in range(2):
            call()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        call()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        same = "-" if base is None else str(bool(torch.equal(out, base)))
        if base is None:
            base = out.clone()
        print(f"VARIANT {name} bits_equal_first={same}", flush=True)


def main():
    a = parse_args()
    run(a, __file__, "ncu-decode-variants", METRICS, run_target, report)


def report(a, raw: str, log: str):
    """One row per profiled kernel launch, grouped by variant (launches come in variant order;
    a call is one decode launch, plus the combine kernel's unless the merge is fused)."""
    info = variant_lines(log)
    values, names = read_metrics(raw, METRICS)  # launch id -> metric -> value / kernel name
    # each call starts with its decode launch (then its combine launch, if any)
    calls = []
    for i in sorted(values):
        if "ombine" in names[i] and calls:
            calls[-1].append(i)
        else:
            calls.append([i])
    if len(info) != len(a.variants) or len(calls) != len(a.variants):
        sys.exit(f"{len(a.variants)} variants, {len(info)} VARIANT lines, {len(calls)} calls")
    print(f"batch {a.batch} seqlen {a.seqlen} heads {a.heads_q}/{a.heads_kv} page "
          f"{a.page_size}; ncu, clocks locked to base")
    print("| variant | bits = first | kernel | us | cycles (max SM) | instructions | DRAM MB read |")
    print("|---|---|---|---|---|---|---|")
    for (name, _, _), extra, launches in zip(a.variants, info, calls):
        for i in launches:
            m = values[i]
            kernel = "combine" if "ombine" in names[i] else "decode"
            print(f"| {name} | {extra['bits_equal_first']} | {kernel} | "
                  f"{m['gpu__time_duration.sum'] / 1e3:.2f} | {m['sm__cycles_elapsed.max']:.0f} | "
                  f"{m['smsp__inst_executed.sum']:.0f} | {m['dram__bytes_read.sum'] / 1e6:.2f} |")


if __name__ == "__main__":
    main()
