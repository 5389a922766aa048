"""Issue #4 acceptance matrix of the sm90 decode kernel: one process, one card, one table.

    python perf/decode_matrix.py [--out DIR] [--tag NAME] [--quick] [--no-dense] [--no-sparse]

Dense: K+V read bandwidth of ``blasst_cute.decode`` (page size 64, head dim 128, one new token,
content checks off) against the dense peers (torch SDPA cuDNN / flash with enable_gqa, and
FlashAttention-4's paged path when ``flash_attn.cute`` imports) and the card's measured copy
bandwidth, for B in {1, 8, 64} x L in {8k, 32k, 128k} x Hq/Hk in {32/8, 64/4}; plus the skip
build at ~0% sparsity (factor 1e-6) against the dense build. Sparse: the speedup over the best
dense peer near 70% and 90% sparsity at B=64 L=32k and B=1 L=128k (synthetic LLM-like
workloads; the sparsity is the kernel's own counters). Host time per call.

Timing is perf/bench.py's: median of CUDA-event-bracketed single calls (a sync after each),
rotating input sets past the L2 size; the peers and every variant of a shape alternate (3 rounds,
reversed on odd rounds; the B=1 A/B rows and the graph columns are timed on their own). "kernel"
columns: 16 calls in one CUDA graph cycling the input sets (device time, launch gaps amortized), next to
a device copy moving the same DRAM bytes timed the same way. At B=1 the sparse section also runs
contiguous split chunks (the interleaved default's A/B) and 64-key tiles. Dense inputs are random; the peers read the contiguous
[B, L, Hk, D] cache and BLASST reads the same memory as 64-token pages through a shuffled block
table. Writes ``<tag>.json`` and ``<tag>.md`` to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import blasst_cute  # noqa: E402
from blasst_cute.kernels import launch_decode  # noqa: E402
from blasst_cute.testing import alternated_medians, capture_graph, round_order, time_graph_cycle  # noqa: E402
from blasst_cute.testing import time_per_call  # noqa: E402
from blasst_cute.workloads import WorkloadSpec, synthetic_qkv, to_paged  # noqa: E402
from bench import bench_ms, n_rotations, stamp  # noqa: E402

PAGE = 64
D = 128
LINES = []


def log(msg=""):
    print(msg, flush=True)
    LINES.append(msg)


def copy_bandwidth():
    """Bytes read + written per second of a 2 GiB device-to-device copy (median of 10)."""
    n = 2 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms([lambda: dst.copy_(src)], warmup=2, iters=10)
    return 2 * n / (ms * 1e-3)


# ---------------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------------

def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]
    F = torch.nn.functional

    def run(s):
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(s["q"].transpose(1, 2), s["k"].transpose(1, 2),
                                                  s["v"].transpose(1, 2), enable_gqa=True)
    return run


def _fa4_paged():
    from flash_attn.cute import flash_attn_varlen_func

    def run(s):
        return flash_attn_varlen_func(s["q"], s["kc"], s["vc"], page_table=s["bt"],
                                      seqused_k=s["lens"], causal=False)
    return run


def peers():
    out = {"sdpa-cudnn": _sdpa("cudnn"), "sdpa-flash": _sdpa("flash")}
    try:
        out["fa4-paged"] = _fa4_paged()
    except Exception as e:  # noqa: BLE001
        log(f"(fa4 unavailable: {type(e).__name__}: {str(e)[:100]})")
    return out


def time_peers(sets, peer_fns, iters):
    res = {}
    for name, fn in peer_fns.items():
        try:
            t0 = time.time()
            fn(sets[0])
            torch.cuda.synchronize()
            first = time.time() - t0
            ms = bench_ms([lambda s=s, fn=fn: fn(s) for s in sets], iters=iters)
            res[name] = dict(ms=ms)
            if first > 2:
                res[name]["first_call_s"] = round(first, 1)
        except Exception as e:  # noqa: BLE001
            res[name] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            torch.cuda.synchronize()
    return res


def best_peer(res):
    ok = {n: r["ms"] for n, r in res.items() if "ms" in r}
    if not ok:
        return None, None
    n = min(ok, key=ok.get)
    return n, ok[n]


def time_with_peers(pr, peer_fns, sets, variants, iters):
    """Median ms of each variant (a list of per-input-set callables), timed in alternation with
    the peers that ran in ``pr`` (time_peers: first calls, errors); each such peer's ``ms``
    becomes its alternated time (the serial one kept as ``serial_ms``). Timed one after the
    other, the first after building the inputs read 11-18 % slow (decode-h100-mixed.md)."""
    ok = [n for n, r in pr.items() if "ms" in r]
    alt = interleaved_ms([[lambda s=s, fn=peer_fns[n]: fn(s) for s in sets] for n in ok]
                         + list(variants), iters)
    for n, ms in zip(ok, alt):
        pr[n]["serial_ms"], pr[n]["ms"] = pr[n]["ms"], ms
    return alt[len(ok):]


def blasst_fn(s, factor, **kw):
    return lambda: blasst_cute.decode(s["q"], s["kc"], s["vc"], cache_seqlens=s["lens"],
                                      block_table=s["bt"], threshold_scale_factor=factor, **kw)


def sparsity(s, factor):
    _, st = blasst_cute.decode(s["q"], s["kc"], s["vc"], cache_seqlens=s["lens"],
                               block_table=s["bt"], threshold_scale_factor=factor,
                               return_stats=True)
    return st.sparsity


def target_factors(sp, grid, targets=(0.7, 0.9)):
    """[(factor, sparsity)]: the grid factor whose measured sparsity sp[f] is closest to each
    target."""
    out = []
    for target in targets:
        f = min(grid, key=lambda x: abs(sp[x] - target))
        out.append((float(f), sp[f]))
    return out


def same_size_copy_ms(kv_bytes, n_sets):
    """Device ms of a copy that moves as many DRAM bytes as the kernel reads (read kv_bytes / 2,
    write kv_bytes / 2), timed like the kernel (time_graph_cycle over n_sets buffers): what the
    memory system gives a launch of this size."""
    srcs = [torch.empty(kv_bytes // 2, dtype=torch.uint8, device="cuda") for _ in range(n_sets)]
    dsts = [torch.empty_like(x) for x in srcs]
    return time_graph_cycle([lambda a=a, b=b: b.copy_(a) for a, b in zip(srcs, dsts)]) * 1e3


def interleaved_ms(variants, iters, rounds=3):
    """Median ms of each variant (a list of per-input-set callables, timed by bench_ms), the
    variants alternated over ``rounds`` rounds (testing.alternated_medians)."""
    return alternated_medians(variants, rounds, max(5, iters // rounds), warmup=3,
                              timer=lambda fns, n, w: bench_ms(fns, warmup=w, iters=n))


def graph_ms(fn, iters=20):
    """Device time per call (ms): the call captured in a CUDA graph, replayed back to back."""
    return time_per_call(capture_graph(fn).replay, iters, warmup=1) * 1e3


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def dense_sets(B, L, hq, hk, seed=0):
    """Random inputs; the paged view shares the contiguous cache's memory (shuffled pages)."""
    kv_bytes = 2 * B * L * hk * D * 2
    n = n_rotations(kv_bytes)
    g = torch.Generator(device="cuda").manual_seed(seed)
    sets = []
    for i in range(n):
        k = torch.randn(B, L, hk, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, L, hk, D, device="cuda", dtype=torch.bfloat16, generator=g)
        q = torch.randn(B, 1, hq, D, device="cuda", dtype=torch.bfloat16, generator=g)
        pages = B * L // PAGE
        perm = torch.randperm(pages, device="cuda", generator=g).to(torch.int32)
        sets.append(dict(q=q, k=k, v=v, kc=k.view(pages, PAGE, hk, D), vc=v.view(pages, PAGE, hk, D),
                         bt=perm.view(B, L // PAGE),
                         lens=torch.full((B,), L, dtype=torch.int32, device="cuda")))
    return sets, kv_bytes


def synthetic_set(B, L, hq, hk, spec=WorkloadSpec(), seed=7, mixed=1):
    """LLM-like sequences (synthetic_qkv), paged with a shuffled table: one sequence repeated over
    the batch (every sequence then skips the same tiles), or with mixed=N, N different ones dealt
    over it (sequence b is number b % N)."""
    n = max(1, min(mixed, B))
    q1, k1, v1 = synthetic_qkv(n, 1, L, hq, hk, D, device="cuda", seed=seed, spec=spec)
    pick = torch.arange(B, device=q1.device) % n
    q, k, v = q1[pick].contiguous(), k1[pick].contiguous(), v1[pick].contiguous()
    del q1, k1, v1
    kc, vc, bt = to_paged(k, v, PAGE, seed=seed)
    return dict(q=q, k=k, v=v, kc=kc, vc=vc, bt=bt,
                lens=torch.full((B,), L, dtype=torch.int32, device="cuda"))


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------

def dense_matrix(peer_fns, bw_copy, iters, quick=False, rows=None, save=None):
    rows = [] if rows is None else rows
    Bs, Ls = ((1, 8), (8192,)) if quick else ((1, 8, 64), (8192, 32768, 131072))
    log(f"{'shape':<22} {'best peer':<11} {'peer us':>8} {'dense us':>8} {'GB/s':>6} "
        f"{'vs peer':>7} {'of copy':>7} {'skip0 us':>8} {'skip0/dense':>11}")
    for hq, hk in ((32, 8), (64, 4)):
        for L in Ls:
            for B in Bs:
                shape = dict(batch=B, seqlen=L, heads_q=hq, heads_kv=hk)
                try:
                    sets, kv_bytes = dense_sets(B, L, hq, hk)
                    pr = time_peers(sets, peer_fns, iters)
                    # Peers, dense and skip-on alternate (the card's clocks drift over long runs).
                    dense, skip0 = time_with_peers(pr, peer_fns, sets,
                                                   [[blasst_fn(s, None) for s in sets],
                                                    [blasst_fn(s, 1e-6) for s in sets]], iters)
                    bname, bms = best_peer(pr)
                    sp0 = sparsity(sets[0], 1e-6)
                    gbps = kv_bytes / (dense * 1e-3) / 1e9
                    # Device time alone (the call replayed from a CUDA graph): the kernel's own
                    # K+V bandwidth, without the host time a synced single call includes.
                    # Many calls in one graph, cycling the input sets (DRAM, not L2).
                    kernel_ms = time_graph_cycle([blasst_fn(s, None) for s in sets]) * 1e3
                    kernel_skip0_ms = time_graph_cycle([blasst_fn(s, 1e-6) for s in sets]) * 1e3
                    copy_same_ms = same_size_copy_ms(kv_bytes, len(sets))
                    kernel_gbps = kv_bytes / (kernel_ms * 1e-3) / 1e9
                    row = dict(shape, peers=pr, best_peer=bname, best_peer_ms=bms, dense_ms=dense,
                               dense_gbps=gbps, dense_vs_best=(bms / dense) if bms else None,
                               dense_of_copy=gbps * 1e9 / bw_copy, kernel_ms=kernel_ms,
                               kernel_gbps=kernel_gbps, kernel_of_copy=kernel_gbps * 1e9 / bw_copy,
                               kernel_skip0_ms=kernel_skip0_ms,
                               kernel_skip0_vs_dense=kernel_ms / kernel_skip0_ms,
                               copy_same_ms=copy_same_ms,
                               skip0_ms=skip0,
                               skip0_sparsity=sp0, skip0_vs_dense=dense / skip0,
                               splits=launch_decode.plan_decode_sm90(
                                   sets[0]["q"], sets[0]["kc"], sets[0]["bt"])["num_splits"])
                    log(f"B={B:<2} L={L:<6} {hq}/{hk:<3} {bname or '-':<11} "
                        f"{(bms or 0) * 1e3:>8.1f} {dense * 1e3:>8.1f} {gbps:>6.0f} "
                        f"{row['dense_vs_best'] or 0:>6.2f}x {row['dense_of_copy'] * 100:>6.0f}% "
                        f"{skip0 * 1e3:>8.1f} {row['skip0_vs_dense']:>10.2f}x")
                except Exception as e:  # noqa: BLE001
                    row = dict(shape, error=f"{type(e).__name__}: {str(e)[:200]}")
                    log(f"B={B} L={L} {hq}/{hk}: ERROR {row['error']}")
                    traceback.print_exc()
                rows.append(row)
                sets = None
                torch.cuda.empty_cache()
                if save is not None:
                    save()
    return rows


SPARSE_CASES = [
    # (B, L, hq, hk, workload name, spec, factor grid)
    (64, 32768, 32, 8, "default", WorkloadSpec(),
     [100, 300, 500, 700, 1000, 1500, 2000, 3000, 5000, 10000, 20000]),
    (64, 32768, 64, 4, "default", WorkloadSpec(),
     [100, 300, 500, 700, 1000, 1500, 2000, 3000, 5000, 10000, 20000]),
    # factor < L (λ < 1): at λ -> 1 the default workload tops out near 86.5% at B=1 L=128k
    (1, 131072, 32, 8, "default", WorkloadSpec(), [30000, 45000, 60000, 90000, 120000, 130000]),
    (1, 131072, 32, 8, "local_logit=24", WorkloadSpec(local_logit=24.0),
     [8000, 12000, 15000, 20000, 60000, 100000, 125000, 130000]),
]


def variant_points(s, variants, label, short, bms, iters):
    """Timed points of the (name, factor) variants under the current launch_decode settings."""
    pts = []
    for name, f, _ in variants:
        spv = sparsity(s, f) if f else 0.0
        ms = bench_ms([blasst_fn(s, f)], iters=iters)
        gms = graph_ms(blasst_fn(s, f))
        pts.append(dict(variant=f"{name} {label}", factor=f, sparsity=spv, ms=ms, graph_ms=gms,
                        vs_best=(bms / ms) if bms else None, ideal=1 / (1 - spv / 2)))
        log(f"{'':<22} {'':<15} {name + ' ' + short:<15} {spv * 100:>7.1f}% "
            f"{ms * 1e3:>8.1f} {(bms / ms) if bms else 0:>11.2f}x "
            f"{1 / (1 - spv / 2):>5.2f}x {gms * 1e3:>8.1f}")
    return pts


def sparse_points(peer_fns, iters, quick=False):
    rows = []
    cases = SPARSE_CASES
    if quick:  # a smoke run of this script
        cases = [(8, 8192, 32, 8, "default", WorkloadSpec(), [300, 1000, 3000]),
                 (1, 16384, 32, 8, "default", WorkloadSpec(), [3000, 10000])]
    log(f"{'shape':<22} {'workload':<15} {'variant':<15} {'sparsity':>8} {'us':>8} "
        f"{'vs best peer':>12} {'ideal':>6} {'graph us':>8}")
    for B, L, hq, hk, wname, spec, grid in cases:
        shape = dict(batch=B, seqlen=L, heads_q=hq, heads_kv=hk, workload=wname)
        try:
            s = synthetic_set(B, L, hq, hk, spec)
            pr = time_peers([s], peer_fns, iters)  # first calls, errors, serial times
            sp = {f: sparsity(s, float(f)) for f in grid}
            variants = [("dense", None, 0.0), ("skip f=1e-6", 1e-6, sparsity(s, 1e-6))]
            variants += [(f"skip f={f:g}", f, spv) for f, spv in target_factors(sp, grid)]
            alt = time_with_peers(pr, peer_fns, [s], [[blasst_fn(s, f)] for _, f, _ in variants],
                                  iters)
            bname, bms = best_peer(pr)
            pts = []
            for (name, f, spv), ms in zip(variants, alt):
                gms = graph_ms(blasst_fn(s, f))
                pts.append(dict(variant=name, factor=f, sparsity=spv, ms=ms, graph_ms=gms,
                                vs_best=(bms / ms) if bms else None, ideal=1 / (1 - spv / 2)))
                log(f"B={B:<2} L={L:<6} {hq}/{hk:<3} {wname:<15} {name:<15} {spv * 100:>7.1f}% "
                    f"{ms * 1e3:>8.1f} {(bms / ms) if bms else 0:>11.2f}x {1 / (1 - spv / 2):>5.2f}x "
                    f"{gms * 1e3:>8.1f}")
            if B == 1:  # the same ~70% point with the other split merge (comparison)
                f = pts[2]["factor"]
                default_fused = launch_decode.FUSED_MERGE
                merge_name = "combine kernel" if default_fused else "fused merge"
                launch_decode.FUSED_MERGE = not default_fused
                launch_decode._plans.clear()
                ms = bench_ms([blasst_fn(s, f)], iters=iters)
                launch_decode.FUSED_MERGE = default_fused
                launch_decode._plans.clear()
                pts.append(dict(variant=f"skip f={f:g} {merge_name}", factor=f,
                                sparsity=pts[2]["sparsity"], ms=ms,
                                vs_best=(bms / ms) if bms else None))
                log(f"{'':<22} {'':<15} {'(' + merge_name + ')':<15} "
                    f"{pts[2]['sparsity'] * 100:>7.1f}% {ms * 1e3:>8.1f} "
                    f"{(bms / ms) if bms else 0:>11.2f}x")
                # A/B: contiguous split chunks instead of interleaved tiles, and 64-key tiles
                # (deeper K/V rings); both change the decisions, so each measures its sparsity.
                saved = launch_decode.INTERLEAVE_SPLITS
                try:
                    launch_decode.INTERLEAVE_SPLITS = False
                    launch_decode._plans.clear()
                    pts += variant_points(s, variants[2:], "contiguous splits", "contig", bms, iters)
                finally:
                    launch_decode.INTERLEAVE_SPLITS = saved
                    launch_decode._plans.clear()
                try:
                    launch_decode.DEFAULT_TUNING = {"tile_n": 64}
                    launch_decode._plans.clear()
                    pts += variant_points(s, [variants[0]] + variants[2:], "tile_n=64", "n64", bms,
                                          iters)
                finally:
                    launch_decode.DEFAULT_TUNING = None
                    launch_decode._plans.clear()
            rows.append(dict(shape, peers=pr, best_peer=bname, best_peer_ms=bms,
                             sparsity_grid={str(k): v for k, v in sp.items()}, points=pts))
            log(f"{'':<22} peers: " + ", ".join(
                f"{n} {r['ms'] * 1e3:.1f} us" if "ms" in r else f"{n} n/a" for n, r in pr.items()))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(shape, error=f"{type(e).__name__}: {str(e)[:200]}"))
            log(f"sparse B={B} L={L} {hq}/{hk} {wname}: ERROR {rows[-1]['error']}")
            traceback.print_exc()
        s = None
        torch.cuda.empty_cache()
    return rows


