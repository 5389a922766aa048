"""Torch-facing glue for the CuTe DSL kernels: geometry, compilation (cached), launch.

Inputs are assumed validated by ``blasst_cute.api`` (dtype, devices, shapes, contiguity of the last
dim); this module only converts, compiles and launches.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

import cutlass.cute as cute
from cutlass import Float32, Int32

from blasst_cute.kernels import compile_cache
from blasst_cute.kernels.dtypes import TORCH_TO_CUTLASS, kernel_dtype
from blasst_cute.kernels.sm90.prefill import (
    SUPPORTED_HEAD_DIM_PAIRS,
    SUPPORTED_HEAD_DIMS,
    PV_SKIP_UNIT,
    BlasstFwdSm90,
    check_head_dims,
    default_tile_config,
)


def prefill_geometry(head_dim: int, head_dim_v: int, causal: bool, dtype,
                     decision_rows: int = 16, tile_m: Optional[int] = None) -> dict:
    """The tiling of the sm90 prefill kernel: what the reference needs to reproduce its decisions.

    Each warp (16 rows of a 64-row consumer warpgroup) makes its own skip decision
    (``rows_per_decision=16``) and a warpgroup skips its P·V wgmma when its 4 warps all skipped
    (``rows_per_pv=64``); ``decision_rows=64`` describes the per-warpgroup variant
    (``tuning={"decision_rows": 64}``), ``tile_m`` a ``tuning={"tile_m": ...}`` launch.
    """
    check_head_dims(head_dim, head_dim_v)
    kernel_dtype(dtype, "sm90 prefill")
    cfg = default_tile_config(head_dim, causal, head_dim_v)
    return dict(block_m=tile_m or cfg["tile_m"], block_n=cfg["tile_n"], rows_per_decision=decision_rows,
                order="reverse", pack_gqa=False, rows_per_pv=64)


# 2-CTA clusters sharing each K/V tile by TMA multicast (BlasstFwdSm90 cluster_m / cluster_h):
#   "auto" (default): one CTA, whose skip build loads V only for kept tiles (v_load_skip; as fast
#       or faster than head pairs at high sparsity, perf/results/prefill-h100-vskip.md). With
#       tuning v_load_skip=False, the earlier rule: q-head pairs where they measured faster
#       (H100 and H200, d128 32/8,
#       B*L = 32k, perf/results/prefill-h100-cluster.md): the skip build with a scalar factor,
#       head dims 128/128, Hq/Hk even, L_k >= AUTO_MIN_SEQLEN_K and lambda = factor / L_k >=
#       AUTO_MIN_LAMBDA (68-98% skipped there, where the kernel is bound by L2 -> SM traffic:
#       +0.4-8%). Elsewhere one CTA per q-tile: dense, short keys and low sparsity lost 2-9%
#       with a cluster, other head dims were not timed.
#   "tiles": q-tile pairs of one (batch, head) (cluster_m=2) where supported (non-causal, no LPT);
#   "heads": q-head pairs of one KV head (cluster_h=2) wherever Hq/Hk is even;
#   "never": one CTA per (q-tile, head).
# Skip decisions and the geometry are the same in every mode (outputs are bitwise equal).
# BLASST_PREFILL_CLUSTER in the environment sets the initial value (tests force the modes).
CLUSTER_MODES = ("auto", "never", "tiles", "heads")
CLUSTER_MODE = os.environ.get("BLASST_PREFILL_CLUSTER", "auto")
AUTO_MIN_SEQLEN_K = 16384
AUTO_MIN_LAMBDA = 0.25


def prefill_cluster(causal: bool, heads_q: int, heads_kv: int, tuning: Optional[dict] = None, *,
                    has_skip: bool = False, factor: float = 0.0, seqlen_k: Optional[int] = None,
                    head_dims: tuple = (128, 128)) -> dict:
    """{cluster_m, cluster_h} of a launch under CLUSTER_MODE (tuning's values win).

    factor: the scalar threshold factor (0 without skipping or with a per-sequence tensor);
    seqlen_k: the key length (varlen: max_seqlen_k, None if unknown); head_dims: (q/k, v).
    These only matter to "auto".
    """
    tuning = tuning or {}
    if "cluster_m" in tuning or "cluster_h" in tuning:
        c = dict(cluster_m=int(tuning.get("cluster_m", 1)), cluster_h=int(tuning.get("cluster_h", 1)))
        if c["cluster_h"] > 1 and (heads_q // max(heads_kv, 1)) % c["cluster_h"]:
            raise NotImplementedError(
                f"blasst sm90 prefill: cluster_h={c['cluster_h']} needs Hq/Hk even "
                f"(got {heads_q}/{heads_kv})")
        return c
    if CLUSTER_MODE not in CLUSTER_MODES:
        raise ValueError(f"launch.CLUSTER_MODE {CLUSTER_MODE!r} (one of {', '.join(CLUSTER_MODES)})")
    if tuning.get("v_load_skip") or (CLUSTER_MODE == "auto" and has_skip
                                     and tuning.get("v_load_skip") is not False):
        return dict(cluster_m=1, cluster_h=1)  # per-CTA V decisions: no K/V-sharing pair
    if CLUSTER_MODE == "tiles" and not causal and not tuning.get("lpt"):
        return dict(cluster_m=2, cluster_h=1)
    lpt_heads = tuning.get("lpt_heads")
    heads_ok = (heads_q // max(heads_kv, 1)) % 2 == 0 and (lpt_heads is None or lpt_heads % 2 == 0)
    auto_ok = (has_skip and factor > 0.0 and tuple(head_dims) == (128, 128) and seqlen_k is not None
               and seqlen_k >= AUTO_MIN_SEQLEN_K and factor / seqlen_k >= AUTO_MIN_LAMBDA)
    if heads_ok and (CLUSTER_MODE == "heads" or (CLUSTER_MODE == "auto" and auto_ok)):
        return dict(cluster_m=1, cluster_h=2)
    return dict(cluster_m=1, cluster_h=1)


# The hdim-128 skip build switches to the look-ahead schedule after a run of skipped tiles
# (BlasstFwdSm90.lookahead_after_skips) only for keys this long: measured on an H100 (d128, B*L =
# 32k), the switch gained 0-8 % at 71-98 % skipped from L = 16k up, cost up to 6 % at L = 4k
# (53-86 %), and kept the speed at 0 % within the noise (perf/results/prefill-h100-lookahead.md).
LOOKAHEAD_MIN_SEQLEN_K = 16384


def prefill_lookahead(seqlen_k: Optional[int], tuning: Optional[dict] = None) -> dict:
    """{lookahead_after_skips: 0} for keys shorter than LOOKAHEAD_MIN_SEQLEN_K (or of unknown
    length); {} otherwise, which leaves the kernel's default. tuning's value wins."""
    if tuning and "lookahead_after_skips" in tuning:
        return {}
    if seqlen_k is None or seqlen_k < LOOKAHEAD_MIN_SEQLEN_K:
        return dict(lookahead_after_skips=0)
    return {}


# ----------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------

# BlasstFwdSm90's tuning keywords and the value a config without them gets.
_KNOB_DEFAULTS = dict(
    tile_m=None, tile_n=None, num_stages=None, intra_wg_overlap=True, pingpong=None,
    vote_smem=True, lpt=None, debug_no_vote=False, decision_rows=16, debug_no_v_load=False,
    pv_skip=True, lpt_heads=None, fast_vote=True, late_v_wait=True, v_load_skip=None, v_warp=None,
    lazy_p_zero=False, defer_v_release=None, qk_lookahead=False, lookahead_after_skips=None,
    rescale_o_before_pv=None, vote_thread_max=None, flag_addr_before_sync=None, keep_first=None,
    thr_add_only=None,
)


def _config_key(config: dict) -> tuple:
    c = dict(config)
    c["dtype"] = kernel_dtype(c.get("dtype", torch.bfloat16), "sm90 prefill")
    c.setdefault("head_dim_v", c["head_dim"])
    for k in ("causal", "has_skip", "has_stats", "varlen", "factor_per_batch"):
        c[k] = bool(c.get(k, False))
    for k, v in _KNOB_DEFAULTS.items():
        c.setdefault(k, v)
    c["cluster_m"] = int(c.get("cluster_m", 1))
    c["cluster_h"] = int(c.get("cluster_h", 1))
    return tuple(sorted(c.items(), key=lambda kv: kv[0]))


def _make_kernel(key: tuple) -> BlasstFwdSm90:
    c = dict(key)
    knobs = {k: c[k] for k in (*_KNOB_DEFAULTS, "cluster_m", "cluster_h")}
    return BlasstFwdSm90(
        TORCH_TO_CUTLASS[c["dtype"]], c["head_dim"], c["head_dim_v"], causal=c["causal"],
        has_skip=c["has_skip"], has_stats=c["has_stats"], varlen=c["varlen"],
        factor_per_batch=c["factor_per_batch"], **knobs,
    )


def _fake(dtype, shape, align_elems):
    n = len(shape)
    stride = tuple(cute.sym_int64(divisibility=align_elems) for _ in range(n - 1)) + (1,)
    return cute.runtime.make_fake_tensor(dtype, shape, stride, assumed_align=16)


def compile_prefill_sm90(config: dict, options: Optional[str] = None):
    """Compile one configuration with fake tensors (no GPU needed; set CUTE_DSL_ARCH=sm_90a).

    config keys: dtype, head_dim, [head_dim_v], causal, has_skip, has_stats, varlen,
    factor_per_batch, and optionally tile_m / tile_n / num_stages / intra_wg_overlap / pingpong /
    cluster_m / cluster_h (default 1).
    Returns the compiled callable (not launchable without a GPU).
    """
    import cuda.bindings.driver as cuda

    key = _config_key(config)
    c = dict(key)
    kern = _make_kernel(key)
    dt = TORCH_TO_CUTLASS[c["dtype"]]
    d, dv = c["head_dim"], c["head_dim_v"]
    a = 128 // dt.width
    hq, hk = cute.sym_int(), cute.sym_int()
    if c["varlen"]:
        tq, tk, b1 = cute.sym_int(), cute.sym_int(), cute.sym_int()
        q, o = _fake(dt, (tq, hq, d), a), _fake(dt, (tq, hq, dv), a)
        k, v = _fake(dt, (tk, hk, d), a), _fake(dt, (tk, hk, dv), a)
        lse = _fake(Float32, (hq, tq), 1)
        cu_q = cute.runtime.make_fake_tensor(Int32, (b1,), (1,), assumed_align=4)
        cu_k = cute.runtime.make_fake_tensor(Int32, (b1,), (1,), assumed_align=4)
        b = cute.sym_int()
    else:
        b, sq, sk = cute.sym_int(), cute.sym_int(), cute.sym_int()
        q, o = _fake(dt, (b, sq, hq, d), a), _fake(dt, (b, sq, hq, dv), a)
        k, v = _fake(dt, (b, sk, hk, d), a), _fake(dt, (b, sk, hk, dv), a)
        lse = _fake(Float32, (b, hq, sq), 1)
        cu_q = cu_k = None
    vis = skp = pv = None
    if c["has_stats"]:
        vis, skp = _fake(Int32, (b, hq), 1), _fake(Int32, (b, hq), 1)
        pv = _fake(Int32, (2, b, hq), 1)
    fac = None
    if c["factor_per_batch"]:
        fac = cute.runtime.make_fake_tensor(Float32, (b,), (1,), assumed_align=4)
    args = (q, k, v, o, lse, Float32(1.0), Float32(0.0), fac, cu_q, cu_k, Int32(1), vis, skp, pv,
            cuda.CUstream(0))
    if options:
        return cute.compile(kern, *args, options=options)
    return cute.compile(kern, *args)


# ----------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------

def _to_cute(t: Optional[torch.Tensor], align: int = 16):
    if t is None:
        return None
    return cute.runtime.from_dlpack(t.detach(), assumed_align=align).mark_layout_dynamic(
        leading_dim=t.dim() - 1
    )


def run_prefill_sm90(q, k, v, out, lse, *, causal: bool, softmax_scale: float,
                     threshold_scale_factor=None, cu_seqlens_q=None, cu_seqlens_k=None,
                     max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                     visited=None, skipped=None, pv_counts=None,
                     tuning: Optional[dict] = None) -> None:
    """Launch the sm90 prefill kernel on torch's current stream.

    q/k/v/out: [B, L, H, D] or varlen [total, H, D] (last dim contiguous, 16-byte aligned rows).
    lse: float32 [B, Hq, Lq] or [Hq, total_q]. visited/skipped: int32 [B, Hq] zeroed, or None
    (the (16-row decision group, key tile) pairs). pv_counts: int32 [2, B, Hq] zeroed (the
    (64-row warpgroup, key tile) P·V products visited, then skipped), or None (with visited, a
    scratch buffer is allocated).
    threshold_scale_factor: None/0 (dense), a number, or a float32 tensor [B] (one per sequence).
    """
    varlen = cu_seqlens_q is not None
    if varlen != (cu_seqlens_k is not None):
        raise NotImplementedError("blasst sm90 prefill: cu_seqlens_q and cu_seqlens_k go together")
    has_stats = visited is not None
    if has_stats != (skipped is not None):
        raise NotImplementedError("blasst sm90 prefill: visited and skipped go together")
    if pv_counts is not None and not has_stats:
        raise NotImplementedError("blasst sm90 prefill: pv_counts needs visited and skipped")
    if has_stats and pv_counts is None:
        pv_counts = torch.zeros(2, *visited.shape, dtype=torch.int32, device=visited.device)
    if has_stats and (pv_counts.dtype != torch.int32 or
                      tuple(pv_counts.shape) != (2, *visited.shape)):
        raise ValueError(f"blasst sm90 prefill: pv_counts must be int32 {[2, *visited.shape]}, "
                         f"got {pv_counts.dtype} {list(pv_counts.shape)}")
    factor_t = None
    factor = 0.0
    if isinstance(threshold_scale_factor, torch.Tensor):
        factor_t = threshold_scale_factor.to(device=q.device, dtype=torch.float32).contiguous()
        has_skip = True
    elif threshold_scale_factor is None:
        has_skip = has_stats  # stats without a factor: skip path with skipping disabled
    else:
        factor = float(threshold_scale_factor)
        has_skip = factor > 0.0 or has_stats
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if batch else 0
    else:
        batch = q.shape[0]
        max_seqlen_q = q.shape[1]
    if batch == 0 or q.numel() == 0 or max_seqlen_q == 0:
        return
    if has_stats:
        min_tile_n = min(64, (tuning or {}).get("tile_n") or 64)
        fits = lambda keys: -(-keys // min_tile_n) < PV_SKIP_UNIT
        keys = k.shape[1]
        if varlen:
            # the packed total bounds every sequence; the exact maximum (a host sync, so not
            # under graph capture in the common case) only when the bound is too long
            keys = max_seqlen_k if max_seqlen_k is not None else k.shape[0]
            if not fits(keys) and max_seqlen_k is None:
                keys = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max().item())
        if not fits(keys):
            # a warp's counter holds its softmax skips and its warpgroup's PV skips in 16 bits
            # each (the default key tiles are >= 64 wide)
            raise NotImplementedError(
                f"blasst sm90 prefill: stats need fewer than {min_tile_n * PV_SKIP_UNIT} keys per "
                f"sequence, got {keys}")
    config = dict(dtype=q.dtype, head_dim=q.shape[-1], head_dim_v=v.shape[-1], causal=bool(causal),
                  has_skip=has_skip, has_stats=has_stats, varlen=varlen,
                  factor_per_batch=factor_t is not None)
    if tuning:
        config.update(tuning)  # experiments only: keys of _KNOB_DEFAULTS, cluster_m, cluster_h
    config.update(prefill_cluster(bool(causal), q.shape[-2], k.shape[-2], tuning,
                                  has_skip=has_skip, factor=factor,
                                  seqlen_k=max_seqlen_k if varlen else k.shape[1],
                                  head_dims=(q.shape[-1], v.shape[-1])))
    config.update(prefill_lookahead(max_seqlen_k if varlen else k.shape[1], tuning))
    key = _config_key(config)

    args = prefill_kernel_args(q, k, v, out, lse, softmax_scale, factor, factor_t, cu_seqlens_q,
                               cu_seqlens_k, max_seqlen_q, visited, skipped, pv_counts)
    fn = compile_cache.get_or_compile(("sm90-prefill",) + key, lambda: cute.compile(_make_kernel(key), *args))
    fn(*args)


def prefill_kernel_args(q, k, v, out, lse, softmax_scale: float, factor: float, factor_t=None,
                        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: Optional[int] = None,
                        visited=None, skipped=None, pv_counts=None) -> list:
    """The kernel's call arguments, in the order of ``BlasstFwdSm90.__call__``, on torch's
    current stream (the A/B tool builds its calls with it too, so it follows signature changes)."""
    import cuda.bindings.driver as cuda

    return [
        _to_cute(q), _to_cute(k), _to_cute(v), _to_cute(out), _to_cute(lse, 4),
        Float32(softmax_scale), Float32(factor), _to_cute(factor_t, 4),
        _to_cute(cu_seqlens_q, 4), _to_cute(cu_seqlens_k, 4),
        Int32(q.shape[1] if max_seqlen_q is None else max_seqlen_q),
        _to_cute(visited, 4), _to_cute(skipped, 4), _to_cute(pv_counts, 4),
        cuda.CUstream(torch.cuda.current_stream(q.device).cuda_stream),
    ]


def clear_cache() -> None:
    compile_cache.clear_memory()


__all__ = ["SUPPORTED_HEAD_DIM_PAIRS", "SUPPORTED_HEAD_DIMS", "prefill_geometry", "prefill_cluster",
           "compile_prefill_sm90", "run_prefill_sm90", "prefill_kernel_args", "clear_cache"]
