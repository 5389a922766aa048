"""One-call GPU check + benchmark of the sm90 decode kernel (run on an H100/H200).

    python tests/kernels/gpu_decode_smoke.py [--quick] [--no-bench] [--sweep N] [--out DIR]

Checks (each prints one line): dense vs float64 SDPA, skipping vs the reference with the kernel's
geometry (outputs and counters), paged (random block tables) and contiguous caches, ragged
cache_seqlens, poisoned outputs, CUDA-graph capture + replay with a new factor tensor, a randomized
sweep. Then a timing table: K+V read bandwidth of the kernel (dense, skip at ~0/70/90%% sparsity)
against torch SDPA (cuDNN / flash backends) and the card's copy bandwidth.
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

sys.path.insert(0, os.environ.get("BLASST_ROOT")
                or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from blasst_cute import reference  # noqa: E402
from blasst_cute.kernels import launch_decode  # noqa: E402
from blasst_cute.testing import CheckRecorder, dense_attention, lse_err, rel_err  # noqa: E402
from blasst_cute.testing import replay_matches_eager  # noqa: E402
from blasst_cute.testing import time_graph, time_per_call  # noqa: E402

LOG = []
GEO_KEYS = ("block_m", "block_n", "pack_gqa", "order", "num_splits", "rows_per_decision",
            "split_tiles", "interleave_splits")


def log(msg=""):
    print(msg, flush=True)
    LOG.append(msg)


# ---------------------------------------------------------------------------------------------
# helpers (also used by tests/kernels/test_decode_sm90.py)
# ---------------------------------------------------------------------------------------------

def make_cache(B, cap, hk, d, page_size, *, seed=0, device="cuda", dtype=torch.bfloat16, k=None,
               v=None):
    """Contiguous K/V [B, cap, hk, d] and, with page_size, a shuffled paged copy.

    Returns (k, v, k_cache, v_cache, block_table); block_table None when page_size is None.
    Unused pages/slots hold random data.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    if k is None:
        k = torch.randn(B, cap, hk, d, generator=g, device=device).to(dtype)
        v = torch.randn(B, cap, hk, d, generator=g, device=device).to(dtype)
    if page_size is None:
        return k, v, k, v, None
    per = -(-cap // page_size)
    n_pages = B * per + 5
    perm = torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed))[: B * per]
    bt = perm.view(B, per).to(device=device, dtype=torch.int32)
    kc = torch.randn(n_pages, page_size, hk, d, generator=g, device=device).to(dtype)
    vc = torch.randn(n_pages, page_size, hk, d, generator=g, device=device).to(dtype)
    pad = per * page_size - cap
    kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(B * per, page_size, hk, d)
    vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).view(B * per, page_size, hk, d)
    kc[bt.reshape(-1).long()] = kp
    vc[bt.reshape(-1).long()] = vp
    return k, v, kc, vc, bt


def sdpa_ref64(q, k, v, lens, causal, scale):
    """float64 decode attention per sequence; out [B, Lq, Hq, Dv], lse [B, Hq, Lq]."""
    B, lq, hq, _ = q.shape
    out = torch.zeros(B, lq, hq, v.shape[-1], dtype=torch.float64, device=q.device)
    lse = torch.full((B, hq, lq), -math.inf, dtype=torch.float64, device=q.device)
    for b in range(B):
        L = int(lens[b])
        if L:
            o, l = dense_attention(q[b:b + 1], k[b:b + 1, :L], v[b:b + 1, :L], causal=causal,
                                   softmax_scale=scale)
            out[b], lse[b] = o[0], l[0]
    return out, lse




def run_kernel(q, kc, vc, lens, bt, *, factor=None, stats=True, causal=True, num_splits=None,
               tuning=None, scale=None):
    """Launch with poisoned outputs; returns out, lse, (visited, skipped, v_loaded), geo."""
    B, lq, hq, d = q.shape
    hk = kc.shape[2]
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, hq, lq), float("nan"), dtype=torch.float32, device=q.device)
    cnt = [torch.zeros(B, hk, dtype=torch.int32, device=q.device) for _ in range(3)] if stats \
        else [None, None, None]
    geo = launch_decode.run_decode_sm90(
        q, kc, vc, out, lse, cache_seqlens=lens, block_table=bt,
        softmax_scale=scale if scale is not None else d ** -0.5, threshold_scale_factor=factor,
        visited=cnt[0], skipped=cnt[1], v_loaded=cnt[2], causal=causal, num_splits=num_splits,
        tuning=tuning)
    return out, lse, cnt, geo


