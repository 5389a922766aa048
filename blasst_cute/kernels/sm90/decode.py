# blasst_cute: Hopper (sm_90a) paged split-KV decode with BLASST tile skipping that never loads V
# for a skipped key tile.
#
# One CTA per (q-tile of 64 packed rows, split, kv head, batch). Rows of a q-tile are the
# G = Hq / Hk query heads x Lq_new new tokens of one kv head, packed r = pos * G + g, so K and V
# are read once per kv head. 160 threads:
#   warps 0-3 (one warpgroup, "consumer"): S = Q K^T (wgmma), mask, tile row max, BLASST vote
#       (warp vote fused with a named barrier: bar.red.and), online softmax (exp2 domain),
#       O += P V (wgmma, P from an smem ring).
#   warp 4 ("producer"): TMA loads of K tiles, page by page through the block table, into an
#       NK-stage ring (full/empty mbarriers), running up to NK tiles ahead of the consumer.
# V-load skipping: the consumer itself issues the TMA of V tile j (one elected lane of warp 0),
# right after the warpgroup decided to keep j; a skipped tile is never loaded. V tiles and their
# P tiles live in an NV-stage ring that advances only on kept tiles. The PV product of a kept tile
# is deferred by LP = NV - 1 kept tiles, so the V load has the time of >= 1 more K tile to land
# (the skip build takes NV = 3 where it fits: decode_stages); the per-row O rescale factor of
# each pending tile is parked in smem (one word per packed row and V slot) until its PV runs.
# producer_v (off by default: no measured gain) lets the producer issue the V loads no vote gates.
# Both sides of every ring are in the same warpgroup (V/P) or advance once per visited tile (K),
# so the skip path and the keep path perform the same barrier sequence: no deadlock, no stale stage.
#
# The page ids of K tile j are staged in smem next to K (written by the producer before it arms
# the full barrier) so that the V load of tile j reuses them without touching the block table.
#
# Splits: by default split s of S visits the key tiles s, s + S, s + 2S, ... (interleave_splits),
# so the tiles BLASST keeps (sinks, recent keys) spread evenly over the CTAs of a sequence;
# otherwise split s takes the s-th contiguous chunk. Each split has its own running max and
# never skips its first tile.
#
# Output: with one split, O (q dtype) and lse directly; otherwise fp32 O / l and lse per split,
# merged either by the combine kernel (blasst_cute.kernels.sm90.combine; the launcher's default)
# or, with fused_merge, in this launch by the last split CTA of each q-tile to finish (an arrival
# counter per q-tile; the merging CTA resets it, so the counters stay zero between launches).
# use_pdl: programmatic dependent launch (the grid starts while the previous kernel drains).
# trace: per-CTA phase timestamps for perf/decode_trace.py (diagnostics only).
#
# The skip rule and the online softmax are blasst_cute.kernels.common.softmax_skip; layout helpers
# from blasst_cute.kernels.common.layout; with the MLA decode kernel it shares the gmem tensors and
# epilogue stores (common.decode_io), the split's key tiles and their page coordinates
# (common.kv_tiles) and the per-row key limits (common.masking). Idioms follow FlashAttention-4's SM90 forward and
# CUTLASS's CuTe DSL Hopper examples; the code here is written for blasst_cute.

import enum
from typing import Optional

import cuda.bindings.driver as cuda

import cutlass
import cutlass.cute as cute
import cutlass.memory
from cutlass import Boolean, Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup

from blasst_cute.kernels.common.decode_io import (
    block_table_tensor,
    bshd_tensor,
    lse_tensor,
    out_lse_tensors,
    store_out_lse,
    vector_tensor,
)
from blasst_cute.kernels.common.kv_tiles import (
    page_copy_coords,
    split_tile_range,
    split_tiles_interleaved,
)
from blasst_cute.kernels.common.layout import (
    acc_rows_cols,
    assume_rows_aligned,
    select_modes,
    smem_layout,
    transpose_mn,
)
from blasst_cute.kernels.common.masking import packed_row_limits
from blasst_cute.kernels.common.pipelines import elem_ptr, qk_pv_tiled_mmas, wgmma
from blasst_cute.kernels.common.softmax_skip import (
    LOG2_E,
    OnlineSoftmax,
    convert_f32_to_16bit,
    group_all,
    rescale_rows,
    sequence_threshold_log2,
)
from blasst_cute.kernels.sm90.combine import merge_split_rows, merge_split_rows_pipelined

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_PAGE_SIZES = (16, 32, 64, 128, 256)
TILE_M = 64  # packed rows per CTA (one consumer warpgroup)
# Rows a warp of the fused merge merges together (one memory wait per split batch serves them all).
MERGE_ROWS = 4
SMEM_BUDGET = 220 * 1024  # the dense build's ring depths (decode_stages)
SMEM_MAX = 227 * 1024  # sm_90 per-block limit
# trace=True: int64 (CTAs, TRACE_SLOTS) per launch, CTA = bidx + grid_x * (head_kv + hk * batch).
# Slots 0-6: %globaltimer (ns) at the points TracePoint; 8-14: clock64 at the same points;
# 16: 1 if this CTA ran the fused merge; 17: its key tiles; 18: its SM.
TRACE_SLOTS = 20


class TracePoint(enum.IntEnum):
    Entry = 0
    QReady = 1  # Q in smem (consumer barrier)
    FirstK = 2  # first K tile landed
    LoopEnd = 3  # every tile's S / vote / P done
    DrainEnd = 4  # every PV done
    Stored = 5  # epilogue stores issued
    Done = 6  # after the fused merge (or = Stored)


class DecodeBarrier(enum.IntEnum):
    """Named-barrier ids of the decode kernel (0 is __syncthreads)."""

    Consumer = 1  # plain 128-thread sync of the consumer warpgroup
    Vote = 2  # bar.red.and of the BLASST vote
    Merge = 3  # bar.red.and: "was this CTA the last split to arrive" (fused merge)


def decode_stages(head_dim: int, tile_n: int, dtype_bytes: int = 2, has_skip: bool = False,
                  copies_per_tile: int = 8):
    """(NK, NV): the deepest K and V/P rings that fit, preferring a third V/P stage.

    The dense build keeps the depths of a 220 KiB budget; the skip build may use the block's
    limit, which at head dim 128 with 128-key tiles gives it (2, 3) instead of (3, 2): its PVs
    wait for 2 more kept tiles, time for a vote-gated V load to land. H100, B=64 L=32k 32/8:
    +5.6 % at 71 % skipped, +2.4 % at 91 %, 0.98x dense at 0 %; the dense build with (2, 3) was
    1.5 % slower there (perf/results/decode-h100-v-ring.md).
    """
    budget = SMEM_MAX if has_skip else SMEM_BUDGET
    best = None
    for nv in (3, 2):
        for nk in (8, 7, 6, 5, 4, 3, 2):
            if decode_smem_bytes(head_dim, tile_n, dtype_bytes, nk, nv, copies_per_tile) <= budget:
                if best is None or nk + nv > best[0] + best[1]:
                    best = (nk, nv)
                break
    return best


