"""Sparse decode with one sequence repeated over the batch against different sequences.

    python perf/decode_mixed.py [--shapes 64,32768,32,8 ...] [--mixed 16] [--targets 0.7 0.9]
        [--splits 0,2,3]

The benchmarks (perf/decode_matrix.py, tests/kernels/gpu_mla_decode_smoke.py) repeat one
synthetic sequence over the batch, so every CTA skips the same tiles. In a real batch each
sequence skips its own share, and a launch lasts as long as its slowest CTAs. For each shape this
times (CUDA-graph replays) dense and the skip build at the factors closest to each target tile
sparsity (over the whole batch), once with the repeated sequence and once with --mixed different
ones, and prints the speedups over the same workload's dense time. A workload's variants are
timed in alternation (--rounds rounds, reversed on odd ones; median): timed one after the
other, the first dense time after building the inputs read up to 18 % slow on an H100.
--splits times several split counts (0 = the launcher's): "vs dense" is then against the first
count's dense time, "vs fastest dense" against the fastest count's, and the factors are picked
per split count (a split restarts the running max, so it skips less at a given factor).
--peers adds the dense peers of perf/decode_matrix.py to the alternation ("vs best peer": the
fastest peer's time over each row's).
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
from blasst_cute.testing import alternated_medians, capture_graph  # noqa: E402

GRID = [round(10 ** (k / 6), 3) for k in range(34)]  # 1 .. ~4.6e5, 6 points a decade


def split_fns(s, num_splits):
    """(call(factor), sparsity(factor)) for the decode launcher at num_splits (None: its own)."""
    out = torch.empty_like(s["q"])
    B, lq, hq, _ = s["q"].shape
    lse = torch.empty(B, hq, lq, dtype=torch.float32, device="cuda")
    hk = s["kc"].shape[2]

    def run(factor, counters=(None, None, None)):
        return launch_decode.run_decode_sm90(
            s["q"], s["kc"], s["vc"], out, lse, cache_seqlens=s["lens"], block_table=s["bt"],
            threshold_scale_factor=factor, num_splits=num_splits, visited=counters[0],
            skipped=counters[1], v_loaded=counters[2])

    def sparsity(factor):
        cnt = [torch.zeros(B, hk, dtype=torch.int32, device="cuda") for _ in range(3)]
        run(factor, cnt)
        return int(cnt[1].sum()) / max(1, int(cnt[0].sum()))

    return (lambda factor: (lambda: run(factor))), sparsity


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["64,32768,32,8"], help="B,L,Hq,Hk")
    ap.add_argument("--mixed", type=int, default=16, help="different sequences in the batch")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.9])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peers", action="store_true",
                    help="also time the dense peers (torch SDPA cuDNN / flash on the contiguous "
                         "cache, FA4 where it imports), captured and alternated the same way")
    ap.add_argument("--splits", default="0",
                    help="split counts, comma-separated (0 = the launcher's); ratios are against "
                         "the first one's dense time")
    args = ap.parse_args()
    split_counts = [int(x) or None for x in args.splits.split(",")]
    print(f"card: {torch.cuda.get_device_name()}")
    print("| B | L | Hq/Hk | sequences | splits | variant | sparsity | time us | vs dense "
          "| vs fastest dense | vs best peer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        B, L, hq, hk = (int(x) for x in shape.split(","))
        for mixed in (1, args.mixed):
            s = dm.synthetic_set(B, L, hq, hk, mixed=mixed)
            label = "one, repeated" if mixed == 1 else f"{min(mixed, B)} different"
            variants = []  # (splits, name, sparsity, graph); timed in alternation below
            for name, peer in (dm.peers() if args.peers else {}).items():
                try:
                    variants.append((None, name, None, capture_graph(lambda p=peer: p(s))))
                except Exception as e:  # noqa: BLE001
                    print(f"({name}: not captured: {type(e).__name__}: {str(e)[:100]})")
                    torch.cuda.synchronize()
            for ns in split_counts:
                S = launch_decode.plan_decode_sm90(s["q"], s["kc"], s["bt"], ns)["num_splits"]
                fn, sparsity = split_fns(s, ns)
                sp = {f: sparsity(f) for f in GRID}
                variants.append((S, "dense", None, capture_graph(fn(None))))
                for f, spf in dm.target_factors(sp, GRID, tuple(args.targets)):
                    variants.append((S, f"skip f={f:.3g}", spf, capture_graph(fn(f))))
            med = [t * 1e6 for t in alternated_medians([v[3].replay for v in variants],
                                                       args.rounds)]
            ours = [m for m, v in zip(med, variants) if v[0] is not None]
            t_ref = ours[0]
            t_best = min(m for m, v in zip(med, variants) if v[1] == "dense")
            t_peer = min((m for m, v in zip(med, variants) if v[0] is None), default=None)
            for (S, name, spf, _), t in zip(variants, med):
                sp_txt = "" if spf is None else f"{spf * 100:.1f}%"
                vs_peer = f"{t_peer / t:.2f}x" if t_peer else "-"
                print(f"| {B} | {L} | {hq}/{hk} | {label} | {S or '-'} | {name} | {sp_txt} | "
                      f"{t:.1f} | {t_ref / t:.2f}x | {t_best / t:.2f}x | {vs_peer} |", flush=True)
            variants = None
            s = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
