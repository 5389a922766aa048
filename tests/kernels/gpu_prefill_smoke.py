"""One-call GPU check + benchmark of the sm90 prefill kernel (run on an H100/H200).

    python tests/kernels/gpu_prefill_smoke.py [--quick] [--no-bench] [--sweep N] [--out DIR]

Prints one line per check, then a short timing table (TFLOP/s) against torch SDPA and, when
importable, FlashAttention-4 (flash_attn.cute.flash_attn_func).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from blasst_cute import reference  # noqa: E402
from blasst_cute.kernels import launch  # noqa: E402
from blasst_cute.testing import dense_attention, lse_err, rel_err  # noqa: E402

LOG = []


def log(msg=""):
    print(msg, flush=True)
    LOG.append(msg)


# ---------------------------------------------------------------------------------------------
# helpers shared with tests/kernels/test_prefill_sm90.py
# ---------------------------------------------------------------------------------------------

def sdpa_ref64(q, k, v, causal, scale):
    """float64 attention with bottom-right causal mask; rows with no visible key -> 0, lse -inf."""
    return dense_attention(q, k, v, causal=causal, softmax_scale=scale)




def run_kernel(q, k, v, *, causal, scale, factor=None, stats=False, cu_q=None, cu_k=None,
               max_q=None, tuning=None, pv=False):
    """Launch with poisoned outputs; returns out, lse, visited, skipped (None without stats) and,
    with pv, the P·V counts [2, B, Hq] (visited, skipped)."""
    varlen = cu_q is not None
    hq = q.shape[-2]
    if varlen:
        batch = cu_q.numel() - 1
        lse = torch.full((hq, q.shape[0]), float("nan"), device=q.device)
    else:
        batch = q.shape[0]
        lse = torch.full((batch, hq, q.shape[1]), float("nan"), device=q.device)
    out = torch.full((*q.shape[:-1], v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    vis = skp = pvc = None
    if stats:
        vis = torch.zeros(batch, hq, dtype=torch.int32, device=q.device)
        skp = torch.zeros_like(vis)
        pvc = torch.zeros(2, batch, hq, dtype=torch.int32, device=q.device)
    launch.run_prefill_sm90(q, k, v, out, lse, causal=causal, softmax_scale=scale,
                            threshold_scale_factor=factor, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                            max_seqlen_q=max_q, visited=vis, skipped=skp, pv_counts=pvc,
                            tuning=tuning)
    if pv:
        return out, lse, vis, skp, pvc
    return out, lse, vis, skp


def geometry(q, v, causal, tuning=None):
    tuning = tuning or {}
    return launch.prefill_geometry(q.shape[-1], v.shape[-1], causal, q.dtype,
                                   decision_rows=tuning.get("decision_rows", 16),
                                   tile_m=tuning.get("tile_m"))


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------

def _dims(D, Dv):
    """Head dims as logged: '128', or '192/128' when the v head dim differs."""
    return f"{D}" if Dv is None or Dv == D else f"{D}/{Dv}"


def check_dense(B, Lq, Lk, Hq, Hk, D, causal, dtype, seed=0, tol=1.2e-2, Dv=None, tuning=None):
    Dv = D if Dv is None else Dv
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, Lk, Hk, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, Lk, Hk, Dv, device="cuda", dtype=dtype, generator=g)
    scale = D ** -0.5
    out, lse, _, _ = run_kernel(q, k, v, causal=causal, scale=scale, tuning=tuning)
    torch.cuda.synchronize()
    ro, rl = sdpa_ref64(q, k, v, causal, scale)
    nan = int(torch.isnan(out).sum()) + int(torch.isnan(lse).sum())
    e, el = rel_err(out, ro), lse_err(lse, rl)
    ok = nan == 0 and e < tol and el < 5e-2
    log(f"{'PASS' if ok else 'FAIL'} dense B={B} Lq={Lq} Lk={Lk} H={Hq}/{Hk} D={_dims(D, Dv)} causal={causal} "
        f"{str(dtype)[6:]}{' ' + str(tuning) if tuning else ''}: rel_err={e:.2e} lse_maxerr={el:.2e} unwritten={nan}")
    return ok


def check_skip(B, Lq, Lk, Hq, Hk, D, causal, dtype, factor, seed=0, synthetic=True,
               flip_tol=0.005, verbose=True, tuning=None, Dv=None):
    from blasst_cute.workloads import random_qkv, synthetic_qkv
    mk = synthetic_qkv if synthetic else random_qkv
    q, k, v = mk(B, Lq, Lk, Hq, Hk, D, Dv, dtype=dtype, device="cuda", seed=seed)
    scale = D ** -0.5
    out, lse, vis, skp, pvc = run_kernel(q, k, v, causal=causal, scale=scale, factor=factor,
                                         stats=True, tuning=tuning, pv=True)
    torch.cuda.synchronize()
    ro, rl, st = reference.blasst_attention(q, k, v, causal=causal, softmax_scale=scale,
                                            threshold_scale_factor=factor,
                                            **geometry(q, v, causal, tuning))
    nan = int(torch.isnan(out).sum()) + int(torch.isnan(lse).sum())
    tot = int(st.visited.sum())
    vis_ok = bool((vis.long() == st.visited).all())
    dskip = int((skp.long() - st.skipped).abs().sum())
    pv_ok, dpv = _pv_counts_ok(pvc, st, tuning, flip_tol)
    e, el = rel_err(out, ro), lse_err(lse, rl)
    sp = float(skp.sum()) / max(1, int(vis.sum()))
    ok = nan == 0 and vis_ok and dskip <= max(1, flip_tol * tot) and pv_ok and e < 2e-2
    if verbose or not ok:
        log(f"{'PASS' if ok else 'FAIL'} skip B={B} Lq={Lq} Lk={Lk} H={Hq}/{Hk} D={_dims(D, Dv)} "
            f"causal={causal} {str(dtype)[6:]} factor={factor}{' ' + str(tuning) if tuning else ''}: sparsity={sp:.3f} "
            f"ref_sparsity={st.sparsity:.3f} visited_equal={vis_ok} |dskip|={dskip}/{tot} "
            f"pv_sparsity={float(pvc[1].sum()) / max(1, int(pvc[0].sum())):.3f} "
            f"ref_pv_sparsity={st.pv_sparsity:.3f} |dpv|={dpv} "
            f"rel_err_vs_ref={e:.2e} lse_err={el:.2e} unwritten={nan}")
    return ok


def _pv_counts_ok(pvc, st, tuning, flip_tol):
    """The kernel's P·V counts [2, B, H] against the reference's: the same visited, skipped up to
    borderline flips (none skipped where the build never skips a P·V: pv_skip=False).
    Returns (ok, |difference of skipped|)."""
    if (tuning or {}).get("pv_skip") is False:
        return bool((pvc[0].long() == st.pv_visited).all()) and int(pvc[1].sum()) == 0, 0
    dpv = int((pvc[1].long() - st.pv_skipped).abs().sum())
    ok = bool((pvc[0].long() == st.pv_visited).all())
    return ok and dpv <= max(1, flip_tol * int(st.pv_visited.sum())), dpv


def check_varlen(seqs_q, seqs_k, Hq, Hk, D, causal, dtype, factor=None, seed=0, Dv=None,
                 tuning=None):
    Dv = D if Dv is None else Dv
    g = torch.Generator(device="cuda").manual_seed(seed)
    tq, tk = sum(seqs_q), sum(seqs_k)
    q = torch.randn(tq, Hq, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(tk, Hk, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(tk, Hk, Dv, device="cuda", dtype=dtype, generator=g)
    cu_q = torch.tensor([0] + list(torch.tensor(seqs_q).cumsum(0)), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + list(torch.tensor(seqs_k).cumsum(0)), dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    out, lse, vis, skp, pvc = run_kernel(q, k, v, causal=causal, scale=scale, factor=factor,
                                         stats=factor is not None, cu_q=cu_q, cu_k=cu_k,
                                         max_q=max(seqs_q), tuning=tuning, pv=True)
    torch.cuda.synchronize()
    ro, rl, st = reference.blasst_attention_varlen(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, softmax_scale=scale,
        threshold_scale_factor=factor, **geometry(q, v, causal, tuning))
    nan = int(torch.isnan(out).sum()) + int(torch.isnan(lse).sum())
    e, el = rel_err(out, ro), lse_err(lse, rl)
    ok = nan == 0 and e < 1.5e-2 and el < 5e-2
    extra = ""
    if factor is not None:
        dskip = int((skp.long() - st.skipped).abs().sum())
        vis_ok = bool((vis.long() == st.visited).all())
        pv_ok, dpv = _pv_counts_ok(pvc, st, tuning, 0.005)
        ok = ok and vis_ok and pv_ok and dskip <= max(1, 0.005 * int(st.visited.sum()))
        extra = (f" visited_equal={vis_ok} |dskip|={dskip}/{int(st.visited.sum())} pv_ok={pv_ok} "
                 f"|dpv|={dpv}")
    log(f"{'PASS' if ok else 'FAIL'} varlen q={seqs_q} k={seqs_k} H={Hq}/{Hk} D={_dims(D, Dv)} "
        f"causal={causal} factor={factor}{' ' + str(tuning) if tuning else ''}: rel_err={e:.2e} lse_err={el:.2e} unwritten={nan}{extra}")
    return ok


def random_sweep(n, seed=1234):
    rng = random.Random(seed)
    fails = 0
    for i in range(n):
        D, Dv = rng.choice([(64, 64), (128, 128), (256, 256), (192, 128)])
        causal = rng.random() < 0.5
        dtype = rng.choice([torch.bfloat16, torch.float16])
        Hk = rng.choice([1, 2, 4])
        Hq = Hk * rng.choice([1, 2, 4])
        B = rng.choice([1, 2, 3])
        Lq = rng.randint(1, 700)
        Lk = rng.randint(1, 900) if rng.random() < 0.7 else Lq
        factor = rng.choice([None, 0.5, 2.0, 10.0, 100.0])
        try:
            if factor is None:
                ok = check_dense(B, Lq, Lk, Hq, Hk, D, causal, dtype, seed=i, Dv=Dv)
            else:
                ok = check_skip(B, Lq, Lk, Hq, Hk, D, causal, dtype, factor, seed=i,
                                synthetic=rng.random() < 0.5, verbose=False, Dv=Dv)
        except Exception as exc:  # noqa: BLE001
            ok = False
            log(f"ERROR sweep case {i}: {type(exc).__name__}: {exc}")
        fails += not ok
    log(f"{'PASS' if fails == 0 else 'FAIL'} random sweep: {n - fails}/{n} cases passed")
    return fails == 0


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------

def bench_ms(fn, warmup=5, rep=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def attn_flops(B, Lq, Lk, Hq, D, causal, Dv=None):
    """2 * B * Hq * pairs * (D + Dv), pairs = visible (query, key) pairs."""
    Dv = D if Dv is None else Dv
    if causal:
        # exact count for bottom-right causal: row i sees min(Lk, max(0, i + Lk - Lq + 1)) keys
        i = torch.arange(Lq, dtype=torch.float64)
        pairs = float((i + (Lk - Lq + 1)).clamp(0, Lk).sum())
    else:
        pairs = Lq * Lk
    return 2.0 * B * Hq * pairs * (D + Dv)


def benchmark(rows):
    try:
        from flash_attn.cute import flash_attn_func as fa4
    except Exception as exc:  # noqa: BLE001
        fa4 = None
        log(f"FA4 not importable: {type(exc).__name__}: {exc}")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    log("")
    log(f"{'config':44s} {'kernel':>9s} {'SDPA':>7s} {'FA4':>7s} {'ratio/FA4':>9s}  (TFLOP/s)")
    for (B, L, Hq, Hk, D, causal) in rows:
        q = torch.randn(B, L, Hq, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, L, Hk, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, L, Hk, D, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        lse = torch.empty(B, Hq, L, device="cuda")
        sc = D ** -0.5
        fl = attn_flops(B, L, L, Hq, D, causal)
        f_ours = lambda: launch.run_prefill_sm90(q, k, v, out, lse, causal=causal, softmax_scale=sc)
        t_ours = bench_ms(f_ours)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
                f_sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(
                    qt, kt, vt, is_causal=causal, enable_gqa=True)
                t_sdpa = bench_ms(f_sdpa)
        except Exception:  # noqa: BLE001
            t_sdpa = float("nan")
        t_fa4 = float("nan")
        if fa4 is not None:
            try:
                t_fa4 = bench_ms(lambda: fa4(q, k, v, causal=causal))
            except Exception as exc:  # noqa: BLE001
                log(f"FA4 failed: {type(exc).__name__}: {exc}")
        tf = lambda t: fl / t / 1e9
        log(f"B={B:<3d} L={L:<6d} H={Hq}/{Hk} D={D:<3d} causal={int(causal)}        "
            f"{tf(t_ours):9.1f} {tf(t_sdpa):7.1f} {tf(t_fa4):7.1f} {t_fa4 / t_ours:9.3f}")


def benchmark_skip(B, L, Hq, Hk, D, causal, factors):
    from blasst_cute.workloads import synthetic_qkv
    q, k, v = synthetic_qkv(B, L, L, Hq, Hk, D, dtype=torch.bfloat16, device="cuda", seed=0)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, L, device="cuda")
    sc = D ** -0.5
    fl = attn_flops(B, L, L, Hq, D, causal)
    t_dense = bench_ms(lambda: launch.run_prefill_sm90(q, k, v, out, lse, causal=causal,
                                                       softmax_scale=sc))
    log(f"skip bench B={B} L={L} H={Hq}/{Hk} D={D} causal={causal}: dense {fl / t_dense / 1e9:.1f} TFLOP/s "
        f"({t_dense:.3f} ms)")
    for f in factors:
        vis = torch.zeros(B, Hq, dtype=torch.int32, device="cuda")
        skp = torch.zeros_like(vis)
        launch.run_prefill_sm90(q, k, v, out, lse, causal=causal, softmax_scale=sc,
                                threshold_scale_factor=f, visited=vis, skipped=skp)
        sp = float(skp.sum()) / max(1, int(vis.sum()))
        t = bench_ms(lambda: launch.run_prefill_sm90(q, k, v, out, lse, causal=causal,
                                                     softmax_scale=sc, threshold_scale_factor=f))
        log(f"  factor={f:<8g} sparsity={sp:.3f} time={t:.3f} ms speedup_vs_dense={t_dense / t:.3f} "
            f"ideal={1 / (1 - sp / 2):.3f}")


def bench_skip_table(B, L, Hq, Hk, D, causal, factors, variants=None):
    """Dense vs skip variants on the synthetic workload: sparsity (decision groups skipped /
    visited), time, speedup over dense and the ideal 1 / (1 - s / 2), in one table."""
    from blasst_cute.workloads import synthetic_qkv
    variants = variants or {"warp16": {}}
    q, k, v = synthetic_qkv(B, L, L, Hq, Hk, D, dtype=torch.bfloat16, device="cuda", seed=0)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, L, device="cuda")
    sc = D ** -0.5
    fl = attn_flops(B, L, L, Hq, D, causal)
    run = lambda f, tune, **kw: launch.run_prefill_sm90(q, k, v, out, lse, causal=causal,
                                                         softmax_scale=sc, threshold_scale_factor=f,
                                                         tuning=tune, **kw)
    t_dense = bench_ms(lambda: run(None, None))
    log(f"skip table B={B} L={L} H={Hq}/{Hk} D={D} causal={int(causal)}: dense "
        f"{fl / t_dense / 1e9:.1f} TFLOP/s ({t_dense:.3f} ms)")
    log(f"  {'variant':10s} {'factor':>8s} {'sparsity':>8s} {'ms':>8s} {'vs dense':>8s} {'ideal':>6s}")
    for name, tune in variants.items():
        for f in factors:
            vis = torch.zeros(B, Hq, dtype=torch.int32, device="cuda")
            skp = torch.zeros_like(vis)
            run(f, tune, visited=vis, skipped=skp)
            sp = float(skp.sum()) / max(1, int(vis.sum()))
            t = bench_ms(lambda: run(f, tune))
            log(f"  {name:10s} {f:8g} {sp:8.3f} {t:8.3f} {t_dense / t:8.3f} {1 / (1 - sp / 2):6.3f}")


def bench_skip_pairs(B, L, Hq, Hk, D, causal, cases, warm_s=3.0, rep=30):
    """Skip variants vs dense, measured in pairs on a GPU in steady state (power / clocks).

    Every configuration is compiled and run once first (no compile gaps while timing), the GPU is
    heated with ``warm_s`` seconds of dense runs, then each case is timed between two dense
    timings: speedup = mean(dense before, dense after) / case. ``cases``: (name, factor, tuning).
    """
    from blasst_cute.workloads import synthetic_qkv
    q, k, v = synthetic_qkv(B, L, L, Hq, Hk, D, dtype=torch.bfloat16, device="cuda", seed=0)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, L, device="cuda")
    sc = D ** -0.5
    fl = attn_flops(B, L, L, Hq, D, causal)
    run = lambda f, tune, **kw: launch.run_prefill_sm90(q, k, v, out, lse, causal=causal,
                                                         softmax_scale=sc, threshold_scale_factor=f,
                                                         tuning=tune or None, **kw)
    dense = lambda: run(None, None)
    sparsity = {}
    for name, f, tune in cases:  # compile everything, read the sparsity
        vis = torch.zeros(B, Hq, dtype=torch.int32, device="cuda")
        skp = torch.zeros_like(vis)
        run(f, tune, visited=vis, skipped=skp)
        run(f, tune)
        sparsity[name] = float(skp.sum()) / max(1, int(vis.sum()))
    dense()
    torch.cuda.synchronize()
    t0 = time.time()
    while time.time() - t0 < warm_s:
        dense()
        torch.cuda.synchronize()
    t_d0 = bench_ms(dense, rep=rep)
    log(f"skip pairs B={B} L={L} H={Hq}/{Hk} D={D} causal={int(causal)}: dense (steady) "
        f"{fl / t_d0 / 1e9:.1f} TFLOP/s ({t_d0:.3f} ms)")
    log(f"  {'case':22s} {'sparsity':>8s} {'ms':>8s} {'dense ms':>8s} {'speedup':>7s} {'ideal':>6s}")
    dense_ts = [t_d0]
    for name, f, tune in cases:
        t = bench_ms(lambda: run(f, tune), rep=rep)
        t_d = bench_ms(dense, rep=rep)
        td = 0.5 * (dense_ts[-1] + t_d)
        dense_ts.append(t_d)
        sp = sparsity[name]
        log(f"  {name:22s} {sp:8.3f} {t:8.3f} {td:8.3f} {td / t:7.3f} {1 / (1 - sp / 2):6.3f}")
    log(f"  dense spread over the run: {min(dense_ts):.3f} .. {max(dense_ts):.3f} ms")


def bench_mla(shapes, factors, D=192, Dv=128, rep=20, fa4_only=False):
    """MLA prefill (q/k 192, v 128, MHA, causal) on the synthetic workload: this kernel dense and
    with skipping (factor sweep), ping-pong on/off, torch SDPA per backend (and FA4 if importable).
    TFLOP/s = 2 * B * H * pairs * (D + Dv) / t, pairs = visible (query, key) pairs; skip rows give
    the dense-equivalent TFLOP/s, the speedup over this kernel's dense run and the ideal
    1 / (1 - s / 2) (s = fraction of (16-row group, key tile) pairs skipped)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from blasst_cute.workloads import synthetic_qkv
    try:
        from flash_attn.cute import flash_attn_func as fa4
    except Exception as exc:  # noqa: BLE001
        fa4 = None
        log(f"FA4 not importable: {type(exc).__name__}: {exc}")
    log(f"MLA prefill bench: D={D} Dv={Dv} causal, bf16, {torch.cuda.get_device_name()}")
    data = {}
    for (B, L, H) in shapes:
        t0 = time.time()
        # Heads are independent: a smaller head count takes the first heads of a larger draw.
        hit = next((x for (b, l, h), x in data.items() if (b, l) == (B, L) and h >= H), None)
        if hit is None:
            hit = synthetic_qkv(B, L, L, H, H, D, Dv, dtype=torch.bfloat16, device="cuda", seed=0)
            data[(B, L, H)] = hit
        q, k, v = (x[:, :, :H].contiguous() for x in hit)
        out = torch.empty(B, L, H, Dv, device="cuda", dtype=torch.bfloat16)
        lse = torch.empty(B, H, L, device="cuda")
        sc = D ** -0.5
        fl = attn_flops(B, L, L, H, D, True, Dv)
        tf = lambda t: fl / t / 1e9
        run = lambda f, tune=None, **kw: launch.run_prefill_sm90(
            q, k, v, out, lse, causal=True, softmax_scale=sc, threshold_scale_factor=f,
            tuning=tune, **kw)
        run(None)
        torch.cuda.synchronize()
        t_dense = bench_ms(lambda: run(None), rep=rep)
        o_dense = out.clone()
        line = f"B={B} L={L} H={H}: data {time.time() - t0:.1f}s | ours dense {tf(t_dense):6.1f} TFLOP/s ({t_dense:.3f} ms)"
        if not fa4_only:
            t_pp = bench_ms(lambda: run(None, {"pingpong": True}), rep=rep)
            line += f" | pingpong {tf(t_pp):6.1f}"
        t_ref = float("nan")
        if fa4 is not None:
            try:
                fa4(q, k, v, causal=True, softmax_scale=sc)
                t_fa4 = bench_ms(lambda: fa4(q, k, v, causal=True, softmax_scale=sc), rep=rep)
                line += f" | FA4 {tf(t_fa4):6.1f} (ours/FA4 speed {t_fa4 / t_dense:.3f})"
            except Exception as exc:  # noqa: BLE001
                line += f" | FA4 ERROR {type(exc).__name__}: {str(exc)[:120]}"
        if fa4_only:
            log(line)
            continue
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        best = (float("inf"), "-")
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                with sdpa_kernel([be]):
                    f_sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(
                        qt, kt, vt, is_causal=True, scale=sc)
                    o_s = f_sdpa()
                    torch.cuda.synchronize()
                    t = bench_ms(f_sdpa, rep=rep)
                err = rel_err(o_dense, o_s.transpose(1, 2))
                line += f" | SDPA-{name} {tf(t):6.1f} (ours vs it rel_err {err:.1e})"
                best = min(best, (t, name))
            except Exception as exc:  # noqa: BLE001
                line += f" | SDPA-{name} n/a ({type(exc).__name__})"
        t_ref = best[0]
        line += f" | ours/best-SDPA speed {t_ref / t_dense:.3f}"
        log(line)
        log(f"  {'variant':9s} {'factor':>8s} {'sparsity':>8s} {'ms':>8s} {'TFLOP/s-eq':>10s} "
            f"{'vs dense':>8s} {'ideal':>6s} {'vs SDPA':>7s}")
        for tname, tune in (("default", None), ("pingpong", {"pingpong": True})):
            for f in factors:
                vis = torch.zeros(B, H, dtype=torch.int32, device="cuda")
                skp = torch.zeros_like(vis)
                run(f, tune, visited=vis, skipped=skp)
                sp = float(skp.sum()) / max(1, int(vis.sum()))
                t = bench_ms(lambda: run(f, tune), rep=rep)
                log(f"  {tname:9s} {f:8g} {sp:8.3f} {t:8.3f} {tf(t):10.1f} {t_dense / t:8.3f} "
                    f"{1 / (1 - sp / 2):6.3f} {t_ref / t:7.3f}")
        del q, k, v, qt, kt, vt, out, lse, o_dense
        torch.cuda.empty_cache()


