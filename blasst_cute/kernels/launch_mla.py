"""Torch-facing glue for the sm90 absorbed-MLA decode kernel: geometry, compilation (cached),
launch.

Inputs are assumed validated by ``blasst_cute.api.decode_mla`` (dtype, devices, shapes, 16-byte
aligned rows with a contiguous last dim); this module only plans, compiles and launches.

    geo = mla_decode_geometry_sm90(H, lq_new, page_size, batch, capacity, num_sms)
    run_mla_decode_sm90(q, kv_cache, out, lse, cache_seqlens=..., block_table=...,
                        softmax_scale=..., threshold_scale_factor=..., visited=, skipped=)

The reference reproduces the kernel's decisions with
``blasst_attention_paged(q, kv.unsqueeze(2), kv[..., :512].unsqueeze(2), ..., **geo)``.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import torch

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from blasst_cute.kernels import compile_cache
from blasst_cute.kernels.dtypes import TORCH_TO_CUTLASS, kernel_dtype
from blasst_cute.kernels.launch_common import (
    compiled,
    compiled_combine,
    cuda_stream,
    factor_kind,
    fake_ptr,
    factor_tensor,
    make_ptr,
    sm_count,
)
from blasst_cute.kernels.sm90.mla_decode import (
    HEAD_DIM,
    HEAD_DIM_V,
    SUPPORTED_PAGE_SIZES,
    TILE_M,
    TILE_N,
    BlasstMlaDecodeSm90,
)

# A split's first tile is never skipped, and each split costs a 64 x 512 fp32 partial that the
# combine reads back: keep >= MIN_TILES_PER_SPLIT tiles per split, and at most MAX_SPLITS. H200,
# B=1 L=32k H=128 (perf/diag/mla_split_sweep.py): with the grouped combine 64 splits 45.9 us,
# 66 splits 46.9 us, 32 splits 58.8 us (the one-warp-per-chunk combine: 57.4-58.3 us for all
# three, so the cap was 32 before).
MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 64

# The q-tiles of a sequence as one 2-CTA cluster sharing each K tile by TMA multicast (see
# mla_decode.py): "auto" = where a CTA walks >= CLUSTER_MIN_TILES_PER_SPLIT key tiles, "always"
# = wherever the q-tiles pair up, "never" = one CTA per q-tile, each loading every tile.
# H100, H=128, page 64 (perf/results/mla-decode-h100.md, two runs): with >= 128 tiles per CTA
# the cluster is 1-5% faster dense and 8-14% faster at ~53% sparsity (the two q-tiles no longer
# drift apart and re-read K from DRAM), ~3% at 90%; with 16-64 tiles per CTA it is 2-3% faster
# dense but 1-3% slower sparse (the 2-stage ring in lock-step makes a tile cost the slower CTA
# of the pair), so "auto" keeps one CTA per q-tile there.
CLUSTER_MODE = "auto"
CLUSTER_MIN_TILES_PER_SPLIT = 128

# Splits deal the key tiles round-robin (split s: tiles s, s + S, ...) instead of taking
# contiguous chunks, as in the GQA decode kernel: each split's running max sees the whole
# sequence, so split-KV (B=1) skips about as much as one pass would. Part of the geometry.
# BLASST_MLA_INTERLEAVE=0 restores contiguous chunks (comparisons).
INTERLEAVE_SPLITS = os.environ.get("BLASST_MLA_INTERLEAVE", "1") != "0"

# Programmatic dependent launch of the kernel and its combine (see mla_decode.py): each grid
# starts while the previous kernel of the stream drains. BLASST_MLA_PDL=0 turns it off.
USE_PDL = os.environ.get("BLASST_MLA_PDL", "1") != "0"
# The combine's grouped merge (combine.py: a row's split groups spread over up to 8 warps, one
# memory round trip); BLASST_MLA_GROUPED_MERGE=0: the earlier one-warp-per-chunk loops.
GROUPED_MERGE = os.environ.get("BLASST_MLA_GROUPED_MERGE", "1") != "0"
# How the two consumer warpgroups share the key tiles (see mla_decode.py): "alternate" (each
# computes S and the softmax of every other tile; H100 1.00-1.10x faster dense, 1.01-1.16x
# sparse, perf/results/mla-decode-h100-alternate.md) or "split_keys" (both on every tile, half
# the keys each). BLASST_MLA_SCHEDULE=split_keys restores the earlier one (comparisons).
SCHEDULE = os.environ.get("BLASST_MLA_SCHEDULE", "alternate")
# Alternate schedule: release the K stage of the other warpgroup's kept tile before waiting for
# the next tile (two loads in flight per CTA; see mla_decode.py). H200, same rounds as the late
# release: 0.3-7 % faster at 29 of 33 dense and skip points, 0.5-2 % slower at 4 (dense B=128
# L=4k and B=32 L=8k; perf/results/mla-decode-h200-early-release.md).
# BLASST_MLA_EARLY_RELEASE=0 restores the late release (comparisons).
EARLY_RELEASE = os.environ.get("BLASST_MLA_EARLY_RELEASE", "1") != "0"


def mla_num_splits(work_units: int, n_tiles: int, num_sms: int) -> int:
    """Splits per (q-tile, batch): fill the SMs once (one CTA per SM: ~226 KiB of smem), i.e.
    floor(num_sms / work_units), with >= MIN_TILES_PER_SPLIT tiles per split."""
    if work_units <= 0 or n_tiles <= 1 or work_units > num_sms:
        return 1
    s = num_sms // work_units
    return max(1, min(s, max(1, n_tiles // MIN_TILES_PER_SPLIT), MAX_SPLITS))


def mla_cluster_m(num_heads: int, lq_new: int, causal: bool = True,
                  tiles_per_split: Optional[int] = None) -> int:
    """CTAs per cluster of the kernel: 2 when the q-tiles of a sequence pair up with identical key
    tiles (an even q-tile count, and with causal Lq_new > 1 each pair inside one new token,
    i.e. H % 128 == 0) and CLUSTER_MODE allows it, else 1. Skip decisions stay per q-tile
    either way. tiles_per_split: key tiles one CTA walks (None: not limiting)."""
    if CLUSTER_MODE not in ("auto", "always", "never"):
        raise ValueError(f"launch_mla.CLUSTER_MODE {CLUSTER_MODE!r} (auto, always or never)")
    if CLUSTER_MODE == "never":
        return 1
    if (CLUSTER_MODE == "auto" and tiles_per_split is not None
            and tiles_per_split < CLUSTER_MIN_TILES_PER_SPLIT):
        return 1
    m_blocks = -(-(num_heads * lq_new) // TILE_M)
    if m_blocks < 2 or m_blocks % 2:
        return 1
    if causal and lq_new > 1 and num_heads % (2 * TILE_M):
        return 1
    return 2


def mla_decode_geometry_sm90(num_heads: int, lq_new: int, page_size: Optional[int], batch: int,
                             max_seqlen: int, num_sms: int = 132) -> dict:
    """The tiling of the sm90 MLA decode kernel: exactly what the reference needs.

    Rows of a tile pack the H heads x lq_new new tokens of a sequence (one latent kv head);
    max_seqlen = the cache capacity the split count is planned for (block_table.shape[1] *
    page_size, or the contiguous cache's second dim), never cache_seqlens.
    """
    if page_size is not None and page_size not in SUPPORTED_PAGE_SIZES:
        raise NotImplementedError(
            f"blasst sm90 MLA decode: page_size {page_size} (supported: {SUPPORTED_PAGE_SIZES})")
    m_blocks = -(-(num_heads * lq_new) // TILE_M)
    n_tiles = -(-max(int(max_seqlen), 0) // TILE_N)
    splits = mla_num_splits(batch * m_blocks, n_tiles, num_sms)
    return dict(block_m=TILE_M, block_n=TILE_N, pack_gqa=True, order="forward",
                num_splits=splits, rows_per_decision=TILE_M, split_tiles=None,
                interleave_splits=INTERLEAVE_SPLITS)


# ----------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------

def _config_key(config: dict) -> tuple:
    c = dict(config)
    c["dtype"] = kernel_dtype(c.get("dtype", torch.bfloat16), "sm90 MLA decode")
    c.setdefault("page_size", None)
    c.setdefault("causal", True)
    for k in ("has_skip", "factor_per_batch", "has_stats", "direct_out", "interleave_splits",
              "use_pdl"):
        c[k] = bool(c.get(k, False))
    c["cluster_m"] = int(c.get("cluster_m", 1))
    c.setdefault("schedule", SCHEDULE)
    # the launcher's policy unless given (so the CPU compile of supported_configs() builds what
    # ships); only the alternate schedule has it (one compiled kernel for split_keys)
    c["early_release"] = (bool(c.get("early_release", EARLY_RELEASE))
                          and c["schedule"] == "alternate")
    return tuple(sorted(c.items(), key=lambda kv: kv[0]))


def _make_kernel(key: tuple) -> BlasstMlaDecodeSm90:
    c = dict(key)
    return BlasstMlaDecodeSm90(
        TORCH_TO_CUTLASS[c["dtype"]], page_size=c["page_size"], causal=c["causal"],
        has_skip=c["has_skip"], factor_per_batch=c["factor_per_batch"],
        has_stats=c["has_stats"], direct_out=c["direct_out"], cluster_m=c["cluster_m"],
        interleave_splits=c["interleave_splits"], use_pdl=c["use_pdl"],
        schedule=c["schedule"], early_release=c["early_release"])


def _compile_args(c: dict, stream):
    """Arguments of ``BlasstMlaDecodeSm90.launch_ptrs`` for compilation (placeholder values)."""
    dt = TORCH_TO_CUTLASS[c["dtype"]]
    paged = c["page_size"] is not None
    o_dt = dt if c["direct_out"] else Float32
    stats = [fake_ptr(Int32, 4) for _ in range(2)] if c["has_stats"] else [None] * 2
    return (
        fake_ptr(dt), fake_ptr(dt), fake_ptr(o_dt), fake_ptr(Float32, 4),
        fake_ptr(Int32, 4), fake_ptr(Int32, 4) if paged else None,
        fake_ptr(Float32, 4) if c["factor_per_batch"] else None, *stats,
        Int32(1), Int32(1), Int32(1), Int32(1), Int32(c["page_size"] or 1),
        cutlass.Int64(8), Int32(8), Int32(1), Int32(1),
        Float32(1.0), Float32(0.0), Int32(1), stream,
    )


def compile_mla_decode_sm90(config: dict, options: Optional[str] = None):
    """Compile one MLA decode configuration (no GPU needed; CUTE_DSL_ARCH=sm_90a on a CPU host).

    config keys: dtype, page_size (None = contiguous cache), and optionally causal, has_skip,
    factor_per_batch, has_stats, direct_out, cluster_m (1 or 2), interleave_splits, use_pdl,
    schedule (default SCHEDULE), early_release (default EARLY_RELEASE; alternate schedule only).
    Returns the compiled ``launch_ptrs``.
    """
    key = _config_key(config)
    args = _compile_args(dict(key), cuda_stream(0))
    fn = _make_kernel(key).launch_ptrs
    if options:
        return cute.compile(fn, *args, options=options)
    return cute.compile(fn, *args)


def _compiled(key: tuple, maker, args):
    return compiled("sm90-mla-decode", key, maker, args)


# ----------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------

def plan_mla_decode_sm90(q, kv_cache, block_table=None, num_splits: Optional[int] = None) -> dict:
    """The geometry ``run_mla_decode_sm90`` uses for these shapes (no device sync)."""
    B, lq, H, _ = q.shape
    if block_table is not None:
        page_size = kv_cache.shape[1]
        cap = block_table.shape[1] * page_size
    else:
        page_size, cap = None, kv_cache.shape[1]
    geo = mla_decode_geometry_sm90(H, lq, page_size, B, cap, sm_count(q.device))
    if num_splits is not None:
        geo["num_splits"] = int(num_splits)
    return geo


class _Plan:
    """What does not change between calls of one signature: geometry, compiled kernels."""

    __slots__ = ("geo", "splits", "direct", "fn", "cfn", "statics", "ws_o", "ws_numel")


_plans: dict = {}
_plans_lock = threading.Lock()


def _get_plan(q, kv_cache, block_table, causal, has_skip, fpb, has_stats, num_splits) -> _Plan:
    key = (q.shape, q.dtype, q.get_device(), kv_cache.shape, kv_cache.stride(),
           None if block_table is None else (block_table.shape, block_table.stride(0)),
           causal, has_skip, fpb, has_stats, num_splits, CLUSTER_MODE, INTERLEAVE_SPLITS, USE_PDL,
           SCHEDULE, EARLY_RELEASE)
    plan = _plans.get(key)
    if plan is not None:
        return plan
    with _plans_lock:
        geo = plan_mla_decode_sm90(q, kv_cache, block_table, num_splits)
        p = _Plan()
        p.geo = geo
        p.splits = splits = geo["num_splits"]
        p.direct = splits == 1
        paged = block_table is not None
        cap = block_table.shape[1] * kv_cache.shape[1] if paged else kv_cache.shape[1]
        tiles_per_split = -(-(-(-cap // TILE_N)) // splits)
        config = dict(dtype=q.dtype, page_size=kv_cache.shape[1] if paged else None,
                      causal=bool(causal), has_skip=has_skip, factor_per_batch=fpb,
                      has_stats=has_stats, direct_out=p.direct,
                      cluster_m=mla_cluster_m(q.shape[2], q.shape[1], bool(causal),
                                              tiles_per_split),
                      # one split: both tile orders coincide (one compiled kernel)
                      interleave_splits=geo["interleave_splits"] and not p.direct,
                      use_pdl=USE_PDL, schedule=SCHEDULE, early_release=EARLY_RELEASE)
        ck = _config_key(config)
        p.fn = _compiled(ck, lambda: _make_kernel(ck).launch_ptrs,
                         _compile_args(dict(ck), cuda_stream(0)))
        B, lq, H, _ = q.shape
        ks = kv_cache.stride()
        p.statics = (B, lq, H, kv_cache.shape[0], kv_cache.shape[1], ks[0], ks[1],
                     block_table.shape[1] if paged else 1, block_table.stride(0) if paged else 1)
        p.ws_o = splits * B * lq * H * HEAD_DIM_V
        p.ws_numel = p.ws_o + splits * B * H * lq
        p.cfn = None
        if not p.direct:
            p.cfn = compiled_combine(q.dtype, HEAD_DIM_V, splits, USE_PDL, GROUPED_MERGE)
        _plans[key] = p
        return p


def run_mla_decode_sm90(q, kv_cache, out, lse, *, cache_seqlens, block_table=None,
                        softmax_scale: float, threshold_scale_factor=None, visited=None,
                        skipped=None, causal: bool = True, num_splits: Optional[int] = None,
                        workspace=None, merge_splits: bool = True) -> dict:
    """Launch the sm90 MLA decode kernel (and the combine when split) on torch's current stream.

    q [B, Lq_new, H, 576] contiguous; kv_cache paged [num_pages, page_size, 576] with block_table
    [B, max_pages] int32 (rows may be strided), or contiguous [B, capacity, 576]; last dim
    contiguous, 16-byte aligned rows. cache_seqlens [B] int32 contiguous. out [B, Lq_new, H, 512]
    (q dtype, contiguous) and lse [B, H, Lq_new] float32 preallocated. visited/skipped: int32 [B]
    (contiguous, zeroed by the caller) or None. threshold_scale_factor: None/0 (dense), a number,
    or a float32 tensor [B]. workspace: optional (out_partial [S, B, Lq, H, 512] fp32,
    lse_partial [S, B, H, Lq] fp32) with S >= num_splits, for allocation-free graph replays.
    merge_splits=False (benchmarks only) skips the combine of a split launch: out and lse are
    then left unwritten.
    Returns the geometry used (pass it to the reference).
    """
    has_stats = visited is not None
    if has_stats != (skipped is not None):
        raise NotImplementedError("blasst sm90 MLA decode: visited and skipped go together")
    has_skip, factor_t, factor = factor_kind(threshold_scale_factor, has_stats)
    plan = _get_plan(q, kv_cache, block_table, causal, has_skip, factor_t is not None, has_stats,
                     num_splits)
    B, lq, H, _ = q.shape
    if B == 0 or lq == 0 or H == 0:
        return plan.geo
    factor_t = factor_tensor(factor_t, B, q.device)
    dt = TORCH_TO_CUTLASS[q.dtype]
    if plan.direct:
        o_p, lse_p = out.data_ptr(), lse.data_ptr()
    elif workspace is not None:
        o_p, lse_p = workspace[0].data_ptr(), workspace[1].data_ptr()
    else:
        ws = torch.empty(plan.ws_numel, dtype=torch.float32, device=q.device)
        o_p = ws.data_ptr()
        lse_p = o_p + 4 * plan.ws_o
    stream = cuda_stream(torch.cuda.current_stream(q.device).cuda_stream)
    s = plan.statics
    plan.fn(
        make_ptr(dt, q.data_ptr(), 16), make_ptr(dt, kv_cache.data_ptr(), 16),
        make_ptr(dt if plan.direct else Float32, o_p, 16), make_ptr(Float32, lse_p, 4),
        make_ptr(Int32, cache_seqlens.data_ptr(), 4),
        make_ptr(Int32, block_table.data_ptr(), 4) if block_table is not None else None,
        make_ptr(Float32, factor_t.data_ptr(), 4) if factor_t is not None else None,
        make_ptr(Int32, visited.data_ptr(), 4) if has_stats else None,
        make_ptr(Int32, skipped.data_ptr(), 4) if has_stats else None,
        Int32(s[0]), Int32(s[1]), Int32(s[2]), Int32(s[3]), Int32(s[4]), cutlass.Int64(s[5]),
        Int32(s[6]), Int32(s[7]), Int32(s[8]),
        Float32(softmax_scale), Float32(factor), Int32(plan.splits), stream)
    if not plan.direct and merge_splits:
        plan.cfn(make_ptr(Float32, o_p, 16), make_ptr(Float32, lse_p, 4), make_ptr(dt, out.data_ptr(), 16),
                 make_ptr(Float32, lse.data_ptr(), 4), Int32(plan.splits), Int32(B), Int32(lq),
                 Int32(H), stream)
    return plan.geo


def mla_decode_sm90(q, kv_cache, *, cache_seqlens, block_table=None, softmax_scale: float,
                    threshold_scale_factor=None, visited=None, skipped=None, causal: bool = True):
    """Like :func:`run_mla_decode_sm90`, but allocates and returns (out, lse)."""
    B, lq, H, _ = q.shape
    out = torch.empty(B, lq, H, HEAD_DIM_V, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, lq, dtype=torch.float32, device=q.device)
    run_mla_decode_sm90(q, kv_cache, out, lse, cache_seqlens=cache_seqlens, block_table=block_table,
                        softmax_scale=softmax_scale, threshold_scale_factor=threshold_scale_factor,
                        visited=visited, skipped=skipped, causal=causal)
    return out, lse


def supported_configs():
    """Every configuration the CPU test compiles (code-changing parameters only)."""
    cfgs = []
    for page_size in (64, None, 16):
        for has_skip, fpb, stats in ((False, False, False), (True, False, False), (True, True, True)):
            for direct in (False, True):
                cfgs.append(dict(dtype=torch.bfloat16, page_size=page_size, has_skip=has_skip,
                                 factor_per_batch=fpb, has_stats=stats, direct_out=direct,
                                 interleave_splits=INTERLEAVE_SPLITS and not direct,
                                 use_pdl=USE_PDL))
    return cfgs


def supported_cluster_configs():
    """The 2-CTA cluster variant: each page-size class (one copy, four 16-row copies, contiguous)
    and both epilogues."""
    bf = torch.bfloat16
    return [dict(dtype=bf, page_size=64, has_skip=True, factor_per_batch=True, has_stats=True,
                 cluster_m=2, interleave_splits=INTERLEAVE_SPLITS, use_pdl=USE_PDL),
            dict(dtype=bf, page_size=64, direct_out=True, cluster_m=2, use_pdl=USE_PDL),
            dict(dtype=bf, page_size=16, has_skip=True, cluster_m=2),
            dict(dtype=bf, page_size=None, has_skip=True, direct_out=True, cluster_m=2,
                 use_pdl=USE_PDL)]


def clear_cache() -> None:
    compile_cache.clear_memory()
    _plans.clear()


__all__ = ["mla_decode_geometry_sm90", "plan_mla_decode_sm90", "compile_mla_decode_sm90",
           "run_mla_decode_sm90", "mla_decode_sm90", "supported_configs", "supported_cluster_configs",
           "mla_cluster_m", "clear_cache",
           "HEAD_DIM", "HEAD_DIM_V", "SUPPORTED_PAGE_SIZES"]