def b1_rounds(peer_fns, iters, rounds=3, factors=(60000.0, 130000.0)):
    """B=1 L=128k 32/8 (default workload): peers and BLASST timed in alternation, ``rounds`` times
    (the synced single-call times of a 0.1-0.2 ms call move by ~10% between measurements)."""
    s = synthetic_set(1, 131072, 32, 8)
    sp = {f: sparsity(s, f) for f in factors}
    fns = dict(peer_fns)
    fns["blasst dense"] = lambda _s: blasst_cute.decode(
        _s["q"], _s["kc"], _s["vc"], cache_seqlens=_s["lens"], block_table=_s["bt"])
    for f in factors:
        fns[f"blasst f={f:g} ({sp[f] * 100:.1f}%)"] = (
            lambda _s, f=f: blasst_cute.decode(_s["q"], _s["kc"], _s["vc"], cache_seqlens=_s["lens"],
                                               block_table=_s["bt"], threshold_scale_factor=f))
    res = {n: [] for n in fns}
    for k in range(rounds):
        for n, fn in round_order(fns.items(), k):
            res[n].append(bench_ms([lambda fn=fn: fn(s)], iters=iters))
    for n, v in res.items():
        log(f"B=1 L=131072 32/8 {n:<28} " + " ".join(f"{x * 1e3:7.1f}" for x in v) + " us")
    best = min(min(v) for n, v in res.items() if not n.startswith("blasst"))
    best_med = min(sorted(v)[len(v) // 2] for n, v in res.items() if not n.startswith("blasst"))
    for n, v in res.items():
        if n.startswith("blasst"):
            med = sorted(v)[len(v) // 2]
            log(f"  {n}: median {med * 1e3:.1f} us, vs best peer median {best_med / med:.2f}x "
                f"(vs best peer's best round {best / med:.2f}x)")
    return dict(sparsity={str(k): v for k, v in sp.items()}, times_ms=res)


TILE_EXPERIMENTS = [None, {"tile_n": 64}, {"tile_n": 64, "num_k_stages": 2, "num_v_stages": 2}]


def tile_experiment(peer_fns, iters):
    """Dense and ~70% / ~90% points under each kernel tuning of TILE_EXPERIMENTS (the public
    path's DEFAULT_TUNING; the decisions follow the tile, the sparsity is the kernel's own)."""
    cases = [(64, 32768, 32, 8, [300, 500, 700, 1000, 1500, 2000, 3000, 5000]),
             (64, 32768, 64, 4, [700, 1000, 1500, 2000, 3000, 5000, 8000]),
             (8, 32768, 32, 8, [1000, 2000, 3000, 5000, 10000, 20000, 30000]),
             (1, 131072, 32, 8, [20000, 40000, 60000, 90000, 130000])]
    out = []
    for B, L, hq, hk, grid in cases:
        s = synthetic_set(B, L, hq, hk)
        pr = time_peers([s], peer_fns, iters)
        bname, bms = best_peer(pr)
        log(f"B={B} L={L} {hq}/{hk}: best peer {bname} {bms * 1e3:.1f} us")
        for tun in TILE_EXPERIMENTS:
            launch_decode.DEFAULT_TUNING = tun
            launch_decode._plans.clear()
            try:
                sp = {f: sparsity(s, float(f)) for f in grid}
                pts = [("dense", None, 0.0)]
                pts += [(f"f={f:g}", f, spv) for f, spv in target_factors(sp, grid)]
                cells = []
                for name, f, spv in pts:
                    ms = bench_ms([blasst_fn(s, f)], iters=iters)
                    cells.append(f"{name} {spv * 100:.1f}% {ms * 1e3:.1f}us {bms / ms:.2f}x")
                    out.append(dict(batch=B, seqlen=L, heads=f"{hq}/{hk}", tuning=str(tun),
                                    variant=name, sparsity=spv, ms=ms, vs_best=bms / ms))
                log(f"  {str(tun):<55} " + " | ".join(cells))
            except Exception as e:  # noqa: BLE001
                log(f"  {str(tun):<55} ERROR {type(e).__name__}: {str(e)[:150]}")
            finally:
                launch_decode.DEFAULT_TUNING = None
                launch_decode._plans.clear()
        s = None
        torch.cuda.empty_cache()
    return out


def host_time(rounds=1, n=300):
    """Host time per call through blasst_cute.decode (B=1, L=1024, 32/8, page 64): CPU time of
    ``n`` back-to-back calls issued behind a long GPU sleep (the GPU stays busy, so no launch
    waits on it); ``rounds`` alternating rounds per variant, the median is reported."""
    s = dense_sets(1, 1024, 32, 8)[0][0]
    out = torch.empty_like(s["q"])
    lse = torch.empty(1, 32, 1, device="cuda")
    variants = [("skip f=100", blasst_fn(s, 100.0)), ("dense", blasst_fn(s, None)),
                ("skip f=100, return_lse", blasst_fn(s, 100.0, return_lse=True)),
                ("run_decode_sm90 (preallocated out/lse)", lambda: launch_decode.run_decode_sm90(
                    s["q"], s["kc"], s["vc"], out, lse, cache_seqlens=s["lens"], block_table=s["bt"],
                    threshold_scale_factor=100.0))]
    times = {name: [] for name, _ in variants}
    for name, fn in variants:  # warm: plans, compiles
        for _ in range(10):
            fn()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in variants:
            torch.cuda._sleep(int(2e8))  # keeps the GPU busy well past the timed calls
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n * 1e6)
            torch.cuda.synchronize()
    res = {}
    for name, v in times.items():
        res[name] = sorted(v)[len(v) // 2]
        log(f"host time per call B=1 L=1024 {name}: median {res[name]:.1f} us "
            f"(rounds: {' '.join(f'{x:.1f}' for x in v)})")
    return res


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def markdown(data):
    m = data["meta"]
    L = [f"# Decode acceptance matrix (issue #4) — {m.get('gpu')} — {m['date']}", "",
         "versions: " + ", ".join(f"{k} {v}" for k, v in m.items() if k not in ("date",)), "",
         f"Card copy bandwidth (read + write, 2 GiB): {data['copy_bw'] / 1e9:.0f} GB/s. "
         "Times: median of synced single calls through `blasst_cute.decode` (content checks "
         "off), page 64, d128, one new token; K+V GB/s = K+V bytes / time.", ""]
    if data.get("host"):
        L += ["Host time per call (B=1 L=1024, CPU time of back-to-back calls): " + ", ".join(
            f"{k} {v:.1f} us" for k, v in data["host"].items()), ""]
    if data.get("dense"):
        L += ["## Dense", "", "| B | L | Hq/Hk | splits | best peer | peer us | BLASST dense us | "
              "K+V GB/s | vs best peer | of copy BW | kernel us (graph) | kernel of copy BW | "
              "same-size copy us | kernel vs same-size copy | "
              "skip on (0%) us | skip0 vs dense | kernel skip0 us | kernel skip0 vs dense | "
              "all peers (us) |", "|" + "---|" * 19]
        for r in data["dense"]:
            if "error" in r:
                L.append(f"| {r['batch']} | {r['seqlen']} | {r['heads_q']}/{r['heads_kv']} | "
                         f"error: {r['error'][:80]} |" + " |" * 16)
                continue
            peers_s = ", ".join(f"{n} {p['ms'] * 1e3:.1f}" if "ms" in p else f"{n} n/a"
                                for n, p in r["peers"].items())
            L.append(
                f"| {r['batch']} | {r['seqlen']} | {r['heads_q']}/{r['heads_kv']} | {r['splits']} | "
                f"{r['best_peer']} | {r['best_peer_ms'] * 1e3:.1f} | {r['dense_ms'] * 1e3:.1f} | "
                f"{r['dense_gbps']:.0f} | {r['dense_vs_best']:.2f}x | {r['dense_of_copy'] * 100:.0f}% | "
                f"{r['kernel_ms'] * 1e3:.1f} | {r['kernel_of_copy'] * 100:.0f}% | "
                f"{r['copy_same_ms'] * 1e3:.1f} | {r['copy_same_ms'] / r['kernel_ms']:.2f}x | "
                f"{r['skip0_ms'] * 1e3:.1f} | {r['skip0_vs_dense']:.2f}x | "
                f"{r['kernel_skip0_ms'] * 1e3:.1f} | {r['kernel_skip0_vs_dense']:.2f}x | {peers_s} |")
        L.append("")
    if data.get("sparse"):
        L += ["## Sparse", "", "| shape | workload | variant | sparsity | us | vs best peer | "
              "ideal 1/(1-s/2) | graph (device) us |", "|" + "---|" * 8]
        for r in data["sparse"]:
            shp = f"B={r['batch']} L={r['seqlen']} {r['heads_q']}/{r['heads_kv']}"
            if "error" in r:
                L.append(f"| {shp} | {r['workload']} | error: {r['error'][:80]} | | | | | |")
                continue
            for p in r["points"]:
                vs = f"{p['vs_best']:.2f}x" if p.get("vs_best") else "—"
                g = f"{p['graph_ms'] * 1e3:.1f}" if "graph_ms" in p else "—"
                ideal = f"{p['ideal']:.2f}x" if "ideal" in p else "—"
                L.append(f"| {shp} | {r['workload']} | {p['variant']} | {p['sparsity'] * 100:.1f}% | "
                         f"{p['ms'] * 1e3:.1f} | {vs} | {ideal} | {g} |")
            peers_s = ", ".join(f"{n} {p['ms'] * 1e3:.1f} us" if "ms" in p else
                                f"{n} n/a ({p['error'][:60]})" for n, p in r["peers"].items())
            L.append(f"| {shp} | {r['workload']} | peers: {peers_s} | | | | | |")
        L.append("")
    errs = {n: p["error"] for r in data.get("dense", []) + data.get("sparse", [])
            for n, p in r.get("peers", {}).items() if "error" in p}
    if errs:
        L += ["Peers that could not run: " + "; ".join(f"{n}: {e[:160]}" for n, e in errs.items()), ""]
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "results")))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--no-sparse", action="store_true")
    ap.add_argument("--tile-exp", action="store_true", help="only: TILE_EXPERIMENTS")
    ap.add_argument("--host-rounds", type=int, default=3)
    ap.add_argument("--host-only", action="store_true")
    ap.add_argument("--b1-rounds", type=int, default=0,
                    help="only: host time + B=1 L=128k peers/BLASST in alternation, N rounds")
    args = ap.parse_args()
    blasst_cute.set_content_checks(False)
    meta = stamp()
    card = "h200" if "H200" in meta.get("gpu", "") else "h100"
    tag = args.tag or f"decode-{card}-matrix"
    data = dict(meta=meta)
    data["copy_bw"] = copy_bandwidth()
    log(f"{meta.get('gpu')}: copy bandwidth {data['copy_bw'] / 1e9:.0f} GB/s (read + write)")
    data["host"] = host_time(rounds=args.host_rounds)
    if args.host_only:
        return
    pf = peers()
    if args.tile_exp:
        pf.pop("fa4-paged", None)
        data["tile_exp"] = tile_experiment(pf, args.iters)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, (args.tag or "decode-tile-exp") + ".json"), "w") as fh:
            json.dump(data, fh, indent=1, default=str)
        return
    if args.b1_rounds:
        pf.pop("fa4-paged", None)  # no split-KV on sm90: ~10x slower at B=1
        data["b1_rounds"] = b1_rounds(pf, args.iters, args.b1_rounds)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, (args.tag or "decode-b1-rounds") + ".json"), "w") as fh:
            json.dump(data, fh, indent=1, default=str)
        return

    def save():
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, tag + ".json"), "w") as fh:
            json.dump(data, fh, indent=1, default=str)
        with open(os.path.join(args.out, tag + ".md"), "w") as fh:
            fh.write(markdown(data))

    if not args.no_sparse:
        data["sparse"] = sparse_points(pf, args.iters, args.quick)
        save()
    if not args.no_dense:
        data["dense"] = []
        dense_matrix(pf, data["copy_bw"], args.iters, args.quick, rows=data["dense"], save=save)
    save()
    log(f"wrote {os.path.join(args.out, tag)}.json/.md")


if __name__ == "__main__":
    main()