def check_case(B, lq, hq, hk, lens, page_size, *, factor=None, seed=0, causal=True,
               num_splits=None, synth=False, d=128, dense_check=True, head_major=False,
               tuning=None):
    """One correctness case; returns (ok, message). head_major: the cache is stored head-major
    ([B, Hk, S, D] / HND pages) and passed as its strided token-major view. tuning: the
    launcher's per-call kernel options (e.g. the non-default merge paths)."""
    dev = "cuda"
    cap = max(max(lens), 1)
    if page_size is None:
        cap = cap + 37  # capacity beyond the longest sequence
    torch.manual_seed(seed)
    if synth:
        from blasst_cute.workloads import synthetic_qkv
        q, k, v = synthetic_qkv(B, lq, cap, hq, hk, d, device=dev, seed=seed)
    else:
        g = torch.Generator(device=dev).manual_seed(seed + 1)
        q = torch.randn(B, lq, hq, d, generator=g, device=dev).to(torch.bfloat16)
        k = v = None
    k, v, kc, vc, bt = make_cache(B, cap, hk, d, page_size, seed=seed, k=k, v=v)
    if head_major:
        kc, vc = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (kc, vc))
    lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
    scale = d ** -0.5
    out, lse, (vis, skp, vld), geo = run_kernel(q, kc, vc, lens_t, bt, factor=factor,
                                                causal=causal, num_splits=num_splits,
                                                tuning=tuning)
    torch.cuda.synchronize()
    msgs = []
    ok = True
    if not bool(torch.isfinite(out).all()):
        return False, "non-finite output"
    ro, rl, rst = reference.blasst_attention_paged(
        q, k, v, cache_seqlens=lens_t, causal=causal, softmax_scale=scale,
        threshold_scale_factor=factor, **{kk: geo[kk] for kk in GEO_KEYS})
    e_ref = rel_err(out, ro)
    l_ref = lse_err(lse, rl)
    msgs.append(f"err_ref={e_ref:.2e} lse_ref={l_ref:.1e}")
    tol = 2e-2
    if factor is None and dense_check:
        o64, l64 = sdpa_ref64(q, k, v, lens, causal, scale)
        e64 = rel_err(out, o64)
        eb = rel_err(o64.to(torch.bfloat16), o64)
        msgs.append(f"err64={e64:.2e} (bf16 rounding {eb:.1e}) lse64={lse_err(lse, l64):.1e}")
        ok &= e64 <= 2 * eb + 4e-3 and lse_err(lse, l64) < 2e-2
    ok &= e_ref < tol and l_ref < 5e-2
    vis_r, skp_r = rst.visited.to(vis.device), rst.skipped.to(vis.device)
    dv = int((vis.long() - vis_r).abs().sum())
    ds = int((skp.long() - skp_r).abs().sum())
    tot = int(vis_r.sum())
    ok &= dv == 0 and ds <= max(1, int(0.005 * tot))
    ok &= bool((vld.long() == vis.long() - skp.long()).all())
    msgs.append(f"visited={int(vis.sum())}/{tot} skipped={int(skp.sum())}/ref {int(skp_r.sum())} "
                f"v_loaded={int(vld.sum())} splits={geo['num_splits']}")
    return bool(ok), " ".join(msgs)


