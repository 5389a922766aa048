"""Prefill kernel variants side by side under Nsight Compute at locked clocks (issue #3): where the
skip build's time at 0 % skipped goes, in cycles and instructions instead of noisy wall time.

On the GPU host, from the repo root:

    python perf/diag/prefill_ncu_variants.py OUTDIR --seqlen 16384 --batch 2 \
        --variant dense:0:{} --variant skip:1e-30:{} --variant nopv:1e-30:'{"pv_skip": false, ...}'

Each --variant is NAME:FACTOR:TUNING (factor 0 = the dense build; TUNING = kernel knobs as JSON,
as launch.run_prefill_sm90 takes them). The script re-runs itself under `ncu` (clocks locked to
base, so cycles do not move with the power cap), profiles one launch per variant after a warm-up,
checks each variant's output bits against the first variant's, and prints one row per variant:
duration, SM cycles, instructions per consumer warp per key tile, tensor-pipe use, and (with
--stats) the share of key tiles skipped. The raw CSV is kept in OUTDIR.
"""

import argparse
import math
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

# duration (ns), SM cycles, instructions, tensor-pipe use
METRICS = (
    "gpu__time_duration.sum",
    "sm__cycles_elapsed.max",
    "smsp__inst_executed.sum",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads-q", type=int, default=32)
    p.add_argument("--heads-kv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--stats", action="store_true",
                   help="also count skipped tiles (one more compile per skip variant)")
    p.add_argument("--extra-metrics", default="",
                   help="more ncu metrics (comma-separated), printed as extra columns")
    return parse(p, argv)


def run_target(a):
    """The profiled process: one warm-up and one profiled launch per variant, in the given order."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    from blasst_cute.kernels import launch
    from blasst_cute.workloads import synthetic_qkv

    q, k, v = synthetic_qkv(a.batch, a.seqlen, a.seqlen, a.heads_q, a.heads_kv, a.head_dim,
                            device="cuda")
    base = None
    for name, factor, tuning in a.variants:
        out = torch.full_like(q, float("nan"))
        lse = torch.empty(a.batch, a.heads_q, a.seqlen, device="cuda")
        kw = dict(causal=a.causal, softmax_scale=a.head_dim ** -0.5,
                  threshold_scale_factor=factor or None, tuning=tuning)
        vis = torch.zeros(a.batch, a.heads_q, dtype=torch.int32, device="cuda")
        skp = torch.zeros_like(vis)
        sparsity = "-"
        if factor and a.stats:  # a stats build of the same knobs counts the skipped tiles
            launch.run_prefill_sm90(q, k, v, out, lse, visited=vis, skipped=skp, **kw)
            sparsity = f"{float(skp.sum()) / max(1.0, float(vis.sum())):.4f}"
        for _ in range(2):
            launch.run_prefill_sm90(q, k, v, out, lse, **kw)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        launch.run_prefill_sm90(q, k, v, out, lse, **kw)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        same = "-" if base is None else str(bool(torch.equal(out, base)))
        if base is None:
            base = out.clone()
        print(f"VARIANT {name} sparsity={sparsity} bits_equal_first={same}", flush=True)


def tiles_per_consumer_warp(a, tile_m: int, tile_n: int, warps: int) -> float:
    """Key tiles visited, summed over consumer warps (for instructions per warp per tile)."""
    m_blocks = math.ceil(a.seqlen / tile_m)
    n_blocks = math.ceil(a.seqlen / tile_n)
    if a.causal:  # bottom-right causal, Lq == Lk: q-tile i sees tiles 0 .. ceil((i+1)*tile_m/tile_n)-1
        tiles = sum(min(n_blocks, math.ceil(min(a.seqlen, (i + 1) * tile_m) / tile_n))
                    for i in range(m_blocks))
    else:
        tiles = m_blocks * n_blocks
    return tiles * a.batch * a.heads_q * warps


def main():
    a = parse_args()
    run(a, __file__, "ncu-variants", metric_names(a), run_target, report)


def metric_names(a) -> list:
    return [*METRICS, *(m for m in a.extra_metrics.split(",") if m)]


def report(a, raw: str, log: str):
    """The table, from ncu's CSV and the target's VARIANT lines."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    from blasst_cute.dispatch import prefill_geometry

    info = variant_lines(log)
    values, _ = read_metrics(raw, metric_names(a))  # launch id -> metric -> value
    ids = sorted(values)
    if len(ids) != len(a.variants) or len(info) != len(a.variants):
        sys.exit(f"expected {len(a.variants)} variants, found {len(ids)} launches and "
                 f"{len(info)} VARIANT lines")
    g = prefill_geometry(a.head_dim, a.head_dim, a.causal, torch.bfloat16)
    # every warp's instructions (producer and epilogue included) over the consumer warps' tiles
    per_warp_tiles = tiles_per_consumer_warp(a, g.block_m, g.block_n, g.block_m // 16)
    first = values[ids[0]]
    print(f"seqlen {a.seqlen} batch {a.batch} heads {a.heads_q}/{a.heads_kv} hdim {a.head_dim} "
          f"{'causal' if a.causal else 'non-causal'}; ncu, clocks locked to base")
    more = metric_names(a)[len(METRICS):]
    print("| variant | skipped | bits = first | us | Mcycles | cycles / first | instr / warp / tile "
          "| tensor % |" + "".join(f" {x} |" for x in more))
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(more))
    for (name, _, _), i, extra in zip(a.variants, ids, info):
        m = values[i]
        ipt = m["smsp__inst_executed.sum"] / per_warp_tiles
        print(f"| {name} | {extra['sparsity']} | {extra['bits_equal_first']} | "
              f"{m['gpu__time_duration.sum'] / 1e3:.0f} | "  # ns -> us
              f"{m['sm__cycles_elapsed.max'] / 1e6:.3f} | "
              f"{m['sm__cycles_elapsed.max'] / first['sm__cycles_elapsed.max']:.4f} | {ipt:.1f} | "
              f"{m[METRICS[3]]:.1f} |" + "".join(f" {m[x]:.2f} |" for x in more))


if __name__ == "__main__":
    main()