def _prewarm_one(cfg):
    """Compile (through the disk cache) one configuration by a tiny launch."""
    dt, D, Dv, causal, kind, varlen, tuning = cfg
    try:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dt]
        hq = hk = 2
        if varlen:
            q = torch.randn(130, hq, D, device="cuda", dtype=dtype)
            k = torch.randn(130, hk, D, device="cuda", dtype=dtype)
            v = torch.randn(130, hk, Dv, device="cuda", dtype=dtype)
            cu = torch.tensor([0, 60, 130], dtype=torch.int32, device="cuda")
            kw = dict(cu_q=cu, cu_k=cu, max_q=70)
            batch = 2
        else:
            q = torch.randn(2, 130, hq, D, device="cuda", dtype=dtype)
            k = torch.randn(2, 130, hk, D, device="cuda", dtype=dtype)
            v = torch.randn(2, 130, hk, Dv, device="cuda", dtype=dtype)
            kw, batch = {}, 2
        factor = {"dense": None, "skip": 1.0, "skip_stats": 1.0,
                  "fpb": torch.ones(batch, device="cuda")}[kind]
        run_kernel(q, k, v, causal=causal, scale=D ** -0.5, factor=factor,
                   stats=kind in ("skip_stats", "fpb"), tuning=tuning, **kw)
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{cfg}: {type(exc).__name__}: {exc}"


