"""Side-by-side benchmark of BLASST against dense peers, one process, one card.

    python perf/bench.py prefill --seqlens 4096 16384 --tokens 32768 --causal both \
        --factors 0 10 100 1000 --out perf/results

For each shape it times the dense peers once (torch SDPA with the flash and cuDNN backends,
FlashAttention-4 ``flash_attn.cute`` when importable) and BLASST at every factor of the sweep
(factor 0 is the dense kernel; the sparsity of each point comes from the kernel's own counters).
Per point it reports sparsity, time, TFLOP/s (prefill) or K+V GB/s (decode), the speedup over
each dense peer and the ideal bound 1/(1 - s/2); prefill points also give the share of P·V
MMAs skipped and the ideal at that share. Timing: median of CUDA-event timed runs after
warm-up, rotating between enough input sets to exceed the L2 cache. Writes JSON, a markdown table
and a PNG plot (speedup vs sparsity with the ideal curve) to ``--out``, stamped with the GPU,
versions and date. A backend that cannot run a configuration is recorded with its error, never
replaced by another.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import blasst_cute  # noqa: E402
from blasst_cute.workloads import synthetic_qkv, to_paged  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def bench_ms(fns, warmup=3, iters=20):
    """Median ms over ``iters`` calls, cycling through ``fns`` (one per rotating input set)."""
    for i in range(warmup):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fns[i % len(fns)]()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def l2_bytes():
    try:
        return torch.cuda.get_device_properties(0).L2_cache_size
    except Exception:
        return 64 << 20


def n_rotations(bytes_per_set):
    return max(1, min(8, math.ceil(3 * l2_bytes() / max(1, bytes_per_set))))


# ----------------------------------------------------------------------------------------------
# Peers
# ----------------------------------------------------------------------------------------------

def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]
    expanded = {}  # GQA expanded once, outside the timed region, for backends without enable_gqa

    def run(q, k, v, causal):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(backend):
            if kt.shape[1] == qt.shape[1]:
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            key = (k.data_ptr(), v.data_ptr())
            if key not in expanded:
                try:
                    return torch.nn.functional.scaled_dot_product_attention(
                        qt, kt, vt, is_causal=causal, enable_gqa=True)
                except RuntimeError:
                    g = qt.shape[1] // kt.shape[1]
                    expanded[key] = (kt.repeat_interleave(g, 1), vt.repeat_interleave(g, 1))
            ke, ve = expanded[key]
            return torch.nn.functional.scaled_dot_product_attention(qt, ke, ve, is_causal=causal)
    return run


def _fa4():
    from flash_attn.cute import flash_attn_func  # noqa: F401 (probe)

    def run(q, k, v, causal):
        return flash_attn_func(q, k, v, causal=causal)
    return run


PEERS = ("sdpa-flash", "sdpa-cudnn", "fa4")


def dense_peers(phase, wanted=PEERS):
    peers = {}
    for name, make in (("sdpa-flash", lambda: _sdpa("flash")), ("sdpa-cudnn", lambda: _sdpa("cudnn")),
                       ("fa4", _fa4)):
        if name not in wanted:
            continue
        try:
            peers[name] = make()
        except Exception as exc:  # not installed here
            peers[name] = exc
    return peers


# ----------------------------------------------------------------------------------------------
# Sweeps
# ----------------------------------------------------------------------------------------------

def host_us_per_call(fn, n=200):
    """Host time per call: a small problem, so the CPU side (validation, dispatch, launch) dominates."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def prefill_flops(b, hq, lq, lk, d, dv, causal):
    if causal:  # exact count of visible (query, key) pairs, bottom-right aligned
        pairs = sum(max(0, min(lk, i + 1 + lk - lq)) for i in range(lq))
    else:
        pairs = lq * lk
    return 2.0 * b * hq * pairs * (d + dv)


