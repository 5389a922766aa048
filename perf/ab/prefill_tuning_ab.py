"""Interleaved A/B of prefill kernel knobs given as launcher tuning (GPU host), any head dims,
e.g. MLA prefill (q/k 192, v 128):

    python perf/ab/prefill_tuning_ab.py --head-dim 192 --head-dim-v 128 --heads 32 \
        --seqlens 8192 16384 --factors 1e-30 100 1000 5000 \
        --variants base "la4:lookahead_after_skips=4" "ovl:vote_thread_max=overlap"

Per shape (B = --tokens / L, MHA, causal unless --non-causal, synthetic_qkv, bf16): the dense
build once, then every variant at every factor (1e-30 enables skipping but skips nothing).
Variants are NAME:knob=value,... of ``launch.run_prefill_sm90(tuning=...)`` (values: int, float,
True/False, or a string); "base" is the launcher's defaults. Rounds run the variants in
alternating order; the table gives median ms over rounds and the speed against the first
variant and against the dense build. Outputs of every variant at a factor must equal the first
variant's bit for bit (the knobs keep the decisions and the arithmetic). Writes $OUT/prefill-tuning-ab.log.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from blasst_cute.kernels import launch  # noqa: E402
from blasst_cute.testing import round_order, tee_log  # noqa: E402
from blasst_cute.workloads import synthetic_qkv  # noqa: E402
from prefill_ab import time_ms  # noqa: E402

OUT = os.environ.get("OUT", ".")
log = tee_log(os.path.join(OUT, "prefill-tuning-ab.log"))


def parse_value(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def parse_variant(text):
    name, _, assigns = text.partition(":")
    knobs = {}
    for a in filter(None, assigns.split(",")):
        k, _, v = a.partition("=")
        knobs[k] = parse_value(v)
    return name, knobs or None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--head-dim-v", type=int, default=None)
    ap.add_argument("--heads", type=int, default=32, help="q heads (MHA unless --heads-kv)")
    ap.add_argument("--heads-kv", type=int, default=None)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--non-causal", action="store_true")
    ap.add_argument("--factors", type=float, nargs="+", default=[1e-30, 100.0, 1000.0, 5000.0])
    ap.add_argument("--variants", nargs="+", default=["base"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    D, Dv = args.head_dim, args.head_dim_v or args.head_dim
    H, Hk = args.heads, args.heads_kv or args.heads
    causal = not args.non_causal
    variants = [parse_variant(v) for v in args.variants]
    log(f"card: {torch.cuda.get_device_name()}; D={D} Dv={Dv} H={H}/{Hk} causal={causal}; "
        f"variants {variants}")
    log("| B | L | factor | P·V skipped | variant | ms | vs first | vs dense |")
    log("|---|---|---|---|---|---|---|---|")
    all_same = True
    for L in args.seqlens:
        B = max(1, args.tokens // L)
        q, k, v = synthetic_qkv(B, L, L, H, Hk, D, Dv, dtype=torch.bfloat16, device="cuda", seed=0)
        out = torch.empty(B, L, H, Dv, dtype=q.dtype, device="cuda")
        lse = torch.empty(B, H, L, device="cuda")
        sc = D ** -0.5

        def run(factor, tuning, counts=None):
            kw = {}
            if counts is not None:
                kw = dict(visited=counts[0], skipped=counts[1], pv_counts=counts[2:])
            launch.run_prefill_sm90(q, k, v, out, lse, causal=causal, softmax_scale=sc,
                                    threshold_scale_factor=factor, tuning=tuning, **kw)

        cases = [("dense", None, None)] + [(n, f, t) for f in args.factors for n, t in variants]
        pv_share, ref = {}, {}
        for name, f, tune in cases:
            counts = torch.zeros(4, B, H, dtype=torch.int32, device="cuda") if f else None
            out.fill_(float("nan"))
            run(f, tune, counts)
            torch.cuda.synchronize()
            if counts is not None:
                c = counts.sum((1, 2)).double().tolist()
                pv_share[f] = c[3] / max(1.0, c[2])
            if f in ref:
                same = torch.equal(ref[f], out)
                all_same &= same
                if not same:
                    log(f"  MISMATCH L={L} f={f:g} {name} vs {variants[0][0]}")
            else:
                ref[f] = out.clone()
                all_same &= bool(torch.isfinite(out).all())
        times = {c[:2]: [] for c in cases}
        for r in range(args.rounds):
            for name, f, tune in round_order(cases, r):
                run(f, tune)  # one untimed call (compiled, caches warm)
                times[(name, f)].append(time_ms(lambda: run(f, tune), [()], args.iters))
        med = {key: statistics.median(t) for key, t in times.items()}
        t_dense = med[("dense", None)]
        log(f"| {B} | {L} | dense | - | dense | {t_dense:.3f} | - | 1.000x |")
        for f in args.factors:
            t0 = med[(variants[0][0], f)]
            for name, _ in variants:
                t = med[(name, f)]
                log(f"| {B} | {L} | {f:g} | {pv_share[f] * 100:.1f}% | {name} | {t:.3f} | "
                    f"{t0 / t:.3f}x | {t_dense / t:.3f}x |")
        q = k = v = out = lse = ref = None  # free before the next shape
        torch.cuda.empty_cache()
    log(f"variants bitwise equal at each factor: {all_same}")
    return all_same


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