def decode_smem_bytes(head_dim: int, tile_n: int, dtype_bytes: int, nk: int, nv: int,
                      copies_per_tile: int) -> int:
    """Shared memory of the decode kernel's storage: Q, the K ring, the V and P rings, and the
    barriers, page ids and row scales before them (padded to the rings' 1 KiB alignment)."""
    rings = (TILE_M * head_dim + nk * tile_n * head_dim
             + nv * (tile_n * head_dim + TILE_M * tile_n)) * dtype_bytes
    small = 16 * (nk + nv) + 4 * nk * copies_per_tile + 4 * nv * TILE_M
    return rings + -(-small // 1024) * 1024


class BlasstDecodeSm90:
    """Static configuration of one compiled decode kernel (see the module comment).

    Dynamic: batch, Lq_new, head counts (G = Hq / Hk), cache lengths, number of pages, number of
    splits, softmax scale, threshold factor.
    """

    def __init__(
        self,
        dtype,
        head_dim: int,
        page_size: Optional[int] = None,
        tile_n: int = 128,
        causal: bool = True,
        has_skip: bool = False,
        factor_per_batch: bool = False,
        has_stats: bool = False,
        direct_out: bool = False,
        fused_merge: bool = False,
        order: str = "forward",
        num_k_stages: Optional[int] = None,
        num_v_stages: Optional[int] = None,
        interleave_splits: bool = False,
        producer_v: bool = False,
        pipelined_merge: bool = False,
        use_pdl: bool = False,
        speculate_pages: bool = False,
        l2_prefetch_tiles: int = 0,
        trace: bool = False,
    ):
        if dtype not in (cutlass.BFloat16, cutlass.Float16):
            raise NotImplementedError(f"blasst sm90 decode: dtype {dtype} (bf16/fp16 only)")
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise NotImplementedError(f"blasst sm90 decode: head_dim {head_dim} (64/128)")
        if page_size is not None and page_size not in SUPPORTED_PAGE_SIZES:
            raise NotImplementedError(f"blasst sm90 decode: page_size {page_size}")
        if tile_n not in (64, 128):
            raise NotImplementedError(f"blasst sm90 decode: tile_n {tile_n} (64/128)")
        if order not in ("forward", "reverse"):
            raise ValueError(order)
        if has_stats and not has_skip:
            raise NotImplementedError("blasst sm90 decode: stats need the skip variant")
        if fused_merge and direct_out:
            raise NotImplementedError("blasst sm90 decode: fused_merge merges split partials (not direct_out)")
        self.dtype = dtype
        self.head_dim = head_dim
        self.paged = page_size is not None
        self.page_size = page_size
        self.tile_n = tile_n
        self.causal = causal
        self.has_skip = has_skip
        self.factor_per_batch = factor_per_batch
        self.has_stats = has_stats
        self.direct_out = direct_out
        self.fused_merge = fused_merge
        self.reverse = order == "reverse"
        # Split s visits tiles s, s + S, ... (see kv_tiles.split_tiles_interleaved) instead of
        # the s-th contiguous chunk.
        self.interleave_splits = interleave_splits
        # The producer warp also issues the V loads that need no vote (every V tile of the dense
        # build, each split's first tile with skipping), right behind their K: they no longer wait
        # for the tile's S and vote, and the last tile's V is no longer issued only after its K
        # landed. Dense: the V ring gets empty barriers (the consumer releases a slot after its PV).
        self.producer_v = producer_v
        # Fused merge: combine.merge_split_rows_pipelined (the loads of a batch of splits in
        # flight together; a q-tile of <= 4 rows takes one row per warp) instead of
        # merge_split_rows (one memory round trip per split).
        self.pipelined_merge = pipelined_merge
        # Programmatic dependent launch: CTAs may start (barrier init, descriptor prefetch) while
        # the kernel before them in the stream drains; every global read of inputs waits for it
        # (griddepcontrol.wait), and the kernel after (the next call, or the combine) may launch
        # as soon as this grid runs.
        self.use_pdl = use_pdl
        # Paged, forward order, interleaved splits or one split: the producer warp reads its
        # first batch of page ids before the sequence length is known, at the slots of the tiles
        # split_idx + i * num_splits, so that read and the seqlens read overlap instead of
        # following each other ahead of the first K load. load() re-reads the ids the guess got
        # wrong (copies past the sequence's last page).
        self.speculate_pages = (speculate_pages and self.paged and not self.reverse
                                and (interleave_splits or direct_out))
        # With use_pdl: before griddepcontrol.wait, the producer warp pulls the K and V of the
        # split's first l2_prefetch_tiles key tiles into L2 (TMA prefetch) while the kernel
        # before drains, so the first loads after the wait find them there (prefetch_first_tiles).
        self.l2_prefetch_tiles = int(l2_prefetch_tiles) if use_pdl else 0
        # Diagnostics: per-CTA timestamps of the kernel's phases (TRACE_SLOTS, trace_ptr).
        self.trace = trace
        # Rows per TMA copy: a whole page, or a slice of one when pages are larger than a tile.
        self.rows_per_copy = min(page_size, tile_n) if self.paged else tile_n
        self.copies_per_tile = tile_n // self.rows_per_copy
        if not 0 <= self.l2_prefetch_tiles * self.copies_per_tile <= 32:
            raise ValueError(f"blasst sm90 decode: l2_prefetch_tiles {l2_prefetch_tiles} x "
                             f"{self.copies_per_tile} copies per tile must be in [0, 32]")
        nk, nv = decode_stages(head_dim, tile_n, dtype.width // 8, has_skip, self.copies_per_tile)
        self.num_k_stages = num_k_stages or nk
        self.num_v_stages = num_v_stages or nv
        self.pv_lag = self.num_v_stages - 1  # kept tiles a PV product waits behind
        if self.pv_lag < 1 or self.num_k_stages < 1:
            raise ValueError(f"blasst sm90 decode: num_k_stages {self.num_k_stages} >= 1 and "
                             f"num_v_stages {self.num_v_stages} >= 2 expected")
        smem = decode_smem_bytes(head_dim, tile_n, dtype.width // 8, self.num_k_stages,
                                 self.num_v_stages, self.copies_per_tile)
        if smem > SMEM_MAX:
            raise ValueError(
                f"blasst sm90 decode: {self.num_k_stages} K and {self.num_v_stages} V stages of "
                f"{tile_n} x {head_dim} need {smem} bytes of shared memory (at most {SMEM_MAX})")
        self.num_threads = 160
        self.producer_warp = 4

    # ------------------------------------------------------------------ host-side derivations
    def _smem_layout(self, rows: int, cols: int, stages: Optional[int] = None):
        return smem_layout(self.dtype, rows, cols, stages)

    def _tiled_mmas(self):
        return qk_pv_tiled_mmas(self.dtype, (1, 1, 1), (TILE_M, self.tile_n),
                                (TILE_M, self.head_dim))

    # ------------------------------------------------------------------ host launch
    @cute.jit
    def launch_ptrs(
        self,
        q_ptr: cute.Pointer,  # (b, lq, hq, d) contiguous
        k_ptr: cute.Pointer,  # paged (pages, page_size, hk, d) / contiguous (b, cap, hk, d)
        v_ptr: cute.Pointer,
        o_ptr: cute.Pointer,  # direct: (b, lq, hq, d) q dtype; else fp32 (splits, b, lq, hq, d)
        lse_ptr: cute.Pointer,  # direct: fp32 (b, hq, lq); else (splits, b, hq, lq)
        seqlens_ptr: cute.Pointer,  # int32 (b,)
        bt_ptr: Optional[cute.Pointer],  # int32 (b, max_pages), row stride bt_stride
        factor_ptr: Optional[cute.Pointer],  # float32 (b,)
        visited_ptr: Optional[cute.Pointer],  # int32 (b, hk) contiguous
        skipped_ptr: Optional[cute.Pointer],
        v_loaded_ptr: Optional[cute.Pointer],
        final_o_ptr: Optional[cute.Pointer],  # fused merge: (b, lq, hq, d) q dtype
        final_lse_ptr: Optional[cute.Pointer],  # fused merge: fp32 (b, hq, lq)
        arrivals_ptr: Optional[cute.Pointer],  # fused merge: int32 (b, hk, m_blocks), zeroed
        batch: Int32, seqlen_q: Int32, num_heads: Int32, num_heads_kv: Int32,
        kv_rows: Int32,  # num_pages (paged) or batch (contiguous)
        kv_len: Int32,  # page_size (paged) or capacity (contiguous)
        kv_stride_0: cutlass.Int64, kv_stride_1: Int32, kv_stride_2: Int32,
        max_pages: Int32, bt_stride: Int32,
        softmax_scale: Float32,
        threshold_scale_factor: Float32,
        num_splits: Int32,
        stream: cuda.CUstream,
        trace_ptr: Optional[cute.Pointer] = None,  # trace=True: int64 (CTAs, TRACE_SLOTS)
    ):
        """Pointer entry point (low host overhead): builds the tensors, then ``__call__``."""
        d = self.head_dim
        mQ = bshd_tensor(q_ptr, batch, seqlen_q, num_heads, d)
        kv_layout = cute.make_layout(
            (kv_rows, kv_len, num_heads_kv, d),
            stride=(cute.assume(kv_stride_0, divby=8), cute.assume(kv_stride_1, divby=8),
                    cute.assume(kv_stride_2, divby=8), 1))
        mK = cute.make_tensor(k_ptr, kv_layout)
        mV = cute.make_tensor(v_ptr, kv_layout)
        mO, mLSE = out_lse_tensors(o_ptr, lse_ptr, batch, seqlen_q, num_heads, d, num_splits,
                                   self.direct_out)
        mSeqlens = vector_tensor(seqlens_ptr, batch)
        mBlockTable = block_table_tensor(bt_ptr, batch, max_pages, bt_stride)
        mFactor = vector_tensor(factor_ptr, batch)
        cnt_layout = cute.make_layout((batch, num_heads_kv), stride=(num_heads_kv, 1))
        mVisited = mSkipped = mVLoaded = None
        if const_expr(visited_ptr is not None):
            mVisited = cute.make_tensor(visited_ptr, cnt_layout)
            mSkipped = cute.make_tensor(skipped_ptr, cnt_layout)
            mVLoaded = cute.make_tensor(v_loaded_ptr, cnt_layout)
        mOFinal = mLSEFinal = mArrivals = None
        if const_expr(self.fused_merge):
            mOFinal = bshd_tensor(final_o_ptr, batch, seqlen_q, num_heads, d)
            mLSEFinal = lse_tensor(final_lse_ptr, batch, num_heads, seqlen_q)
            m_blocks = (seqlen_q * (num_heads // num_heads_kv) + TILE_M - 1) // TILE_M
            mArrivals = cute.make_tensor(arrivals_ptr, cute.make_layout(
                (batch, num_heads_kv, m_blocks), stride=(num_heads_kv * m_blocks, m_blocks, 1)))
        mTrace = None
        if const_expr(self.trace):
            m_blocks_t = (seqlen_q * (num_heads // num_heads_kv) + TILE_M - 1) // TILE_M
            n_ctas = m_blocks_t * num_splits * num_heads_kv * batch
            mTrace = cute.make_tensor(trace_ptr, cute.make_layout((n_ctas, TRACE_SLOTS),
                                                                  stride=(TRACE_SLOTS, 1)))
        self.__call__(mQ, mK, mV, mO, mLSE, mSeqlens, mBlockTable, softmax_scale,
                      threshold_scale_factor, mFactor, mVisited, mSkipped, mVLoaded, num_splits,
                      stream, mOFinal, mLSEFinal, mArrivals, mTrace)

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (b, lq, hq, d)
        mK: cute.Tensor,  # paged (pages, page_size, hk, d) or contiguous (b, cap, hk, d)
        mV: cute.Tensor,
        mO: cute.Tensor,  # direct: (b, lq, hq, d) q dtype; else fp32 (splits, b, lq, hq, d)
        mLSE: cute.Tensor,  # direct: (b, hq, lq) fp32; else (splits, b, hq, lq)
        mSeqlens: cute.Tensor,  # int32 (b,)
        mBlockTable: Optional[cute.Tensor],  # int32 (b, max_pages) or None
        softmax_scale: Float32,
        threshold_scale_factor: Float32,
        mFactor: Optional[cute.Tensor],  # float32 (b,) or None
        mVisited: Optional[cute.Tensor],  # int32 (b, hk) or None
        mSkipped: Optional[cute.Tensor],
        mVLoaded: Optional[cute.Tensor],
        num_splits: Int32,
        stream: cuda.CUstream,
        mOFinal: Optional[cute.Tensor] = None,  # fused merge: (b, lq, hq, d) q dtype
        mLSEFinal: Optional[cute.Tensor] = None,  # fused merge: fp32 (b, hq, lq)
        mArrivals: Optional[cute.Tensor] = None,  # fused merge: int32 (b, hk, m_blocks), zeroed
        mTrace: Optional[cute.Tensor] = None,  # trace: int64 (CTAs, TRACE_SLOTS)
    ):
        for t in (mQ, mK, mV):
            if const_expr(t.element_type != self.dtype):
                raise TypeError(f"expected {self.dtype}, got {t.element_type}")
        # K/V in CuTe order (rows, d, hk, page-or-batch); the head dim is contiguous.
        mKc = select_modes(assume_rows_aligned(mK), [1, 3, 2, 0])
        mVc = select_modes(assume_rows_aligned(mV), [1, 3, 2, 0])

        tiled_mma_qk, tiled_mma_pv = self._tiled_mmas()
        NK, NV = self.num_k_stages, self.num_v_stages
        sQ_layout = self._smem_layout(TILE_M, self.head_dim)
        sK_layout = self._smem_layout(self.tile_n, self.head_dim, NK)
        sV_layout = self._smem_layout(self.tile_n, self.head_dim, NV)
        sP_layout = self._smem_layout(TILE_M, self.tile_n, NV)

        # One TMA copy = `rows_per_copy` rows (one page or a slice of one) of a stage.
        rpc = self.rows_per_copy
        copy_tiler = (cute.make_layout(rpc), cute.make_layout(self.head_dim))
        sK_copy = cute.composition(cute.select(sK_layout, mode=[0, 1]), copy_tiler)
        sV_copy = cute.composition(cute.select(sV_layout, mode=[0, 1]), copy_tiler)
        load_op = cpasync.CopyBulkTensorTileG2SOp()
        tma_atom_K, tma_K = cpasync.make_tiled_tma_atom(
            load_op, mKc, sK_copy, (rpc, self.head_dim), 1
        )
        tma_atom_V, tma_V = cpasync.make_tiled_tma_atom(
            load_op, mVc, sV_copy, (rpc, self.head_dim), 1
        )
        self.tx_bytes_K = cute.size_in_bytes(self.dtype, cute.select(sK_layout, mode=[0, 1]))
        self.tx_bytes_V = cute.size_in_bytes(self.dtype, cute.select(sV_layout, mode=[0, 1]))

        @cute.struct
        class SharedStorage:
            mbar_k_full: cute.struct.MemRange[cutlass.Int64, NK]
            mbar_k_empty: cute.struct.MemRange[cutlass.Int64, NK]
            mbar_v_full: cute.struct.MemRange[cutlass.Int64, NV]
            mbar_v_empty: cute.struct.MemRange[cutlass.Int64, NV]  # dense producer_v only
            pages: cute.struct.MemRange[Int32, NK * self.copies_per_tile]
            row_scale: cute.struct.MemRange[Float32, NV * TILE_M]  # per packed row and V slot
            sQ: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sV_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sP_layout)], 1024]

        self.shared_storage = SharedStorage

        num_batch = mQ.shape[0]
        seqlen_q = mQ.shape[1]
        num_head_kv = mK.shape[2]
        qhead_per_kvhead = mQ.shape[2] // num_head_kv
        num_m_blocks = (seqlen_q * qhead_per_kvhead + TILE_M - 1) // TILE_M
        scale_log2 = softmax_scale * LOG2_E
        self.kernel(
            mQ, tma_K, tma_V, mO, mLSE, mSeqlens, mBlockTable,
            tma_atom_K, tma_atom_V,
            scale_log2, threshold_scale_factor, mFactor, mVisited, mSkipped, mVLoaded,
            mOFinal, mLSEFinal, mArrivals, mTrace,
            qhead_per_kvhead, num_splits,
            sQ_layout, sK_layout, sV_layout, sP_layout, tiled_mma_qk, tiled_mma_pv,
        ).launch(
            grid=[num_m_blocks * num_splits, num_head_kv, num_batch],
            block=[self.num_threads, 1, 1],
            stream=stream,
            use_pdl=self.use_pdl,
            min_blocks_per_mp=1,
        )

    # ------------------------------------------------------------------ device entry
    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mV: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        mSeqlens: cute.Tensor,
        mBlockTable: Optional[cute.Tensor],
        tma_atom_K: cute.CopyAtom,
        tma_atom_V: cute.CopyAtom,
        scale_log2: Float32,
        threshold_scale_factor: Float32,
        mFactor: Optional[cute.Tensor],
        mVisited: Optional[cute.Tensor],
        mSkipped: Optional[cute.Tensor],
        mVLoaded: Optional[cute.Tensor],
        mOFinal: Optional[cute.Tensor],
        mLSEFinal: Optional[cute.Tensor],
        mArrivals: Optional[cute.Tensor],
        mTrace: Optional[cute.Tensor],
        qhead_per_kvhead: Int32,
        num_splits: Int32,
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
        sV_layout: cute.ComposedLayout,
        sP_layout: cute.ComposedLayout,
        tiled_mma_qk: cute.TiledMma,
        tiled_mma_pv: cute.TiledMma,
    ):
        NK, NV = self.num_k_stages, self.num_v_stages
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        bidx, head_kv, batch_idx = cute.arch.block_idx()
        m_block = bidx // num_splits
        split_idx = bidx - m_block * num_splits
        grid_x, num_head_kv_grid, _ = cute.arch.grid_dim()
        cta_id = bidx + grid_x * (head_kv + num_head_kv_grid * batch_idx)
        self.trace_mark(mTrace, cta_id, tidx, TracePoint.Entry)

        if warp_idx == self.producer_warp:
            cpasync.prefetch_descriptor(tma_atom_K)
            cpasync.prefetch_descriptor(tma_atom_V)

        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        mbar_k_full = storage.mbar_k_full.data_ptr()
        mbar_k_empty = storage.mbar_k_empty.data_ptr()
        mbar_v_full = storage.mbar_v_full.data_ptr()
        mbar_v_empty = storage.mbar_v_empty.data_ptr()
        if warp_idx == 0:
            with cute.arch.elect_one():
                for s in cutlass.range_constexpr(NK):
                    cute.arch.mbarrier_init(mbar_k_full + s, 1)
                    cute.arch.mbarrier_init(mbar_k_empty + s, 4)  # one arrival per consumer warp
                for s in cutlass.range_constexpr(NV):
                    cute.arch.mbarrier_init(mbar_v_full + s, 1)
                    if const_expr(self.producer_v_all()):
                        cute.arch.mbarrier_init(mbar_v_empty + s, 4)  # one per consumer warp
            cute.arch.mbarrier_init_fence()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sV = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)
        sPages = storage.pages.get_tensor(cute.make_layout((self.copies_per_tile, NK)))
        sScale = storage.row_scale.get_tensor(cute.make_layout((TILE_M, NV)))

        if const_expr(self.l2_prefetch_tiles > 0):
            if warp_idx == self.producer_warp:
                self.prefetch_first_tiles(
                    mK, mV, sK, sV, tma_atom_K, tma_atom_V, mSeqlens, mBlockTable, head_kv,
                    batch_idx, m_block, split_idx, num_splits, qhead_per_kvhead, mQ.shape[1])
        if const_expr(self.use_pdl):
            cute.arch.griddepcontrol_wait()
            cute.arch.griddepcontrol_launch_dependents()

        first_ids = Int32(0)
        guess_slot = Int32(0)
        if const_expr(self.speculate_pages):
            if warp_idx == self.producer_warp:
                # the first batch's slots for tiles split_idx + i * num_splits, as if the
                # sequence filled the block table's row (no step clamp: n_local >= 32)
                guess_slot = self.batch_page_slot(
                    mBlockTable.shape[1] * self.page_size, cute.arch.lane_idx(), Int32(0),
                    split_idx, num_splits, Int32(32))
                first_ids = mBlockTable[batch_idx, guess_slot]

        # ---- key tiles of this CTA: the split's slice of the tiles the q-tile sees
        seqlen_k = mSeqlens[batch_idx]
        seqlen_q = mQ.shape[1]
        num_rows = seqlen_q * qhead_per_kvhead
        tile_first, tile_step, n_local = self.split_tiles(
            seqlen_k, seqlen_q, m_block, qhead_per_kvhead, split_idx, num_splits)

        cute.arch.sync_threads()  # mbarrier init visible

        if warp_idx == self.producer_warp:
            self.load(
                mK, sK, tma_atom_K, mBlockTable, sPages, mbar_k_full, mbar_k_empty,
                head_kv, batch_idx, seqlen_k, tile_first, tile_step, n_local,
                mV, sV, tma_atom_V, mbar_v_full, mbar_v_empty, first_ids, guess_slot,
            )
        elif warp_idx < 4:
            self.mma(
                mQ, mV, mO, mLSE, sQ, sK, sV, sP, sPages, sScale, tma_atom_V,
                mbar_k_full, mbar_k_empty, mbar_v_full,
                tiled_mma_qk, tiled_mma_pv,
                tidx, m_block, split_idx, head_kv, batch_idx, qhead_per_kvhead, num_rows,
                seqlen_q, seqlen_k, tile_first, tile_step, n_local,
                scale_log2, threshold_scale_factor, mFactor, mVisited, mSkipped, mVLoaded,
                mOFinal, mLSEFinal, mArrivals, num_splits, mbar_v_empty, mTrace, cta_id,
            )

    # ------------------------------------------------------------------ diagnostics / V issue
    def producer_v_all(self) -> bool:
        """The producer issues every V load (dense build with producer_v)."""
        return self.producer_v and not self.has_skip

    @cute.jit
    def trace_mark(self, mTrace: Optional[cute.Tensor], cta_id: Int32, tidx: Int32,
                   point: cutlass.Constexpr[int]):
        """trace: thread 0 records the global timer and its SM clock at ``point``."""
        if const_expr(self.trace):
            if tidx == 0:
                mTrace[cta_id, int(point)] = cute.arch.globaltimer()
                mTrace[cta_id, 8 + int(point)] = cute.arch.clock64()

    @cute.jit
    def issue_v(self, tma_atom_V: cute.CopyAtom, tVgV: cute.Tensor, tVsV: list, mbar_v_full,
                slot: Int32, tile: Int32, pages, batch_idx: Int32, seqlen_k: Int32):
        """TMA of V tile ``tile`` into ring slot ``slot`` (called by one whole warp)."""
        with cute.arch.elect_one():
            cute.arch.mbarrier_arrive_and_expect_tx(mbar_v_full + slot, self.tx_bytes_V)
        for c in cutlass.range_constexpr(self.copies_per_tile):
            _, rb = self.copy_coords(tile, c, seqlen_k)
            pg = batch_idx
            if const_expr(self.paged):
                pg = pages[c]
            cute.copy(tma_atom_V, tVgV[None, rb, 0, pg], tVsV[c][None, slot],
                      tma_bar_ptr=mbar_v_full + slot)

    # ------------------------------------------------------------------ tile order / pages
    @cute.jit
    def tile_of(self, i: Int32, tile_first: Int32, tile_step: Int32, n_local: Int32) -> Int32:
        """The key tile of local step i (the split's tiles in ascending or descending order)."""
        step = i
        if const_expr(self.reverse):
            step = n_local - 1 - i
        return tile_first + step * tile_step

    @cute.jit
    def split_tiles(self, seqlen_k: Int32, seqlen_q: Int32, m_block: Int32,
                    qhead_per_kvhead: Int32, split_idx: Int32, num_splits: Int32):
        """(tile_first, tile_step, n_local): tile i of this CTA is tile_first + i * tile_step
        (forward order), the split's slice of the key tiles the q-tile sees."""
        if const_expr(self.interleave_splits):
            tile_first, tile_step, n_local = split_tiles_interleaved(
                seqlen_k, seqlen_q, m_block, qhead_per_kvhead, split_idx, num_splits,
                TILE_M, self.tile_n, self.causal)
        else:
            tile_first, _, n_local = split_tile_range(
                seqlen_k, seqlen_q, m_block, qhead_per_kvhead, split_idx, num_splits,
                TILE_M, self.tile_n, self.causal)
            tile_step = Int32(1)
        return tile_first, tile_step, n_local

    @cute.jit
    def copy_coords(self, tile: Int32, c: int, seqlen_k: Int32):
        """(page slot in the block table, row block inside the page) of copy c of a key tile."""
        return page_copy_coords(tile, c, seqlen_k, self.tile_n, self.rows_per_copy,
                                self.page_size, self.paged)

    @cute.jit
    def batch_page_slot(self, seqlen_k: Int32, lane: Int32, i0: Int32, tile_first: Int32,
                        tile_step: Int32, n_local: Int32) -> Int32:
        """This lane's block-table slot in the batch starting at local step i0 (tile i0 +
        lane // cpt, copy lane % cpt; clamped to the valid steps and pages)."""
        cpt = self.copies_per_tile
        step = cutlass.max(cutlass.min(i0 + lane // cpt, n_local - 1), 0)
        tile = self.tile_of(step, tile_first, tile_step, n_local)
        key0 = tile * self.tile_n + (lane % cpt) * self.rows_per_copy
        last_page = cutlass.max((seqlen_k + self.page_size - 1) // self.page_size - 1, 0)
        return cutlass.max(cutlass.min(key0 // self.page_size, last_page), 0)

    @cute.jit
    def batch_page_ids(self, mBlockTable: cute.Tensor, batch_idx: Int32, seqlen_k: Int32,
                       lane: Int32, i0: Int32, tile_first: Int32, tile_step: Int32, n_local: Int32):
        """This lane's page id of the batch starting at local step i0 (see batch_page_slot)."""
        return mBlockTable[batch_idx, self.batch_page_slot(seqlen_k, lane, i0, tile_first,
                                                           tile_step, n_local)]

    @cute.jit
    def tma_views(self, tma_atom: cute.CopyAtom, mX: cute.Tensor, sX: cute.Tensor, head_kv: Int32):
        """Per-copy TMA partitions: gmem (vals, row_block, 1, page) and a list of smem (vals, stage)."""
        rpc = self.rows_per_copy
        gX = cute.flat_divide(mX[None, None, head_kv, None], (rpc, self.head_dim))
        sXd = cute.flat_divide(sX, (rpc, self.head_dim))  # (rpc, d, copies, 1, stages)
        parts_s = []
        tXgX = None
        for c in cutlass.range_constexpr(self.copies_per_tile):
            tXsX_c, tXgX = cpasync.tma_partition(
                tma_atom, 0, cute.make_layout(1),
                cute.group_modes(sXd[None, None, c, 0, None], 0, 2),
                cute.group_modes(gX, 0, 2),
            )
            parts_s.append(tXsX_c)
        return tXgX, parts_s

    # ------------------------------------------------------------------ producer
    @cute.jit
    def prefetch_first_tiles(
        self, mK: cute.Tensor, mV: cute.Tensor, sK: cute.Tensor, sV: cute.Tensor,
        tma_atom_K: cute.CopyAtom, tma_atom_V: cute.CopyAtom, mSeqlens: cute.Tensor,
        mBlockTable: Optional[cute.Tensor], head_kv: Int32, batch_idx: Int32, m_block: Int32,
        split_idx: Int32, num_splits: Int32, qhead_per_kvhead: Int32, seqlen_q: Int32,
    ):
        """Before griddepcontrol.wait (l2_prefetch_tiles): TMA prefetches of the K and V of this
        split's first key tiles into L2. The kernel before may still write the sequence length
        and the block table, so what is read here only picks addresses: read at L2
        (ld.global.cg: no line of them stays in L1 for the reads after the wait) and clamped to
        the block table and the cache. A stale guess wastes a prefetch; it never changes a
        result."""
        lane = cute.arch.lane_idx()
        seqlen_k = cute.arch.load(mSeqlens.iterator + batch_idx, Int32, cop="cg")
        seqlen_k = cutlass.max(seqlen_k, 0)
        tile_first, tile_step, n_local = self.split_tiles(
            seqlen_k, seqlen_q, m_block, qhead_per_kvhead, split_idx, num_splits)
        tKgK, _ = self.tma_views(tma_atom_K, mK, sK, head_kv)
        tVgV, _ = self.tma_views(tma_atom_V, mV, sV, head_kv)
        cpt = self.copies_per_tile
        ids = Int32(0)
        if const_expr(self.paged):
            slot = self.batch_page_slot(seqlen_k, lane, Int32(0), tile_first, tile_step, n_local)
            slot = cutlass.min(slot, mBlockTable.shape[1] - 1)
            ids = cute.arch.load(
                mBlockTable.iterator + cute.crd2idx((batch_idx, slot), mBlockTable.layout),
                Int32, cop="cg")
            ids = cutlass.max(cutlass.min(ids, mK.shape[0] - 1), 0)
        for i in cutlass.range_constexpr(self.l2_prefetch_tiles):
            tile = self.tile_of(Int32(i), tile_first, tile_step, n_local)
            for c in cutlass.range_constexpr(cpt):
                _, rb = self.copy_coords(tile, c, seqlen_k)
                pg = batch_idx
                if const_expr(self.paged):
                    pg = cute.arch.shuffle_sync(ids, i * cpt + c)
                if i < n_local:
                    with cute.arch.elect_one():
                        cute.prefetch(tma_atom_K, tKgK[None, rb, 0, pg])
                        cute.prefetch(tma_atom_V, tVgV[None, rb, 0, pg])

    @cute.jit
    def load(
        self,
        mK: cute.Tensor, sK: cute.Tensor, tma_atom_K: cute.CopyAtom,
        mBlockTable: Optional[cute.Tensor], sPages: cute.Tensor,
        mbar_k_full, mbar_k_empty,
        head_kv: Int32, batch_idx: Int32, seqlen_k: Int32,
        tile_first: Int32, tile_step: Int32, n_local: Int32,
        mV: cute.Tensor, sV: cute.Tensor, tma_atom_V: cute.CopyAtom, mbar_v_full, mbar_v_empty,
        first_ids: Int32, guess_slot: Int32,
    ):
        NK, NV = self.num_k_stages, self.num_v_stages
        cpt = self.copies_per_tile
        lane = cute.arch.lane_idx()
        tKgK, tKsK = self.tma_views(tma_atom_K, mK, sK, head_kv)
        tVgV = tVsV = None
        if const_expr(self.producer_v):
            tVgV, tVsV = self.tma_views(tma_atom_V, mV, sV, head_kv)
        # Page ids are fetched 32 at a time (one per lane: tile i0 + lane // cpt, copy lane % cpt),
        # one batch ahead, and handed out with warp shuffles, so the block-table load latency is
        # never on the TMA issue path.
        tiles_per_batch = 32 // cpt
        ids_cur = Int32(0)
        ids_nxt = Int32(0)
        if const_expr(self.speculate_pages):
            # Only the ids of tiles the split visits are ever handed out; re-read those whose
            # guessed slot is not the real one.
            ids_nxt = first_ids
            want = self.batch_page_slot(seqlen_k, lane, Int32(0), tile_first, tile_step, n_local)
            if lane // cpt < n_local and want != guess_slot:
                ids_nxt = mBlockTable[batch_idx, want]
        elif const_expr(self.paged):
            ids_nxt = self.batch_page_ids(mBlockTable, batch_idx, seqlen_k, lane, Int32(0),
                                          tile_first, tile_step, n_local)
        for i in cutlass.range(n_local, unroll=1):
            tile = self.tile_of(i, tile_first, tile_step, n_local)
            stage = i % NK
            phase = (i // NK) % 2
            page = Int32(0)
            if const_expr(self.paged):
                j = i % tiles_per_batch
                if j == 0:
                    ids_cur = ids_nxt
                    ids_nxt = self.batch_page_ids(
                        mBlockTable, batch_idx, seqlen_k, lane, i + tiles_per_batch,
                        tile_first, tile_step, n_local)
                page = cute.arch.shuffle_sync(ids_cur, j * cpt + cutlass.min(lane, cpt - 1))
            cute.arch.mbarrier_wait(mbar_k_empty + stage, phase ^ 1)
            if const_expr(self.paged):
                if lane < cpt:
                    sPages[lane, stage] = page
                cute.arch.sync_warp()
            with cute.arch.elect_one():
                cute.arch.mbarrier_arrive_and_expect_tx(mbar_k_full + stage, self.tx_bytes_K)
            for c in cutlass.range_constexpr(cpt):
                _, rb = self.copy_coords(tile, c, seqlen_k)
                pg = batch_idx
                if const_expr(self.paged):
                    pg = sPages[c, stage]
                cute.copy(
                    tma_atom_K, tKgK[None, rb, 0, pg], tKsK[c][None, stage],
                    tma_bar_ptr=mbar_k_full + stage,
                )
            # V right behind its K where no vote gates it. Dense: tile i is kept tile i (ring
            # slot i % NV, freed by the consumer after PV i - NV); skipping: only the first tile
            # (kept tile 0: slot 0, first use, nothing to wait for).
            if const_expr(self.producer_v_all()):
                v_slot = i % NV
                cute.arch.mbarrier_wait(mbar_v_empty + v_slot, ((i // NV) % 2) ^ 1)
                self.issue_v(tma_atom_V, tVgV, tVsV, mbar_v_full, v_slot, tile,
                             sPages[None, stage], batch_idx, seqlen_k)
            elif const_expr(self.producer_v):
                if i == 0:
                    self.issue_v(tma_atom_V, tVgV, tVsV, mbar_v_full, Int32(0), tile,
                                 sPages[None, stage], batch_idx, seqlen_k)

    # ------------------------------------------------------------------ consumer warpgroup
    @cute.jit
    def mma(
        self,
        mQ: cute.Tensor, mV: cute.Tensor, mO: cute.Tensor, mLSE: cute.Tensor,
        sQ: cute.Tensor, sK: cute.Tensor, sV: cute.Tensor, sP: cute.Tensor,
        sPages: cute.Tensor, sScale: cute.Tensor, tma_atom_V: cute.CopyAtom,
        mbar_k_full, mbar_k_empty, mbar_v_full,
        tiled_mma_qk: cute.TiledMma, tiled_mma_pv: cute.TiledMma,
        tidx: Int32, m_block: Int32, split_idx: Int32, head_kv: Int32, batch_idx: Int32,
        qhead_per_kvhead: Int32, num_rows: Int32, seqlen_q: Int32, seqlen_k: Int32,
        tile_first: Int32, tile_step: Int32, n_local: Int32,
        scale_log2: Float32, threshold_scale_factor: Float32, mFactor: Optional[cute.Tensor],
        mVisited: Optional[cute.Tensor], mSkipped: Optional[cute.Tensor],
        mVLoaded: Optional[cute.Tensor],
        mOFinal: Optional[cute.Tensor], mLSEFinal: Optional[cute.Tensor],
        mArrivals: Optional[cute.Tensor], num_splits: Int32,
        mbar_v_empty, mTrace: Optional[cute.Tensor], cta_id: Int32,
    ):
        NK, NV = self.num_k_stages, self.num_v_stages
        cpt = self.copies_per_tile
        warp_in_wg = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        G = qhead_per_kvhead

        # ---- Q: 64 packed rows -> smem (rows past G * Lq_new are zero). Every load is issued
        # before any is used (rows past the end re-read the last row and are zeroed after), so
        # the thread waits for memory once, not once per 16 bytes.
        vec = 8
        chunks = self.head_dim // vec
        n_it = TILE_M * chunks // 128
        frags = [cute.make_rmem_tensor((vec,), self.dtype) for _ in range(n_it)]
        for it in cutlass.range_constexpr(n_it):
            idx = it * 128 + tidx
            r = idx // chunks
            grow = cutlass.min(m_block * TILE_M + r, num_rows - 1)
            pos = grow // G
            g = grow - pos * G
            src = cute.local_tile(mQ[batch_idx, pos, head_kv * G + g, None], (vec,),
                                  (idx - r * chunks,))
            cute.autovec_copy(src, frags[it])
        for it in cutlass.range_constexpr(n_it):
            idx = it * 128 + tidx
            r = idx // chunks
            if m_block * TILE_M + r >= num_rows:
                frags[it].fill(0.0)
            cute.autovec_copy(frags[it], cute.local_tile(sQ[r, None], (vec,), (idx - r * chunks,)))
        cute.arch.fence_proxy("async.shared", space="cta")
        cute.arch.barrier(barrier_id=int(DecodeBarrier.Consumer), number_of_threads=128)
        self.trace_mark(mTrace, cta_id, tidx, TracePoint.QReady)

        # ---- MMA fragments
        thr_mma_qk = tiled_mma_qk.get_slice(tidx)
        thr_mma_pv = tiled_mma_pv.get_slice(tidx)
        tSrQ = thr_mma_qk.make_fragment_A(thr_mma_qk.partition_A(sQ))
        tSrK = thr_mma_qk.make_fragment_B(thr_mma_qk.partition_B(sK))
        tOrP = thr_mma_pv.make_fragment_A(thr_mma_pv.partition_A(sP))
        tOrVt = thr_mma_pv.make_fragment_B(thr_mma_pv.partition_B(transpose_mn(sV)))
        acc_S_shape = thr_mma_qk.partition_shape_C((TILE_M, self.tile_n))
        acc_O = cute.make_rmem_tensor(thr_mma_pv.partition_shape_C((TILE_M, self.head_dim)), Float32)
        acc_O.fill(0.0)
        cS = cute.make_identity_tensor((TILE_M, self.tile_n))
        tScS = thr_mma_qk.partition_C(cS)
        tScS_mn = acc_rows_cols(tScS)
        n_rows_thr = cute.size(tScS_mn, mode=[0])
        st_atom = cute.make_copy_atom(
            cute.nvgpu.warp.StMatrix8x8x16bOp(transpose=False, num_matrices=4), self.dtype
        )
        thr_st = cute.make_tiled_copy_C(st_atom, tiled_mma_qk).get_slice(tidx)
        tPsP = thr_st.partition_D(sP)

        # V TMA views (used by warp 0 only)
        tVgV, tVsV = self.tma_views(tma_atom_V, mV, sV, head_kv)

        # Per-row key limits (exclusive, tile-relative offsets are applied per tile) and validity.
        row_valid, row_limit, mask_from = packed_row_limits(
            tScS_mn, n_rows_thr, m_block, TILE_M, num_rows, G, seqlen_q, seqlen_k, self.causal)

        softmax = OnlineSoftmax(scale_log2, n_rows_thr)
        softmax.reset()
        log2_lambda, skip_enabled = sequence_threshold_log2(
            self.has_skip, self.factor_per_batch, threshold_scale_factor, mFactor, batch_idx,
            seqlen_k)

        pages = cute.make_rmem_tensor(cpt, Int32)
        num_kept = Int32(0)
        num_done = Int32(0)
        for i in cutlass.range(n_local, unroll=1):
            tile = self.tile_of(i, tile_first, tile_step, n_local)
            stage = i % NK
            # ---- S = Q K^T
            acc_S = cute.make_rmem_tensor(acc_S_shape, Float32)
            cute.arch.mbarrier_wait(mbar_k_full + stage, (i // NK) % 2)
            if const_expr(self.trace):
                if i == 0:
                    self.trace_mark(mTrace, cta_id, tidx, TracePoint.FirstK)
            wgmma(tiled_mma_qk, acc_S, tSrQ, tSrK[None, None, None, stage], True)
            if const_expr(self.paged):
                if warp_in_wg == 0:
                    for c in cutlass.range_constexpr(cpt):
                        pages[c] = sPages[c, stage]
            warpgroup.wait_group(0)
            with cute.arch.elect_one():
                cute.arch.mbarrier_arrive(mbar_k_empty + stage)
            # ---- mask (key length, causality among the new tokens)
            if tile * self.tile_n + self.tile_n > mask_from:
                s_mn = acc_rows_cols(acc_S)
                c_mn = acc_rows_cols(tScS)
                for r in cutlass.range_constexpr(n_rows_thr):
                    lim = row_limit[r] - tile * self.tile_n
                    for c in cutlass.range_constexpr(cute.size(s_mn, mode=[1])):
                        if c_mn[r, c][1] >= lim:
                            s_mn[r, c] = -Float32.inf
            m_tile = softmax.tile_row_max(acc_S)
            # ---- keep / skip (the first tile of a split is always kept)
            keep = Boolean(True)
            if const_expr(self.has_skip):
                vote = softmax.rows_vote_skip(m_tile, row_valid, log2_lambda)
                vote = vote and skip_enabled and i > 0
                # marked warp-uniform: the keep block and the ring counters it advances then
                # stay on the uniform datapath, as in the dense build (unmarked, the 64-key tile
                # build at 0 % skipped ran 0.94x dense at B=1 L=8k 64/4 on an H100:
                # perf/results/decode-h100-uniform-vote.md)
                keep = not group_all(vote, int(DecodeBarrier.Vote), 128, warp_uniform=True)
            else:
                cute.arch.barrier(barrier_id=int(DecodeBarrier.Consumer), number_of_threads=128)
            if keep:
                slot = num_kept % NV
                # V tile load, issued only now that the tile is kept (unless the producer
                # already issued it: producer_v, see load()).
                if const_expr(self.producer_v_all()):
                    pass
                elif const_expr(self.producer_v):
                    if warp_in_wg == 0 and i > 0:
                        self.issue_v(tma_atom_V, tVgV, tVsV, mbar_v_full, slot, tile, pages,
                                     batch_idx, seqlen_k)
                else:
                    if warp_in_wg == 0:
                        self.issue_v(tma_atom_V, tVgV, tVsV, mbar_v_full, slot, tile, pages,
                                     batch_idx, seqlen_k)
                row_scale = cute.make_rmem_tensor(n_rows_thr, Float32)
                if i == 0:
                    softmax.update(acc_S, m_tile, True)
                    row_scale.fill(1.0)
                else:
                    row_scale.store(softmax.update(acc_S, m_tile, False).load())
                # The 4 threads of a row's quad write the same value (the warp's own rows).
                for r in cutlass.range_constexpr(n_rows_thr):
                    sScale[tScS_mn[r, 0][0], slot] = row_scale[r]
                rP = cute.make_rmem_tensor(acc_S.layout, self.dtype)
                convert_f32_to_16bit(acc_S, rP)
                cute.copy(st_atom, thr_st.retile(rP), tPsP[None, None, None, slot])
                cute.arch.fence_proxy("async.shared", space="cta")
                num_kept += 1
            if num_kept - num_done > self.pv_lag:
                self.pv_step(acc_O, tOrP, tOrVt, sScale, mbar_v_full, mbar_v_empty, tiled_mma_pv,
                             tScS_mn, num_done, n_rows_thr)
                num_done += 1
        self.trace_mark(mTrace, cta_id, tidx, TracePoint.LoopEnd)

        # ---- drain the deferred PV products
        cute.arch.barrier(barrier_id=int(DecodeBarrier.Consumer), number_of_threads=128)
        for _ in cutlass.range(num_kept - num_done, unroll=1):
            self.pv_step(acc_O, tOrP, tOrVt, sScale, mbar_v_full, mbar_v_empty, tiled_mma_pv,
                         tScS_mn, num_done, n_rows_thr)
            num_done += 1
        self.trace_mark(mTrace, cta_id, tidx, TracePoint.DrainEnd)

        # ---- counters: one thread per CTA
        if const_expr(self.has_stats):
            if tidx == 0 and n_local > 0:
                cute.arch.atomic_add(elem_ptr(mVisited, (batch_idx, head_kv)), n_local)
                cute.arch.atomic_add(elem_ptr(mSkipped, (batch_idx, head_kv)), n_local - num_kept)
                cute.arch.atomic_add(elem_ptr(mVLoaded, (batch_idx, head_kv)), num_kept)

        # ---- epilogue: normalized O and lse for the valid rows
        inv_l, lse = softmax.finalize()
        rescale_rows(acc_O, inv_l)
        store_out_lse(acc_O, lse, thr_mma_pv, mO, mLSE, m_block, num_rows, G, head_kv, batch_idx,
                      split_idx, n_rows_thr, TILE_M, self.head_dim, self.direct_out, self.dtype)
        self.trace_mark(mTrace, cta_id, tidx, TracePoint.Stored)

        merged = Boolean(False)
        if const_expr(self.fused_merge):
            merged = self.merge_if_last(mO, mLSE, mOFinal, mLSEFinal, mArrivals, tidx, m_block,
                                        head_kv, batch_idx, qhead_per_kvhead, num_rows, num_splits)
        if const_expr(self.trace):
            self.trace_mark(mTrace, cta_id, tidx, TracePoint.Done)
            if tidx == 0:
                merged_flag = cutlass.Int64(0)
                if merged:
                    merged_flag = cutlass.Int64(1)
                mTrace[cta_id, 16] = merged_flag
                mTrace[cta_id, 17] = cutlass.Int64(n_local)
                mTrace[cta_id, 18] = cutlass.Int64(cute.arch.smid())

    @cute.jit
    def merge_if_last(
        self, mOp: cute.Tensor, mLSEp: cute.Tensor, mOFinal: cute.Tensor, mLSEFinal: cute.Tensor,
        mArrivals: cute.Tensor, tidx: Int32, m_block: Int32, head_kv: Int32, batch_idx: Int32,
        G: Int32, num_rows: Int32, num_splits: Int32,
    ):
        """Split-KV merge without a second launch: every split's CTA publishes its partial and
        counts itself in; the CTA that arrives last merges the q-tile's rows (one warp per row,
        the combine kernel's row merge) and resets the counter for the next launch."""
        # Release this thread's partial O / lse stores, then one arrival per CTA (the classic
        # threadfence-reduction handshake).
        cute.arch.fence_acq_rel_gpu()
        cute.arch.barrier(barrier_id=int(DecodeBarrier.Consumer), number_of_threads=128)
        not_last = Boolean(True)
        counter = elem_ptr(mArrivals, (batch_idx, head_kv, m_block))
        if tidx == 0:
            arrived = cute.arch.atomic_add(counter, Int32(1), sem="acq_rel", scope="gpu")
            not_last = arrived != num_splits - 1
        is_last = not group_all(not_last, int(DecodeBarrier.Merge), 128)
        if is_last:
            cute.arch.fence_acq_rel_gpu()  # acquire: every split's partial is visible
            if tidx == 0:
                cute.arch.atomic_exch(counter, Int32(0), sem="relaxed", scope="gpu")
            warp = tidx // 32
            lane = tidx - warp * 32
            rows_here = cutlass.min(num_rows - m_block * TILE_M, TILE_M)
            if const_expr(self.pipelined_merge):
                if rows_here <= 4:  # GQA decode with G <= 4: one row per warp, more splits per batch
                    if warp < rows_here:
                        grow = m_block * TILE_M + warp
                        p = grow // G
                        merge_split_rows_pipelined(mOp, mLSEp, mOFinal, mLSEFinal, batch_idx, [p],
                                                   [head_kv * G + (grow - p * G)], None, lane)
                else:
                    for r0 in cutlass.range(warp, rows_here, 4 * MERGE_ROWS, unroll=1):
                        pos, head, valid = self.merge_batch_rows(r0, rows_here, m_block, head_kv, G)
                        merge_split_rows_pipelined(mOp, mLSEp, mOFinal, mLSEFinal, batch_idx, pos,
                                                   head, valid, lane)
            else:
                # Warp w merges rows w, w + 4, ...; MERGE_ROWS of them at once (a batch is padded
                # with duplicates of a valid row, never written).
                for r0 in cutlass.range(warp, rows_here, 4 * MERGE_ROWS, unroll=1):
                    pos, head, valid = self.merge_batch_rows(r0, rows_here, m_block, head_kv, G)
                    merge_split_rows(mOp, mLSEp, mOFinal, mLSEFinal, batch_idx, pos, head, valid,
                                     lane)
        return is_last

    @cute.jit
    def merge_batch_rows(self, r0: Int32, rows_here: Int32, m_block: Int32, head_kv: Int32,
                         G: Int32):
        """(pos, head, valid) of the MERGE_ROWS rows r0, r0 + 4, ... of a q-tile that one warp
        merges together (past the tile's valid rows: duplicates of its last row, not written)."""
        pos, head, valid = [], [], []
        for i in cutlass.range_constexpr(MERGE_ROWS):
            r = r0 + 4 * i
            valid.append(r < rows_here)
            grow = m_block * TILE_M + cutlass.min(r, rows_here - 1)
            p = grow // G
            pos.append(p)
            head.append(head_kv * G + (grow - p * G))
        return pos, head, valid

    @cute.jit
    def pv_step(
        self, acc_O: cute.Tensor, tOrP: cute.Tensor, tOrVt: cute.Tensor, sScale: cute.Tensor,
        mbar_v_full, mbar_v_empty, tiled_mma_pv: cute.TiledMma, tScS_mn: cute.Tensor, k: Int32,
        n_rows_thr: cutlass.Constexpr[int],
    ):
        """O = O * scale_k + P_k V_k for the k-th kept tile (its V and P in ring slot k % NV)."""
        NV = self.num_v_stages
        slot = k % NV
        row_scale = cute.make_rmem_tensor(n_rows_thr, Float32)
        for r in cutlass.range_constexpr(n_rows_thr):
            row_scale[r] = sScale[tScS_mn[r, 0][0], slot]
        rescale_rows(acc_O, row_scale)
        cute.arch.mbarrier_wait(mbar_v_full + slot, (k // NV) % 2)
        wgmma(tiled_mma_pv, acc_O, tOrP[None, None, None, slot], tOrVt[None, None, None, slot], False)
        warpgroup.wait_group(0)
        if const_expr(self.producer_v_all()):
            with cute.arch.elect_one():  # this warp is done with V slot `slot`
                cute.arch.mbarrier_arrive(mbar_v_empty + slot)
