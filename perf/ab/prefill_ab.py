"""A/B timing of sm90 prefill kernel variants, interleaved in one process (GPU host).

    python perf/ab/prefill_ab.py [--seqlens 4096 16384 32768] [--rounds 7] [--iters 10] \
        [--variants dense skip0 sparse ...] [--baseline FILE] [--lambdas 0.3 0.95]

Variants per shape (--head-dim, default 128; --head-dim-v, default the head dim: 192 and 128
are the MLA prefill shape; Hq 32, Hk --heads-kv, default 8; B*L = 32k; names in PRESETS, or
"fa4" / "fa4_nopack" for FlashAttention-4 dense with / without its GQA packing): the dense
build, the skip build at a factor that enables skipping but never skips (1e-30, "skip0") or at
--sparse-factor ("sparse"; with --lambdas, one sparse column per lambda = factor / L:
"sparse@0.3", ...), knob variants (pv_skip off, LPT section sizes, 2-CTA K/V multicast
clusters of q-tile pairs "*_c2" (non-causal only) or of q-head pairs "*_h2", 3 stages "*_s3",
every V loaded "*_allv", 128-row tiles "*_m128", ...), and "base_*" variants built from another
version of prefill.py given as --baseline, e.g.
``git show 0b9c92e:blasst_cute/kernels/sm90/prefill.py > perf/ab/prefill_baseline.py``.
Rounds interleave the variants so that clock/power drift (H100 at its 700 W cap) hits all of
them alike, in forward order on even rounds and reverse order on odd ones (a fixed order favoured
the later sparse variants by a few percent); the table shows the median over rounds of per-round
medians, and the spread. Use an even --rounds. With fa4 among the variants a second table gives
every variant's speed relative to FA4 (the issues' bars).
Sparsity is the kernel's own count (a decision per 16-row warp, each skipping its softmax) and,
in parentheses, the same decisions per 64-row warpgroup: the share of PV wgmmas skipped.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cutlass.cute as cute  # noqa: E402

from blasst_cute.kernels import launch  # noqa: E402
from blasst_cute.kernels.dtypes import TORCH_TO_CUTLASS  # noqa: E402
from blasst_cute.testing import round_order  # noqa: E402
from blasst_cute.workloads import synthetic_qkv  # noqa: E402

_compiled = {}
# FlashAttention-4 dense variants: name -> its pack_gqa argument (None: FA4's default)
FA4_VARIANTS = {"fa4": None, "fa4_nopack": False}
ZERO = 1e-30  # a factor that enables the skip path but never skips

# name: (module "new"/"base", has_skip, factor (number or "sparse"), kernel knobs)
PRESETS = {
    "dense": ("new", False, 0.0, {}),
    "skip0": ("new", True, ZERO, {}),
    "sparse": ("new", True, "sparse", {}),
    "sparse_nopv": ("new", True, "sparse", dict(pv_skip=False)),
    "skip0_nopv": ("new", True, ZERO, dict(pv_skip=False)),
    "skip0_novote": ("new", True, ZERO, dict(debug_no_vote=True)),
    # no vote and no PV skip (so every V from warp 0 and no look-ahead switch): the skip build's
    # remaining structure (the skip branch, thresholds, counter) at 0 %
    "skip0_novote_nopv": ("new", True, ZERO, dict(debug_no_vote=True, pv_skip=False)),
    "base_skip0": ("base", True, ZERO, {}),
    "base_sparse": ("base", True, "sparse", {}),
    "base_skip0_vs": ("base", True, ZERO, dict(v_load_skip=True)),
    "base_sparse_vs": ("base", True, "sparse", dict(v_load_skip=True)),
    "dense_nolpt": ("new", False, 0.0, dict(lpt=False, causal_only=True)),
    "dense_lpt4": ("new", False, 0.0, dict(lpt_heads=4, causal_only=True)),
    "dense_lpt8": ("new", False, 0.0, dict(lpt_heads=8, causal_only=True)),
    "dense_lpt2": ("new", False, 0.0, dict(lpt_heads=2, causal_only=True)),
    "dense_lpt16": ("new", False, 0.0, dict(lpt_heads=16, causal_only=True)),
    "dense_c2": ("new", False, 0.0, dict(cluster_m=2, noncausal_only=True)),
    "skip0_c2": ("new", True, ZERO, dict(cluster_m=2, noncausal_only=True)),
    "sparse_c2": ("new", True, "sparse", dict(cluster_m=2, noncausal_only=True)),
    "sparse_s3": ("new", True, "sparse", dict(num_stages=3)),
    "dense_s3": ("new", False, 0.0, dict(num_stages=3)),
    "sparse_c2s3": ("new", True, "sparse", dict(cluster_m=2, num_stages=3, noncausal_only=True)),
    "dense_c2s3": ("new", False, 0.0, dict(cluster_m=2, num_stages=3, noncausal_only=True)),
    "dense_h2": ("new", False, 0.0, dict(cluster_h=2)),
    "skip0_h2": ("new", True, ZERO, dict(cluster_h=2)),
    "sparse_h2": ("new", True, "sparse", dict(cluster_h=2)),
    # pairs sharing K by multicast, each CTA loading its own V gated by its votes
    "skip0_h2v": ("new", True, ZERO, dict(cluster_h=2, v_load_skip=True)),
    "sparse_h2v": ("new", True, "sparse", dict(cluster_h=2, v_load_skip=True)),
    "sparse_c2v": ("new", True, "sparse", dict(cluster_m=2, v_load_skip=True, noncausal_only=True)),
    # the skip path shortened: P zeroed only for a PV that runs (lz), a skipped PV's V stage
    # released one iteration later (dv); and 128 x 176 tiles (n176)
    # (dv: the default for causal; nodv: off)
    "skip0_lzdv": ("new", True, ZERO, dict(lazy_p_zero=True, defer_v_release=True)),
    "skip0_lz": ("new", True, ZERO, dict(lazy_p_zero=True)),
    "skip0_dv": ("new", True, ZERO, dict(defer_v_release=True)),
    "skip0_nodv": ("new", True, ZERO, dict(defer_v_release=False)),
    # the skip block laid out first (keep_first=False, the layout before the 32nd session)
    "skip0_kf0": ("new", True, ZERO, dict(keep_first=False)),
    # the skip threshold with a floor (thr_add_only=False): the hdim-128 default before the 35th
    # session; since then only non-causal keys shorter than 16k build it
    "skip0_thr0": ("new", True, ZERO, dict(thr_add_only=False)),
    "sparse_lz": ("new", True, "sparse", dict(lazy_p_zero=True)),
    "sparse_dv": ("new", True, "sparse", dict(defer_v_release=True)),
    "sparse_nodv": ("new", True, "sparse", dict(defer_v_release=False)),
    "sparse_lzdv": ("new", True, "sparse", dict(lazy_p_zero=True, defer_v_release=True)),
    "dense_n176": ("new", False, 0.0, dict(tile_n=176)),
    "skip0_n176": ("new", True, ZERO, dict(tile_n=176)),
    "sparse_n176": ("new", True, "sparse", dict(tile_n=176)),
    "sparse_n176lzdv": ("new", True, "sparse", dict(tile_n=176, lazy_p_zero=True, defer_v_release=True)),
    # the QK of the next key tile issued before the current tile's vote and softmax (la), with
    # 3 K/V stages (la3; hdim 128)
    "dense_la": ("new", False, 0.0, dict(qk_lookahead=True)),
    # the warpgroup ping-pong token (pp; default for hdim <= 128 only)
    "dense_pp": ("new", False, 0.0, dict(pingpong=True)),
    "skip0_la": ("new", True, ZERO, dict(qk_lookahead=True)),
    "sparse_la": ("new", True, "sparse", dict(qk_lookahead=True)),
    "dense_la3": ("new", False, 0.0, dict(qk_lookahead=True, num_stages=3)),
    "skip0_la3": ("new", True, ZERO, dict(qk_lookahead=True, num_stages=3)),
    "sparse_la3": ("new", True, "sparse", dict(qk_lookahead=True, num_stages=3)),
    # the default schedule until a warpgroup skipped k tiles in a row, then la (las<k>; the
    # hdim 128 skip build's default is k = 4, las0 = never)
    "skip0_las0": ("new", True, ZERO, dict(lookahead_after_skips=0)),
    "sparse_las0": ("new", True, "sparse", dict(lookahead_after_skips=0)),
    "skip0_las1": ("new", True, ZERO, dict(lookahead_after_skips=1)),
    "sparse_las1": ("new", True, "sparse", dict(lookahead_after_skips=1)),
    "skip0_las2": ("new", True, ZERO, dict(lookahead_after_skips=2)),
    "sparse_las2": ("new", True, "sparse", dict(lookahead_after_skips=2)),
    "skip0_las4": ("new", True, ZERO, dict(lookahead_after_skips=4)),
    "sparse_las4": ("new", True, "sparse", dict(lookahead_after_skips=4)),
    "skip0_lanopv": ("new", True, ZERO, dict(qk_lookahead=True, pv_skip=False)),
    "sparse_lanopv": ("new", True, "sparse", dict(qk_lookahead=True, pv_skip=False)),
    "skip0_laallv": ("new", True, ZERO, dict(qk_lookahead=True, v_load_skip=False)),
    "sparse_laallv": ("new", True, "sparse", dict(qk_lookahead=True, v_load_skip=False)),
    # the O rescale of a kept tile applied before the next PV, in the next QK's shadow (ors, an
    # option) or after the tile's last wait (nors, the default)
    "dense_ors": ("new", False, 0.0, dict(rescale_o_before_pv=True)),
    "skip0_ors": ("new", True, ZERO, dict(rescale_o_before_pv=True)),
    "sparse_ors": ("new", True, "sparse", dict(rescale_o_before_pv=True)),
    "dense_nors": ("new", False, 0.0, dict(rescale_o_before_pv=False)),
    "skip0_nors": ("new", True, ZERO, dict(rescale_o_before_pv=False)),
    "sparse_nors": ("new", True, "sparse", dict(rescale_o_before_pv=False)),
    # V loads gated by the skip decisions (one CTA; the 2-warpgroup skip build's default) or
    # every V loaded
    "skip0_vs": ("new", True, ZERO, dict(v_load_skip=True)),
    "sparse_vs": ("new", True, "sparse", dict(v_load_skip=True)),
    "skip0_allv": ("new", True, ZERO, dict(v_load_skip=False)),
    "sparse_allv": ("new", True, "sparse", dict(v_load_skip=False)),
    # V tiles from producer warp 1 without gating (the dense build; the skip build loading every V)
    "dense_vw": ("new", False, 0.0, dict(v_warp=True)),
    "dense_vw_ors": ("new", False, 0.0, dict(v_warp=True, rescale_o_before_pv=True)),
    "dense_vw_nors": ("new", False, 0.0, dict(v_warp=True, rescale_o_before_pv=False)),
    # Q, K and V from one producer warp (v1; the dense default except at hdim_v 256)
    "dense_v1": ("new", False, 0.0, dict(v_warp=False)),
    "skip0_allvw": ("new", True, ZERO, dict(v_load_skip=False, v_warp=True)),
    "sparse_allvw": ("new", True, "sparse", dict(v_load_skip=False, v_warp=True)),
    # 128-row q-tiles (2 consumer warpgroups): the earlier hdim-64 tiling (192 rows is its default)
    "dense_m128": ("new", False, 0.0, dict(tile_m=128)),
    "skip0_m128": ("new", True, ZERO, dict(tile_m=128)),
    "sparse_m128": ("new", True, "sparse", dict(tile_m=128)),
    # the vote on each thread's own columns' maxima, the row max reduced after the branch: in
    # the look-ahead schedule only (default), in both schedules (vtm1), or never (vtm0)
    "skip0_vtm0": ("new", True, ZERO, dict(vote_thread_max=False)),
    "sparse_vtm0": ("new", True, "sparse", dict(vote_thread_max=False)),
    "skip0_vtm1": ("new", True, ZERO, dict(vote_thread_max=True)),
    "sparse_vtm1": ("new", True, "sparse", dict(vote_thread_max=True)),
    # the hdim-128 default before "overlap" (the vote on thread maxima in the look-ahead
    # schedule only)
    "skip0_vtmla": ("new", True, ZERO, dict(vote_thread_max="lookahead")),
    "sparse_vtmla": ("new", True, "sparse", dict(vote_thread_max="lookahead")),
    # issue #3 skip-cost variants, every knob explicit (independent of the class defaults):
    # rule = the vote evaluated from the rule each tile, fv = per-row thresholds, lvw = late V
    # wait for skipped PVs (all three load every V)
    "skip0_rule": ("new", True, ZERO, dict(fast_vote=False, late_v_wait=False, v_load_skip=False)),
    "sparse_rule": ("new", True, "sparse", dict(fast_vote=False, late_v_wait=False, v_load_skip=False)),
    "skip0_fv": ("new", True, ZERO, dict(fast_vote=True, late_v_wait=False, v_load_skip=False)),
    "sparse_fv": ("new", True, "sparse", dict(fast_vote=True, late_v_wait=False, v_load_skip=False)),
    "skip0_fvlvw": ("new", True, ZERO, dict(fast_vote=True, late_v_wait=True, v_load_skip=False)),
    "sparse_fvlvw": ("new", True, "sparse", dict(fast_vote=True, late_v_wait=True, v_load_skip=False)),
}


# Name parts whose variant gives the same bits as the variant without them (replaced in order).
BITWISE_SAME = (("_vtm0", ""), ("_vtm1", ""), ("_vtmla", ""), ("_nors", ""), ("_ors", ""),
                ("_la3", ""),
                ("_laallv", ""), ("_lanopv", ""),
                ("_las0", ""), ("_las1", ""), ("_las2", ""), ("_las4", ""), ("_la", ""),
                ("_h2v", ""), ("_c2v", ""), ("_c2s3", "_s3"), ("_c2", ""), ("_h2", ""),
                ("_lzdv", ""), ("_lz", ""), ("_nodv", ""), ("_dv", ""), ("n176lzdv", "n176"),
                ("_vw", ""), ("_v1", ""))


def bitwise_base(name):
    """The variant whose output a variant must equal bit for bit (itself if none)."""
    for part, repl in BITWISE_SAME:
        name = name.replace(part, repl)
    return name


def _args(q, k, v, out, lse, factor):
    return launch.prefill_kernel_args(q, k, v, out, lse, q.shape[-1] ** -0.5, factor)


def make_runner(name, module, causal, has_skip, factor, **kw):
    """A closure launching one compiled variant on given tensors."""
    def run(q, k, v, out, lse):
        args = _args(q, k, v, out, lse, factor)
        key = (name, causal)
        fn = _compiled.get(key)
        if fn is None:
            # head_dim_v only where it differs (older --baseline versions lack the argument)
            dv = {} if v.shape[-1] == q.shape[-1] else dict(head_dim_v=v.shape[-1])
            kern = module.BlasstFwdSm90(TORCH_TO_CUTLASS[q.dtype], q.shape[-1], causal=causal,
                                        has_skip=has_skip, **dv, **kw)
            t = time.time()
            fn = cute.compile(kern, *args)
            print(f"  compiled {name} causal={causal} in {time.time() - t:.1f}s", flush=True)
            _compiled[key] = fn
        fn(*args)
    return run


def fa4_runner(causal, pack_gqa=None):
    """FlashAttention-4 (flash_attn.cute, the GPU host's .gpu/part2) on the same buffers.
    pack_gqa None: FA4's default (on SM90 it packs the q-heads of a kv head into the tile rows
    whenever Hq > Hk)."""
    from flash_attn.cute import flash_attn_func

    def run(q, k, v, out, lse):
        flash_attn_func(q, k, v, causal=causal, pack_gqa=pack_gqa)
    return run


@functools.lru_cache(maxsize=None)
def load_baseline(path):
    """prefill.py of another version, imported as a module (it uses this tree's common/)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("prefill_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sparsity(q, k, v, causal, factor, tuning=None):
    """(share of (warp, key tile) softmaxes skipped, share of (warpgroup, key tile) P·V wgmmas
    skipped, out) from the kernel's counters."""
    B, L, H = q.shape[0], q.shape[1], q.shape[2]
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    lse = torch.empty(B, H, L, device=q.device)
    counts = torch.zeros(4, B, H, dtype=torch.int32, device=q.device)
    launch.run_prefill_sm90(q, k, v, out, lse, causal=causal, softmax_scale=q.shape[-1] ** -0.5,
                            threshold_scale_factor=factor, visited=counts[0], skipped=counts[1],
                            pv_counts=counts[2:], tuning=tuning)
    torch.cuda.synchronize()
    c = counts.sum((1, 2)).double().tolist()
    return c[1] / max(1.0, c[0]), c[3] / max(1.0, c[2]), out


def paired_ratio(base: list, times: list) -> tuple:
    """(median, first quartile, third quartile) of base[r] / times[r] over rounds r."""
    ratios = sorted(b / t for b, t in zip(base, times))
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q[0], q[2]


def time_ms(fn, sets, iters):
    times = []
    for i in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = sets[i % len(sets)]
        s.record()
        fn(*args)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--causal", choices=("true", "false", "both"), default="both")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--head-dim-v", type=int, default=None,
                   help="V head dim (default: --head-dim; 128 with --head-dim 192 for MLA)")
    p.add_argument("--heads-kv", type=int, default=8, help="KV heads (32 query heads)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--sparse-factor", type=float, default=1000.0)
    p.add_argument("--lambdas", type=float, nargs="*", default=None,
                   help="sparse points as lambda = factor / L (each < 1), instead of --sparse-factor")
    p.add_argument("--baseline", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "prefill_baseline.py"))
    p.add_argument("--variants", nargs="+", default=["dense", "skip0", "sparse"],
                   help="names in PRESETS, or fa4 / fa4_nopack (FlashAttention-4 dense with its "
                        "default GQA packing / without; needs flash_attn.cute)")
    a = p.parse_args()
    if "dense" not in a.variants:
        p.error("--variants must include dense (the reference of every ratio)")
    print(torch.cuda.get_device_name(), flush=True)
    rows = []
    zero = ZERO
    for L in a.seqlens:
        B = max(1, a.tokens // L)
        sets = [synthetic_qkv(B, L, L, 32, a.heads_kv, a.head_dim, a.head_dim_v,
                              device="cuda", seed=s) for s in range(1)]
        sparse_factors = ([(f"@{lam:g}", lam * L) for lam in a.lambdas] if a.lambdas
                          else [("", a.sparse_factor)])
        for causal in ([False, True] if a.causal == "both" else [a.causal == "true"]):
            s0 = sparsity(*sets[0], causal, zero)[0]
            # per warp (the softmax skips) and per 64-row warpgroup (the P·V wgmmas skipped)
            both = {tag: sparsity(*sets[0], causal, f)[:2] for tag, f in sparse_factors}
            ss = {tag: b[0] for tag, b in both.items()}
            ss64 = {tag: b[1] for tag, b in both.items()}
            variants = {}
            for name in a.variants:
                if name in FA4_VARIANTS:  # the dense peer, timed in the same rounds
                    variants[name] = fa4_runner(causal, FA4_VARIANTS[name])
                    continue
                mod, has_skip, factor, kw = PRESETS[name]
                if kw.get("causal_only") and not causal:
                    continue
                if kw.get("noncausal_only") and causal:
                    continue
                kw = {k: v for k, v in kw.items() if k not in ("causal_only", "noncausal_only")}
                if mod == "new":  # the launcher's length policy, as the public API gets it
                    kw = {**launch.prefill_lookahead(L, kw), **kw}
                module = load_baseline(a.baseline) if mod == "base" else launch
                # one compiled kernel per (module, skip, knobs); the factor is a runtime argument
                cname = f"{mod}-{has_skip}-{sorted(kw.items())}"
                points = sparse_factors if factor == "sparse" else [("", factor)]
                for tag, f in points:
                    variants[name + tag] = make_runner(cname, module, causal, has_skip, f, **kw)
            for name in a.variants:  # other tile sizes reach another sparsity
                if name in PRESETS and PRESETS[name][2] == "sparse" and "tile_n" in PRESETS[name][3]:
                    kw = {k: v for k, v in PRESETS[name][3].items()
                          if k not in ("causal_only", "noncausal_only")}
                    got = [f"{sparsity(*sets[0], causal, f, kw)[0]:.3f}" for _, f in sparse_factors]
                    print(f"  {name} sparsity {' '.join(got)}", flush=True)
            bufs = []
            for (q, k, v) in sets:
                bufs.append((q, k, v, q.new_empty(*q.shape[:3], v.shape[-1]),
                             torch.empty(B, 32, L, device="cuda")))
            # warm-up/compile + a bit-exactness check of skip0 vs dense
            for name, fn in variants.items():
                fn(*bufs[0])
            same = None
            if "dense" in variants:
                # skipping compiled in but never triggered must give the dense kernel's bits
                variants["dense"](*bufs[0])
                torch.cuda.synchronize()
                o_d = bufs[0][3].clone()
                for name in [n for n in variants if n.startswith("skip0")]:
                    bufs[0][3].fill_(float("nan"))
                    variants[name](*bufs[0])
                    torch.cuda.synchronize()
                    ok = torch.equal(o_d, bufs[0][3])
                    same = ok if same is None else (same and ok)
                    if not ok:
                        diff = (o_d.float() - bufs[0][3].float()).abs()
                        print(f"  {name} vs dense: max |diff| {diff.max().item():.3g}, "
                              f"{int((diff > 0).sum())} of {diff.numel()} elements differ",
                              flush=True)
            # a 2-CTA cluster variant must give its 1-CTA counterpart's bits (same per-CTA math),
            # a schedule knob the bits of the build without it
            for name in variants:
                base = bitwise_base(name)
                if base == name or base not in variants:
                    continue
                outs = []
                for n in (base, name):
                    bufs[0][3].fill_(float("nan"))
                    variants[n](*bufs[0])
                    torch.cuda.synchronize()
                    outs.append(bufs[0][3].clone())
                print(f"  {name} == {base} bits: {torch.equal(outs[0], outs[1])}", flush=True)
            per = {n: [] for n in variants}
            for r in range(a.rounds):
                for name, fn in round_order(variants.items(), r):
                    per[name].append(time_ms(fn, bufs, a.iters))
            med = {n: statistics.median(v) for n, v in per.items()}
            spread = {n: (max(v) - min(v)) / statistics.median(v) for n, v in per.items()}
            # per-round ratios against dense (variants of one round run seconds apart, so
            # clock and power drift between rounds cancels): median and quartiles
            paired = {n: paired_ratio(per["dense"], v) for n, v in per.items()}
            row = dict(L=L, B=B, causal=causal, s0=s0, ss=ss, ss64=ss64, same=same, med=med,
                       spread=spread, paired=paired)
            rows.append(row)
            d = med["dense"]
            sp = " ".join(f"sparsity{tag or '@%g' % f}={ss[tag]:.3f}" for tag, f in sparse_factors)
            sp64 = " ".join(f"{ss64[tag]:.3f}" for tag, _ in sparse_factors)
            print(f"L={L} B={B} causal={causal} sparsity@1e-30={s0:.4f} {sp} (per warpgroup "
                  f"{sp64}) skip0*==dense bits: {same}", flush=True)
            for n in variants:
                pm, q1, q3 = paired[n]
                print(f"   {n:14s} {med[n]:8.3f} ms  x{d / med[n]:.3f} vs dense  "
                      f"(spread {spread[n] * 100:.1f}%; per round x{pm:.3f} [{q1:.3f}, {q3:.3f}])",
                      flush=True)
        del sets
        torch.cuda.empty_cache()
    print("\nSUMMARY (speed relative to dense of the same run; >1 = faster)")
    names = [n for n in dict.fromkeys(n for r in rows for n in r["med"])]
    print("shape".ljust(22) + "".join(n.rjust(13) for n in names))
    for r in rows:
        tag = f"L={r['L'] // 1024}k {'causal' if r['causal'] else 'noncausal'}"
        cells = "".join((f"{r['med']['dense'] / r['med'][n]:.3f}" if n in r["med"] else "-").rjust(13)
                        for n in names)
        print(tag.ljust(22) + cells + "   sparsity " + " ".join(f"{v:.3f}" for v in r["ss"].values())
              + " (per warpgroup " + " ".join(f"{v:.3f}" for v in r["ss64"].values()) + ")")
    print("\nper-round ratios against dense: median [quartiles]")
    print("shape".ljust(22) + "".join(n.rjust(24) for n in names))
    for r in rows:
        tag = f"L={r['L'] // 1024}k {'causal' if r['causal'] else 'noncausal'}"
        print(tag.ljust(22) + "".join(
            ("%.3f [%.3f, %.3f]" % r["paired"][n] if n in r["paired"] else "-").rjust(24)
            for n in names))
    for peer in [n for n in FA4_VARIANTS if n in names]:  # the ratios are against FA4
        print(f"\nspeed relative to {peer} (>1 = faster than {peer})")
        print("shape".ljust(22) + "".join(n.rjust(13) for n in names))
        for r in rows:
            tag = f"L={r['L'] // 1024}k {'causal' if r['causal'] else 'noncausal'}"
            print(tag.ljust(22) + "".join(
                (f"{r['med'][peer] / r['med'][n]:.3f}" if n in r["med"] and peer in r["med"]
                 else "-").rjust(13)
                for n in names))
    print("dense ms: " + ", ".join(f"{r['L'] // 1024}k{'c' if r['causal'] else 'n'} {r['med']['dense']:.3f}"
                                  for r in rows))


if __name__ == "__main__":
    main()
