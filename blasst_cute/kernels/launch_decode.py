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
import os
import struct
import threading
from typing import Optional

import torch

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from blasst_cute.kernels import compile_cache
from blasst_cute.kernels.dtypes import TORCH_TO_CUTLASS, kernel_dtype
from blasst_cute.kernels.launch_common import (
    combine_compile_args,
    compiled,
    compiled_combine,
    cuda_stream,
    factor_kind,
    factor_tensor,
    fake_ptr,
    make_ptr,
    sm_count,
)
from blasst_cute.kernels.sm90.combine import BlasstDecodeCombineSm90
from blasst_cute.kernels.sm90.decode import (
    SUPPORTED_PAGE_SIZES,
    TILE_M,
    BlasstDecodeSm90,
)


MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 128
DEFAULT_TILE_N = 128
# Short caches: where 128-key tiles leave SMs idle (MIN_TILES_PER_SPLIT holds the split count
# down), 64-key tiles give up to twice the splits, with the same share of each split's keys in
# its never-skipped first tile. Taken when they give >= 1.5x the splits: a 64-key tile costs more
# per key (H100, B=1 L=32k 64/4, same 33 splits: 0.94-0.96x), a split count doubled wins (H100,
# B <= 2, L 2k-8k: 1.09-1.46x less kernel time, perf/results/decode-h100-small-copy.md). Part of
# the geometry.
# BLASST_DECODE_SHORT_TILE_N=0 keeps 128-key tiles everywhere.
_short_tile_env = os.environ.get("BLASST_DECODE_SHORT_TILE_N", "64")
if _short_tile_env not in ("0", "64"):
    raise ValueError(f"BLASST_DECODE_SHORT_TILE_N={_short_tile_env!r}: expected 64 or 0 (off)")
SHORT_CACHE_TILE_N = int(_short_tile_env)

# Split-KV partials merged inside the decode launch (the last split CTA of each q-tile) instead
# of by the separate combine kernel. Off by default in device time: the fused merge runs on ONE
# SM per q-tile (L2 reads of rows x splits partials, plus an arrival handshake and, in a captured
# graph, a zero-fill of the counters per call), and the combine kernel launched with PDL beat it
# in kernel time at every measured shape (perf/results/decode-h100-small.md).
# BLASST_DECODE_FUSED_MERGE=1 (per call: tuning={"fused_merge": True}) turns it on everywhere.
FUSED_MERGE = os.environ.get("BLASST_DECODE_FUSED_MERGE", "0") == "1"
# But the second launch costs host time: ~5 us on the H100 host (perf/decode_host.py; API call
# 19.9 -> 15.0 us at B=1 L=1024), and an eager decode loop of small launches runs at the host's
# pace. So a call outside CUDA-graph capture, without a caller workspace, whose cache holds at
# most EAGER_FUSED_MAX_KV_BYTES of K+V (B x capacity x Hk x (D + Dv) x element size) merges in
# the decode launch: eager loops 0.77x (4 MiB) to 0.96-0.98x (16-32 MiB) the time per call, never
# slower up to 128 MiB, same output bits (perf/results/decode-h100-host.md). Graph captures, whose
# replays have no host time per launch, keep the combine kernel.
# BLASST_DECODE_EAGER_FUSED_MAX_KV_BYTES=0 turns the rule off.
EAGER_FUSED_MAX_KV_BYTES = int(os.environ.get("BLASST_DECODE_EAGER_FUSED_MAX_KV_BYTES", 32 << 20))
# The grouped merge (combine.py): the combine kernel spreads a row's split groups over up to 8
# warps (one memory round trip), the fused merge walks the same groups with the loads of a batch
# of splits in flight together; both give the same bits. BLASST_DECODE_PIPELINED_MERGE=0: the
# old one-warp-per-row loops.
PIPELINED_MERGE = os.environ.get("BLASST_DECODE_PIPELINED_MERGE", "1") != "0"
# Programmatic dependent launch of the decode kernel and of its combine: each grid launches
# while the kernel before it in the stream drains. Used for launches of >= PDL_MIN_SPLITS splits
# (the latency-bound small batches: -1 us at B=1), not below (+2 us measured at B=8 L=8k 64/4,
# 4 splits; not understood yet). BLASST_DECODE_PDL=0 turns it off.
USE_PDL = os.environ.get("BLASST_DECODE_PDL", "1") != "0"
PDL_MIN_SPLITS = 8
# The producer warp issues the V loads that need no vote (decode.py, producer_v): measured no
# gain on the H100 (perf/results/decode-h100-small.md); off unless BLASST_DECODE_PRODUCER_V=1.
PRODUCER_V = os.environ.get("BLASST_DECODE_PRODUCER_V", "0") == "1"
# Paged caches: the producer warp reads its first page ids before the sequence length arrives
# (decode.py, speculate_pages), taking one dependent global read off the path to the first K
# load. H100, page 64, two runs (perf/results/decode-h100-small.md, speculative page ids):
# -0.1 to -0.5 us at B=1 (+3.7-4.7 % at L=8k 64/4, +1-2 % at 8k 32/8, +1-1.4 % at 32k 64/4),
# +0.2-0.8 % at B=8 L=8k, +0.1 % at B=32; never slower. BLASST_DECODE_SPECULATE_PAGES=0: off.
SPECULATE_PAGES = os.environ.get("BLASST_DECODE_SPECULATE_PAGES", "1") != "0"
# Launches with programmatic dependent launch: the producer warp prefetches the K and V of its
# split's first L2_PREFETCH_TILES key tiles into L2 before griddepcontrol.wait, while the kernel
# before drains (decode.py, prefetch_first_tiles). H100, page 64, kernel time in a CUDA graph
# (perf/results/decode-h100-l2-prefetch.md): 1 tile: B=1 L=8k 32/8 -5.4 % / -7.2 % (dense /
# skip build at 0 %), L=32k 64/4 -1.0 / -0.4 %, L=128k 32/8 +0.1 / +0.2 %; 2 tiles: L=8k 64/4
# -9.7 / -4.5 %, 8k 32/8 a little faster than 1 tile, 32k 64/4 +1.3-2.3 %.
# BLASST_DECODE_L2_PREFETCH=N sets the count (0: off).
try:
    L2_PREFETCH_TILES = int(os.environ.get("BLASST_DECODE_L2_PREFETCH", "1"))