def prewarm(workers):
    """Fill the disk compile cache in parallel for the configurations the GPU tests and the MLA
    benchmark use (set CUTE_DSL_ARCH the same way in every process: it is part of the cache key)."""
    import itertools
    import multiprocessing as mp
    pairs = [(64, 64), (128, 128), (256, 256), (192, 128)]
    cfgs = []
    for dt, (D, Dv), causal, kind in itertools.product(("bf16", "fp16"), pairs, (False, True),
                                                       ("dense", "skip_stats")):
        cfgs.append((dt, D, Dv, causal, kind, False, None))
    for (D, Dv), causal, kind in itertools.product(pairs, (False, True), ("dense", "skip_stats")):
        cfgs.append(("bf16", D, Dv, causal, kind, True, None))
    for causal in (False, True):
        cfgs.append(("bf16", 128, 128, causal, "skip_stats", False, {"decision_rows": 64}))
    cfgs.append(("bf16", 128, 128, True, "fpb", False, None))
    cfgs.append(("bf16", 192, 128, True, "fpb", False, None))
    cfgs.append(("bf16", 192, 128, True, "skip", False, None))
    cfgs.append(("bf16", 192, 128, True, "dense", False, {"pingpong": True}))
    cfgs.append(("bf16", 192, 128, True, "skip", False, {"pingpong": True}))
    cfgs.append(("bf16", 192, 128, True, "skip_stats", False, {"pingpong": True}))
    t0 = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        errs = [e for e in pool.imap_unordered(_prewarm_one, cfgs) if e]
    log(f"prewarm: {len(cfgs)} configurations in {time.time() - t0:.1f} s with {workers} workers; "
        f"{len(errs)} errors")
    for e in errs:
        log(f"  prewarm error {e}")


