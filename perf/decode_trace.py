"""Where the time of a small decode launch goes: per-CTA phase timestamps of the sm90 decode
kernel (``BlasstDecodeSm90(trace=True)``, see decode.TracePoint), 16 launches in one CUDA graph
cycling input sets past the L2 (as perf/decode_small.py times them).

    python perf/decode_trace.py [--out DIR] [--shapes B,L,Hq,Hk ...]

Per shape and variant it prints, in ns from the launch's first CTA entry (medians over the
launches): the spread of CTA starts, first K landed, loop end, last PV, stores, and the end of
the launch (the last CTA done: the fused merge), the merging CTA's merge time, and the gap from
one launch's end to the next launch's first CTA (graph launch gap, fill kernels included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import cutlass  # noqa: E402
import cutlass.cute as cute  # noqa: E402
from cutlass import Float32, Int32  # noqa: E402

from blasst_cute.kernels import launch_decode  # noqa: E402
from blasst_cute.kernels.dtypes import TORCH_TO_CUTLASS  # noqa: E402
from blasst_cute.kernels.launch_common import cuda_stream, fake_ptr, make_ptr  # noqa: E402
from blasst_cute.kernels.sm90.decode import TILE_M, TRACE_SLOTS, BlasstDecodeSm90  # noqa: E402
from decode_matrix import dense_sets  # noqa: E402

CALLS = 16
SHAPES = [(1, 8192, 32, 8), (1, 8192, 64, 4), (1, 32768, 32, 8), (1, 32768, 64, 4)]


def compile_traced(variant: dict, tile_n: int = 128):
    """The traced kernel for key tiles of tile_n keys (run_shape passes the launcher's tile size
    for the shape); the rings are the kernel's defaults for that tile size."""
    k = BlasstDecodeSm90(cutlass.BFloat16, 128, page_size=64, tile_n=tile_n,
                         has_skip=variant["skip"], fused_merge=True, interleave_splits=True,
                         producer_v=variant["producer_v"],
                         pipelined_merge=variant.get("pipelined_merge", False), trace=True)
    c = dict(launch_decode._config_key(dict(dtype=torch.bfloat16, head_dim=128, page_size=64,
                                            tile_n=tile_n, has_skip=variant["skip"],
                                            fused_merge=True)))
    args = launch_decode._decode_compile_args(c, cuda_stream(0))
    return cute.compile(k.launch_ptrs, *args, fake_ptr(cutlass.Int64, 8))


