"""Torch-facing glue for the sm90 decode kernel: geometry, compilation (cached), launch.

Inputs are assumed validated by ``blasst_cute.api`` (dtype, devices, shapes, 16-byte aligned rows
with a contiguous last dim); this module only plans, converts, compiles and launches.

    geo = decode_geometry_sm90(G, lq_new, page_size, batch, hk, max_seqlen, num_sms)
    run_decode_sm90(q, k_cache, v_cache, out, lse, cache_seqlens=..., block_table=...,
                    softmax_scale=..., threshold_scale_factor=..., visited=, skipped=, v_loaded=)

The reference reproduces the kernel's decisions with
``blasst_attention_paged(..., **{k: geo[k] for k in Geometry fields})``.
"""

from __future__ import annotations

import ctypes
import math
import threading
from typing import Optional

import torch

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from blasst_cute.kernels.sm90.combine import BlasstDecodeCombineSm90
from blasst_cute.kernels.sm90.decode import (
    SUPPORTED_PAGE_SIZES,
    TILE_M,
    BlasstDecodeSm90,
)

_TORCH_TO_CUTLASS = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}
_NAME_TO_TORCH = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                  "fp16": torch.float16, "float16": torch.float16}

MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 128
DEFAULT_TILE_N = 128

_cache: dict = {}
_cache_lock = threading.Lock()
_num_sms: dict = {}


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = _NAME_TO_TORCH.get(dtype, dtype)
    if dtype not in _TORCH_TO_CUTLASS:
        raise NotImplementedError(f"blasst sm90 decode: dtype {dtype} (bf16/fp16 only)")
    return dtype


