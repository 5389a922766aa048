"""MLA decode (H=128, Lq_new=1): why a shape's sparse speedup sits where it does. CPU only.

The reference's decision scan (blasst_cute.reference, the kernel's geometry) gives the kept key
tiles of every CTA (q-tile x split) on the benchmark's workload (gpu_mla_decode_smoke.bench: one
synthetic sequence, seed 7, repeated over the batch; or --independent / --sequences N different
ones, seeds 7, 8, ..., as with its --mixed: each sequence then skips its own share and the
slowest CTAs set the time). A CTA's time is modelled as
    n_tiles * T_SKIP + kept * (T_KEEP - T_SKIP) + T_CTA
with per-tile costs measured on a GPU (defaults: H200, seventeenth-session table, B=64 L=32k:
dense 2.12 us per tile, a skipped tile ~1.36 us from the 69 % and 90 % rows). CTAs of a 2-CTA
cluster share one K ring, so a pair moves at its slower CTA; CTAs beyond the SM count queue
(greedy list schedule over the SMs). The factor is bisected to the target tile sparsity.

    python perf/diag/mla_sparse_model.py [--shapes 16x32768 64x4096 ...] [--target 0.7]
        [--splits N] [--contiguous] [--reverse]     (other split layouts than the kernel's)
        [--independent | --sequences N]   (B or N different sequences dealt over the batch)
"""

import argparse
import heapq
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from blasst_cute import reference  # noqa: E402
from blasst_cute.kernels.launch_mla import mla_cluster_m, mla_decode_geometry_sm90  # noqa: E402
from blasst_cute.workloads import synthetic_qkv  # noqa: E402

D, DV, H = 576, 512, 128


def tile_maxima(q, k, geo):
    """The reference's per-tile row maxima of one sequence (what the scan decides on)."""
    qu, ku, _, row_pos = reference._units(q, k, None, True)
    for _, _, s, m_tile, n_visit, row_valid, grp_valid in reference._score_chunks(
            qu, ku, row_pos, 1, True, D ** -0.5, geo["block_m"], geo["block_n"],
            geo["rows_per_decision"]):
        del s
        return k.shape[1], (m_tile, n_visit, row_valid, grp_valid)
    raise AssertionError("no q-tile")


def kept_per_cta(maxima, factor, geo):
    """kept [q-tiles, splits], key tiles [splits] and (skipped, visited) tiles of one sequence,
    by the reference's scan over tile_maxima's output."""
    L, (m_tile, n_visit, row_valid, grp_valid) = maxima
    S = geo["num_splits"]
    ln_lam = reference.log_threshold(factor, torch.tensor([L]))
    kept, vis, skp, _ = reference._decide(
        m_tile, n_visit, row_valid, grp_valid, ln_lam, geo["order"], S, geo["split_tiles"],
        geo["interleave_splits"])
    per, tiles = per_split(kept[0, 0, :, 0], geo)  # [q-tiles, key tiles] (one decision group)
    return per, tiles, (float(skp.sum()), float(vis.sum()))


def per_split(kept, geo):
    """Kept tiles per (row of kept, split) and key tiles per split, for kept [rows, key tiles]
    and the geometry's split layout (round-robin or contiguous chunks)."""
    S, n_kt = geo["num_splits"], kept.shape[1]
    split_of = (torch.arange(n_kt) % S if geo["interleave_splits"]
                else torch.arange(n_kt) // -(-n_kt // S))
    per = torch.zeros(kept.shape[0], S, dtype=torch.int64).index_add_(1, split_of,
                                                                      kept.to(torch.int64))
    return per, torch.bincount(split_of, minlength=S)


def makespan(times, slots):
    heap = [0.0] * slots
    for t in times:
        heapq.heappush(heap, heapq.heappop(heap) + t)
    return max(heap)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["16x32768", "64x32768", "128x32768",
                                                   "64x4096", "128x4096"])
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--t-keep", type=float, default=2.12, help="us per kept tile (dense)")
    ap.add_argument("--t-skip", type=float, default=1.36, help="us per skipped tile")
    ap.add_argument("--t-cta", type=float, default=4.0, help="us of fixed cost per CTA")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--splits", type=int, default=None, help="instead of the launcher's count")
    ap.add_argument("--contiguous", action="store_true", help="chunks instead of round-robin")
    ap.add_argument("--reverse", action="store_true", help="each split's tiles last to first")
    ap.add_argument("--independent", action="store_true",
                    help="B different sequences (seeds 7, 8, ...) instead of one repeated")
    ap.add_argument("--sequences", type=int, default=None,
                    help="N different sequences dealt over the batch (b -> b %% N)")
    args = ap.parse_args()
    print("| B | L | sequences | splits | cluster | factor | sparsity | slowest CTA kept | "
          "model dense us | model sparse us | model speedup | speedup if balanced | ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        B, L = (int(x) for x in shape.split("x"))
        geo = mla_decode_geometry_sm90(H, 1, 64, B, L, num_sms=args.sms)
        if args.splits:
            geo["num_splits"] = args.splits
        geo["interleave_splits"] &= not args.contiguous
        if args.reverse:
            geo["order"] = "reverse"
        S = geo["num_splits"]
        cm = mla_cluster_m(H, 1, True, -(-(-(-L // 64)) // S))
        n_seq = min(B, args.sequences or (B if args.independent else 1))
        seqs = []
        for b in range(n_seq):
            q, k, _ = synthetic_qkv(1, 1, L, H, 1, D, device="cpu", seed=7 + b)
            seqs.append(tile_maxima(q, k, geo))
            del q, k

        def scan(f):
            res = [kept_per_cta(m, f, geo) for m in seqs]
            return res, sum(r[2][0] for r in res) / sum(r[2][1] for r in res)

        lo, hi = 1.0, float(L)
        for _ in range(24):  # sparsity grows with the factor below lambda = 1
            f = math.sqrt(lo * hi)
            res, sp = scan(f)
            lo, hi = (f, hi) if sp < args.target else (lo, f)
        res = [res[b % n_seq] for b in range(B)]
        n_all, kept_all, worst = [], [], 0.0
        for per, tiles, _ in res:
            n = tiles[None, :].expand_as(per).to(torch.float64)
            kept = per.to(torch.float64)
            worst = max(worst, float((kept / n).max()))
            if cm == 2:  # the pair (both q-tiles) shares one ring: it moves at the slower CTA
                kept = kept.amax(0, keepdim=True)
                n = n[:1]
            n_all += n.flatten().tolist()
            kept_all += kept.flatten().tolist()
        slots = args.sms // cm
        dt = args.t_keep - args.t_skip
        dense = makespan([x * args.t_keep + args.t_cta for x in n_all], slots)
        sparse = makespan([a * args.t_skip + b * dt + args.t_cta
                           for a, b in zip(n_all, kept_all)], slots)
        even = makespan([a * args.t_skip + a * (1 - sp) * dt + args.t_cta for a in n_all], slots)
        ideal = 1.0 / (1.0 - sp * DV / (D + DV))
        kind = "one, repeated" if n_seq == 1 else f"{n_seq} different"
        print(f"| {B} | {L} | {kind} | {S} | {cm} | {f:.4g} | {sp * 100:.1f}% | "
              f"{worst * 100:.0f}% | {dense:.0f} | {sparse:.0f} | {dense / sparse:.2f}x | "
              f"{dense / even:.2f}x | {ideal:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
