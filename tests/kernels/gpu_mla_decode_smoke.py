"""One-call GPU check + benchmark of the sm90 absorbed-MLA decode kernel (run on an H100/H200).

    python tests/kernels/gpu_mla_decode_smoke.py [--no-check] [--no-bench] [--quick] [--out DIR]
        [--shapes BxLxH[xLq],...] [--mixed N] [--splits S,...] [--no-sdpa] [--early-release-ab]

Checks (one line each): dense vs float64 attention on the expanded form (K = the 576-dim latent
row, V = its first 512 dims), skipping vs the reference with the kernel's geometry (outputs and
counters), paged (shuffled block tables, page sizes 16..256) and contiguous caches, ragged
cache_seqlens, Lq_new 1 and > 1, one split and many, poisoned outputs, the public API, CUDA-graph replay with a
new factor tensor, the 2-CTA cluster variant forced on (launch_mla.CLUSTER_MODE).
Then a timing table (CUDA-graph replays): dense TFLOP/s and GB/s at B in {1,16,64,128} x
L in {4k,32k}, H=128, page 64, against torch SDPA on the expanded form (heads folded into the
query length: the same computation), and sparse decode at ~70% / ~90% block sparsity vs dense
(dense and sparse of one split count timed in alternation, 3 rounds, median). The bench
repeats one synthetic sequence over the batch (every CTA then skips the same tiles); --mixed N
deals N different ones over it, where the least sparse sequences set the time
(perf/results/mla-decode-h100-mixed.md). --splits 0,4 times several split counts.
--early-release-ab times each point with and without the early K-stage release
(launch_mla.EARLY_RELEASE) in the same rounds.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.environ.get("BLASST_ROOT")
                or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from blasst_cute import reference  # noqa: E402
from blasst_cute.kernels import launch_mla  # noqa: E402
from blasst_cute.testing import CheckRecorder, dense_attention, lse_err, rel_err  # noqa: E402
from blasst_cute.testing import replay_matches_eager  # noqa: E402
from blasst_cute.testing import alternated_medians, capture_graph  # noqa: E402
from blasst_cute.testing import time_graph, time_per_call  # noqa: E402

D, DV = 576, 512
BENCH_ROUNDS = 3  # bench: rounds of alternated timing per split count
LOG = []
GEO_KEYS = ("block_m", "block_n", "pack_gqa", "order", "num_splits", "rows_per_decision",
            "split_tiles", "interleave_splits")


def log(msg=""):
    print(msg, flush=True)
    LOG.append(msg)


# ---------------------------------------------------------------------------------------------
# helpers (also used by tests/kernels/test_mla_decode_sm90.py)
# ---------------------------------------------------------------------------------------------

def make_mla_cache(B, cap, page_size, *, seed=0, device="cuda", dtype=torch.bfloat16, kv=None):
    """Contiguous latent rows kv [B, cap, 576] and, with page_size, a shuffled paged copy
    [pages, page_size, 576] + block table (None for a contiguous cache). Unused slots are random."""
    g = torch.Generator(device=device).manual_seed(seed)
    if kv is None:
        kv = torch.randn(B, cap, D, generator=g, device=device).to(dtype)
    if page_size is None:
        return kv, kv, None
    per = -(-cap // page_size)
    n_pages = B * per + 3
    perm = torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed))[: B * per]
    bt = perm.view(B, per).to(device=device, dtype=torch.int32)
    kvc = torch.randn(n_pages, page_size, D, generator=g, device=device).to(dtype)
    pad = per * page_size - cap
    kvp = torch.nn.functional.pad(kv, (0, 0, 0, pad)).view(B * per, page_size, D)
    kvc[bt.reshape(-1).long()] = kvp
    return kv, kvc, bt


def run_kernel(q, kvc, lens, bt, *, factor=None, stats=True, num_splits=None, scale=None):
    """Launch with poisoned outputs; returns out, lse, (visited, skipped), geo."""
    B, lq, H, _ = q.shape
    out = torch.full((B, lq, H, DV), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, lq), float("nan"), dtype=torch.float32, device=q.device)
    cnt = [torch.zeros(B, dtype=torch.int32, device=q.device) for _ in range(2)] if stats \
        else [None, None]
    geo = launch_mla.run_mla_decode_sm90(
        q, kvc, out, lse, cache_seqlens=lens, block_table=bt,
        softmax_scale=scale if scale is not None else D ** -0.5, threshold_scale_factor=factor,
        visited=cnt[0], skipped=cnt[1], num_splits=num_splits)
    return out, lse, cnt, geo


def dense64(q, kv, lens, scale):
    """float64 decode attention on the expanded form; out [B, Lq, H, 512], lse [B, H, Lq]."""
    B, lq, H, _ = q.shape
    out = torch.zeros(B, lq, H, DV, dtype=torch.float64, device=q.device)
    lse = torch.full((B, H, lq), -math.inf, dtype=torch.float64, device=q.device)
    for b in range(B):
        L = int(lens[b])
        if L:
            k = kv[b:b + 1, :L, None, :]
            o, l = dense_attention(q[b:b + 1], k, k[..., :DV], causal=True, softmax_scale=scale)
            out[b], lse[b] = o[0], l[0]
    return out, lse


def synth(B, lq, cap, H, seed, device="cuda"):
    """LLM-like q [B, lq, H, 576] and latent rows [B, cap, 576] (blasst_cute.workloads)."""
    from blasst_cute.workloads import synthetic_qkv
    q, k, _ = synthetic_qkv(B, lq, cap, H, 1, D, device=device, seed=seed)
    return q, k[:, :, 0].contiguous()


def check_case(B, lq, H, lens, page_size, *, factor=None, seed=0, num_splits=None,
               use_synth=False, dense_check=True, factor_tensor=False):
    """One correctness case; returns (ok, message)."""
    dev = "cuda"
    cap = max(max(lens), 1)
    if page_size is None:
        cap += 37  # capacity beyond the longest sequence
    if use_synth:
        q, kv = synth(B, lq, cap, H, seed)
    else:
        g = torch.Generator(device=dev).manual_seed(seed + 1)
        q = torch.randn(B, lq, H, D, generator=g, device=dev).to(torch.bfloat16)
        kv = None
    kv, kvc, bt = make_mla_cache(B, cap, page_size, seed=seed, kv=kv)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
    scale = D ** -0.5
    fac = factor
    if factor_tensor and factor is not None:
        fac = torch.tensor([factor * (1 + 0.5 * (b % 2)) for b in range(B)], device=dev)
    out, lse, (vis, skp), geo = run_kernel(q, kvc, lens_t, bt, factor=fac, num_splits=num_splits)
    torch.cuda.synchronize()
    if not bool(torch.isfinite(out).all()):
        return False, "non-finite output (unwritten or NaN)"
    msgs = []
    ok = True
    ro, rl, rst = reference.blasst_attention_paged(
        q, kv[:, :, None, :], kv[:, :, None, :DV], cache_seqlens=lens_t, causal=True,
        softmax_scale=scale, threshold_scale_factor=fac, **{kk: geo[kk] for kk in GEO_KEYS})
    e_ref = rel_err(out, ro)
    l_ref = lse_err(lse, rl)
    msgs.append(f"err_ref={e_ref:.2e} lse_ref={l_ref:.1e}")
    if factor is None and dense_check:
        o64, l64 = dense64(q, kv, lens, scale)
        e64 = rel_err(out, o64)
        eb = rel_err(o64.to(torch.bfloat16), o64)
        msgs.append(f"err64={e64:.2e} (bf16 rounding {eb:.1e}) lse64={lse_err(lse, l64):.1e}")
        ok &= e64 <= 2 * eb + 4e-3 and lse_err(lse, l64) < 2e-2
    ok &= e_ref < 2e-2 and l_ref < 5e-2
    vis_r, skp_r = rst.visited[:, 0].to(dev), rst.skipped[:, 0].to(dev)
    dv = int((vis.long() - vis_r).abs().sum())
    ds = int((skp.long() - skp_r).abs().sum())
    tot = int(vis_r.sum())
    ok &= dv == 0 and ds <= max(1, int(0.005 * tot))
    msgs.append(f"visited={int(vis.sum())}/{tot} skipped={int(skp.sum())}/ref {int(skp_r.sum())} "
                f"splits={geo['num_splits']}")
    return bool(ok), " ".join(msgs)


def api_check():
    """blasst_cute.decode_mla on CUDA (kernel) vs backend='reference' (same geometry)."""
    import blasst_cute
    B, lq, H, L = 2, 1, 32, 3000
    q, kv = synth(B, lq, L, H, 11)
    _, kvc, bt = make_mla_cache(B, L, 64, seed=11, kv=kv)
    lens = torch.tensor([L, 1234], dtype=torch.int32, device="cuda")
    res = {}
    for be in ("auto", "reference"):
        res[be] = blasst_cute.decode_mla(q, kvc, cache_seqlens=lens, block_table=bt,
                                         softmax_scale=D ** -0.5, threshold_scale_factor=50.0,
                                         return_lse=True, return_stats=True, backend=be)
    (o, l, s), (ro, rl, rs) = res["auto"], res["reference"]
    e = rel_err(o, ro)
    ok = e < 2e-2 and lse_err(l, rl) < 5e-2 and s.visited.shape == (B, 1) \
        and torch.equal(s.visited.cpu(), rs.visited.cpu()) \
        and int((s.skipped.cpu() - rs.skipped.cpu()).abs().sum()) <= 1
    try:
        blasst_cute.decode_mla(q[..., :512].contiguous(), kvc[..., :512].contiguous(),
                               cache_seqlens=lens, block_table=bt, softmax_scale=0.1)
        ok = False
        msg = "D=512 did not raise"
    except NotImplementedError as exc:
        msg = f"D=512 -> NotImplementedError ({str(exc)[:60]}...)"
    return ok, f"err={e:.2e} stats {s} vs ref {rs}; {msg}"


def graph_check(B=3, lq=1, H=128, L=3000, page_size=64):
    """Capture with a factor tensor and a workspace, replay with a new factor: equals eager."""
    dev = "cuda"
    q, kv = synth(B, lq, L, H, 3)
    _, kvc, bt = make_mla_cache(B, L, page_size, seed=3, kv=kv)
    lens = torch.tensor([L, L // 2 + 1, 1], dtype=torch.int32, device=dev)[:B]
    fac = torch.full((B,), 5.0, device=dev)
    S = launch_mla.plan_mla_decode_sm90(q, kvc, bt)["num_splits"]
    ws = (torch.empty(S, B, lq, H, DV, device=dev), torch.empty(S, B, H, lq, device=dev))
    out = torch.empty(B, lq, H, DV, dtype=q.dtype, device=dev)
    lse = torch.empty(B, H, lq, device=dev)
    cnt = [torch.zeros(B, dtype=torch.int32, device=dev) for _ in range(2)]

    def call():
        for c in cnt:
            c.zero_()
        launch_mla.run_mla_decode_sm90(q, kvc, out, lse, cache_seqlens=lens, block_table=bt,
                                       softmax_scale=D ** -0.5, threshold_scale_factor=fac,
                                       visited=cnt[0], skipped=cnt[1], workspace=ws)

    res = replay_matches_eager(call, fac, out, lse, cnt)  # lambda = f / L stays < 1
    ok = all(r[1] for r in res) and res[1][2] > res[0][2] and S > 1
    return ok, f"splits={S} " + " ".join(
        f"f={f}: replay==eager {s_} skipped {sk}/{vi}" for f, s_, sk, vi in res)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------

def forced_cluster(fn):
    """fn run with launch_mla.CLUSTER_MODE = "always" (the 2-CTA cluster wherever q-tiles pair up;
    "auto" keeps short key ranges, i.e. every other check here, on one CTA per q-tile)."""
    def run():
        mode = launch_mla.CLUSTER_MODE
        launch_mla.CLUSTER_MODE = "always"
        try:
            return fn()
        finally:
            launch_mla.CLUSTER_MODE = mode
    return run


def run_checks():
    rec = CheckRecorder(log)
    results = rec.results
    T = {}

    rec("dense paged64 B2 H16 lq1", lambda: check_case(2, 1, 16, [1000, 4999], 64, **T))
    rec("dense paged64 B2 H128 lq2 split3", lambda: check_case(2, 2, 128, [3000, 77], 64,
                                                               num_splits=3, **T))
    rec("dense paged64 B2 H128 lq1 direct", lambda: check_case(2, 1, 128, [2049, 64], 64,
                                                               num_splits=1, **T))
    rec("dense contiguous B2 H16 lq1", lambda: check_case(2, 1, 16, [4096, 1], None, **T))
    rec("dense paged16 B2 H24 lq3 (2 m-blocks)", lambda: check_case(2, 3, 24, [2000, 130], 16, **T))
    rec("dense paged256 B2 H128 lq1", lambda: check_case(2, 1, 128, [5000, 300], 256, **T))
    rec("dense empty seqs", lambda: check_case(3, 1, 16, [0, 5, 0], 64, num_splits=3, **T))
    rec("skip paged64 synth B2 H16 lq1 f=30",
        lambda: check_case(2, 1, 16, [4096, 3000], 64, factor=30.0, use_synth=True, **T))
    rec("skip paged64 synth B2 H128 lq2 f=100 split4 factor-tensor",
        lambda: check_case(2, 2, 128, [4096, 2500], 64, factor=100.0, use_synth=True,
                           num_splits=4, factor_tensor=True, **T))
    rec("skip paged32 synth B2 H64 lq1 f=300 direct",
        lambda: check_case(2, 1, 64, [5000, 1111], 32, factor=300.0, use_synth=True,
                           num_splits=1, **T))
    rec("skip contiguous synth B1 H128 lq1 f=1000",
        lambda: check_case(1, 1, 128, [8192], None, factor=1000.0, use_synth=True, **T))
    rec("skip paged128 synth B3 H128 lq1 f=3000 (high sparsity)",
        lambda: check_case(3, 1, 128, [16384, 9000, 65], 128, factor=3000.0, use_synth=True, **T))
    rec("cluster dense paged16 B2 H128 lq1",
        forced_cluster(lambda: check_case(2, 1, 128, [3001, 130], 16, **T)))
    rec("cluster skip paged64 synth B2 H128 lq2 f=100 split4",
        forced_cluster(lambda: check_case(2, 2, 128, [4096, 2500], 64, factor=100.0,
                                          use_synth=True, num_splits=4, **T)))
    rec("api decode_mla kernel vs reference", api_check)
    rec("cuda graph replay with a new factor tensor", graph_check)
    return all(results)


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------

def sdpa_expanded(q, kv, scale):
    """(name, fn) of the fastest torch SDPA backend that runs the expanded form: the H heads of
    the one new token folded into the query length of one head (Lq_new = 1: no mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    B, _, H, _ = q.shape
    qt = q.reshape(B, 1, H, D)  # (B, 1 head, H queries, D)
    kt = kv[:, None]  # (B, 1, L, D)
    vt = kv[:, None, :, :DV]
    best = None
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("mem_eff", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        def fn(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
        try:
            fn()
            torch.cuda.synchronize()
            t = time_per_call(fn, 5)
        except Exception as e:  # noqa: BLE001
            log(f"  (sdpa {name} unavailable: {str(e).splitlines()[0][:90]})")
            continue
        if best is None or t < best[2]:
            best = (name, fn, t)
    return best


def bench_splits(q, kvc, bt, lens, out, lse, ws, num_splits, scale, t_dense, t_sdpa, flops,
                 nbytes, rows, prefix, early_release_ab=False):
    """Dense and skip at ~70% / ~90% block sparsity with one split count, timed in alternation
    (CUDA graphs, BENCH_ROUNDS rounds, median); t_dense: the dense time the ratios are against
    (None: this one's; another split count's dense was timed in its own rounds). Returns that
    dense time."""
    B = q.shape[0]

    def mk(factor):
        return lambda: launch_mla.run_mla_decode_sm90(
            q, kvc, out, lse, cache_seqlens=lens, block_table=bt, softmax_scale=scale,
            threshold_scale_factor=factor, workspace=ws, num_splits=num_splits)

    def sparsity(factor):
        cnt = [torch.zeros(B, dtype=torch.int32, device="cuda") for _ in range(2)]
        launch_mla.run_mla_decode_sm90(q, kvc, out, lse, cache_seqlens=lens, block_table=bt,
                                       softmax_scale=scale, threshold_scale_factor=factor,
                                       visited=cnt[0], skipped=cnt[1], workspace=ws,
                                       num_splits=num_splits)
        return float(cnt[1].sum()) / max(1, float(cnt[0].sum()))

    grid = [10, 30, 100, 300, 1000, 3000, 1e4, 3e4, 1e5, 3e5, 1e6]
    sp = {f: sparsity(f) for f in grid}
    points = [("dense", None, 0.0)]
    for target in (0.7, 0.9):
        f = min(grid, key=lambda x: abs(sp[x] - target))
        # Sparsity grows with the factor until λ = f / L reaches 1 (then skipping is off):
        # bisect (geometrically) between the grid points that bracket the target below
        # that, so the row lands near ~70% / ~90%.
        hi = min([x for x in grid if sp[x] >= target], default=None)
        lo = None if hi is None else max([x for x in grid if x < hi and sp[x] <= target],
                                         default=None)
        for _ in range(4 if lo is not None and hi is not None else 0):
            if abs(sp[f] - target) < 0.02:
                break
            mid = (lo * hi) ** 0.5
            sp[mid] = sparsity(mid)
            lo, hi = (mid, hi) if sp[mid] <= target else (lo, mid)
            f = min(sp, key=lambda x: abs(sp[x] - target))
        points.append((f"skip f={f:.4g}", f, sp[f]))
    if early_release_ab:  # each point also with launch_mla.EARLY_RELEASE flipped, same rounds
        points = [(f"{n} ER={int(e)}", f, s_, e) for n, f, s_ in points
                  for e in (launch_mla.EARLY_RELEASE, not launch_mla.EARLY_RELEASE)]
    else:
        points = [p + (launch_mla.EARLY_RELEASE,) for p in points]
    graphs, default = [], launch_mla.EARLY_RELEASE
    try:
        for _, f, _, early in points:
            launch_mla.EARLY_RELEASE = early
            graphs.append(capture_graph(mk(f)))
    finally:
        launch_mla.EARLY_RELEASE = default
    med = alternated_medians([g.replay for g in graphs], BENCH_ROUNDS, iters=20)
    graphs = None
    for (name, f, s_, _), t in zip(points, med):
        if f is None and t_dense is None:
            t_dense = t
        ideal = 1.0 / (1.0 - s_ * DV / (D + DV))
        vs_sdpa = f"{t_sdpa / t:.2f}x" if t_sdpa else "-"
        line = (f"{prefix} {name} | {s_ * 100:.1f}% | "
                f"{t * 1e6:.1f} | {flops / t / 1e12:.0f} | {nbytes / t / 1e9:.0f} | "
                f"{vs_sdpa} | {t_dense / t:.2f}x (ideal {ideal:.2f}x) |")
        log(line)
        rows.append(line)
    return t_dense


def bench(cfgs, page_size=64, out_dir=".", mixed=0, split_counts=(None,), sdpa=True,
          early_release_ab=False):
    """cfgs: (B, L, H) or (B, L, H, Lq_new) tuples (Lq_new 1 by default). Dense + skip at
    ~70%/~90% block sparsity per kernel variant. mixed=N: N different sequences dealt over the
    batch (sequence b is number b % N) instead of one sequence repeated; split_counts: split
    counts to time (None = the launcher's; ratios are against the first one's dense time);
    early_release_ab: each point also with launch_mla.EARLY_RELEASE flipped, same rounds."""
    card = torch.cuda.get_device_name()
    log(f"card: {card}; sequences: "
        f"{f'{mixed} different' if mixed else 'one, repeated over the batch'}; "
        f"splits: {', '.join(str(x or 'launcher default') for x in split_counts)}")
    hdr = ("| B | L | H | Lq_new | kernel | variant | sparsity | time us | TFLOP/s | GB/s | vs SDPA "
           "| vs own dense |")
    rows = [hdr, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    log(hdr)
    scale = D ** -0.5
    for cfg in cfgs:
        B, L, H = cfg[:3]
        lq = cfg[3] if len(cfg) > 3 else 1
        n_seq = min(mixed, B) if mixed else 1
        q1, kv1 = synth(n_seq, lq, L, H, 7)
        pick = torch.arange(B, device=q1.device) % n_seq
        q = q1[pick].contiguous()
        kv = kv1[pick].contiguous()
        del q1, kv1
        _, kvc, bt = make_mla_cache(B, L, page_size, seed=1, kv=kv)
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        # (new token t sees L - lq + 1 + t keys: the count below takes L for each)
        flops = 2.0 * B * lq * H * L * (D + DV)
        nbytes = B * L * D * 2
        t_sdpa = None
        try:
            sd = sdpa_expanded(q, kv, scale) if lq == 1 and sdpa else None  # (no causal mask there)
            if sd is not None:
                t_sdpa = time_per_call(sd[1])
                line = (f"| {B} | {L} | {H} | {lq} | sdpa-{sd[0]} | dense | | "
                        f"{t_sdpa * 1e6:.1f} | {flops / t_sdpa / 1e12:.0f} | "
                        f"{nbytes / t_sdpa / 1e9:.0f} | | |")
                log(line)
                rows.append(line)
        except Exception as e:  # noqa: BLE001
            log(f"  sdpa failed: {str(e)[:100]}")
        del kv
        out = torch.empty(B, lq, H, DV, dtype=q.dtype, device="cuda")
        lse = torch.empty(B, H, lq, device="cuda")
        t_dense = None  # the first split count's dense time (the launcher's, by default)
        for num_splits in split_counts:
            geo = launch_mla.plan_mla_decode_sm90(q, kvc, bt, num_splits)
            S = geo["num_splits"]
            log(f"  B={B} L={L} H={H} Lq_new={lq}: {S} split(s), {n_seq} different sequence(s)")
            ws = (torch.empty(S, B, lq, H, DV, device="cuda"),
                  torch.empty(S, B, H, lq, device="cuda"))
            t_dense = bench_splits(q, kvc, bt, lens, out, lse, ws, num_splits, scale, t_dense,
                                   t_sdpa, flops, nbytes, rows,
                                   (f"| {B} | {L} | {H} | {lq} | blasst |"
                                    + ("" if len(split_counts) == 1 else f" S={S}")),
                                   early_release_ab)

        kvc = q = out = ws = None  # free before the next shape
        torch.cuda.empty_cache()
    tag = "h200" if "H200" in card else ("h100" if "H100" in card else "gpu")
    if mixed:
        tag += f"-mixed{mixed}"
    path = os.path.join(out_dir, f"mla-decode-{tag}.md")
    with open(path, "w") as fh:
        fh.write(f"# MLA decode (sm90), {card}, page {page_size}, bf16\n\n")
        seqs = f"{mixed} different ones dealt over the batch" if mixed else "one, repeated"
        fh.write(f"Sequences: {seqs}; "
                 f"splits: {', '.join(str(x or 'the launcher default') for x in split_counts)}"
                 " (vs own dense: against the first one's dense time).\n\n")
        fh.write("Dense TFLOP/s count 2*B*Lq_new*H*L*(576+512); GB/s count the latent cache once "
                 "(B*L*576*2 bytes). Times: CUDA-graph replays (kernel + combine); SDPA: "
                 "heads folded into the query length (same computation; Lq_new = 1 only), eager. "
                 "Skip rows: the factor of "
                 "the grid closest to 70% / 90% tile sparsity (measured by the kernel's "
                 "counters); ideal = 1 / (1 - s * 512 / 1088).\n\n")
        fh.write("\n".join(rows) + "\n")
    log(f"wrote {path}")


def split_sweep(cfgs, page_size=64):
    """Dense time vs num_splits (and without the combine) for small batches."""
    scale = D ** -0.5
    log("| B | L | H | splits | time us (with combine) | kernel only us |")
    for B, L, H, cands in cfgs:
        q = torch.randn(B, 1, H, D, device="cuda").to(torch.bfloat16)
        _, kvc, bt = make_mla_cache(B, L, page_size, seed=2)
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        out = torch.empty(B, 1, H, DV, dtype=q.dtype, device="cuda")
        lse = torch.empty(B, H, 1, device="cuda")
        default = launch_mla.plan_mla_decode_sm90(q, kvc, bt)["num_splits"]
        for ns in sorted(set(cands + [default])):
            ws = (torch.empty(ns, B, 1, H, DV, device="cuda"), torch.empty(ns, B, H, 1, device="cuda"))
            fn = lambda ns=ns, ws=ws, merge=True: launch_mla.run_mla_decode_sm90(  # noqa: E731
                q, kvc, out, lse, cache_seqlens=lens, block_table=bt, softmax_scale=scale,
                num_splits=ns, workspace=ws, merge_splits=merge)
            t = time_graph(fn)
            tk = time_graph(lambda: fn(merge=False)) if ns > 1 else t
            mark = " (default)" if ns == default else ""
            log(f"| {B} | {L} | {H} | {ns}{mark} | {t * 1e6:.1f} | {tk * 1e6:.1f} |")
        kvc = q = None
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep-splits", action="store_true")
    ap.add_argument("--shapes", default=None,
                    help="benchmark only these BxLxH[xLq_new] shapes, comma-separated (e.g. "
                         "1x32768x128 or 64x32768x128x2)")
    ap.add_argument("--mixed", type=int, default=0, metavar="N",
                    help="bench: N different sequences dealt over the batch (default: one "
                         "sequence repeated, so every CTA has the same skip pattern)")
    ap.add_argument("--splits", default=None,
                    help="bench: split counts to time, comma-separated ('0' = the launcher's); "
                         "ratios are against the first one's dense time")
    ap.add_argument("--no-sdpa", action="store_true", help="bench: skip the SDPA peer")
    ap.add_argument("--early-release-ab", action="store_true",
                    help="bench: time each point also with the early K-stage release flipped "
                         "(launch_mla.EARLY_RELEASE), in the same rounds")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log(f"torch {torch.__version__}, device {torch.cuda.get_device_name()}")
    ok = True
    if not args.no_check:
        t0 = time.time()
        ok = run_checks()
        log(f"checks {'PASS' if ok else 'FAIL'} in {time.time() - t0:.1f}s")
    if args.sweep_splits:
        try:
            split_sweep([(1, 4096, 128, [4, 8, 32]), (1, 32768, 128, [16, 33, 128]),
                         (16, 32768, 128, [1, 2, 8]), (64, 32768, 16, [1, 2, 4])])
        except Exception:  # noqa: BLE001
            log(traceback.format_exc())
    if not args.no_bench:
        cfgs = [(B, L, 128) for L in (4096, 32768) for B in (1, 16, 64, 128)]
        cfgs += [(64, 32768, 16), (64, 32768, 64)]
        if args.quick:
            cfgs = [(16, 4096, 128), (64, 32768, 128)]
        if args.shapes:
            cfgs = [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
        try:
            splits = [int(x) or None for x in args.splits.split(",")] if args.splits else [None]
            bench(cfgs, out_dir=args.out, mixed=args.mixed, split_counts=splits,
                  sdpa=not args.no_sdpa, early_release_ab=args.early_release_ab)
        except Exception:  # noqa: BLE001
            log(traceback.format_exc())
    with open(os.path.join(args.out, "gpu_mla_decode_smoke.log"), "a") as f:
        f.write("\n".join(LOG) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