def bench_variants(B, L, Hq, Hk, D, causal, factor_sparse=1000.0):
    """Tuning knobs on synthetic data (same inputs for every variant)."""
    from blasst_cute.workloads import synthetic_qkv
    q, k, v = synthetic_qkv(B, L, L, Hq, Hk, D, dtype=torch.bfloat16, device="cuda", seed=0)
    qr, kr, vr = (torch.randn_like(x) for x in (q, k, v))
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, L, device="cuda")
    sc = D ** -0.5
    fl = attn_flops(B, L, L, Hq, D, causal)
    log(f"variants B={B} L={L} H={Hq}/{Hk} D={D} causal={causal} (TFLOP/s-equivalent, ms)")
    variants = [("dense", None, {}), ("dense random-data", None, {"_random": True}),
                ("dense lpt=off", None, {"lpt": False}),
                ("skip~0% smem-vote", 1e-4, {}), ("skip~0% bar.red", 1e-4, {"vote_smem": False}),
                ("skip~0% no-vote (debug)", 1e-4, {"debug_no_vote": True}),
                ("skip~0% no-pingpong", 1e-4, {"pingpong": False}),
                ("dense no-pingpong", None, {"pingpong": False}),
                (f"skip f={factor_sparse:g}", factor_sparse, {}),
                (f"skip f={factor_sparse:g} bar.red", factor_sparse, {"vote_smem": False}),
                (f"skip f={factor_sparse:g} no-pingpong", factor_sparse, {"pingpong": False})]
    for name, f, tune in variants:
        tune = dict(tune)
        rnd = tune.pop("_random", False)
        if "lpt" in tune and not causal:
            continue
        a = (qr, kr, vr) if rnd else (q, k, v)
        try:
            t = bench_ms(lambda: launch.run_prefill_sm90(*a, out, lse, causal=causal, softmax_scale=sc,
                                                         threshold_scale_factor=f, tuning=tune))
            log(f"  {name:32s} {fl / t / 1e9:7.1f} {t:7.3f}")
        except Exception as exc:  # noqa: BLE001
            log(f"  {name:32s} ERROR {type(exc).__name__}: {exc}")