def run_prefill(args):
    rows = []
    for L in args.seqlens:
        B = max(1, args.tokens // L)
        for causal in ([False, True] if args.causal == "both" else [args.causal == "true"]):
            dv = args.head_dim_v or args.head_dim
            shape = dict(phase="prefill", batch=B, seqlen=L, heads_q=args.heads_q, heads_kv=args.heads_kv,
                         head_dim=args.head_dim, causal=causal)
            if dv != args.head_dim:
                shape["head_dim_v"] = dv
            per_set = 2 * B * L * (args.heads_q * (args.head_dim + dv)
                                   + args.heads_kv * (args.head_dim + dv))
            sets = [synthetic_qkv(B, L, L, args.heads_q, args.heads_kv, args.head_dim, dv,
                                  dtype=torch.bfloat16, device="cuda", seed=s)
                    for s in range(n_rotations(per_set))]
            flops = prefill_flops(B, args.heads_q, L, L, args.head_dim, dv, causal)
            # the share of the MMA work a skipped tile saves (P·V: dv of d + dv columns)
            pv_share = dv / (args.head_dim + dv)
            peers = {}
            for name, fn in dense_peers("prefill", args.peers).items():
                if isinstance(fn, Exception):
                    peers[name] = dict(error=f"{type(fn).__name__}: {fn}")
                    continue
                try:
                    ms = bench_ms([lambda s=s, fn=fn: fn(*s, causal) for s in sets], iters=args.iters)
                    peers[name] = dict(ms=ms, tflops=flops / ms / 1e9)
                except Exception as exc:
                    peers[name] = dict(error=f"{type(exc).__name__}: {exc}")
            for f in args.factors:
                point = dict(shape, factor=f, peers=peers)
                if args.no_blasst:
                    point.update(error="not run (--no-blasst)")
                    rows.append(point)
                    break
                try:
                    _, st = blasst_cute.prefill(*sets[0], causal=causal, threshold_scale_factor=f,
                                                return_stats=True)
                    ms = bench_ms([lambda s=s: blasst_cute.prefill(*s, causal=causal,
                                                                   threshold_scale_factor=f or None)
                                   for s in sets], iters=args.iters)
                    s_ = st.sparsity
                    point.update(ms=ms, sparsity=s_, tflops_dense_equiv=flops / ms / 1e9,
                                 ideal=1 / (1 - s_ * pv_share))
                    if st.pv_sparsity is not None:
                        # the share of P·V MMAs skipped (64-row warpgroups): the s the kernel's
                        # gain 1/(1 - s/2) is bounded by when decisions are finer than the MMA
                        point.update(pv_sparsity=st.pv_sparsity,
                                     ideal_pv=1 / (1 - st.pv_sparsity * pv_share))
                except Exception as exc:
                    point.update(error=f"{type(exc).__name__}: {exc}")
                    if args.verbose:
                        traceback.print_exc()
                rows.append(point)
                _print_point(point)
            del sets
            torch.cuda.empty_cache()
    return rows


def run_decode(args):
    rows = []
    q, k, v = synthetic_qkv(1, 1, 1024, args.heads_q, args.heads_kv, args.head_dim, dtype=torch.bfloat16,
                            device="cuda")
    kc, vc, bt = to_paged(k, v, args.page_size)
    lens = torch.full((1,), 1024, dtype=torch.int32, device="cuda")
    try:
        host = host_us_per_call(lambda: blasst_cute.decode(q, kc, vc, cache_seqlens=lens, block_table=bt,
                                                           threshold_scale_factor=100.0))
        print(f"host time per decode call (B=1, L=1024, content checks "
              f"{'on' if args.content_checks else 'off'}): {host:.1f} us", flush=True)
    except Exception as exc:
        print(f"host time per decode call: n/a ({type(exc).__name__}: {exc})")
    for L in args.seqlens:
        for B in args.batches:
            shape = dict(phase="decode", batch=B, seqlen=L, heads_q=args.heads_q, heads_kv=args.heads_kv,
                         head_dim=args.head_dim, page_size=args.page_size)
            kv_bytes = 2 * B * L * args.heads_kv * args.head_dim * 2
            sets = []
            for s in range(n_rotations(kv_bytes)):
                q, k, v = synthetic_qkv(B, 1, L, args.heads_q, args.heads_kv, args.head_dim,
                                        dtype=torch.bfloat16, device="cuda", seed=s)
                kc, vc, bt = to_paged(k, v, args.page_size, seed=s)
                sets.append((q, k, v, kc, vc, bt))
            lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
            peers = {}
            for name, fn in dense_peers("decode", args.peers).items():
                if isinstance(fn, Exception):
                    peers[name] = dict(error=f"{type(fn).__name__}: {fn}")
                    continue
                try:
                    ms = bench_ms([lambda s=s, fn=fn: fn(s[0], s[1], s[2], False) for s in sets],
                                  iters=args.iters)
                    peers[name] = dict(ms=ms, gbps=kv_bytes / ms / 1e6)
                except Exception as exc:
                    peers[name] = dict(error=f"{type(exc).__name__}: {exc}")
            for f in args.factors:
                point = dict(shape, factor=f, peers=peers)
                if args.no_blasst:
                    point.update(error="not run (--no-blasst)")
                    rows.append(point)
                    break
                try:
                    s0 = sets[0]
                    _, st = blasst_cute.decode(s0[0], s0[3], s0[4], cache_seqlens=lens, block_table=s0[5],
                                               threshold_scale_factor=f, return_stats=True)
                    ms = bench_ms([lambda s=s: blasst_cute.decode(
                        s[0], s[3], s[4], cache_seqlens=lens, block_table=s[5],
                        threshold_scale_factor=f or None) for s in sets], iters=args.iters)
                    point.update(ms=ms, sparsity=st.sparsity, gbps_dense_equiv=kv_bytes / ms / 1e6,
                                 ideal=1 / (1 - st.sparsity / 2))
                except Exception as exc:
                    point.update(error=f"{type(exc).__name__}: {exc}")
                rows.append(point)
                _print_point(point)
            del sets
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def _shape_str(p):
    s = f"{p['phase']} B={p['batch']} L={p['seqlen']} H={p['heads_q']}/{p['heads_kv']} d={p['head_dim']}"
    if "head_dim_v" in p:
        s += f"/{p['head_dim_v']}"
    if p["phase"] == "prefill":
        s += " causal" if p["causal"] else " non-causal"
    return s


def _print_point(p):
    peer = "  ".join(f"{n} {v['ms']:.3f}ms" if "ms" in v else f"{n} n/a" for n, v in p["peers"].items())
    if "ms" in p:
        print(f"{_shape_str(p)} f={p['factor']:g}: blasst {p['ms']:.3f}ms s={p['sparsity']:.3f} | {peer}",
              flush=True)
    else:
        print(f"{_shape_str(p)} f={p['factor']:g}: blasst n/a ({p['error'][:120]}) | {peer}", flush=True)


def stamp():
    info = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, python=platform.python_version(),
                blasst_cute=blasst_cute.__version__)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    from importlib import metadata
    for dist in ("nvidia-cutlass-dsl", "flash-attn-4", "triton"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def _head_dims(rows):
    """(q/k head dim, v head dim) of a report's rows."""
    r = rows[0] if rows else {}
    d = r.get("head_dim", 1)
    return d, r.get("head_dim_v", d)


def _pv_share(rows):
    """The share of a dense tile's MMA work a skip saves: dv / (d + dv) (1/2 when d = dv)."""
    d, dv = _head_dims(rows)
    return dv / (d + dv)


def _ideal_formula(rows):
    d, dv = _head_dims(rows)
    return "1/(1-s/2)" if dv == d else f"1/(1-s*{dv}/{d + dv})"


def markdown(rows, meta):
    peer_names = sorted({n for r in rows for n in r["peers"]})
    lines = [f"# BLASST benchmark — {meta.get('gpu', 'no GPU')} — {meta['date']}", "",
             "versions: " + ", ".join(f"{k} {v}" for k, v in meta.items() if k not in ("date",)), ""]
    unit = "TFLOP/s" if rows and rows[0]["phase"] == "prefill" else "K+V GB/s"
    lines += [f"Times are medians in ms; in parentheses the dense-equivalent rate ({unit}).", ""]
    with_pv = any("pv_sparsity" in r for r in rows)
    head = ["shape", "factor", "sparsity", "blasst ms"] + [f"{n} ms" for n in peer_names] + \
        [f"vs {n}" for n in peer_names] + [f"ideal {_ideal_formula(rows)}"] + (
            ["P·V skipped", "ideal at P·V s"] if with_pv else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_shape_str(r), f"{r['factor']:g}"]
        if "ms" in r:
            rate = r.get("tflops_dense_equiv", r.get("gbps_dense_equiv"))
            cells += [f"{r['sparsity']:.3f}", f"{r['ms']:.3f} ({rate:.0f})"]
        else:
            cells += ["—", "n/a: " + r["error"].split("\n")[0][:80]]
        for n in peer_names:
            v = r["peers"].get(n, {})
            rate = v.get("tflops", v.get("gbps"))
            cells.append(f"{v['ms']:.3f} ({rate:.0f})" if "ms" in v else "n/a")
        for n in peer_names:
            v = r["peers"].get(n, {})
            cells.append(f"{v['ms'] / r['ms']:.2f}x" if "ms" in v and "ms" in r else "—")
        cells.append(f"{r['ideal']:.2f}x" if "ideal" in r else "—")
        if with_pv:
            cells += ([f"{r['pv_sparsity']:.3f}", f"{r['ideal_pv']:.2f}x"] if "pv_sparsity" in r
                      else ["—", "—"])
        lines.append("| " + " | ".join(cells) + " |")
    if with_pv:
        lines += ["", "sparsity: share of (16-row warp, key tile) softmaxes skipped; P·V skipped: "
                  "share of (64-row warpgroup, key tile) P·V MMAs skipped (all 4 warps skipped)."]
    errs = {n: v["error"] for r in rows for n, v in r["peers"].items() if "error" in v}
    if errs:
        lines += ["", "Peers that could not run:"] + [f"- {n}: {e[:200]}" for n, e in errs.items()]
    return "\n".join(lines) + "\n"


def plot(rows, meta, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"(no plot: matplotlib unavailable: {exc}; rerun `python perf/bench.py report JSON` elsewhere)")
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    s = [i / 100 for i in range(0, 100)]
    share = _pv_share(rows)
    ax.plot(s, [1 / (1 - x * share) for x in s], "k--", label=f"ideal {_ideal_formula(rows)}")
    groups = {}
    for r in rows:
        if "ms" not in r:
            continue
        peers = {n: v["ms"] for n, v in r["peers"].items() if "ms" in v}
        if not peers:
            continue
        best_name = min(peers, key=peers.get)
        groups.setdefault((_shape_str(r), best_name), []).append(
            (r["sparsity"], peers[best_name] / r["ms"], r.get("pv_sparsity")))
    for (name, peer), pts in groups.items():
        pts.sort()
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{name} (vs {peer})")
        pv = [(p[2], p[1]) for p in pts if p[2] is not None]
        if pv:  # the same points placed at the share of P·V MMAs skipped
            ax.plot([p[0] for p in pv], [p[1] for p in pv], "x:", color=line.get_color(),
                    label=f"{name}, x = P·V sparsity")
    ax.set_xlabel("block sparsity (fraction of tiles skipped)")
    ax.set_ylabel("speedup over the fastest dense peer")
    ax.set_title(f"BLASST on {meta.get('gpu', '?')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    # 64-color palette PNG: a line plot looks the same at about a quarter of the bytes (results
    # travel with the checkout to the GPU host, which caps its size)
    import io

    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format="png")
    plt.close(fig)
    Image.open(buf).convert("RGB").quantize(colors=64).save(path, optimize=True)
    return True


def write_results(rows, meta, out_dir, tag, with_plot=True):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, tag)
    with open(base + ".json", "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    with open(base + ".md", "w") as fh:
        fh.write(markdown(rows, meta))
    if with_plot:
        plot(rows, meta, base + ".png")
    print(f"wrote {base}.json, .md" + (", .png" if os.path.exists(base + ".png") else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="phase", required=True)
    for name in ("prefill", "decode"):
        s = sub.add_parser(name)
        s.add_argument("--seqlens", type=int, nargs="+",
                       default=[4096, 16384, 32768] if name == "prefill" else [8192, 32768, 131072])
        s.add_argument("--heads-q", type=int, default=32)
        s.add_argument("--heads-kv", type=int, default=8)
        s.add_argument("--head-dim", type=int, default=128)
        if name == "prefill":
            s.add_argument("--head-dim-v", type=int, default=None,
                           help="V head dim (default: --head-dim; 128 with --head-dim 192 is MLA prefill)")
        s.add_argument("--factors", type=float, nargs="+", default=[0, 10, 100, 1000, 5000])
        s.add_argument("--iters", type=int, default=20)
        s.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
        s.add_argument("--tag", default=None, help="file name stem (default: phase + date)")
        s.add_argument("--verbose", action="store_true")
        s.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS, help="dense peers to time")
        s.add_argument("--no-blasst", action="store_true", help="time the dense peers only")
        s.add_argument("--no-plot", action="store_true", help="JSON and markdown only (plot later with `report`)")
        s.add_argument("--content-checks", action="store_true",
                       help="keep the synchronising checks of index-tensor contents (off by default here)")
        if name == "prefill":
            s.add_argument("--tokens", type=int, default=32768, help="batch x seqlen per shape")
            s.add_argument("--causal", choices=("true", "false", "both"), default="both")
        else:
            s.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
            s.add_argument("--page-size", type=int, default=64)
    r = sub.add_parser("report", help="rewrite the table and plot from a JSON result")
    r.add_argument("json")
    args = p.parse_args(argv)
    if args.phase == "report":
        with open(args.json) as fh:
            data = json.load(fh)
        base = os.path.splitext(args.json)[0]
        with open(base + ".md", "w") as fh:
            fh.write(markdown(data["rows"], data["meta"]))
        plot(data["rows"], data["meta"], base + ".png")
        return 0
    if not torch.cuda.is_available():
        p.error("the benchmark needs a CUDA GPU")
    # A serving engine validates indices upstream; the synchronising content checks would add a
    # device-to-host round trip to every call (see blasst_cute.set_content_checks).
    blasst_cute.set_content_checks(args.content_checks)
    meta = stamp()
    rows = run_prefill(args) if args.phase == "prefill" else run_decode(args)
    tag = args.tag or f"{args.phase}-{_dt.date.today().isoformat()}"
    write_results(rows, meta, args.out, tag, with_plot=not args.no_plot)
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
