"""GQA decode (issue #4): does a batch of different sequences lose the skip gain? CPU only.

    python perf/diag/decode_mixed_model.py [--batch 64] [--seqlen 32768] [--heads-q 32]
        [--heads-kv 8] [--sequences 16] [--skip-cost 0.5] [--splits S]

The reference's decisions (the kernel's geometry, blasst_cute.launch_decode) give the kept key
tiles of every CTA (sequence x kv head x split) for one synthetic sequence repeated over the
batch and for --sequences different ones (seeds 7, 8, ...), with the factor bisected to 70 %
tile sparsity over the batch. A CTA costs n_tiles * skip_cost + kept * (1 - skip_cost) + 0.02
(in kept-tile units; a skipped tile reads K but not V), and CTAs are list-scheduled on 132 SMs
(one per SM). For a bandwidth-bound kernel this is pessimistic: the SMs share DRAM, so a CTA
that skips more leaves bandwidth to the others. So read the two rows against each other, not
as speedups. Measured on an H100 (perf/results/decode-h100-mixed.md), different sequences cost
nothing at B=64 L=32k for 32/8 and 64/4 alike, where the model predicts a loss for 64/4 (1.21x
against 1.43x): it misjudges this kernel's balance as well. --splits S forces S splits
(default: the launcher's count); speedups are then also given against the launcher's dense
time ("vs launcher dense").
"""

import argparse
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

from blasst_cute import reference  # noqa: E402
from blasst_cute.kernels.launch_decode import decode_geometry_sm90  # noqa: E402
from blasst_cute.workloads import synthetic_qkv  # noqa: E402
from mla_sparse_model import makespan, per_split  # noqa: E402

D = 128


def tile_maxima(L, hq, hk, geo, seed):
    """The reference's per-tile row maxima of one sequence [1, hk, q-tiles, groups, rows, tiles]."""
    q, k, _ = synthetic_qkv(1, 1, L, hq, hk, D, device="cpu", seed=seed)
    qu, ku, _, row_pos = reference._units(q, k, None, True)
    for _, _, s, m_tile, n_visit, row_valid, grp_valid in reference._score_chunks(
            qu, ku, row_pos, 1, True, D ** -0.5, geo["block_m"], geo["block_n"],
            geo["rows_per_decision"]):
        del s
        return m_tile, n_visit, row_valid, grp_valid
    raise AssertionError("no q-tile")


def kept_per_cta(maxima, L, factor, geo):
    """Kept tiles per (kv head, split) of one sequence, and its (skipped, visited) tiles."""
    m_tile, n_visit, row_valid, grp_valid = maxima
    S = geo["num_splits"]
    kept, vis, skp, _ = reference._decide(
        m_tile, n_visit, row_valid, grp_valid, reference.log_threshold(factor, torch.tensor([L])),
        geo["order"], S, geo["split_tiles"], geo["interleave_splits"])
    per, tiles = per_split(kept[0, :, 0, 0], geo)  # [kv heads, key tiles] (one q-tile, group)
    return per, tiles, (float(skp.sum()), float(vis.sum()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=32768)
    ap.add_argument("--heads-q", type=int, default=32)
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--skip-cost", type=float, default=0.5, help="a skipped tile / a kept one")
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--splits", type=int, default=None, help="force this split count")
    a = ap.parse_args()
    B, L, hq, hk = a.batch, a.seqlen, a.heads_q, a.heads_kv
    geo = decode_geometry_sm90(hq // hk, 1, 64, B, hk, L, 132)
    # the launcher's dense time (its split count; a CTA's cost is its tiles + 0.02)
    launcher_dense = makespan([-(-L // geo["block_n"]) / geo["num_splits"] + 0.02]
                              * (B * hk * geo["num_splits"]), 132)
    if a.splits:
        geo["num_splits"] = a.splits
    seqs = [tile_maxima(L, hq, hk, geo, 7 + b) for b in range(min(B, a.sequences))]
    print(f"B={B} L={L} {hq}/{hk}: {geo['num_splits']} split(s), {geo['block_n']}-key tiles")
    print("| sequences | factor | sparsity | slowest CTA keeps | model speedup | if even "
          "| vs launcher dense |")
    print("|---|---|---|---|---|---|---|")
    for n_seq in sorted({1, len(seqs)}):
        lo, hi = 1.0, float(L)
        for _ in range(22):  # sparsity grows with the factor below lambda = 1
            f = math.sqrt(lo * hi)
            res = [kept_per_cta(m, L, f, geo) for m in seqs[:n_seq]]
            sp = sum(r[2][0] for r in res) / sum(r[2][1] for r in res)
            lo, hi = (f, hi) if sp < a.target else (lo, f)
        c, dt = a.skip_cost, 1.0 - a.skip_cost
        dense, times, worst = [], [], 0.0
        for b in range(B):
            per, tiles, _ = res[b % n_seq]
            n = tiles[None, :].expand_as(per).to(torch.float64)
            worst = max(worst, float((per / n).max()))
            dense += (n.flatten() + 0.02).tolist()
            times += (n.flatten() * c + per.flatten() * dt + 0.02).tolist()
        t_dense = makespan(dense, 132)
        label = "one, repeated" if n_seq == 1 else f"{n_seq} different"
        t_skip = makespan(times, 132)
        print(f"| {label} | {f:.4g} | {sp * 100:.1f}% | {worst * 100:.0f}% | "
              f"{t_dense / t_skip:.2f}x | {sum(dense) / sum(times):.2f}x | "
              f"{launcher_dense / t_skip:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