def bench_tiles():
    """Dense tile-shape knobs for head dims 64 and 256 (random data)."""
    sets = {64: [(128, 2), (128, 3), (176, 2), (192, 2)], 256: [(80, 2), (64, 2)]}
    for D, opts in sets.items():
        B, L, Hq, Hk = 8, 4096, 32, 8
        q = torch.randn(B, L, Hq, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, L, Hk, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, L, Hk, D, device="cuda", dtype=torch.bfloat16)
        out, lse = torch.empty_like(q), torch.empty(B, Hq, L, device="cuda")
        for causal in (False, True):
            fl = attn_flops(B, L, L, Hq, D, causal)
            for tn, st in opts:
                tune = dict(tile_n=tn, num_stages=st)
                try:
                    t = bench_ms(lambda: launch.run_prefill_sm90(q, k, v, out, lse, causal=causal,
                                                                 softmax_scale=D ** -0.5, tuning=tune))
                    log(f"tiles D={D} causal={int(causal)} tile_n={tn} stages={st}: {fl / t / 1e9:.1f} TFLOP/s")
                except Exception as exc:  # noqa: BLE001
                    log(f"tiles D={D} tile_n={tn} stages={st}: ERROR {type(exc).__name__}: {exc}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--sweep", type=int, default=0)
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--only-bench", action="store_true")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--tiles", action="store_true")
    ap.add_argument("--skip-pairs", action="store_true",
                    help="skip variants vs dense timed in pairs in steady state (L=16k, hdim 128)")
    ap.add_argument("--pairs-set", default="full", choices=["full", "diag"])
    ap.add_argument("--skip-table", action="store_true",
                    help="only the dense vs skip-variant table (L=16k, hdim 128, 32/8 heads)")
    ap.add_argument("--mla-bench", action="store_true",
                    help="MLA prefill (192/128, MHA, causal) dense + skip sweep vs SDPA at 32k tokens")
    ap.add_argument("--fa4-only", action="store_true", help="with --mla-bench: ours dense vs FA4 only")
    ap.add_argument("--prewarm", type=int, default=0,
                    help="fill the disk compile cache with N parallel workers, then exit")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    log(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    t0 = time.time()
    results = []

    def guard(fn, *a, **kw):
        try:
            results.append(fn(*a, **kw))
        except Exception as exc:  # noqa: BLE001
            results.append(False)
            log(f"ERROR {fn.__name__}{a}: {type(exc).__name__}: {exc}")
            log(traceback.format_exc(limit=3))

    bf, fp = torch.bfloat16, torch.float16
    if args.prewarm:
        prewarm(args.prewarm)
        return
    if args.mla_bench:
        shapes = [(4, 8192, 32), (2, 16384, 32), (4, 8192, 16), (2, 16384, 16)]
        if args.fa4_only:
            shapes = shapes[:2]
        guard(bench_mla, shapes, [1e-4, 1.0, 10.0, 100.0, 1000.0, 5000.0], fa4_only=args.fa4_only)
        os.makedirs(args.out, exist_ok=True)
        name = "mla_fa4.log" if args.fa4_only else "mla_bench.log"
        with open(os.path.join(args.out, name), "w") as f:
            f.write("\n".join(LOG) + "\n")
        return
    if args.skip_pairs:
        w, g = {}, {"decision_rows": 64}
        if args.pairs_set == "diag":
            nv = {"debug_no_vote": True}
            cases = [("warp16 f=1e-4 #1", 1e-4, w), ("warp16 f=1e-4 #2", 1e-4, w),
                     ("warp16 f=1e-4 #3", 1e-4, w),
                     ("nevote f=1e-4", 1e-4, nv),
                     ("nevote alwaysPV f=1e-4", 1e-4, dict(nv, pv_skip=False)),
                     ("alwaysPV f=1e-4", 1e-4, {"pv_skip": False}),
                     ("alwaysPV f=1000", 1000.0, {"pv_skip": False}),
                     ("warp16 f=1000", 1000.0, w),
                     ("warp16 f=5000", 5000.0, w),
                     ("warp16 f=1e-4 #4", 1e-4, w)]
        else:
            cases = [("warp16 f=1e-4", 1e-4, w), ("warp16 f=2e4(off)", 2e4, w),
                   ("warp16 nevote f=1e-4", 1e-4, {"debug_no_vote": True}),
                   ("wg64 f=1e-4", 1e-4, g),
                   ("warp16 f=10", 10.0, w), ("warp16 f=100", 100.0, w),
                   ("warp16 f=1000", 1000.0, w), ("warp16 f=5000", 5000.0, w),
                   ("wg64 f=1000", 1000.0, g), ("wg64 f=5000", 5000.0, g),
                   ("warp16 st3 f=5000", 5000.0, {"num_stages": 3}),
                   ("noV(debug) f=1e-4", 1e-4, {"debug_no_v_load": True}),
                   ("noV(debug) f=5000", 5000.0, {"debug_no_v_load": True}),
                   ("warp16 f=1e-4 again", 1e-4, w)]
        for causal in ((True,) if args.pairs_set == "diag" else (True, False)):
            guard(bench_skip_pairs, 2, 16384, 32, 8, 128, causal, cases)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "skip_pairs.log"), "w") as f:
            f.write("\n".join(LOG) + "\n")
        return
    if args.skip_table:
        fs = [1e-4, 10.0, 100.0, 1000.0, 5000.0, 20000.0]
        var = {"warp16": {}, "wg64": {"decision_rows": 64}, "warp16_st3": {"num_stages": 3},
               "noV_debug": {"debug_no_v_load": True}}
        for causal in (True, False):
            guard(bench_skip_table, 2, 16384, 32, 8, 128, causal, fs, var)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "skip_table.log"), "w") as f:
            f.write("\n".join(LOG) + "\n")
        return
    if args.variants:
        guard(bench_variants, 2, 16384, 32, 8, 128, True)
        guard(bench_variants, 2, 16384, 32, 8, 128, False)
    if args.tiles:
        guard(bench_tiles)
    if args.only_bench or args.skip_correctness:
        args.quick = args.quick or args.only_bench
        results.append(True)
    else:
        correctness(args, guard)
    log(f"correctness: {sum(map(bool, results))}/{len(results)} passed ({time.time() - t0:.0f} s)")
    if not args.no_bench:
        rows = [(8, 4096, 32, 8, 128, False), (8, 4096, 32, 8, 128, True),
                (2, 16384, 32, 8, 128, False), (2, 16384, 32, 8, 128, True)]
        if not args.quick:
            rows += [(1, 32768, 32, 8, 128, False), (1, 32768, 32, 8, 128, True),
                     (8, 4096, 32, 8, 64, False), (8, 4096, 32, 8, 64, True),
                     (8, 4096, 32, 8, 256, False), (8, 4096, 32, 8, 256, True)]
        guard(benchmark, rows)
        if not args.only_bench:
            guard(benchmark_skip, 2, 16384, 32, 8, 128, True, [1e-4, 1.0, 10.0, 100.0, 1000.0, 5000.0])
            if not args.quick:
                guard(benchmark_skip, 2, 16384, 32, 8, 128, False, [1e-4, 10.0, 100.0, 1000.0, 5000.0])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_prefill_smoke.log"), "w") as f:
        f.write("\n".join(LOG) + "\n")