except ValueError:
    raise ValueError("BLASST_DECODE_L2_PREFETCH must be an integer (key tiles per split, 0 = "
                     f"none), got {os.environ['BLASST_DECODE_L2_PREFETCH']!r}") from None
if L2_PREFETCH_TILES < 0:
    raise ValueError(f"BLASST_DECODE_L2_PREFETCH must be >= 0, got {L2_PREFETCH_TILES}")

# Splits take the key tiles round-robin (split s: tiles s, s + S, ...) rather than as contiguous
# chunks: the kept tiles (sinks, recent keys) spread evenly over the CTAs of a sequence, so no
# split keeps far more V tiles than the others. BLASST_DECODE_INTERLEAVE=0 restores chunks
# (comparisons; per call: tuning={"interleave_splits": False}). Part of the geometry, so the
# reference reproduces the decisions of either layout.
INTERLEAVE_SPLITS = os.environ.get("BLASST_DECODE_INTERLEAVE", "1") != "0"




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
                         max_seqlen: int, num_sms: int = 132, tile_n: Optional[int] = None,
                         interleave_splits: Optional[bool] = None) -> dict:
    """The tiling of the sm90 decode kernel: exactly what the reference needs.

    G = Hq // Hk, lq_new new tokens, page_size None for a contiguous cache, max_seqlen = the
    cache capacity the split count is planned for (block_table.shape[1] * page_size, or the
    contiguous cache's second dim): splits are chosen without reading cache_seqlens, and each
    sequence's visited tiles are dealt round-robin to num_splits splits (interleave_splits,
    default INTERLEAVE_SPLITS) or cut into num_splits chunks of ceil(n_visit / num_splits).
    tile_n None: 128-key tiles, or SHORT_CACHE_TILE_N-key tiles where those give >= 1.5x the
    splits.
    """
    if page_size is not None and page_size not in SUPPORTED_PAGE_SIZES:
        raise NotImplementedError(f"blasst sm90 decode: page_size {page_size}")
    m_blocks = -(-(G * lq_new) // TILE_M)
    units = batch * hk * m_blocks
    keys = max(int(max_seqlen), 0)
    block_n = tile_n or DEFAULT_TILE_N
    if tile_n is None and SHORT_CACHE_TILE_N:
        short = SHORT_CACHE_TILE_N
        if (2 * decode_num_splits(units, -(-keys // short), num_sms)
                >= 3 * decode_num_splits(units, -(-keys // block_n), num_sms)):
            block_n = short
    splits = decode_num_splits(units, -(-keys // block_n), num_sms)
    if interleave_splits is None:
        interleave_splits = INTERLEAVE_SPLITS
    return dict(block_m=TILE_M, block_n=block_n, pack_gqa=True, order="forward",
                num_splits=splits, rows_per_decision=TILE_M, split_tiles=None,
                interleave_splits=bool(interleave_splits))


# ----------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------

def _config_key(config: dict) -> tuple:
    c = dict(config)
    c["dtype"] = kernel_dtype(c.get("dtype", torch.bfloat16), "sm90 decode")
    c.setdefault("page_size", None)
    c.setdefault("tile_n", DEFAULT_TILE_N)
    c.setdefault("causal", True)
    c.setdefault("order", "forward")
    for k in ("has_skip", "factor_per_batch", "has_stats", "direct_out", "fused_merge",
              "interleave_splits", "producer_v", "pipelined_merge", "use_pdl",
              "speculate_pages"):
        c[k] = bool(c.get(k, False))
    c.setdefault("num_k_stages", None)
    c.setdefault("num_v_stages", None)
    c["l2_prefetch_tiles"] = int(c.get("l2_prefetch_tiles", 0))
    return tuple(sorted(c.items(), key=lambda kv: kv[0]))


def _make_kernel(key: tuple) -> BlasstDecodeSm90:
    c = dict(key)
    return BlasstDecodeSm90(
        TORCH_TO_CUTLASS[c["dtype"]], c["head_dim"], page_size=c["page_size"], tile_n=c["tile_n"],
        causal=c["causal"], has_skip=c["has_skip"], factor_per_batch=c["factor_per_batch"],
        has_stats=c["has_stats"], direct_out=c["direct_out"], fused_merge=c["fused_merge"],
        order=c["order"],
        num_k_stages=c["num_k_stages"], num_v_stages=c["num_v_stages"],
        interleave_splits=c["interleave_splits"], producer_v=c["producer_v"],
        pipelined_merge=c["pipelined_merge"], use_pdl=c["use_pdl"],
        speculate_pages=c["speculate_pages"], l2_prefetch_tiles=c["l2_prefetch_tiles"],
    )


def _decode_compile_args(c: dict, stream):
    """Arguments of ``BlasstDecodeSm90.launch_ptrs`` for compilation (placeholder values)."""
    dt = TORCH_TO_CUTLASS[c["dtype"]]
    paged = c["page_size"] is not None
    o_dt = dt if c["direct_out"] else Float32
    stats = [fake_ptr(Int32, 4) for _ in range(3)] if c["has_stats"] else [None] * 3
    merge = [fake_ptr(dt), fake_ptr(Float32, 4), fake_ptr(Int32, 4)] if c["fused_merge"] \
        else [None] * 3
    return (
        fake_ptr(dt), fake_ptr(dt), fake_ptr(dt), fake_ptr(o_dt), fake_ptr(Float32, 4),
        fake_ptr(Int32, 4), fake_ptr(Int32, 4) if paged else None,
        fake_ptr(Float32, 4) if c["factor_per_batch"] else None, *stats, *merge,
        Int32(1), Int32(1), Int32(1), Int32(1), Int32(1), Int32(c["page_size"] or 1),
        cutlass.Int64(8), Int32(8), Int32(8), Int32(1), Int32(1),
        Float32(1.0), Float32(0.0), Int32(1), stream,
    )


def compile_decode_sm90(config: dict, options: Optional[str] = None):
    """Compile one decode configuration (no GPU needed; set CUTE_DSL_ARCH=sm_90a on a CPU host).

    config keys: dtype, head_dim, page_size (None = contiguous cache), and optionally tile_n,
    causal, has_skip, factor_per_batch, has_stats, direct_out, fused_merge, order, num_k_stages,
    num_v_stages, interleave_splits, producer_v, pipelined_merge, use_pdl, speculate_pages,
    l2_prefetch_tiles.
    Returns the compiled callable of ``BlasstDecodeSm90.launch_ptrs``.
    """
    key = _config_key(config)
    kern = _make_kernel(key)
    args = _decode_compile_args(dict(key), cuda_stream(0))
    if options:
        return cute.compile(kern.launch_ptrs, *args, options=options)
    return cute.compile(kern.launch_ptrs, *args)


def compile_combine_sm90(dtype, head_dim: int, options: Optional[str] = None,
                         use_pdl: bool = False, grouped: bool = False, warps_per_row: int = 1):
    """Compile the split-KV combine kernel (no GPU needed)."""
    dt = TORCH_TO_CUTLASS[kernel_dtype(dtype, "sm90 decode")]
    kern = BlasstDecodeCombineSm90(dt, head_dim, use_pdl=use_pdl, grouped=grouped,
                                   warps_per_row=warps_per_row)
    args = combine_compile_args(dt)
    if options:
        return cute.compile(kern.launch_ptrs, *args, options=options)
    return cute.compile(kern.launch_ptrs, *args)


# ----------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------

_geo_cache: dict = {}


def plan_decode_sm90(q, k_cache, block_table=None, num_splits: Optional[int] = None,
                     tile_n: Optional[int] = None, interleave_splits: Optional[bool] = None) -> dict:
    """The geometry ``run_decode_sm90`` will use for these shapes (no device sync; cached:
    treat the returned dict as read-only)."""
    if interleave_splits is None:
        interleave_splits = INTERLEAVE_SPLITS
    key = (tuple(q.shape), tuple(k_cache.shape),
           None if block_table is None else tuple(block_table.shape), q.device, num_splits, tile_n,
           interleave_splits)
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
    geo = decode_geometry_sm90(hq // hk, lq, page_size, B, hk, cap, sm_count(q.device), tile_n,
                               interleave_splits)
    if num_splits is not None:
        geo["num_splits"] = int(num_splits)
    _geo_cache[key] = geo
    return geo


class _FastCall:
    """Low-overhead invocation of a compiled function whose parameters are all pointers and
    scalars (the DSL's generic per-call argument marshalling costs ~50 us).

    The parameters live in one preallocated buffer, 8 bytes each, the per-call ("dynamic")
    ones first in the order given, so one ``struct.pack_into`` writes them all; the rest are
    written once (:meth:`preset`). The buffer starts as a byte copy of the DSL's own execution
    arguments for the compile-time arguments; when those are not one parameter per argument,
    the call path disables itself (``ok`` False). tests/kernels/test_launch_decode.py checks the
    storage against the DSL's marshalling. Calls are serialized by a lock (one storage per
    compiled function).
    """

    def __init__(self, fn, sample_args, dynamic):
        self.fn = fn
        self.ok = False
        self.lock = threading.Lock()
        codes = []  # (struct code, bytes) per parameter
        for a in sample_args:
            if a is None:
                continue
            if isinstance(a, cute.Pointer):
                codes.append(("Q", 8))
            elif isinstance(a, cutlass.Int64):
                codes.append(("q", 8))
            elif isinstance(a, Int32):
                codes.append(("i", 4))
            elif isinstance(a, Float32):
                codes.append(("f", 4))
            else:  # the stream
                codes.append(("Q", 8))
        try:
            exe, _ = fn.execution_args.generate_execution_args(tuple(sample_args), {})
        except Exception:  # noqa: BLE001
            return
        dynamic = list(dynamic)
        if len(exe) != len(codes) or len(set(dynamic)) != len(dynamic) \
                or not all(0 <= i < len(codes) for i in dynamic):
            return
        order = dynamic + [i for i in range(len(codes)) if i not in dynamic]
        self.buf = (ctypes.c_uint64 * len(codes))()
        base = ctypes.addressof(self.buf)
        self.offset = [0] * len(codes)
        for slot, i in enumerate(order):
            self.offset[i] = 8 * slot
        self.addrs = [base + off for off in self.offset]
        for dst, e, (_, nbytes) in zip(self.addrs, exe, codes):
            ctypes.memmove(dst, e if isinstance(e, int) else e.value, nbytes)
        self.formats = ["<" + c for c, _ in codes]
        self.dynamic = struct.Struct("<" + "".join(codes[i][0] + ("4x" if codes[i][1] == 4 else "")
                                                   for i in dynamic))
        self.ok = True
        self.first = True

    def preset(self, positions, values):
        """Write parameters that stay fixed for this storage (a plan's shapes); returns self."""
        for i, v in zip(positions, values):
            struct.pack_into(self.formats[i], self.buf, self.offset[i], v)
        return self

    def launch(self, values):
        """Write the dynamic parameters (in the order given at construction), then launch."""
        with self.lock:
            try:
                self.dynamic.pack_into(self.buf, 0, *values)
            except OverflowError:  # a float beyond float32's range: inf, as a C cast gives
                self.dynamic.pack_into(self.buf, 0, *[ctypes.c_float(v).value if type(v) is float
                                                      else v for v in values])
            self._launch()

    def _launch(self):
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


USE_FAST_CALL = True
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream(device) -> int:
    if _raw_stream is not None:
        return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream


def _compiled(key, compile_args, maker):
    return compiled("sm90-decode", key, maker, compile_args)


class _Plan:
    """Everything about one call signature that does not change from call to call: the
    geometry, the compiled kernels, and (fast path) private launch storage whose static slots
    (shapes, strides, split count) are filled once; a call only writes pointers, scale, factor
    and stream."""

    __slots__ = ("geo", "splits", "direct", "has_skip", "fpb", "has_stats", "fn", "cfn",
                 "fast", "cfast", "statics", "cstatics", "ws_o", "ws_numel", "out_shape",
                 "lse_shape", "lse_numel", "dtype", "device", "lock", "scratch", "fused", "use_pdl",
                 "n_arrivals", "arrivals", "stream_bufs")

    def __init__(self):
        self.scratch = {}
        self.arrivals = {}
        self.stream_bufs = {}  # stream -> (scratch address, arrivals address or None)

    def buffers(self, stream_h: int):
        """(scratch address, arrival counters address or None) for ``stream_h``, one lookup."""
        bufs = self.stream_bufs.get(stream_h)
        if bufs is None:
            bufs = self.stream_bufs[stream_h] = (
                self.scratch_ptr(stream_h), self.arrivals_ptr(stream_h) if self.fused else None)
        return bufs

    def scratch_ptr(self, stream_h: int) -> int:
        """Device address of this plan's fp32 scratch for ``stream_h``: the split partials, then
        an lse slot for calls that do not return lse. Reused by every call on that stream
        (stream order makes the reuse safe); one buffer per stream, so concurrent streams never
        share it. Never used while a CUDA graph is being captured (the caller allocates then)."""
        buf = self.scratch.get(stream_h)
        if buf is None:
            buf = torch.empty(self.ws_numel + self.lse_numel, dtype=torch.float32,
                              device=self.device)
            self.scratch[stream_h] = buf
        return buf.data_ptr()

    def arrivals_ptr(self, stream_h: int) -> int:
        """The fused merge's per-q-tile arrival counters for ``stream_h`` (zeroed once; every
        launch leaves them zero again). Per stream, like the scratch."""
        buf = self.arrivals.get(stream_h)
        if buf is None:
            buf = torch.zeros(self.n_arrivals, dtype=torch.int32, device=self.device)
            self.arrivals[stream_h] = buf
        return buf.data_ptr()


_plans: dict = {}
MAX_PLANS = 64
_CPOS = (0, 1, 2, 3, 8)  # combine: the dynamic slots (pointers, stream)


def _make_plan(key, q, k_cache, block_table, causal, has_skip, fpb, has_stats, num_splits,
               tuning, eager_fused=False) -> _Plan:
    tile_n = interleave = None
    if tuning:
        tuning = dict(tuning)
        tile_n = tuning.pop("tile_n", None)
        interleave = tuning.pop("interleave_splits", None)
    geo = plan_decode_sm90(q, k_cache, block_table, num_splits, tile_n, interleave)
    p = _Plan()
    p.geo = geo
    p.splits = splits = geo["num_splits"]
    p.direct = direct = splits == 1
    p.has_skip, p.fpb, p.has_stats = has_skip, fpb, has_stats
    B, lq, hq, d = q.shape
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else None
    use_pdl = USE_PDL and splits >= PDL_MIN_SPLITS
    config = dict(dtype=q.dtype, head_dim=d, page_size=page_size, tile_n=geo["block_n"],
                  causal=bool(causal), has_skip=has_skip, factor_per_batch=fpb,
                  has_stats=has_stats, direct_out=direct, fused_merge=FUSED_MERGE or eager_fused,
                  producer_v=PRODUCER_V, pipelined_merge=PIPELINED_MERGE,
                  use_pdl=use_pdl, speculate_pages=SPECULATE_PAGES and paged,
                  l2_prefetch_tiles=L2_PREFETCH_TILES if use_pdl else 0,
                  order=geo["order"],
                  # one split: the two tile orders coincide (one compiled kernel)
                  interleave_splits=geo["interleave_splits"] and not direct)
    tkey = ()
    if tuning:
        # experiments only: num_k_stages, num_v_stages, fused_merge, producer_v,
        # pipelined_merge, use_pdl, speculate_pages, l2_prefetch_tiles (tile_n /
        # interleave_splits: popped above)
        config.update(tuning)
        tkey = tuple(sorted(tuning.items()))
    config["fused_merge"] = p.fused = fused = bool(config["fused_merge"]) and not direct
    p.use_pdl = bool(config["use_pdl"])
    ck = _config_key(config)
    fkey = ("decode", q.dtype, d, page_size, geo["block_n"], bool(causal), has_skip, fpb,
            has_stats, direct, fused, geo["order"], config["interleave_splits"],
            bool(config["producer_v"]), bool(config["pipelined_merge"]), bool(config["use_pdl"]),
            bool(config["speculate_pages"]), int(config["l2_prefetch_tiles"]), tkey)
    compile_args = _decode_compile_args(dict(ck), cuda_stream(0))
    p.fn = _compiled(fkey, compile_args, lambda: _make_kernel(ck).launch_ptrs)
    ks = k_cache.stride()
    p.statics = [B, lq, hq, k_cache.shape[2], k_cache.shape[0], k_cache.shape[1], ks[0], ks[1],
                 ks[2], block_table.shape[1] if paged else 1,
                 block_table.stride(0) if paged else 1]
    p.fast = None
    n_ptr = 6 + paged + fpb + 3 * has_stats + 3 * fused
    if USE_FAST_CALL:
        # dynamic: the pointers, softmax scale, factor and stream (after the statics and the
        # split count, in launch_ptrs' order)
        n_st = len(p.statics)
        fc = _FastCall(p.fn, compile_args,
                       list(range(n_ptr)) + [n_ptr + n_st, n_ptr + n_st + 1, n_ptr + n_st + 3])
        if fc.ok:
            p.fast = fc.preset(list(range(n_ptr, n_ptr + n_st)) + [n_ptr + n_st + 2],
                               p.statics + [splits])
    p.out_shape = (B, lq, hq, d)
    p.lse_shape = (B, hq, lq)
    p.dtype = q.dtype
    p.device = q.device
    p.ws_o = splits * B * lq * hq * d if not direct else 0
    p.ws_numel = p.ws_o + splits * B * hq * lq if not direct else 0
    p.lse_numel = B * hq * lq
    p.n_arrivals = B * k_cache.shape[2] * (-(-(lq * (hq // k_cache.shape[2])) // TILE_M))
    p.cfn = p.cfast = None
    if not direct and not fused:
        # pipelined_merge: the grouped merge in the combine too (same bits as the fused merge)
        p.cfn = compiled_combine(q.dtype, d, splits, config["use_pdl"],
                                 config["pipelined_merge"])
        p.cstatics = [splits, B, lq, hq]
        if USE_FAST_CALL:
            fc = _FastCall(p.cfn, combine_compile_args(TORCH_TO_CUTLASS[q.dtype]), _CPOS)
            if fc.ok:
                p.cfast = fc.preset((4, 5, 6, 7), p.cstatics)
    p.lock = threading.Lock()
    return p


_CONTIGUOUS = torch.contiguous_format

# torch.cuda.is_current_stream_capturing without its Python wrapper (host time per call).
_is_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing",
                        torch.cuda.is_current_stream_capturing)


def cache_kv_bytes(q, k_cache, v_cache, block_table) -> int:
    """K+V bytes a call may read: B x capacity x Hk x (D + Dv) x element size (capacity: the
    block table's pages x page size, or the contiguous cache's length)."""
    B = q.shape[0]
    cap = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    return B * cap * k_cache.shape[2] * (k_cache.shape[3] + v_cache.shape[3]) * k_cache.element_size()


def _launch(q, k_cache, v_cache, out, lse, cache_seqlens, block_table, softmax_scale,
            threshold_scale_factor, visited, skipped, v_loaded, causal, num_splits, workspace,
            tuning, want_lse=True, plan_key=None):
    """Plan (cached per call signature), launch; returns (plan, out, lse). out/lse None:
    allocated here (after the decode launch when the combine writes them); with want_lse False
    and lse None, lse goes to the plan's scratch and None is returned for it.

    plan_key: a hashable key that already determines q's shape/dtype/device, the caches'
    shapes/strides and the block table's shape/strides (the API's validated signature); it
    replaces the key built here from the tensors (host time)."""
    has_stats = visited is not None
    if has_stats != (skipped is not None):
        raise NotImplementedError("blasst sm90 decode: visited and skipped go together")
    has_skip, factor_t, factor = factor_kind(threshold_scale_factor, has_stats)
    if plan_key is None:
        plan_key = (q.shape, q.dtype, q.get_device(), k_cache.shape, k_cache.stride(),
                    None if block_table is None else (block_table.shape, block_table.stride(0)))
    # (the capture query only where the eager rule can apply; an explicit fused_merge wins)
    eager_fused = bool(EAGER_FUSED_MAX_KV_BYTES) and workspace is None \
        and not (tuning and "fused_merge" in tuning) and not _is_capturing()
    key = (plan_key, causal, has_skip, factor_t is not None, has_stats, num_splits,
           tuple(sorted(tuning.items())) if tuning else None, eager_fused)
    plan = _plans.get(key)
    if plan is None:
        plan = _make_plan(key, q, k_cache, block_table, causal, has_skip, factor_t is not None,
                          has_stats, num_splits, tuning,
                          eager_fused and cache_kv_bytes(q, k_cache, v_cache, block_table)
                          <= EAGER_FUSED_MAX_KV_BYTES)
        # Bounded: a plan holds per-stream scratch (up to a few MB), and keys churn with the batch
        # and block-table shape under continuous batching. Oldest first out (rebuilt on demand;
        # the compiled kernels stay in compile_cache).
        while len(_plans) >= MAX_PLANS:
            _plans.pop(next(iter(_plans)))
        _plans[key] = plan
    B, lq, hq, d = q.shape
    if B == 0 or lq == 0 or hq == 0:
        return plan, out, lse
    if has_stats and v_loaded is None:
        v_loaded = torch.zeros_like(visited)
    factor_t = factor_tensor(factor_t, B, q.device)
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    stream_h = _raw_stream(q.get_device()) if _raw_stream is not None else \
        _current_stream(q.device)
    direct, fused = plan.direct, plan.fused
    # Scratch (split partials, an lse nobody reads) and the fused merge's arrival counters: the
    # plan's per-stream buffers, except while a graph is captured (then fresh allocations from
    # the graph's pool, as torch does for any temporary), so a captured graph never shares
    # memory with eager calls or with other graphs.
    need_scratch = (not direct and workspace is None) or (lse is None and not want_lse)
    scratch_p = arrivals_p = None
    ws_arrivals = workspace[2] if workspace is not None and len(workspace) > 2 else None
    if ws_arrivals is not None and (ws_arrivals.dtype != torch.int32
                                    or ws_arrivals.numel() < plan.n_arrivals):
        raise ValueError(f"workspace[2] (merge arrival counters) must be int32 with >= "
                         f"{plan.n_arrivals} elements, got {ws_arrivals.dtype} x {ws_arrivals.numel()}")
    if fused and ws_arrivals is not None:
        arrivals_p = ws_arrivals.data_ptr()
        fused_needs = False
    else:
        fused_needs = fused
    if need_scratch or fused_needs:
        if _is_capturing():
            scratch = torch.empty(plan.ws_numel + plan.lse_numel, dtype=torch.float32,
                                  device=plan.device) if need_scratch else None
            arrivals = torch.zeros(plan.n_arrivals, dtype=torch.int32,
                                   device=plan.device) if fused_needs else None
            scratch_p = scratch.data_ptr() if need_scratch else None
            if fused_needs:
                arrivals_p = arrivals.data_ptr()
        else:
            scratch_p, plan_arrivals_p = plan.buffers(stream_h)
            if fused_needs:
                arrivals_p = plan_arrivals_p
    if direct or fused:  # the decode launch writes the final out / lse
        if out is None:
            # out has q's shape and dtype: empty_like skips the shape/dtype/device parsing.
            out = torch.empty_like(q, memory_format=_CONTIGUOUS)
        if lse is None and want_lse:
            lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=plan.device)
    if direct:
        o_p = out.data_ptr()
        lse_p = lse.data_ptr() if lse is not None else scratch_p + 4 * plan.ws_numel
    elif workspace is not None:
        o_p, lse_p = workspace[0].data_ptr(), workspace[1].data_ptr()
    else:
        o_p = scratch_p
        lse_p = o_p + 4 * plan.ws_o
    ptrs = [q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), o_p, lse_p,
            cache_seqlens.data_ptr()]
    if block_table is not None:
        ptrs.append(block_table.data_ptr())
    if factor_t is not None:
        ptrs.append(factor_t.data_ptr())
    if has_stats:
        ptrs += [visited.data_ptr(), skipped.data_ptr(), v_loaded.data_ptr()]
    if fused:
        ptrs += [out.data_ptr(),
                 lse.data_ptr() if lse is not None else scratch_p + 4 * plan.ws_numel, arrivals_p]
    fast = plan.fast
    if fast is not None:
        ptrs += (float(softmax_scale), factor, stream_h)
        fast.launch(ptrs)
    else:
        _slow_decode_call(plan, q, ptrs, softmax_scale, factor, stream_h, block_table, factor_t,
                          has_stats)
    if not direct and not fused:
        if out is None:
            out = torch.empty_like(q, memory_format=_CONTIGUOUS)
        if lse is None and want_lse:
            lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=plan.device)
        lse_out = lse.data_ptr() if lse is not None else scratch_p + 4 * plan.ws_numel
        cvals = [o_p, lse_p, out.data_ptr(), lse_out, stream_h]
        if plan.cfast is not None:
            plan.cfast.launch(cvals)
        else:
            dt = TORCH_TO_CUTLASS[q.dtype]
            plan.cfn(make_ptr(Float32, o_p, 16), make_ptr(Float32, lse_p, 4), make_ptr(dt, cvals[2], 16),
                     make_ptr(Float32, cvals[3], 4), *[Int32(x) for x in plan.cstatics],
                     cuda_stream(stream_h))
    return plan, out, lse


def _slow_decode_call(plan, q, ptrs, softmax_scale, factor, stream_h, block_table, factor_t,
                      has_stats):
    """The DSL's generic call (used only when the fast path could not verify its storage)."""
    dt = TORCH_TO_CUTLASS[q.dtype]
    it = iter(ptrs)
    qp, kp, vp = (make_ptr(dt, next(it), 16) for _ in range(3))
    op = make_ptr(dt if plan.direct else Float32, next(it), 16)
    lp = make_ptr(Float32, next(it), 4)
    sp = make_ptr(Int32, next(it), 4)
    btp = make_ptr(Int32, next(it), 4) if block_table is not None else None
    fp = make_ptr(Float32, next(it), 4) if factor_t is not None else None
    st = [make_ptr(Int32, next(it), 4) for _ in range(3)] if has_stats else [None] * 3
    mg = [make_ptr(dt, next(it), 16), make_ptr(Float32, next(it), 4), make_ptr(Int32, next(it), 4)] \
        if plan.fused else [None] * 3
    s = plan.statics
    plan.fn(qp, kp, vp, op, lp, sp, btp, fp, *st, *mg,
            Int32(s[0]), Int32(s[1]), Int32(s[2]), Int32(s[3]), Int32(s[4]), Int32(s[5]),
            cutlass.Int64(s[6]), Int32(s[7]), Int32(s[8]), Int32(s[9]), Int32(s[10]),
            Float32(softmax_scale), Float32(factor), Int32(plan.splits), cuda_stream(stream_h))


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
    lse_partial [S, B, Hq, Lq] fp32[, arrivals]) with S >= num_splits, for allocation-free graph
    captures; arrivals: int32 [>= B * Hk * ceil(G * Lq / 64)] zeroed once (the fused merge's
    counters; every launch leaves them zero), else the plan's per-stream counters are used.
    Returns the geometry used (pass it to the reference).
    """
    plan, _, _ = _launch(q, k_cache, v_cache, out, lse, cache_seqlens, block_table, softmax_scale,
                         threshold_scale_factor, visited, skipped, v_loaded, causal, num_splits,
                         workspace, tuning)
    return plan.geo


def decode_sm90(q, k_cache, v_cache, *, cache_seqlens, block_table=None,
                softmax_scale: Optional[float] = None, threshold_scale_factor=None,
                visited=None, skipped=None, v_loaded=None, causal: bool = True,
                tuning: Optional[dict] = None, want_lse: bool = True, plan_key=None):
    """Like :func:`run_decode_sm90`, but allocates and returns (out, lse); with splits they are
    allocated after the decode launch (off the path to the first kernel). want_lse False: lse is
    written to a per-plan scratch and returned as None (one allocation less per call).
    plan_key: see ``_launch`` (the API passes its validated signature)."""
    plan, out, lse = _launch(q, k_cache, v_cache, None, None, cache_seqlens, block_table,
                             softmax_scale, threshold_scale_factor, visited, skipped, v_loaded,
                             causal, None, None, tuning or DEFAULT_TUNING, want_lse, plan_key)
    if out is None:  # empty problem
        out = torch.empty(plan.out_shape, dtype=plan.dtype, device=plan.device)
        lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=plan.device)
    return out, lse


# The tuning the public path (blasst_cute.decode) uses; None = the kernel's defaults.
DEFAULT_TUNING: Optional[dict] = None


def supported_configs():
    """Every configuration the CPU test compiles (code-changing parameters only)."""
    cfgs = []
    for page_size in (None,) + SUPPORTED_PAGE_SIZES:
        for has_skip, fpb, stats in ((False, False, False), (True, False, False), (True, True, True)):
            for direct in (False, True):
                cfgs.append(dict(dtype=torch.bfloat16, head_dim=128, page_size=page_size,
                                 has_skip=has_skip, factor_per_batch=fpb, has_stats=stats,
                                 direct_out=direct, fused_merge=FUSED_MERGE and not direct,
                                 interleave_splits=INTERLEAVE_SPLITS and not direct,
                                 producer_v=PRODUCER_V, pipelined_merge=PIPELINED_MERGE,
                                 use_pdl=USE_PDL,
                                 speculate_pages=SPECULATE_PAGES and page_size is not None,
                                 l2_prefetch_tiles=L2_PREFETCH_TILES if USE_PDL else 0))
    # 64-key tiles (short caches, SHORT_CACHE_TILE_N): one or several copies per tile; short
    # eager calls also merge in the launch (EAGER_FUSED_MAX_KV_BYTES)
    for page_size in (None, 16, 64, 256):
        for has_skip in (False, True):
            cfgs.append(dict(dtype=torch.bfloat16, head_dim=128, page_size=page_size, tile_n=64,
                             has_skip=has_skip, factor_per_batch=has_skip, has_stats=has_skip,
                             fused_merge=page_size in (None, 64),
                             interleave_splits=INTERLEAVE_SPLITS,
                             pipelined_merge=PIPELINED_MERGE, use_pdl=USE_PDL,
                             speculate_pages=SPECULATE_PAGES and page_size is not None,
                             l2_prefetch_tiles=L2_PREFETCH_TILES if USE_PDL else 0))
    return cfgs


def clear_cache() -> None:
    compile_cache.clear_memory()
    _plans.clear()
    _geo_cache.clear()


__all__ = ["decode_geometry_sm90", "plan_decode_sm90", "compile_decode_sm90",
           "compile_combine_sm90", "run_decode_sm90", "decode_sm90", "supported_configs", "clear_cache"]
