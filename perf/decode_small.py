"""Small decode shapes (issue #4's latency-bound corner): split count and merge variants, kernel
time against a copy of the same bytes, and where the host time of a call goes.

    python perf/decode_small.py [--out DIR] [--no-host]
    python perf/decode_small.py --ab [--rounds N] [--variants a,b,...] [--factors F ...]

--ab: the kernel variants of VARIANTS (launcher tuning, split counts, a preallocated workspace
with the merge's arrival counters, i.e. no zero-fill kernel in the graph), dense and skip-on at
0% sparsity (factor 1e-6), each captured once (16 calls cycling the input sets) and the graphs
replayed in alternation for --rounds rounds (reverse order on odd rounds); medians. Every variant's output is checked first.
--factors adds skip builds at those factors and switches to synthetic LLM-like inputs (the
sparsity of each is counted on the first input set). Without --variants, shapes of B * L >= 1M
run only BIG_SHAPE_VARIANTS.

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
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import blasst_cute  # noqa: E402
from blasst_cute import dispatch  # noqa: E402
from blasst_cute.kernels import launch_decode  # noqa: E402
from blasst_cute.testing import (  # noqa: E402
    capture_cycle,
    rel_err,
    round_order,
    time_graph_cycle,
    time_per_call,
)
import decode_matrix  # noqa: E402
from decode_matrix import dense_sets, n_rotations, synthetic_set  # noqa: E402

SHAPES = [  # (B, L, Hq, Hk)
    (1, 8192, 32, 8), (1, 8192, 64, 4), (1, 32768, 32, 8), (1, 32768, 64, 4),
    (8, 8192, 32, 8), (8, 8192, 64, 4), (8, 32768, 64, 4), (1, 131072, 64, 4), (1, 131072, 32, 8),
]
CALLS_PER_GRAPH = 16


REF_SEQS = 4  # sequences checked against the fp32 reference (memory at B=64 L=32k)


def paged_reference(s, B, L, hk):
    """fp32 attention of the first REF_SEQS sequences of set s as the kernel sees them: the paged
    view (its pages are shuffled across the batch, so for B > 1 it is not the contiguous k / v)."""
    nb = min(B, REF_SEQS)
    k, v = (x[s["bt"][:nb].long()].reshape(nb, L, hk, -1).float() for x in (s["kc"], s["vc"]))
    return torch.nn.functional.scaled_dot_product_attention(
        s["q"][:nb].float().transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        enable_gqa=True).transpose(1, 2)


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


AB_SHAPES = [(1, 8192, 32, 8), (1, 8192, 64, 4), (1, 32768, 32, 8), (1, 32768, 64, 4),
             (8, 8192, 64, 4), (64, 32768, 32, 8), (1, 131072, 32, 8)]
# name -> (run_decode_sm90 tuning, num_splits: None = the launcher's, or "x2" / "/2" of it,
#          preallocated workspace with arrival counters)
# The build before issue #4's small-shape work: fused merge for every q-tile, one memory round
# trip per split in the merge loops, V issued by the consumer, no programmatic dependent launch.
OLD = dict(producer_v=False, pipelined_merge=False, fused_merge=True, use_pdl=False)
VARIANTS = {
    "old": (OLD, None, False),
    "old ws": (OLD, None, True),
    "old combine": (dict(OLD, fused_merge=False), None, False),
    "fused pm": (dict(OLD, pipelined_merge=True), None, False),
    "fused pm ws": (dict(OLD, pipelined_merge=True), None, True),
    "fused pm pdl": (dict(OLD, pipelined_merge=True, use_pdl=True), None, False),
    "combine pm": (dict(OLD, pipelined_merge=True, fused_merge=False), None, False),
    "combine pm pdl": (dict(OLD, pipelined_merge=True, fused_merge=False, use_pdl=True), None,
                       False),
    "pv pm": (dict(OLD, pipelined_merge=True, producer_v=True), None, False),
    "pm splits x2": (dict(OLD, pipelined_merge=True), "x2", False),
    "pm splits /2": (dict(OLD, pipelined_merge=True), "/2", False),
    "pm tile64": (dict(OLD, pipelined_merge=True, tile_n=64), None, False),
    "new": (None, None, False),  # the launcher's defaults
    "new ws": (None, None, True),
    "new pv": (dict(producer_v=True), None, False),
    "new nopdl": (dict(use_pdl=False), None, False),  # no programmatic dependent launch
    "new nospec": (dict(speculate_pages=False), None, False),  # page ids read after the length
    # ring depths (K, V/P stages); the launcher's: (3, 2) dense, (2, 3) skip (head dim 128)
    "new k2 v3": (dict(num_k_stages=2, num_v_stages=3), None, False),
    "new k3 v2": (dict(num_k_stages=3, num_v_stages=2), None, False),
    # 64-key tiles (the short-cache default) with a V/P ring that holds a 4-tile split's V loads
    # (these depths fit 64-key tiles only: use them on shapes the launcher gives 64-key tiles)
    "new k4 v5": (dict(num_k_stages=4, num_v_stages=5), None, False),
    "new k6 v4": (dict(num_k_stages=6, num_v_stages=4), None, False),
    "new tile64": (dict(tile_n=64), None, False),  # 64-key tiles: deeper rings, more splits
    "new tile128": (dict(tile_n=128), None, False),  # 128-key tiles at every cache length
    # the first 0 / 1 (the default) / 2 / 4 key tiles of each split prefetched into L2 before
    # griddepcontrol.wait (launches with programmatic dependent launch only)
    "new nol2pf": (dict(l2_prefetch_tiles=0), None, False),
    "new l2pf1": (dict(l2_prefetch_tiles=1), None, False),
    "new l2pf2": (dict(l2_prefetch_tiles=2), None, False),
    "new l2pf4": (dict(l2_prefetch_tiles=4), None, False),
    "new splits x2": (None, "x2", False),
    "new splits /2": (None, "/2", False),
}
BIG_SHAPE_VARIANTS = ("old", "new")  # B * L >= 1M: the regression check only


def shape_setup(B, L, hq, hk, synthetic=False):
    """Per shape: the input sets and their K+V bytes, the fp32 reference of set 0, the time of a
    copy of the same bytes, and one out / lse buffer per set. synthetic: LLM-like inputs
    (decode_matrix.synthetic_set, one seed per set) instead of random ones, for sparse builds."""
    if synthetic:
        kv_bytes = 2 * B * L * hk * 128 * 2
        sets = [synthetic_set(B, L, hq, hk, seed=7 + i) for i in range(n_rotations(kv_bytes))]
    else:
        sets, kv_bytes = dense_sets(B, L, hq, hk)
    ref = paged_reference(sets[0], B, L, hk)
    cu = copy_us(kv_bytes, len(sets))
    outs = [torch.empty_like(s["q"]) for s in sets]
    lses = [torch.empty(B, hq, 1, dtype=torch.float32, device="cuda") for _ in sets]
    return sets, kv_bytes, ref, cu, outs, lses


def ab_main(args, log):
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else AB_SHAPES
    log(f"Interleaved A/B, {args.rounds} rounds, kernel us = median of the rounds' graph replays "
        f"({CALLS_PER_GRAPH} calls per graph, input sets cycled past the L2), page size "
        f"{decode_matrix.PAGE}")
    log("")
    builds = [("dense", None), ("skip0", 1e-6)]
    builds += [(f"skip f={f:g}", f) for f in args.factors]
    if args.factors:
        log("Inputs: synthetic LLM-like sets (perf/decode_matrix.synthetic_set); sparsity = share "
            "of key tiles skipped in set 0 (the kernel's counters).")
    log("| B | L | Hq/Hk | build | variant | splits | kernel us | K+V GB/s | copy same bytes us | "
        "vs first variant | rel err |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for B, L, hq, hk in shapes:
        sets, kv_bytes, ref, cu, outs, lses = shape_setup(B, L, hq, hk, bool(args.factors))
        entries = []
        shape_names = names
        if not args.variants and B * L >= 1 << 20:
            shape_names = [n for n in names if n in BIG_SHAPE_VARIANTS]
        for build, factor in builds:
            for name in shape_names:
                tuning, split_rule, use_ws = VARIANTS[name]
                s0 = sets[0]
                tn = (tuning or {}).get("tile_n")
                geo = launch_decode.plan_decode_sm90(s0["q"], s0["kc"], s0["bt"], None, tn)
                S = geo["num_splits"]
                if split_rule == "x2":
                    S = min(2 * S, max(1, L // (tn or 128)))
                elif split_rule == "/2":
                    S = max(1, S // 2)
                if split_rule is not None and S == geo["num_splits"]:
                    continue
                ns = S if split_rule is not None else None
                ws = [None] * len(sets)
                if use_ws and S > 1:
                    m_blocks = -(-(hq // hk) // 64)
                    ws = [(torch.empty(S, B, 1, hq, 128, dtype=torch.float32, device="cuda"),
                           torch.empty(S, B, hq, 1, dtype=torch.float32, device="cuda"),
                           torch.zeros(B * hk * m_blocks, dtype=torch.int32, device="cuda"))
                          for _ in sets]

                def call(i, tuning=tuning, ns=ns, ws=ws, factor=factor):
                    s = sets[i]
                    return launch_decode.run_decode_sm90(
                        s["q"], s["kc"], s["vc"], outs[i], lses[i], cache_seqlens=s["lens"],
                        block_table=s["bt"], threshold_scale_factor=factor, num_splits=ns,
                        workspace=ws[i], tuning=tuning)
                try:
                    outs[0].fill_(float("nan"))
                    g = call(0)
                    torch.cuda.synchronize()
                    err = rel_err(outs[0][:REF_SEQS].float(), ref)
                    if factor:  # the sparsity of set 0 (one more call, with counters)
                        s = sets[0]
                        cnt = [torch.zeros(B, hk, dtype=torch.int32, device="cuda")
                               for _ in range(3)]
                        launch_decode.run_decode_sm90(
                            s["q"], s["kc"], s["vc"], outs[0], lses[0], cache_seqlens=s["lens"],
                            block_table=s["bt"], threshold_scale_factor=factor, num_splits=ns,
                            visited=cnt[0], skipped=cnt[1], v_loaded=cnt[2], tuning=tuning)
                        build_s = f"{build} ({int(cnt[1].sum()) / int(cnt[0].sum()):.1%})"
                    else:
                        build_s = build
                    graph = capture_cycle([lambda i=i: call(i) for i in range(len(sets))],
                                          CALLS_PER_GRAPH)
                    if args.check_replay:  # replay once now: a fault is pinned to this variant
                        print(f"replay check {build} {name} ...", flush=True)
                        for o in outs:
                            o.fill_(float("nan"))
                        graph.replay()
                        torch.cuda.synchronize()
                        bad = [i for i, o in enumerate(outs) if not torch.isfinite(o).all()]
                        print(f"replay check {build} {name} ok, sets with non-finite out: {bad}",
                              flush=True)
                    # the graph uses ws: keep it alive as long as the graph
                    entries.append(dict(build=build_s, name=name, splits=g["num_splits"], err=err,
                                        graph=graph, times=[], ws=ws))
                except Exception as e:  # noqa: BLE001
                    log(f"| {B} | {L} | {hq}/{hk} | {build} | {name} | ERROR {type(e).__name__}: "
                        f"{str(e)[:150]} |")
        for r in range(args.rounds):
            for e in round_order(entries, r):
                e["times"].append(time_per_call(e["graph"].replay, 10, warmup=1)
                                  / CALLS_PER_GRAPH * 1e6)
        first = {}
        for e in entries:
            us = statistics.median(e["times"])
            first.setdefault(e["build"], us)
            rows.append(dict(B=B, L=L, hq=hq, hk=hk, build=e["build"], variant=e["name"],
                             splits=e["splits"], kernel_us=us, rounds=e["times"], copy_us=cu,
                             err=e["err"]))
            log(f"| {B} | {L} | {hq}/{hk} | {e['build']} | {e['name']} | {e['splits']} | {us:.1f} | "
                f"{kv_bytes / (us * 1e-6) / 1e9:.0f} | {cu:.1f} | {first[e['build']] / us:.3f}x | "
                f"{e['err']:.1e} |")
            e["graph"] = e["ws"] = None
        sets = None
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-host", action="store_true")
    ap.add_argument("--ab", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default=None)
    ap.add_argument("--check-replay", action="store_true")
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--factors", type=float, nargs="*", default=[],
                    help="--ab: also time skip builds at these factors, on synthetic inputs")
    ap.add_argument("--page-size", type=int, default=decode_matrix.PAGE,
                    help="page size of the paged caches (default %(default)s)")
    args = ap.parse_args()
    decode_matrix.PAGE = args.page_size  # read by dense_sets / synthetic_set
    dev = torch.cuda.get_device_name()
    lines = [f"# decode small shapes — {dev} — {time.strftime('%Y-%m-%dT%H:%M:%S')}", ""]

    def log(m=""):
        print(m, flush=True)
        lines.append(m)

    if args.ab:
        rows = ab_main(args, log)
        with open(os.path.join(args.out, "decode_small_ab.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "decode_small_ab.json"), "w") as f:
            json.dump(dict(device=dev, rows=rows), f, indent=1)
        return
    log("| B | L | Hq/Hk | variant | splits | kernel us | K+V GB/s | copy same bytes us | kernel/copy | rel err |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for B, L, hq, hk in SHAPES:
        sets, kv_bytes, ref, cu, outs, lses = shape_setup(B, L, hq, hk)
        s0, variants = variants_for(B, L, hq, hk)
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
                err = rel_err(outs[0][:REF_SEQS].float(), ref)
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