def decode_num_splits(work_units: int, n_tiles: int, num_sms: int) -> int:
    """Splits per (q-tile, kv head, batch): fill the SMs once when there are fewer work units
    than SMs, keeping >= MIN_TILES_PER_SPLIT tiles per split (a split's first tile is never
    skipped, so more splits also mean fewer skips)."""
    if work_units <= 0 or n_tiles <= 1 or work_units * 2 > num_sms:
        return 1
    s = num_sms // work_units
    s = min(s, max(1, n_tiles // MIN_TILES_PER_SPLIT), MAX_SPLITS)
    return max(1, s)


def decode_geometry_sm90(G: int, lq_new: int, page_size: Optional[int], batch: int, hk: int,
                         max_seqlen: int, num_sms: int = 132, tile_n: Optional[int] = None) -> dict:
    """The tiling of the sm90 decode kernel: exactly what the reference needs.

    G = Hq // Hk, lq_new new tokens, page_size None for a contiguous cache, max_seqlen = the
    cache capacity the split count is planned for (block_table.shape[1] * page_size, or the
    contiguous cache's second dim): splits are chosen without reading cache_seqlens, and each
    sequence's visited tiles are cut into num_splits chunks of ceil(n_visit / num_splits).
    """
    if page_size is not None and page_size not in SUPPORTED_PAGE_SIZES:
        raise NotImplementedError(f"blasst sm90 decode: page_size {page_size}")
    block_n = tile_n or DEFAULT_TILE_N
    m_blocks = -(-(G * lq_new) // TILE_M)
    n_tiles = -(-max(int(max_seqlen), 0) // block_n)
    splits = decode_num_splits(batch * hk * m_blocks, n_tiles, num_sms)
    return dict(block_m=TILE_M, block_n=block_n, pack_gqa=True, order="forward",
                num_splits=splits, rows_per_decision=TILE_M, split_tiles=None)


# ----------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------

def _config_key(config: dict) -> tuple:
    c = dict(config)
    c["dtype"] = _torch_dtype(c.get("dtype", torch.bfloat16))
    c.setdefault("page_size", None)
    c.setdefault("tile_n", DEFAULT_TILE_N)
    c.setdefault("causal", True)
    c.setdefault("order", "forward")
    for k in ("has_skip", "factor_per_batch", "has_stats", "direct_out"):
        c[k] = bool(c.get(k, False))
    c.setdefault("num_k_stages", None)
    c.setdefault("num_v_stages", None)
    return tuple(sorted(c.items(), key=lambda kv: kv[0]))


def _make_kernel(key: tuple) -> BlasstDecodeSm90:
    c = dict(key)
    return BlasstDecodeSm90(
        _TORCH_TO_CUTLASS[c["dtype"]], c["head_dim"], page_size=c["page_size"], tile_n=c["tile_n"],
        causal=c["causal"], has_skip=c["has_skip"], factor_per_batch=c["factor_per_batch"],
        has_stats=c["has_stats"], direct_out=c["direct_out"], order=c["order"],
        num_k_stages=c["num_k_stages"], num_v_stages=c["num_v_stages"],
    )


_GMEM = cute.AddressSpace.gmem


def _fake_ptr(dtype, align=16):
    return cute.runtime.make_ptr(dtype, 0, _GMEM, assumed_align=align)


def _decode_compile_args(c: dict, stream):
    """Arguments of ``BlasstDecodeSm90.launch_ptrs`` for compilation (placeholder values)."""
    dt = _TORCH_TO_CUTLASS[c["dtype"]]
    paged = c["page_size"] is not None
    o_dt = dt if c["direct_out"] else Float32
    stats = [_fake_ptr(Int32, 4) for _ in range(3)] if c["has_stats"] else [None] * 3
    return (
        _fake_ptr(dt), _fake_ptr(dt), _fake_ptr(dt), _fake_ptr(o_dt), _fake_ptr(Float32, 4),
        _fake_ptr(Int32, 4), _fake_ptr(Int32, 4) if paged else None,
        _fake_ptr(Float32, 4) if c["factor_per_batch"] else None, *stats,
        Int32(1), Int32(1), Int32(1), Int32(1), Int32(1), Int32(c["page_size"] or 1),
        cutlass.Int64(8), Int32(8), Int32(8), Int32(1), Int32(1),
        Float32(1.0), Float32(0.0), Int32(1), stream,
    )


def compile_decode_sm90(config: dict, options: Optional[str] = None):
    """Compile one decode configuration (no GPU needed; set CUTE_DSL_ARCH=sm_90a on a CPU host).

    config keys: dtype, head_dim, page_size (None = contiguous cache), and optionally tile_n,
    causal, has_skip, factor_per_batch, has_stats, direct_out, order, num_k_stages, num_v_stages.
    Returns the compiled callable of ``BlasstDecodeSm90.launch_ptrs``.
    """
    import cuda.bindings.driver as cuda

    key = _config_key(config)
    kern = _make_kernel(key)
    args = _decode_compile_args(dict(key), cuda.CUstream(0))
    if options:
        return cute.compile(kern.launch_ptrs, *args, options=options)
    return cute.compile(kern.launch_ptrs, *args)


def _combine_compile_args(dt):
    return (_fake_ptr(Float32, 16), _fake_ptr(Float32, 4), _fake_ptr(dt), _fake_ptr(Float32, 4),
            Int32(1), Int32(1), Int32(1), Int32(1), _cuda_stream(0))


def _cuda_stream(h):
    import cuda.bindings.driver as cuda

    return cuda.CUstream(h)


def compile_combine_sm90(dtype, head_dim: int, options: Optional[str] = None):
    """Compile the split-KV combine kernel (no GPU needed)."""
    dt = _TORCH_TO_CUTLASS[_torch_dtype(dtype)]
    kern = BlasstDecodeCombineSm90(dt, head_dim)
    args = _combine_compile_args(dt)
    if options:
        return cute.compile(kern.launch_ptrs, *args, options=options)
    return cute.compile(kern.launch_ptrs, *args)


# ----------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------

def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _num_sms.get(idx)
    if n is None:
        n = torch.cuda.get_device_properties(idx).multi_processor_count
        _num_sms[idx] = n
    return n


_geo_cache: dict = {}


def plan_decode_sm90(q, k_cache, block_table=None, num_splits: Optional[int] = None,
                     tile_n: Optional[int] = None) -> dict:
    """The geometry ``run_decode_sm90`` will use for these shapes (no device sync; cached:
    treat the returned dict as read-only)."""
    key = (tuple(q.shape), tuple(k_cache.shape),
           None if block_table is None else tuple(block_table.shape), q.device, num_splits, tile_n)
    geo = _geo_cache.get(key)
    if geo is not None:
        return geo
    B, lq, hq, _ = q.shape
    hk = k_cache.shape[2]
    if block_table is not None:
        page_size = k_cache.shape[1]
        cap = block_table.shape[1] * page_size
    else:
        page_size, cap = None, k_cache.shape[1]
    geo = decode_geometry_sm90(hq // hk, lq, page_size, B, hk, cap, _sm_count(q.device), tile_n)
    if num_splits is not None:
        geo["num_splits"] = int(num_splits)
    _geo_cache[key] = geo
    return geo


def _ptr(dtype, t: Optional[torch.Tensor], align: int):
    if t is None:
        return None
    return cute.runtime.make_ptr(dtype, t.data_ptr(), _GMEM, assumed_align=align)


class _FastCall:
    """Low-overhead invocation of a compiled function whose parameters are all pointers and
    scalars: the argument storage is preallocated ctypes and only the values change per call
    (the DSL's generic per-call argument marshalling costs ~50 us).

    Built from the compile-time arguments; verifies that its storage reproduces the DSL's own
    execution arguments byte for byte, and otherwise disables itself (``ok`` False). Not
    thread-safe (one storage per compiled function; calls are serialized by a lock).
    """

    def __init__(self, fn, sample_args):
        self.fn = fn
        self.ok = False
        self.lock = threading.Lock()
        self.store = []
        kinds = []
        for a in sample_args:
            if a is None:
                continue
            if isinstance(a, cute.Pointer):
                kinds.append((ctypes.c_uint64, 8))
            elif isinstance(a, cutlass.Int64):
                kinds.append((ctypes.c_int64, 8))
            elif isinstance(a, Int32):
                kinds.append((ctypes.c_int32, 4))
            elif isinstance(a, Float32):
                kinds.append((ctypes.c_float, 4))
            else:  # the stream
                kinds.append((ctypes.c_uint64, 8))
        try:
            exe, _ = fn.execution_args.generate_execution_args(tuple(sample_args), {})
        except Exception:  # noqa: BLE001
            return
        if len(exe) != len(kinds):
            return
        self.store = [k() for k, _ in kinds]
        for st, e, (_, nbytes) in zip(self.store, exe, kinds):
            addr = e if isinstance(e, int) else e.value
            ctypes.memmove(ctypes.addressof(st), addr, nbytes)
        self.addrs = [ctypes.addressof(st) for st in self.store]
        self.ok = True
        self.first = True

    def __call__(self, values):
        with self.lock:
            for st, v in zip(self.store, values):
                st.value = v
            if self.first:
                self.fn.run_compiled_program(self.addrs)
                self.first = False
                ex = getattr(self.fn, "_default_executor", None)
                self.packed = None
                if ex is not None and hasattr(ex, "capi_func"):
                    # Our argument addresses never change: pack them once, in a private buffer.
                    n = len(self.addrs) + getattr(ex, "_num_extra_args", 0)
                    tmp = ex._get_invoke_packed_args_func(self.addrs)
                    self.packed = (ctypes.c_void_p * n)(*tmp[:n])
                    self.executor = ex
            elif self.packed is not None:
                ex = self.executor
                ex.capi_func(self.packed)
                if ex._has_cuda_result and ex.cuda_result.value != 0:
                    raise RuntimeError(f"blasst decode launch failed: {ex.cuda_result.value}")
            else:
                self.fn._default_executor.run_compiled_program(self.addrs)


_fast: dict = {}
USE_FAST_CALL = True
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream(device) -> int:
    if _raw_stream is not None:
        return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream


def _compiled(key, compile_args, maker):
    fn = _cache.get(key)
    if fn is None:
        with _cache_lock:
            fn = _cache.get(key)
            if fn is None:
                fn = cute.compile(maker(), *compile_args)
                _cache[key] = fn
    return fn


def run_decode_sm90(q, k_cache, v_cache, out, lse, *, cache_seqlens, block_table=None,
                    softmax_scale: Optional[float] = None, threshold_scale_factor=None,
                    visited=None, skipped=None, v_loaded=None, causal: bool = True,
                    num_splits: Optional[int] = None, workspace=None,
                    tuning: Optional[dict] = None) -> dict:
    """Launch the sm90 decode kernel (and the combine when split) on torch's current stream.

    q [B, Lq_new, Hq, D] contiguous; k_cache/v_cache paged [num_pages, page_size, Hk, D] with
    block_table [B, max_pages] int32 (rows may be strided), or contiguous [B, capacity, Hk, D]
    (block_table None); K and V share strides, head dim contiguous, 16-byte aligned rows.
    cache_seqlens [B] int32. out [B, Lq_new, Hq, D] (q dtype, contiguous) and lse
    [B, Hq, Lq_new] float32 (contiguous) preallocated. visited/skipped/v_loaded: int32 [B, Hk]
    contiguous, zeroed by the caller, or None (v_loaded needs the other two).
    threshold_scale_factor: None/0 (dense), a number, or a float32 tensor [B] (one per
    sequence; CUDA-graph friendly). workspace: optional (out_partial [S, B, Lq, Hq, D] fp32,
    lse_partial [S, B, Hq, Lq] fp32) with S >= num_splits, for allocation-free graph replays.
    Returns the geometry used (pass it to the reference).
    """
    import cuda.bindings.driver as cuda

    tile_n = None
    if tuning:
        tuning = dict(tuning)
        tile_n = tuning.pop("tile_n", None)
    geo = plan_decode_sm90(q, k_cache, block_table, num_splits, tile_n)
    splits = geo["num_splits"]
    B, lq, hq, d = q.shape
    if B == 0 or lq == 0 or hq == 0:
        return geo
    has_stats = visited is not None
    if has_stats != (skipped is not None):
        raise NotImplementedError("blasst sm90 decode: visited and skipped go together")
    if has_stats and v_loaded is None:
        v_loaded = torch.zeros_like(visited)
    factor_t = None
    factor = 0.0
    if isinstance(threshold_scale_factor, torch.Tensor):
        factor_t = threshold_scale_factor
        if factor_t.dtype != torch.float32 or factor_t.numel() != B or not factor_t.is_contiguous():
            factor_t = factor_t.to(device=q.device, dtype=torch.float32).reshape(-1)
            factor_t = factor_t.expand(B).contiguous() if factor_t.numel() == 1 else factor_t.contiguous()
        has_skip = True
    elif threshold_scale_factor is None:
        has_skip = has_stats
    else:
        factor = float(threshold_scale_factor)
        has_skip = factor > 0.0 or has_stats
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    direct = splits == 1
    paged = block_table is not None
    key = ("decode", q.dtype, d, k_cache.shape[1] if paged else None, geo["block_n"], bool(causal),
           has_skip, factor_t is not None, has_stats, direct, geo["order"],
           tuple(sorted(tuning.items())) if tuning else ())
    fn = _cache.get(key)
    if fn is None:
        config = dict(dtype=q.dtype, head_dim=d, page_size=k_cache.shape[1] if paged else None,
                      tile_n=geo["block_n"], causal=bool(causal), has_skip=has_skip,
                      factor_per_batch=factor_t is not None, has_stats=has_stats,
                      direct_out=direct, order=geo["order"])
        if tuning:
            config.update(tuning)  # experiments only: num_k_stages, num_v_stages
        ck = _config_key(config)
        fn = _compiled(key, _decode_compile_args(dict(ck), cuda.CUstream(0)),
                       lambda: _make_kernel(ck).launch_ptrs)
    if direct:
        o_t, lse_t = out, lse
    elif workspace is not None:
        o_t, lse_t = workspace
    else:
        o_t = torch.empty(splits, B, lq, hq, d, dtype=torch.float32, device=q.device)
        lse_t = torch.empty(splits, B, hq, lq, dtype=torch.float32, device=q.device)
    dt = _TORCH_TO_CUTLASS[q.dtype]
    stream_h = _current_stream(q.device)
    ks = k_cache.stride()
    opt = [t.data_ptr() for t in (block_table, factor_t, visited, skipped, v_loaded) if t is not None]
    values = [q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), o_t.data_ptr(), lse_t.data_ptr(),
              cache_seqlens.data_ptr(), *opt,
              B, lq, hq, k_cache.shape[2], k_cache.shape[0], k_cache.shape[1], ks[0], ks[1], ks[2],
              block_table.shape[1] if paged else 1, block_table.stride(0) if paged else 1,
              float(softmax_scale), factor, splits, stream_h]
    fast = _fast.get(key) if USE_FAST_CALL else None
    if fast is not None and fast.ok:
        fast(values)
    else:
        fn(
            _ptr(dt, q, 16), _ptr(dt, k_cache, 16), _ptr(dt, v_cache, 16),
            _ptr(dt if direct else Float32, o_t, 16), _ptr(Float32, lse_t, 4),
            _ptr(Int32, cache_seqlens, 4), _ptr(Int32, block_table, 4), _ptr(Float32, factor_t, 4),
            _ptr(Int32, visited, 4), _ptr(Int32, skipped, 4), _ptr(Int32, v_loaded, 4),
            Int32(B), Int32(lq), Int32(hq), Int32(k_cache.shape[2]), Int32(k_cache.shape[0]),
            Int32(k_cache.shape[1]), cutlass.Int64(ks[0]), Int32(ks[1]), Int32(ks[2]),
            Int32(block_table.shape[1] if paged else 1),
            Int32(block_table.stride(0) if paged else 1),
            Float32(softmax_scale), Float32(factor), Int32(splits),
            cuda.CUstream(stream_h),
        )
        if USE_FAST_CALL and key not in _fast:
            c = dict(_config_key(dict(dtype=q.dtype, head_dim=d,
                                      page_size=k_cache.shape[1] if paged else None,
                                      tile_n=geo["block_n"], causal=bool(causal),
                                      has_skip=has_skip, factor_per_batch=factor_t is not None,
                                      has_stats=has_stats, direct_out=direct, order=geo["order"])))
            _fast[key] = _FastCall(fn, _decode_compile_args(c, cuda.CUstream(0)))
    if not direct:
        ckey = ("combine", q.dtype, d)
        cfn = _cache.get(ckey)
        if cfn is None:
            with _cache_lock:
                cfn = compile_combine_sm90(q.dtype, d)
                _cache[ckey] = cfn
        cvalues = [o_t.data_ptr(), lse_t.data_ptr(), out.data_ptr(), lse.data_ptr(), splits, B, lq,
                   hq, stream_h]
        cfast = _fast.get(ckey) if USE_FAST_CALL else None
        if cfast is not None and cfast.ok:
            cfast(cvalues)
        else:
            cfn(_ptr(Float32, o_t, 16), _ptr(Float32, lse_t, 4), _ptr(dt, out, 16),
                _ptr(Float32, lse, 4), Int32(splits), Int32(B), Int32(lq), Int32(hq),
                cuda.CUstream(stream_h))
            if USE_FAST_CALL and ckey not in _fast:
                _fast[ckey] = _FastCall(cfn, _combine_compile_args(_TORCH_TO_CUTLASS[q.dtype]))
    return geo


def supported_configs():
    """Every configuration the CPU test compiles (code-changing parameters only)."""
    cfgs = []
    for page_size in (None,) + SUPPORTED_PAGE_SIZES:
        for has_skip, fpb, stats in ((False, False, False), (True, False, False), (True, True, True)):
            for direct in (False, True):
                cfgs.append(dict(dtype=torch.bfloat16, head_dim=128, page_size=page_size,
                                 has_skip=has_skip, factor_per_batch=fpb, has_stats=stats,
                                 direct_out=direct))
    return cfgs


def clear_cache() -> None:
    _cache.clear()


__all__ = ["decode_geometry_sm90", "plan_decode_sm90", "compile_decode_sm90",
           "compile_combine_sm90", "run_decode_sm90", "supported_configs", "clear_cache"]
del math