def correctness(args, guard):
    bf, fp = torch.bfloat16, torch.float16
    guard(check_dense, 1, 256, 256, 2, 2, 128, False, bf)
    guard(check_dense, 2, 300, 517, 4, 2, 128, False, bf)
    guard(check_dense, 2, 300, 517, 4, 2, 128, True, bf)
    guard(check_dense, 1, 700, 250, 4, 1, 128, True, bf)
    guard(check_skip, 1, 1024, 1024, 4, 2, 128, True, bf, 50.0)
    if not args.quick:
        for D in (64, 128, 256):
            for causal in (False, True):
                for dt in (bf, fp):
                    guard(check_dense, 2, 333, 1000, 8, 2, D, causal, dt)
                guard(check_skip, 2, 1000, 1500, 4, 1, D, causal, bf, 30.0)
                guard(check_skip, 1, 777, 777, 4, 4, D, causal, fp, 300.0, synthetic=False)
        guard(check_dense, 3, 1, 1, 2, 1, 64, False, bf)
        guard(check_dense, 1, 129, 65, 2, 1, 128, True, bf)
        guard(check_varlen, [100, 1, 300, 257], [200, 5, 300, 700], 4, 2, 128, True, bf)
        guard(check_varlen, [100, 1, 300, 257], [200, 5, 300, 700], 4, 2, 64, False, bf, 20.0)
        guard(check_varlen, [513, 64], [1000, 64], 2, 2, 256, True, fp, 50.0)
        for causal in (False, True):  # MLA prefill head dims
            guard(check_dense, 2, 333, 1000, 8, 2, 192, causal, bf, Dv=128)
            guard(check_skip, 2, 1000, 1500, 4, 4, 192, causal, bf, 30.0, Dv=128)
            guard(check_varlen, [100, 1, 300, 257], [200, 5, 300, 700], 4, 4, 192, causal, bf, 20.0,
                  Dv=128)
    if args.sweep:
        guard(random_sweep, args.sweep)


if __name__ == "__main__":
    main()