def run_shape(B, L, hq, hk, variants, log):
    sets, _ = dense_sets(B, L, hq, hk)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    geo = launch_decode.decode_geometry_sm90(hq // hk, 1, 64, B, hk, L, sms)
    S = geo["num_splits"]
    G = hq // hk
    m_blocks = -(-G // TILE_M)
    n_ctas = m_blocks * S * hk * B
    bf = TORCH_TO_CUTLASS[torch.bfloat16]
    for name, var in variants:
        fn = compile_traced(var, geo["block_n"])
        name = f"{name} (tile {geo['block_n']})"
        trace = torch.zeros(CALLS, n_ctas, TRACE_SLOTS, dtype=torch.int64, device="cuda")
        bufs = []
        for s in sets:
            o_p = torch.empty(S, B, 1, hq, 128, dtype=torch.float32, device="cuda")
            l_p = torch.empty(S, B, hq, 1, dtype=torch.float32, device="cuda")
            out = torch.empty_like(s["q"])
            lse = torch.empty(B, hq, 1, dtype=torch.float32, device="cuda")
            arr = torch.zeros(B * hk * m_blocks, dtype=torch.int32, device="cuda")
            bufs.append((o_p, l_p, out, lse, arr))
        factor = 1e-6 if var["skip"] else 0.0

        def call(i, slot):
            s, (o_p, l_p, out, lse, arr) = sets[i], bufs[i]
            kc = s["kc"]
            ks = kc.stride()
            stream = torch.cuda.current_stream().cuda_stream
            fn(make_ptr(bf, s["q"].data_ptr(), 16), make_ptr(bf, kc.data_ptr(), 16),
               make_ptr(bf, s["vc"].data_ptr(), 16), make_ptr(Float32, o_p.data_ptr(), 16),
               make_ptr(Float32, l_p.data_ptr(), 4), make_ptr(Int32, s["lens"].data_ptr(), 4),
               make_ptr(Int32, s["bt"].data_ptr(), 4), None, None, None, None,
               make_ptr(bf, out.data_ptr(), 16), make_ptr(Float32, lse.data_ptr(), 4),
               make_ptr(Int32, arr.data_ptr(), 4),
               Int32(B), Int32(1), Int32(hq), Int32(hk), Int32(kc.shape[0]), Int32(kc.shape[1]),
               cutlass.Int64(ks[0]), Int32(ks[1]), Int32(ks[2]), Int32(s["bt"].shape[1]),
               Int32(s["bt"].stride(0)), Float32(128 ** -0.5), Float32(factor), Int32(S),
               cuda_stream(stream), make_ptr(cutlass.Int64, trace[slot].data_ptr(), 8))

        for i in range(len(sets)):
            call(i, 0)
        torch.cuda.synchronize()
        ref = torch.nn.functional.scaled_dot_product_attention(
            sets[0]["q"].float().transpose(1, 2), sets[0]["k"].float().transpose(1, 2),
            sets[0]["v"].float().transpose(1, 2), enable_gqa=True).transpose(1, 2)
        err = float((bufs[0][2].float() - ref).norm() / ref.norm())
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call(0, 0)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(g):
            for c in range(CALLS):
                call(c % len(sets), c)
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        t = trace.cpu()
        gt = t[:, :, 0:7].double()
        ck = t[:, :, 8:15].double()
        starts = gt[:, :, 0].min(dim=1).values
        ends = gt[:, :, 6].max(dim=1).values
        rel = gt - starts[:, None, None]
        med = lambda x: statistics.median(x.tolist())  # noqa: E731
        # ns per clock from the CTAs' own entry->done intervals
        ns_per_clk = float(((gt[:, :, 6] - gt[:, :, 0]).sum() / (ck[:, :, 6] - ck[:, :, 0]).sum()))
        steps = sorted(set((gt[:, :, 1:7] - gt[:, :, 0:6]).flatten().tolist()) - {0.0})
        res_ns = steps[0] if steps else float("nan")
        merged = t[:, :, 16] == 1
        merge_ns = ((ck[:, :, 6] - ck[:, :, 5]) * ns_per_clk)[merged]
        handshake_ns = ((ck[:, :, 6] - ck[:, :, 5]) * ns_per_clk)[~merged]
        store_ns = ((ck[:, :, 5] - ck[:, :, 4]) * ns_per_clk)
        drain_ns = ((ck[:, :, 4] - ck[:, :, 3]) * ns_per_clk)
        firstk_ns = ((ck[:, :, 2] - ck[:, :, 0]) * ns_per_clk)
        # the CTA that ends each launch
        last = gt[:, :, 6].argmax(dim=1)
        idx = torch.arange(CALLS)
        last_rel = rel[idx, last]
        gaps = starts[1:] - ends[:-1]
        log(f"| {B} | {L} | {hq}/{hk} | {name} | {S} | {n_ctas} | {med(ends - starts) / 1e3:.1f} | "
            f"{med(gaps) / 1e3:.1f} | {med(rel[:, :, 0].max(dim=1).values) / 1e3:.1f} | "
            f"{med(firstk_ns.median(dim=1).values) / 1e3:.2f} / {med(firstk_ns.max(dim=1).values) / 1e3:.2f} | "
            f"{med(rel[:, :, 3].median(dim=1).values) / 1e3:.1f} / {med(rel[:, :, 3].max(dim=1).values) / 1e3:.1f} | "
            f"{med(drain_ns.median(dim=1).values) / 1e3:.2f} | {med(store_ns.median(dim=1).values) / 1e3:.2f} | "
            f"{med(rel[:, :, 5].max(dim=1).values) / 1e3:.1f} | "
            f"{med(merge_ns) / 1e3 if merge_ns.numel() else float('nan'):.2f} / "
            f"{float(merge_ns.max()) / 1e3 if merge_ns.numel() else float('nan'):.2f} | "
            f"{med(handshake_ns) / 1e3 if handshake_ns.numel() else float('nan'):.2f} | "
            f"{' '.join(f'{med(last_rel[:, p]) / 1e3:.1f}' for p in range(7))} | {res_ns:.0f} | {err:.1e} |")
        torch.save(dict(trace=t, shape=(B, L, hq, hk), name=name, splits=S),
                   os.path.join(OUT_DIR, f"trace_{B}_{L}_{hq}_{hk}_{name}.pt"))


OUT_DIR = "."


def main():
    global OUT_DIR
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--save", action="store_true", help="save the raw traces (.pt)")
    args = ap.parse_args()
    OUT_DIR = args.out if args.save else "/tmp"
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    lines = []

    def log(m=""):
        print(m, flush=True)
        lines.append(m)

    log(f"# decode phase trace — {torch.cuda.get_device_name()} — {CALLS} launches in one graph")
    log("times in us from the launch's first CTA entry; a / b = median / max over CTAs (medians over launches)")
    log("| B | L | Hq/Hk | variant | splits | CTAs | launch span | gap to next launch | last CTA entry | "
        "first K after entry | loop end | drain (last PV) | stores | last CTA stored | merge med / max | "
        "arrival handshake (not last) | ending CTA: entry Q K0 loop drain stored done | timer step ns | "
        "rel err |")
    log("|" + "---|" * 19)
    variants = [("dense", dict(skip=False, producer_v=False)),
                ("dense pm", dict(skip=False, producer_v=False, pipelined_merge=True)),
                ("skip0 pm", dict(skip=True, producer_v=False, pipelined_merge=True)),
                ("skip0 pv pm", dict(skip=True, producer_v=True, pipelined_merge=True))]
    for B, L, hq, hk in shapes:
        run_shape(B, L, hq, hk, variants, log)
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "decode_trace.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