def graph_check(B=3, lq=2, hq=16, hk=4, L=3000, page_size=64):
    """Capture with a factor tensor, replay with a new factor: equals the eager result."""
    dev = "cuda"
    from blasst_cute.workloads import synthetic_qkv
    q, k, v = synthetic_qkv(B, lq, L, hq, hk, 128, device=dev, seed=3)
    k, v, kc, vc, bt = make_cache(B, L, hk, 128, page_size, seed=3, k=k, v=v)
    lens = torch.tensor([L, L // 2 + 1, 1], dtype=torch.int32, device=dev)[:B]
    fac = torch.full((B,), 5.0, device=dev)
    geo = launch_decode.plan_decode_sm90(q, kc, bt)
    S = geo["num_splits"]
    # partials + the fused merge's arrival counters: nothing allocated inside the captured call
    ws = (torch.empty(S, B, lq, hq, 128, device=dev), torch.empty(S, B, hq, lq, device=dev),
          torch.zeros(B * hk * 4, dtype=torch.int32, device=dev))
    out = torch.empty_like(q)
    lse = torch.empty(B, hq, lq, device=dev)
    cnt = [torch.zeros(B, hk, dtype=torch.int32, device=dev) for _ in range(3)]

    def call():
        for c in cnt:
            c.zero_()
        launch_decode.run_decode_sm90(q, kc, vc, out, lse, cache_seqlens=lens, block_table=bt,
                                      softmax_scale=128 ** -0.5, threshold_scale_factor=fac,
                                      visited=cnt[0], skipped=cnt[1], v_loaded=cnt[2],
                                      workspace=ws)

    res = replay_matches_eager(call, fac, out, lse, cnt)  # lambda = f / L stays < 1
    ok = all(r[1] for r in res) and res[1][2] > res[0][2]
    return ok, " ".join(f"f={f}: replay==eager {s_} skipped {sk}/{vi}" for f, s_, sk, vi in res)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------

ALT_TUNINGS = [
    ("fused pipelined merge", {"fused_merge": True, "pipelined_merge": True}),
    ("combine, old loops, no PDL", {"fused_merge": False, "pipelined_merge": False,
                                    "use_pdl": False}),
    ("fused old merge, producer V", {"fused_merge": True, "pipelined_merge": False,
                                     "producer_v": True}),
    ("page ids read after the length", {"speculate_pages": False}),
]


def run_checks(quick=False, sweep=0):
    rec = CheckRecorder(log)
    results = rec.results

    lens_a = [1, 64, 128, 1000, 4096]
    rec("dense contiguous B5 lq1 G4", lambda: check_case(5, 1, 32, 8, lens_a, None))
    rec("dense paged64 B5 lq1 G4 split8", lambda: check_case(5, 1, 32, 8, lens_a, 64, num_splits=8))
    rec("dense paged16 lq3 G4", lambda: check_case(3, 3, 16, 4, [2, 300, 2048], 16))
    rec("dense paged256 lq1 G16", lambda: check_case(3, 1, 64, 4, [256, 1, 5000], 256))
    rec("dense paged32 lq8 G16 (2 m-blocks)", lambda: check_case(2, 8, 32, 2, [8, 999], 32))
    rec("dense empty seq", lambda: check_case(3, 1, 8, 8, [0, 5, 0], 64, num_splits=3))
    rec("skip contiguous synth B2 lq1 G4 f=30",
        lambda: check_case(2, 1, 32, 8, [4096, 3000], None, factor=30.0, synth=True))
    rec("skip paged64 synth B3 lq2 G4 f=100 split4",
        lambda: check_case(3, 2, 32, 8, [4096, 2048, 700], 64, factor=100.0, synth=True,
                           num_splits=4))
    rec("skip paged16 synth lq1 G8 f=300",
        lambda: check_case(2, 1, 16, 2, [8192, 1111], 16, factor=300.0, synth=True))
    rec("skip paged256 synth lq4 G4 f=1000 split3",
        lambda: check_case(2, 4, 16, 4, [6000, 1], 256, factor=1000.0, synth=True, num_splits=3))
    rec("cuda graph replay new factor", lambda: graph_check())
    # The non-default kernel paths (launcher tuning): the fused merge for many rows (G16, two
    # m-blocks) and the old merge loops, the producer-issued V loads, no PDL, the speculative
    # first page ids (pages past a sequence's last one re-read: 999 keys of 32-key pages).
    for name, tuning in ALT_TUNINGS:
        rec(f"{name}: dense paged32 lq8 G16 split3",
            lambda t=tuning: check_case(2, 8, 32, 2, [8, 999], 32, num_splits=3, tuning=t))
        rec(f"{name}: skip paged64 synth B3 lq1 G4 f=100",
            lambda t=tuning: check_case(3, 1, 32, 8, [4096, 2048, 700], 64, factor=100.0,
                                        synth=True, tuning=t))
    if sweep:
        rng = random.Random(0)
        n_ok = 0
        t0 = time.time()
        fails = []
        for i in range(sweep):
            G = rng.choice([1, 2, 4, 8, 16])
            hk = rng.choice([1, 2, 4])
            lq = rng.choice([1, 1, 2, 4, 8])
            B = rng.randint(1, 4)
            ps = rng.choice([None, 16, 32, 64, 128, 256])
            lens = [rng.choice([0, 1, rng.randint(1, 3000), 64 * rng.randint(1, 40),
                                128 * rng.randint(1, 20)]) for _ in range(B)]
            factor = rng.choice([None, 1.0, 10.0, 100.0, 1000.0])
            ns = rng.choice([None, 1, 2, 5])
            hm = rng.random() < 0.3
            try:
                ok, msg = check_case(B, lq, G * hk, hk, lens, ps, factor=factor, seed=100 + i,
                                     num_splits=ns, synth=factor is not None and max(lens) >= 64,
                                     dense_check=False, head_major=hm)
            except Exception as e:  # noqa: BLE001
                ok, msg = False, f"EXC {e}"
            n_ok += ok
            if not ok:
                fails.append(f"  case {i}: B{B} lq{lq} G{G} hk{hk} ps{ps} lens{lens} f{factor} "
                             f"ns{ns} head_major{hm}: {msg}")
        for f in fails[:10]:
            log(f)
        results.append(n_ok == sweep)
        log(f"[{'PASS' if n_ok == sweep else 'FAIL'}] random sweep: {n_ok}/{sweep} "
            f"({time.time() - t0:.1f}s)")
    return all(results)


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------

def copy_bandwidth():
    src = torch.empty(2 * 1024 ** 3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_per_call(lambda: dst.copy_(src), 10)
    return 2 * 2 * 1024 ** 3 / t


def sdpa_peers(q, k, v, scale):
    """{name: fn} of torch SDPA backends that accept this decode shape (GQA via enable_gqa)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    qt = q.transpose(1, 2)  # B, Hq, 1, D
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # B, Hk, L, D (strided views)
    peers = {}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("mem_eff", SDPBackend.EFFICIENT_ATTENTION)):
        def fn(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=True)
        try:
            fn()
            torch.cuda.synchronize()
            peers[name] = fn
        except Exception as e:  # noqa: BLE001
            log(f"  (sdpa {name} unavailable: {str(e).splitlines()[0][:100]})")
    try:
        from flash_attn.cute import flash_attn_func as fa4

        def fa4_fn():
            return fa4(q, k, v, softmax_scale=scale, causal=False)
        t0 = time.time()
        fa4_fn()
        torch.cuda.synchronize()
        peers["fa4"] = fa4_fn
        log(f"  (fa4 ready, first call {time.time() - t0:.1f}s)")
    except Exception as e:  # noqa: BLE001
        log(f"  (fa4 unavailable: {str(e).splitlines()[0][:100] if str(e) else type(e).__name__})")
    return peers


def bench(configs, page_size=64, with_n64=False):
    from blasst_cute.workloads import synthetic_qkv
    bw_copy = copy_bandwidth()
    log(f"card: {torch.cuda.get_device_name()}  copy bandwidth (read+write) {bw_copy / 1e12:.2f} TB/s")
    log(f"{'B':>3} {'L':>7} {'Hq/Hk':>6} {'variant':<14} {'sparsity':>8} {'time us':>9} "
        f"{'K+V TB/s':>9} {'vs best peer':>12}")
    for B, L, hq, hk in configs:
        d = 128
        q1, k1, v1 = synthetic_qkv(1, 1, L, hq, hk, d, device="cuda", seed=7)
        q = q1.expand(B, -1, -1, -1).contiguous()
        k = k1.expand(B, -1, -1, -1).contiguous()
        v = v1.expand(B, -1, -1, -1).contiguous()
        del q1, k1, v1
        _, _, kc, vc, bt = make_cache(B, L, hk, d, page_size, seed=1, k=k, v=v)
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        kv_bytes = 2 * B * L * hk * d * 2
        scale = d ** -0.5
        peers = sdpa_peers(q, k, v, scale)
        best = None
        for name, fn in peers.items():
            t = time_per_call(fn)
            best = t if best is None else min(best, t)
            log(f"{B:>3} {L:>7} {hq}/{hk:<3} {'sdpa-' + name:<14} {'':>8} {t * 1e6:>9.1f} "
                f"{kv_bytes / t / 1e12:>9.2f} {'':>12}")
        del k, v
        out = torch.empty_like(q)
        lse = torch.empty(B, hq, 1, device="cuda")
        geo = launch_decode.plan_decode_sm90(q, kc, bt)
        S = geo["num_splits"]
        ws = (torch.empty(S, B, 1, hq, d, device="cuda"), torch.empty(S, B, hq, 1, device="cuda"))

        def mk(factor, tuning=None):
            return lambda: launch_decode.run_decode_sm90(
                q, kc, vc, out, lse, cache_seqlens=lens, block_table=bt, softmax_scale=scale,
                threshold_scale_factor=factor, workspace=ws, tuning=tuning)

        def sparsity(factor, tuning=None):
            cnt = [torch.zeros(B, hk, dtype=torch.int32, device="cuda") for _ in range(3)]
            launch_decode.run_decode_sm90(q, kc, vc, out, lse, cache_seqlens=lens, block_table=bt,
                                          softmax_scale=scale, threshold_scale_factor=factor,
                                          visited=cnt[0], skipped=cnt[1], v_loaded=cnt[2],
                                          workspace=ws, tuning=tuning)
            return float(cnt[1].sum()) / max(1, float(cnt[0].sum()))

        grid = [1, 3, 10, 30, 100, 200, 300, 500, 700, 1000, 1500, 2000, 3000, 5000, 7000, 1e4,
                2e4, 3e4, 5e4, 1e5, 2e5, 3e5, 1e6]
        sp = {f: sparsity(f) for f in grid}
        variants = [("dense", None, 0.0, None), ("skip f=1e-6", 1e-6, sparsity(1e-6), None)]
        for target in (0.7, 0.9):
            f = min(grid, key=lambda x: abs(sp[x] - target))
            variants.append((f"skip f={f:g}", f, sp[f], None))
        if with_n64:
            t64 = dict(tile_n=64)
            variants.append(("dense n64", None, 0.0, t64))
            f = variants[2][1]
            variants.append((f"skip n64 f={f:g}", f, sparsity(f, t64), t64))
        t_dense = None
        for name, f, s, tun in variants:
            t_eager = time_per_call(mk(f, tun))
            t = time_graph(mk(f, tun))
            if f is None:
                t_dense = t
            rel = f"{best / t:.2f}x" if best else "-"
            log(f"{B:>3} {L:>7} {hq}/{hk:<3} {name:<14} {s * 100:>7.1f}% {t * 1e6:>9.1f} "
                f"{kv_bytes / t / 1e12:>9.2f} {rel:>12}   (vs own dense {t_dense / t:.2f}x; "
                f"eager {t_eager * 1e6:.1f} us)")
        del kc, vc, q, out

    # host overhead: a tiny problem (device time << host time), skip variant, cache warm
    for B, L in ((1, 1024), (8, 1024)):
        q = torch.randn(B, 1, 32, 128, device="cuda").to(torch.bfloat16)
        _, _, kc, vc, bt = make_cache(B, L, 8, 128, 64, seed=2)
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        lse = torch.empty(B, 32, 1, device="cuda")
        geo = launch_decode.plan_decode_sm90(q, kc, bt)
        S = geo["num_splits"]
        ws = (torch.empty(S, B, 1, 32, 128, device="cuda"), torch.empty(S, B, 32, 1, device="cuda"))
        def fn(q=q, kc=kc, vc=vc, out=out, lse=lse, lens=lens, bt=bt, ws=ws):
            launch_decode.run_decode_sm90(
                q, kc, vc, out, lse, cache_seqlens=lens, block_table=bt, softmax_scale=0.088,
                threshold_scale_factor=1e-6, workspace=ws)
        t_dev = time_graph(fn)
        fn()
        torch.cuda.synchronize()
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t_host = (time.perf_counter() - t0) / n
        torch.cuda.synchronize()
        log(f"host time per call B={B} L={L} ({n} calls, splits={S}): {t_host * 1e6:.1f} us "
            f"(device time per call {t_dev * 1e6:.1f} us)")


def api_bench(iters=30):
    """The perf/bench.py methodology (median of CUDA-event-bracketed single calls through
    ``blasst_cute.decode``, content checks off, rotating input sets), next to torch SDPA
    cuDNN/flash timed the same way, plus the kernel-only time (CUDA graph replay) and the host
    time per call. Prints one line per point."""
    import blasst_cute
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "perf")))
    import bench as pb  # perf/bench.py
    from blasst_cute.workloads import synthetic_qkv, to_paged
    from blasst_cute import api
    api.set_content_checks(False)
    # host time per call (B=1, L=1024), as perf/bench.py
    q, k, v = synthetic_qkv(1, 1, 1024, 32, 8, 128, dtype=torch.bfloat16, device="cuda")
    kc, vc, bt = to_paged(k, v, 64)
    lens = torch.full((1,), 1024, dtype=torch.int32, device="cuda")
    for f in ((100.0, None) if not os.environ.get("BENCH_CFGS") else ()):
        h = pb.host_us_per_call(lambda: blasst_cute.decode(q, kc, vc, cache_seqlens=lens,
                                                           block_table=bt, threshold_scale_factor=f))
        log(f"API host us/call B=1 L=1024 factor={f}: {h:.1f}")
    cfgs = [(1, 32768, 32, 8, 30000), (8, 32768, 32, 8, 5000), (64, 32768, 32, 8, 1000),
            (1, 131072, 32, 8, 60000), (1, 32768, 64, 4, 30000), (8, 32768, 64, 4, 15000),
            (64, 32768, 64, 4, 5000)]
    if os.environ.get("BENCH_CFGS"):  # e.g. "3,4,5": a subset (device time is scarce)
        cfgs = [cfgs[int(i)] for i in os.environ["BENCH_CFGS"].split(",")]
    log(f"{'shape':<24} {'what':<14} {'sparsity':>8} {'ms':>8} {'GB/s':>7} {'vs best':>8}")
    for B, L, hq, hk, fac in cfgs:
        kv_bytes = 2 * B * L * hk * 128 * 2
        sets = []
        for sd in range(pb.n_rotations(kv_bytes)):
            q, k, v = synthetic_qkv(B, 1, L, hq, hk, 128, dtype=torch.bfloat16, device="cuda",
                                    seed=sd)
            kc, vc, bt = to_paged(k, v, 64, seed=sd)
            sets.append((q, k, v, kc, vc, bt))
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        shape = f"B={B} L={L} {hq}/{hk}"
        best = None
        peers = {n: pb._sdpa(n) for n in ("cudnn", "flash")}
        for name, fn in peers.items():
            try:
                ms = pb.bench_ms([lambda s=s, fn=fn: fn(s[0], s[1], s[2], False) for s in sets],
                                 iters=iters)
            except Exception as e:  # noqa: BLE001
                log(f"{shape:<24} sdpa-{name}: {type(e).__name__}")
                continue
            best = ms if best is None else min(best, ms)
            log(f"{shape:<24} {'sdpa-' + name:<14} {'':>8} {ms:>8.4f} {kv_bytes / ms / 1e6:>7.0f}")
        for f in (0, fac):
            s0 = sets[0]
            _, st = blasst_cute.decode(s0[0], s0[3], s0[4], cache_seqlens=lens, block_table=s0[5],
                                       threshold_scale_factor=f, return_stats=True)
            ms = pb.bench_ms([lambda s=s: blasst_cute.decode(
                s[0], s[3], s[4], cache_seqlens=lens, block_table=s[5],
                threshold_scale_factor=f or None) for s in sets], iters=iters)
            # kernel only: run_decode_sm90 with a workspace, captured in a CUDA graph
            out = torch.empty_like(s0[0])
            lse = torch.empty(B, hq, 1, device="cuda")
            geo = launch_decode.plan_decode_sm90(s0[0], s0[3], s0[5])
            S = geo["num_splits"]
            ws = (torch.empty(S, B, 1, hq, 128, device="cuda"), torch.empty(S, B, hq, 1, device="cuda"))
            tk = time_graph(lambda: launch_decode.run_decode_sm90(
                s0[0], s0[3], s0[4], out, lse, cache_seqlens=lens, block_table=s0[5],
                threshold_scale_factor=f or None, workspace=ws)) * 1e3
            rel = f"{best / ms:.2f}x" if best else "-"
            log(f"{shape:<24} {'blasst f=' + format(f, 'g'):<14} {st.sparsity * 100:>7.1f}% "
                f"{ms:>8.4f} {kv_bytes / ms / 1e6:>7.0f} {rel:>8}   kernel-only(graph) {tk:.4f} ms "
                f"({kv_bytes / tk / 1e6:.0f} GB/s) splits={S}")
        del sets, peers, out, lse, ws, s0
        torch.cuda.empty_cache()


def _api_fn(q, kc, vc, lens, bt, f, **kw):
    import blasst_cute
    return lambda: blasst_cute.decode(q, kc, vc, cache_seqlens=lens, block_table=bt,
                                      threshold_scale_factor=f or None, **kw)


def _sparsity(q, kc, vc, lens, bt, f):
    import blasst_cute
    _, st = blasst_cute.decode(q, kc, vc, cache_seqlens=lens, block_table=bt,
                               threshold_scale_factor=f, return_stats=True)
    return st.sparsity


def host_times():
    """Host time per call (CPU time of back-to-back calls on a tiny problem, B=1 L=1024, content
    checks off) through each layer: the public API, the launch glue, the preplanned launch."""
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "perf")))
    import bench as pb
    from blasst_cute import api
    from blasst_cute.workloads import synthetic_qkv, to_paged
    api.set_content_checks(False)
    res = {}
    for B, L in ((1, 1024), (8, 1024), (64, 1024)):
        q, k, v = synthetic_qkv(B, 1, L, 32, 8, 128, device="cuda")
        kc, vc, bt = to_paged(k, v, 64)
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        S = launch_decode.plan_decode_sm90(q, kc, bt)["num_splits"]
        out = torch.empty_like(q)
        lse = torch.empty(B, 32, 1, device="cuda")
        ws = (torch.empty(S, B, 1, 32, 128, device="cuda"), torch.empty(S, B, 32, 1, device="cuda"))
        rows = [
            ("api f=100", _api_fn(q, kc, vc, lens, bt, 100.0)),
            ("api dense", _api_fn(q, kc, vc, lens, bt, None)),
            ("api f=100 +lse", _api_fn(q, kc, vc, lens, bt, 100.0, return_lse=True)),
            ("glue decode_sm90", lambda: launch_decode.decode_sm90(
                q, kc, vc, cache_seqlens=lens, block_table=bt, threshold_scale_factor=100.0)),
            ("run_decode_sm90 prealloc", lambda: launch_decode.run_decode_sm90(
                q, kc, vc, out, lse, cache_seqlens=lens, block_table=bt,
                threshold_scale_factor=100.0, workspace=ws)),
        ]
        for name, fn in rows:
            h = pb.host_us_per_call(fn, n=300)
            res[(B, name)] = h
            log(f"host us/call B={B} L={L} splits={S} {name:<26} {h:6.1f}")
    return res


def diag_long(B=1, L=131072, hq=32, hk=8, factors=(0, 60000, 120000, 300000), prof=True):
    """Where does a B=1 L=128k call spend its time? For each factor: the API call timed with a
    sync per call (perf/bench.py's method), back-to-back, captured in a graph, the kernel alone
    (preplanned, graph), and a torch.profiler list of the kernels of one synced call."""
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "perf")))
    import bench as pb
    from blasst_cute import api
    from blasst_cute.workloads import synthetic_qkv, to_paged
    api.set_content_checks(False)
    q, k, v = synthetic_qkv(B, 1, L, hq, hk, 128, device="cuda", seed=0)
    kc, vc, bt = to_paged(k, v, 64, seed=0)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    peers = {n: pb._sdpa(n) for n in ("cudnn", "flash")}
    for n, fn in peers.items():
        ms = pb.bench_ms([lambda fn=fn: fn(q, k, v, False)], iters=30)
        log(f"diag B={B} L={L} {hq}/{hk} sdpa-{n}: synced {ms * 1e3:.1f} us")
    del k, v
    S = launch_decode.plan_decode_sm90(q, kc, bt)["num_splits"]
    out = torch.empty_like(q)
    lse = torch.empty(B, hq, 1, device="cuda")
    ws = (torch.empty(S, B, 1, hq, 128, device="cuda"), torch.empty(S, B, hq, 1, device="cuda"))
    for f in factors:
        sp = _sparsity(q, kc, vc, lens, bt, f)
        fn = _api_fn(q, kc, vc, lens, bt, f)
        synced = pb.bench_ms([fn], iters=30) * 1e3
        b2b = time_per_call(fn, 30) * 1e6
        graph = time_graph(fn, 30) * 1e6
        kern = time_graph(lambda: launch_decode.run_decode_sm90(
            q, kc, vc, out, lse, cache_seqlens=lens, block_table=bt,
            threshold_scale_factor=f or None, workspace=ws), 30) * 1e6
        log(f"diag f={f:g} sparsity {sp:.3f} splits {S}: api synced {synced:.1f} us, "
            f"back-to-back {b2b:.1f}, api graph {graph:.1f}, kernel-only graph {kern:.1f}")
        if prof:
            from torch.profiler import ProfilerActivity, profile
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                for _ in range(3):
                    fn()
                    torch.cuda.synchronize()
            evs = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            evs.sort(key=lambda e: e.time_range.start)
            t0 = evs[0].time_range.start if evs else 0
            cpu = [e for e in p.events() if e.device_type != torch.autograd.DeviceType.CUDA]
            cpu_names = sorted({(e.name, round(e.cpu_time_total, 1)) for e in cpu},
                               key=lambda x: -x[1])[:6]
            log("  kernels: " + "; ".join(
                f"{e.name[:28]} @{e.time_range.start - t0:.0f} {e.time_range.elapsed_us():.0f}us"
                for e in evs[-6:]))
            log("  top cpu ops: " + "; ".join(f"{n[:30]} {t}us" for n, t in cpu_names))


def ncu_case(B=8, L=32768, hq=32, hk=8, factor=30000.0):
    """Two launches for `ncu` (dense, then skipping at `factor`), after a warm-up of each."""
    from blasst_cute.workloads import synthetic_qkv
    q1, k1, v1 = synthetic_qkv(1, 1, L, hq, hk, 128, device="cuda", seed=7)
    q = q1.expand(B, -1, -1, -1).contiguous()
    k = k1.expand(B, -1, -1, -1).contiguous()
    v = v1.expand(B, -1, -1, -1).contiguous()
    _, _, kc, vc, bt = make_cache(B, L, hk, 128, 64, seed=1, k=k, v=v)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    for f in (None, factor):
        out, lse, cnt, geo = run_kernel(q, kc, vc, lens, bt, factor=f, stats=f is not None)
        torch.cuda.synchronize()
        if f is not None:
            log(f"ncu case: factor {f} sparsity {float(cnt[1].sum()) / float(cnt[0].sum()):.3f}")
    torch.cuda.cudart().cudaProfilerStart()
    for f in (None, factor):
        run_kernel(q, kc, vc, lens, bt, factor=f, stats=False)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncu-case", action="store_true")
    ap.add_argument("--api-bench", action="store_true")
    ap.add_argument("--diag", action="store_true", help="host time per layer + B=1 L=128k timing")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--sweep", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.ncu_case:
        ncu_case()
        return
    if args.diag:
        log(f"torch {torch.__version__}, device {torch.cuda.get_device_name()}")
        host_times()
        diag_long()
        with open(os.path.join(args.out, "diag.log"), "w") as f:
            f.write("\n".join(LOG) + "\n")
        return
    if args.api_bench:
        log(f"torch {torch.__version__}, device {torch.cuda.get_device_name()}")
        api_bench()
        with open(os.path.join(args.out, "api_bench.log"), "w") as f:
            f.write("\n".join(LOG) + "\n")
        return
    log(f"torch {torch.__version__}, device {torch.cuda.get_device_name()}")
    ok = True
    if not args.no_check:
        t0 = time.time()
        ok = run_checks(args.quick, args.sweep)
        log(f"checks {'PASS' if ok else 'FAIL'} in {time.time() - t0:.1f}s")
    if not args.no_bench:
        cfgs = [(1, 131072, 32, 8), (8, 32768, 32, 8), (64, 32768, 32, 8), (1, 32768, 64, 4),
                (8, 8192, 64, 4)]
        if args.quick:
            cfgs = [(1, 131072, 32, 8), (64, 32768, 32, 8)]
        try:
            bench(cfgs)
        except Exception:  # noqa: BLE001
            log(traceback.format_exc())
    with open(os.path.join(args.out, "gpu_decode_smoke.log"), "w") as f:
        f.write("\n".join(LOG) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
