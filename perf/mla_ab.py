"""Interleaved A/B of MLA decode launcher switches (module attributes of
blasst_cute.kernels.launch_mla), H=128, page 64, bf16, synthetic sequences; shapes BxL or
BxLxLq (Lq_new new tokens, default 1).

    python perf/mla_ab.py --variants "pdl:USE_PDL=1" "no-pdl:USE_PDL=0" --shapes 1x4096 1x32768

Per shape and variant: dense and the grid factor nearest --target sparsity (by the kernel's own
counters), each timed as (a) a CUDA graph holding one call (kernel + combine), replayed, and
(b) a graph holding --chain back-to-back calls (per call), medians over --rounds interleaved rounds.
Counters of every variant must equal the first variant's; outputs and lse bitwise, or (a
variant that sums in another order) within bf16 level: each difference is logged.
Writes $OUT/mla-ab.log.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))

import gpu_mla_decode_smoke as smoke  # noqa: E402
from blasst_cute.kernels import launch_mla  # noqa: E402
from blasst_cute.testing import capture_graph, tee_log, time_per_call  # noqa: E402

D, DV, H = 576, 512, 128
OUT = os.environ.get("OUT", ".")
log = tee_log(os.path.join(OUT, "mla-ab.log"))


def parse_variant(text):
    name, _, assigns = text.partition(":")
    attrs = {}
    for a in filter(None, assigns.split(",")):
        k, _, v = a.partition("=")
        cur = getattr(launch_mla, k)
        attrs[k] = type(cur)(int(v)) if isinstance(cur, (bool, int)) else type(cur)(v)
    return name, attrs


def use(attrs):
    for k, v in attrs.items():
        setattr(launch_mla, k, v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--shapes", nargs="+", default=["1x4096", "1x32768", "16x4096", "64x4096"])
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chain", type=int, default=16)
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    log(f"card: {torch.cuda.get_device_name()}; variants: {variants}")
    log("| B | L | variant | point | sparsity | one call us | chained us/call | vs first (one / chained) |")
    log("|---|---|---|---|---|---|---|---|")
    scale = D ** -0.5
    grid = [30, 100, 300, 1000, 3000, 1e4, 3e4, 1e5]
    all_same = True
    for shape in args.shapes:
        B, L, lq = ([int(x) for x in shape.split("x")] + [1])[:3]
        q1, kv1 = smoke.synth(1, lq, L, H, 7)
        q = q1.expand(B, -1, -1, -1).contiguous()
        kv = kv1.expand(B, -1, -1).contiguous()
        _, kvc, bt = smoke.make_mla_cache(B, L, 64, seed=1, kv=kv)
        del q1, kv1, kv
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        o = torch.empty(B, lq, H, DV, dtype=q.dtype, device="cuda")
        lse = torch.empty(B, H, lq, device="cuda")
        S = launch_mla.plan_mla_decode_sm90(q, kvc, bt)["num_splits"]
        ws = (torch.empty(S, B, lq, H, DV, device="cuda"), torch.empty(S, B, H, lq, device="cuda"))

        def launch(attrs, factor, cnt=None):
            use(attrs)
            launch_mla.run_mla_decode_sm90(
                q, kvc, o, lse, cache_seqlens=lens, block_table=bt, softmax_scale=scale,
                threshold_scale_factor=factor, workspace=ws,
                visited=None if cnt is None else cnt[0], skipped=None if cnt is None else cnt[1])

        def counted(attrs, factor):
            cnt = [torch.zeros(B, dtype=torch.int32, device="cuda") for _ in range(2)]
            o.fill_(float("nan"))
            launch(attrs, factor, cnt)
            torch.cuda.synchronize()
            return cnt, o.clone(), lse.clone()

        base = variants[0][1]
        sp = {}
        for f in grid:
            cnt, _, _ = counted(base, f)
            sp[f] = float(cnt[1].sum()) / max(1.0, float(cnt[0].sum()))
        f_t = min(grid, key=lambda x: abs(sp[x] - args.target))
        points = [("dense", None, 0.0), (f"f={f_t:g}", f_t, sp[f_t])]
        for pname, f, _ in points:
            ref = counted(base, f)
            for vname, attrs in variants[1:]:
                got = counted(attrs, f)
                cnt_same = all(torch.equal(a, b) for a, b in zip(ref[0], got[0]))
                bits = torch.equal(ref[1], got[1]) and torch.equal(ref[2], got[2])
                d_o = (ref[1].float() - got[1].float()).abs().max().item()
                d_lse = (ref[2] - got[2]).abs().max().item()
                # another schedule may sum in another order: same decisions, outputs at bf16 level
                close = d_o < 2e-2 and d_lse < 1e-3
                all_same &= cnt_same and close and bool(torch.isfinite(got[1]).all())
                if not (cnt_same and bits):
                    log(f"  {shape} {pname} {vname} vs {variants[0][0]}: counters "
                        f"{'equal' if cnt_same else 'DIFFER'}, bits differ, max |dO| {d_o:.2e}, "
                        f"max |dlse| {d_lse:.2e}{'' if close else ' MISMATCH'}")
        one = {(v, p): capture_graph(lambda a=a, f=f: launch(a, f))
               for v, a in variants for p, f, _ in points}
        chained = {(v, p): capture_graph(lambda a=a, f=f: [launch(a, f) for _ in range(args.chain)])
                   for v, a in variants for p, f, _ in points}
        t1 = {k: [] for k in one}
        tc = {k: [] for k in one}
        for _ in range(args.rounds):
            for k in one:
                t1[k].append(time_per_call(one[k].replay, 20, warmup=2))
                tc[k].append(time_per_call(chained[k].replay, 5, warmup=1) / args.chain)
        med = lambda x: sorted(x)[len(x) // 2]  # noqa: E731
        for v, _ in variants:
            for p, _, s_ in points:
                a, c = med(t1[(v, p)]), med(tc[(v, p)])
                a0, c0 = med(t1[(variants[0][0], p)]), med(tc[(variants[0][0], p)])
                log(f"| {B} | {L}{'' if lq == 1 else f' (Lq {lq})'} | {v} | {p} | {s_ * 100:.1f}% | {a * 1e6:.1f} | {c * 1e6:.1f} | "
                    f"{a0 / a:.2f}x / {c0 / c:.2f}x |")
        one = chained = None
        torch.cuda.empty_cache()
    log(f"variants agree (counters equal, outputs within bf16 level): {all_same}")
    return all_same


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
