# blasst_cute: Hopper (sm_90a) absorbed-MLA decode (DeepSeek-style latent attention) with BLASST
# tile skipping, paged or contiguous latent cache, split-KV.
#
# Shapes: q [B, Lq_new, H, 576] (512 latent + 64 rope dims), one latent row per cached token,
# K = the whole 576-dim row, V = its first 512 dims. One CTA per (q-tile of 64 packed rows, split,
# batch); rows r = pos * H + h (the H heads x Lq_new new tokens all share the one latent head, so
# a tile's rows are contiguous rows of q). Key tiles of 64 tokens. 384 threads:
#   warps 0-7, two consumer warpgroups; warpgroup w owns O[:, 256w : 256w + 256] (128 fp32
#   accumulators per thread). Two schedules (``schedule``):
#     "alternate" (default): warpgroup w computes S = Q K^T (64 x 64, K-depth 576), the mask,
#       the row maxima, the BLASST vote (over its 128 threads) and the softmax of the local key
#       tiles i with i % 2 == w, which always sit in K stage w. It publishes the keep flag and
#       the new running max (smem) and P (the stage's rope block, columns 512-575, which no one
#       reads once S is computed) and arrives at a named barrier; its own O += P V takes P from
#       registers. The other warpgroup syncs there, adopts the new max (rescaling its O half
#       and row sums), and adds P V with P from smem. The vote of tile i uses the running max
#       after tile i - 1, which the other warpgroup decided, so the decisions and the visit
#       order are those of a sequential pass. The two warpgroups' QK^T chains run on different
#       tiles, one tile's softmax overlaps the other warpgroup's MMAs, and Q is read from smem
#       once per tile, by m64n64 wgmmas (H100: 1.00-1.10x faster dense than "split_keys",
#       1.02-1.16x sparse; perf/results/mla-decode-h100-alternate.md).
#     "split_keys": both warpgroups work on every tile, each on 32 of its 64 keys (m64n32 S,
#       both read all of Q); see "Row maxima and the BLASST vote" below; P goes through an
#       8 KiB buffer that both read.
#   warpgroup 2 (producer; only its first warp works, the group exists for setmaxnreg 240/24):
#       TMA of the 64 x 576 Q tile (own barrier; a loop of 16-byte loads by the consumers cost
#       3-6 us per launch, H100), then of the 64 x 576 K tiles, page by page through the block
#       table, into a 2-stage ring (full/empty mbarriers). V needs no load: it is the first 512 columns of the K stage,
#       viewed transposed (MN-major) as the B operand of the PV wgmma. A K stage is released
#       after the PV products of its tile (or right after the decision when the tile is skipped).
# Smem: Q 72 KiB + 2 x K 72 KiB (+ P 8 KiB for split_keys) = 216 (224) KiB, plus ~2.6 KiB of
# barriers and exchange slots, so one CTA per SM.
# Cluster variant (cluster_m=2; launch_mla picks it, see CLUSTER_MODE there): the two q-tiles of a
# (split, batch) run as one 2-CTA cluster (q-tile the fastest grid index). Each CTA's producer
# loads half the rows of every K copy and multicasts it, so each K tile leaves DRAM/L2 once; each
# full barrier expects the whole tile, each empty barrier collects the 8 consumer warps of both
# CTAs (remote arrive), and cluster barriers after the mbarrier init and before exit keep the
# peer's barriers alive. Skip decisions stay per CTA (same geometry and reference; outputs and
# counters are bitwise those of cluster_m=1); the shared ring only keeps the pair in lock-step.
# Without it, skipping lets the pair drift apart and with long key ranges the second q-tile
# re-reads K from DRAM (H100 B=64/128 L=32k: 8-9% faster at 53% sparsity, 3-5% dense, 3% at
# 90%, where the kernel streams the unique latent cache at ~2.65 TB/s, near the DRAM roof: MLA
# skipping never saves K bytes). Requires the pair to see the same key tiles.
# Skipping saves the exp/rescale and the PV product (512/1088 of the FLOPs),
# never the K/V bytes (one shared latent row): memory-bound shapes (small H) gain little.
# Launched with programmatic dependent launch (use_pdl): CTAs wait (griddepcontrol.wait) before
# any global access, then let the combine launch; 1-3% on back-to-back calls (H100).
# Tried and dropped: 32-key tiles in four 36 KiB stages (the N-split QK^T becomes m64n16 per
# warpgroup and smem-bound: 0.64-0.73x dense; perf/results/mla-decode-h100-tile32.md). Also
# (H200, same runs): issuing QK^T of tile i+1 before waiting for PV of tile i
# (slower: the stage release then waits behind the next tile's load), and an L2 prefetch of the
# next tile by the producer (no gain, slower at B >= 64 with 32k keys); tried again 1-8 tiles
# ahead (eighteenth and nineteenth sessions, perf/results/mla-decode-sparse-model.md): 0.67-1.01x
# on an H100, 0.95-1.02x on an H200, same bits, removed. And (H100, fifteenth
# session, perf/results/mla-decode-h100-qk-tries.md): QK^T split over the depth (each warpgroup
# an m64n64 partial over 288 columns, halves swapped through the stage's dead rope block: a third
# less smem operand traffic, but 2-8% slower dense, even sparse); and each K stage landing in 3 or
# 9 column chunks with a full barrier each, QK^T starting on the first (9: 3-5% slower dense,
# 1-4% sparse; 3: within +-2%): neither smem operand bandwidth nor the tile's load latency bounds
# the loop, whose QK^T, vote, softmax and PV phases run one after another in both warpgroups.
# (These tries were of the split_keys schedule, before "alternate" existed.)
#
# Row maxima and the BLASST vote across the two warpgroups (split_keys): a row skips a tile iff
# (max(m_0, m_1) - m_run) * s < log2(lambda), which is the AND of the same test on each half's
# partial max m_w. So each warpgroup votes on its own half, and one bar.red.and over the 256
# consumer threads gives the tile decision; the same barrier orders the partial maxima each
# warpgroup parked in smem (double-buffered by tile parity), from which a kept tile's full max is
# read. Both warpgroups therefore hold identical running maxima, take the same branch, and run
# the same barrier sequence (skip path: vote only; keep path: vote, P-ready). Row sums stay
# per-warpgroup partials (same max) and are added through smem at the end.
#
# Output: with one split, O (q dtype) and lse directly; otherwise fp32 O / l and lse per split,
# merged by blasst_cute.kernels.sm90.combine. The skip rule and online softmax are
# blasst_cute.kernels.common.softmax_skip; idioms follow blasst_cute's GQA decode kernel
# (kernels/sm90/decode.py), FlashAttention-4's SM90 forward and CUTLASS's CuTe DSL examples.
# Shared with that kernel: gmem tensors and epilogue stores (common.decode_io), the split's key
# tiles and page coordinates (common.kv_tiles), per-row key limits (common.masking).

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
    acc_as_operand_a,
    acc_rows_cols,
    assume_rows_aligned,
    select_modes,
    smem_layout,
)
from blasst_cute.kernels.common.masking import packed_row_limits
from blasst_cute.kernels.common.pipelines import elem_ptr, qk_pv_tiled_mmas, wgmma
from blasst_cute.kernels.common.softmax_skip import (
    LN_2,
    LOG2_E,
    OnlineSoftmax,
    convert_f32_to_16bit,
    group_all,
    quad_allreduce_sum,
    rescale_rows,
    sequence_threshold_log2,
)

HEAD_DIM = 576  # latent (512) + rope (64)
HEAD_DIM_V = 512
TILE_M = 64  # packed rows (heads x new tokens) per CTA
TILE_N = 64  # keys per tile
SUPPORTED_PAGE_SIZES = (16, 32, 64, 128, 256)
NUM_STAGES = 2
SMEM_LIMIT = 227 * 1024  # opt-in dynamic smem per block on sm_90


class MlaBarrier(enum.IntEnum):
    """Named-barrier ids (0 is __syncthreads)."""

    Consumers = 1  # plain sync of the 256 consumer threads (row-max exchange, row sums)
    Vote = 2  # split_keys: bar.red.and of the BLASST vote over 256 threads
    PReady = 3  # split_keys: the P tile is complete in smem
    # alternate: warpgroup w's vote over its own 128 threads (VoteWG0 + w)
    VoteWG0 = 4
    VoteWG1 = 5
    # alternate: the tile of warpgroup w is decided (flag, running max and P published);
    # w arrives, the other warpgroup syncs (256 threads; TileReadyWG0 + w)
    TileReadyWG0 = 6
    TileReadyWG1 = 7


SCHEDULES = ("alternate", "split_keys")


class BlasstMlaDecodeSm90:
    """Static configuration of one compiled MLA decode kernel (see the module comment).

    Dynamic: batch, Lq_new, heads, cache lengths, pages, splits, softmax scale, factor.
    """

    def __init__(
        self,
        dtype,
        page_size: Optional[int] = None,
        causal: bool = True,
        has_skip: bool = False,
        factor_per_batch: bool = False,
        has_stats: bool = False,
        direct_out: bool = False,
        cluster_m: int = 1,
        interleave_splits: bool = False,
        use_pdl: bool = False,
        schedule: str = "alternate",
        early_release: bool = False,
    ):
        if schedule not in SCHEDULES:
            raise NotImplementedError(f"blasst sm90 MLA decode: schedule {schedule!r} ({SCHEDULES})")
        if dtype not in (cutlass.BFloat16, cutlass.Float16):
            raise NotImplementedError(f"blasst sm90 MLA decode: dtype {dtype} (bf16/fp16 only)")
        if page_size is not None and page_size not in SUPPORTED_PAGE_SIZES:
            raise NotImplementedError(
                f"blasst sm90 MLA decode: page_size {page_size} (supported: {SUPPORTED_PAGE_SIZES})")
        if has_stats and not has_skip:
            raise NotImplementedError("blasst sm90 MLA decode: stats need the skip variant")
        if factor_per_batch and not has_skip:
            raise NotImplementedError("blasst sm90 MLA decode: a factor tensor needs the skip variant")
        if cluster_m not in (1, 2):
            raise NotImplementedError(f"blasst sm90 MLA decode: cluster_m {cluster_m} (1 or 2)")
        self.dtype = dtype
        # Split s visits tiles s, s + S, ... (kv_tiles.split_tiles_interleaved) instead of the s-th
        # contiguous chunk: every split samples the whole sequence, so its running max finds the
        # high-scoring keys early (more skips) and the kept tiles spread evenly over the CTAs.
        self.interleave_splits = interleave_splits
        self.paged = page_size is not None
        self.page_size = page_size
        self.causal = causal
        self.has_skip = has_skip
        self.factor_per_batch = factor_per_batch
        self.has_stats = has_stats
        self.direct_out = direct_out
        # Rows per TMA copy: a whole page, or a 64-row slice of a larger one.
        self.rows_per_copy = min(page_size, TILE_N) if self.paged else TILE_N
        self.copies_per_tile = TILE_N // self.rows_per_copy
        # Cluster of the q-tiles of one (split, batch): each CTA loads half the rows of every copy
        # and multicasts it, so both receive the whole tile; a stage is refilled only after the
        # consumers of every CTA of the cluster released it.
        self.cluster_m = cluster_m
        # Programmatic dependent launch: CTAs may start (barrier init, descriptor prefetch) while
        # the kernel before them in the stream drains; every global access waits for it
        # (griddepcontrol.wait), and the kernel after (the combine) may launch once all CTAs run.
        self.use_pdl = use_pdl
        # How the two consumer warpgroups share the key tiles (see the module comment):
        # "alternate": warpgroup w computes S and the softmax of the tiles i with i % 2 == w
        # alone, and both add every kept tile's P V to their half of O;
        # "split_keys": both work on every tile, each on 32 of its 64 keys.
        self.schedule = schedule
        # alternate: a warpgroup waits for its P V of the other warpgroup's kept tile i - 1 and
        # releases that K stage before it waits for tile i, instead of after issuing S of tile i.
        # The producer can then load tile i + 1 while tile i is still in flight (two loads per CTA
        # instead of one), for memory-bound launches whose CTAs finish unevenly. Same bits. The
        # launcher's default (launch_mla.EARLY_RELEASE; H200: faster in 29 of 33 points).
        self.early_release = early_release
        self.rows_per_tma = self.rows_per_copy // cluster_m
        self.num_stages = NUM_STAGES
        self.num_consumer_threads = 256
        self.producer_warp = 8  # first warp of the producer warpgroup (the only one working)
        self.num_threads = self.num_consumer_threads + 128
        # Register split (setmaxnreg): 128 O accumulators per consumer thread need the room. The
        # launch pool is 384 x 168 (ptxas cap for 384 threads): 240 x 256 + 24 x 128 must fit it,
        # else setmaxnreg.inc waits forever.
        self.num_mma_regs = 240
        self.num_producer_regs = 24

    # ------------------------------------------------------------------ host-side derivations
    def _smem_layout(self, rows: int, cols: int, stages: Optional[int] = None):
        return smem_layout(self.dtype, rows, cols, stages)

    def _tiled_mmas(self):
        """(QK^T, PV with P from smem, PV with P from registers).

        PV: two warpgroups side by side along N (64 x 256 atoms, one half of O each).
        QK^T: split_keys, the same arrangement with 64 x 32 atoms (half the keys each);
        alternate, one warpgroup's 64 x 64 tile (each warpgroup computes whole tiles)."""
        if const_expr(self.schedule != "split_keys"):
            mma_qk, _ = qk_pv_tiled_mmas(self.dtype, (1, 1, 1), (TILE_M, TILE_N),
                                         (TILE_M, HEAD_DIM_V // 2))
        else:
            mma_qk, _ = qk_pv_tiled_mmas(self.dtype, (1, 2, 1), (TILE_M, TILE_N // 2),
                                         (TILE_M, HEAD_DIM_V // 2))
        _, mma_pv = qk_pv_tiled_mmas(self.dtype, (1, 2, 1), (TILE_M, TILE_N // 2),
                                     (TILE_M, HEAD_DIM_V // 2))
        _, mma_pv_rs = qk_pv_tiled_mmas(self.dtype, (1, 2, 1), (TILE_M, TILE_N // 2),
                                        (TILE_M, HEAD_DIM_V // 2),
                                        pv_a_source=warpgroup.OperandSource.RMEM)
        return mma_qk, mma_pv, mma_pv_rs

    # ------------------------------------------------------------------ host launch
    @cute.jit
    def launch_ptrs(
        self,
        q_ptr: cute.Pointer,  # (b, lq, h, 576) contiguous
        kv_ptr: cute.Pointer,  # paged (pages, page_size, 576) / contiguous (b, cap, 576)
        o_ptr: cute.Pointer,  # direct: (b, lq, h, 512) q dtype; else fp32 (splits, b, lq, h, 512)
        lse_ptr: cute.Pointer,  # direct: fp32 (b, h, lq); else (splits, b, h, lq)
        seqlens_ptr: cute.Pointer,  # int32 (b,)
        bt_ptr: Optional[cute.Pointer],  # int32 (b, max_pages), row stride bt_stride
        factor_ptr: Optional[cute.Pointer],  # float32 (b,)
        visited_ptr: Optional[cute.Pointer],  # int32 (b,)
        skipped_ptr: Optional[cute.Pointer],
        batch: Int32, seqlen_q: Int32, num_heads: Int32,
        kv_rows: Int32,  # num_pages (paged) or batch (contiguous)
        kv_len: Int32,  # page_size (paged) or capacity (contiguous)
        kv_stride_0: cutlass.Int64, kv_stride_1: Int32,
        max_pages: Int32, bt_stride: Int32,
        softmax_scale: Float32,
        threshold_scale_factor: Float32,
        num_splits: Int32,
        stream: cuda.CUstream,
    ):
        """Pointer entry point (low host overhead): builds the tensors, then ``__call__``."""
        d, dv = HEAD_DIM, HEAD_DIM_V
        mQ = bshd_tensor(q_ptr, batch, seqlen_q, num_heads, d)
        mKV = cute.make_tensor(kv_ptr, cute.make_layout(
            (kv_rows, kv_len, d),
            stride=(cute.assume(kv_stride_0, divby=8), cute.assume(kv_stride_1, divby=8), 1)))
        mO, mLSE = out_lse_tensors(o_ptr, lse_ptr, batch, seqlen_q, num_heads, dv, num_splits,
                                   self.direct_out)
        mSeqlens = vector_tensor(seqlens_ptr, batch)
        mBlockTable = block_table_tensor(bt_ptr, batch, max_pages, bt_stride)
        mFactor = vector_tensor(factor_ptr, batch)
        mVisited = mSkipped = None
        if const_expr(visited_ptr is not None):
            mVisited = vector_tensor(visited_ptr, batch)
            mSkipped = vector_tensor(skipped_ptr, batch)
        self.__call__(mQ, mKV, mO, mLSE, mSeqlens, mBlockTable, softmax_scale,
                      threshold_scale_factor, mFactor, mVisited, mSkipped, num_splits, stream)

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (b, lq, h, 576)
        mKV: cute.Tensor,  # paged (pages, page_size, 576) or contiguous (b, cap, 576)
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        mSeqlens: cute.Tensor,
        mBlockTable: Optional[cute.Tensor],
        softmax_scale: Float32,
        threshold_scale_factor: Float32,
        mFactor: Optional[cute.Tensor],
        mVisited: Optional[cute.Tensor],
        mSkipped: Optional[cute.Tensor],
        num_splits: Int32,
        stream: cuda.CUstream,
    ):
        for t in (mQ, mKV):
            if const_expr(t.element_type != self.dtype):
                raise TypeError(f"expected {self.dtype}, got {t.element_type}")
        # Latent cache in CuTe order (rows, d, page-or-batch); d contiguous.
        mKc = select_modes(assume_rows_aligned(mKV), [1, 2, 0])

        tiled_mma_qk, tiled_mma_pv, tiled_mma_pv_rs = self._tiled_mmas()
        NS = self.num_stages
        sQ_layout = self._smem_layout(TILE_M, HEAD_DIM)
        sK_layout = self._smem_layout(TILE_N, HEAD_DIM, NS)
        sP_layout = self._smem_layout(TILE_M, TILE_N)

        rpt = self.rows_per_tma
        copy_tiler = (cute.make_layout(rpt), cute.make_layout(HEAD_DIM))
        sK_copy = cute.composition(cute.select(sK_layout, mode=[0, 1]), copy_tiler)
        tma_op = cpasync.CopyBulkTensorTileG2SOp()
        if const_expr(self.cluster_m > 1):
            # The box is already this CTA's share: the multicast factor of the atom stays 1.
            tma_op = cpasync.CopyBulkTensorTileG2SMulticastOp()
        tma_atom_K, tma_K = cpasync.make_tiled_tma_atom(tma_op, mKc, sK_copy, (rpt, HEAD_DIM), 1)
        self.tx_bytes_K = cute.size_in_bytes(self.dtype, cute.select(sK_layout, mode=[0, 1]))
        # Q by TMA: a sequence's packed rows (r = pos * H + h) in CuTe order (rows, d, batch);
        # rows past Lq_new * H are out of bounds and arrive as zeros.
        rows_q = mQ.shape[1] * mQ.shape[2]
        mQr = select_modes(assume_rows_aligned(cute.make_tensor(mQ.iterator, cute.make_layout(
            (mQ.shape[0], rows_q, HEAD_DIM), stride=(mQ.stride[0], HEAD_DIM, 1)))), [1, 2, 0])
        tma_atom_Q, tma_Q = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), mQr, sQ_layout, (TILE_M, HEAD_DIM))
        self.tx_bytes_Q = cute.size_in_bytes(self.dtype, sQ_layout)

        # alternate: P lives in the rope block of its K stage (no buffer of its own)
        p_elems = cute.cosize(sP_layout) if self.schedule == "split_keys" else 8

        # Big buffers first (1024-aligned for the 128B swizzle), the small ones after them.
        @cute.struct
        class SharedStorage:
            sQ: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sK_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[self.dtype, p_elems], 1024]
            mbar_full: cute.struct.MemRange[cutlass.Int64, NS]
            mbar_empty: cute.struct.MemRange[cutlass.Int64, NS]
            mbar_q: cute.struct.MemRange[cutlass.Int64, 1]
            row_max: cute.struct.MemRange[Float32, 2 * 2 * TILE_M]  # (parity, warpgroup, row)
            row_sum: cute.struct.MemRange[Float32, 2 * TILE_M]  # (warpgroup, row)
            # alternate: the running max after the last decided tile, per (row slot, thread of
            # a warpgroup), and each tile's keep flag by tile parity
            run_max: cute.struct.MemRange[Float32, 2 * 128]
            keep_flag: cute.struct.MemRange[Int32, 2]

        self.shared_storage = SharedStorage
        if const_expr(SharedStorage.size_in_bytes() > SMEM_LIMIT):
            raise ValueError(f"MLA decode smem {SharedStorage.size_in_bytes()} > {SMEM_LIMIT}")

        num_batch = mQ.shape[0]
        seqlen_q = mQ.shape[1]
        num_heads = mQ.shape[2]
        num_m_blocks = (seqlen_q * num_heads + TILE_M - 1) // TILE_M
        scale_log2 = softmax_scale * LOG2_E
        self.kernel(
            mQ, tma_Q, tma_K, mO, mLSE, mSeqlens, mBlockTable, tma_atom_Q, tma_atom_K,
            scale_log2, threshold_scale_factor, mFactor, mVisited, mSkipped, num_splits,
            sQ_layout, sK_layout, sP_layout, tiled_mma_qk, tiled_mma_pv, tiled_mma_pv_rs,
        ).launch(
            grid=[num_m_blocks * num_splits, 1, num_batch],
            block=[self.num_threads, 1, 1],
            cluster=[self.cluster_m, 1, 1],
            stream=stream,
            use_pdl=self.use_pdl,
            min_blocks_per_mp=1,
        )

    # ------------------------------------------------------------------ device entry
    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor,
        mQr: cute.Tensor,
        mK: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        mSeqlens: cute.Tensor,
        mBlockTable: Optional[cute.Tensor],
        tma_atom_Q: cute.CopyAtom,
        tma_atom_K: cute.CopyAtom,
        scale_log2: Float32,
        threshold_scale_factor: Float32,
        mFactor: Optional[cute.Tensor],
        mVisited: Optional[cute.Tensor],
        mSkipped: Optional[cute.Tensor],
        num_splits: Int32,
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
        sP_layout: cute.ComposedLayout,
        tiled_mma_qk: cute.TiledMma,
        tiled_mma_pv: cute.TiledMma,
        tiled_mma_pv_rs: cute.TiledMma,
    ):
        NS = self.num_stages
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, batch_idx = cute.arch.block_idx()
        cta_rank = Int32(0)
        if const_expr(self.cluster_m > 1):
            # q-tile fastest, so a cluster = consecutive q-tiles of one (split, batch); the host
            # only picks this variant when the q-tile count is even and all q-tiles of a
            # sequence see the same key tiles.
            num_m_blocks = cute.arch.grid_dim()[0] // num_splits
            split_idx = bidx // num_m_blocks
            m_block = bidx - split_idx * num_m_blocks
            cta_rank = cute.arch.block_idx_in_cluster()
        else:
            m_block = bidx // num_splits
            split_idx = bidx - m_block * num_splits

        if warp_idx == self.producer_warp:
            cpasync.prefetch_descriptor(tma_atom_Q)
            cpasync.prefetch_descriptor(tma_atom_K)

        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        mbar_full = storage.mbar_full.data_ptr()
        mbar_empty = storage.mbar_empty.data_ptr()
        mbar_q = storage.mbar_q.data_ptr()
        if warp_idx == 0:
            with cute.arch.elect_one():
                cute.arch.mbarrier_init(mbar_q, 1)
                for s in cutlass.range_constexpr(NS):
                    cute.arch.mbarrier_init(mbar_full + s, 1)
                    # one arrival per consumer warp of every CTA of the cluster
                    cute.arch.mbarrier_init(mbar_empty + s, 8 * self.cluster_m)
            cute.arch.mbarrier_init_fence()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sP = None  # alternate: P lives in the K stages
        if const_expr(self.schedule == "split_keys"):
            sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)
        sRowMax = storage.row_max.get_tensor(cute.make_layout((2, 2, TILE_M), stride=(2 * TILE_M, TILE_M, 1)))
        sRowSum = storage.row_sum.get_tensor(cute.make_layout((2, TILE_M), stride=(TILE_M, 1)))
        sRunMax = storage.run_max.get_tensor(cute.make_layout((2, 128), stride=(128, 1)))
        sKeepFlag = storage.keep_flag.get_tensor(cute.make_layout(2))

        if const_expr(self.use_pdl):
            cute.arch.griddepcontrol_wait()
            cute.arch.griddepcontrol_launch_dependents()

        # ---- key tiles of this CTA: the split's slice of the tiles the q-tile sees
        seqlen_k = mSeqlens[batch_idx]
        seqlen_q = mQ.shape[1]
        num_heads = mQ.shape[2]
        num_rows = seqlen_q * num_heads
        # Tile i of this CTA is tile_first + i * tile_step.
        if const_expr(self.interleave_splits):
            tile_first, tile_step, n_local = split_tiles_interleaved(
                seqlen_k, seqlen_q, m_block, num_heads, split_idx, num_splits,
                TILE_M, TILE_N, self.causal)
        else:
            tile_first, _, n_local = split_tile_range(
                seqlen_k, seqlen_q, m_block, num_heads, split_idx, num_splits,
                TILE_M, TILE_N, self.causal)
            tile_step = Int32(1)

        if const_expr(self.cluster_m > 1):
            # mbarrier init visible to the peer CTA (its multicasts and remote arrivals)
            cute.arch.cluster_arrive_relaxed()
            cute.arch.cluster_wait()
        else:
            cute.arch.sync_threads()  # mbarrier init visible

        if warp_idx >= self.producer_warp:
            cute.arch.setmaxregister_decrease(self.num_producer_regs)
            if warp_idx == self.producer_warp:
                self.load(mQr, mK, sQ, sK, tma_atom_Q, tma_atom_K, mBlockTable, mbar_q,
                          mbar_full, mbar_empty, m_block, batch_idx, seqlen_k, tile_first,
                          tile_step, n_local, cta_rank)
        else:
            cute.arch.setmaxregister_increase(self.num_mma_regs)
            if const_expr(self.schedule != "split_keys"):
                self.mma_alternate(
                    mO, mLSE, sQ, sK, sRunMax, sKeepFlag, sRowSum, mbar_q, mbar_full,
                    mbar_empty, tiled_mma_qk, tiled_mma_pv, tiled_mma_pv_rs, tidx, m_block,
                    split_idx, batch_idx, num_heads, num_rows, seqlen_q, seqlen_k, tile_first,
                    tile_step, n_local, scale_log2, threshold_scale_factor, mFactor, mVisited,
                    mSkipped, cta_rank,
                )
            else:
                self.mma(
                    mO, mLSE, sQ, sK, sP, sRowMax, sRowSum, mbar_q, mbar_full, mbar_empty,
                    tiled_mma_qk, tiled_mma_pv, tidx, m_block, split_idx, batch_idx, num_heads,
                    num_rows, seqlen_q, seqlen_k, tile_first, tile_step, n_local,
                    scale_log2, threshold_scale_factor, mFactor, mVisited, mSkipped, cta_rank,
                )
        if const_expr(self.cluster_m > 1):
            # No CTA exits while its peer may still arrive on its empty barriers.
            cute.arch.cluster_arrive()
            cute.arch.cluster_wait()

    # ------------------------------------------------------------------ pages
    @cute.jit
    def copy_coords(self, tile: Int32, c: int, seqlen_k: Int32):
        """(page slot in the block table, row block inside the page) of copy c of a key tile."""
        return page_copy_coords(tile, c, seqlen_k, TILE_N, self.rows_per_copy, self.page_size,
                                self.paged)

    # ------------------------------------------------------------------ producer
    @cute.jit
    def load(
        self,
        mQr: cute.Tensor, mK: cute.Tensor, sQ: cute.Tensor, sK: cute.Tensor,
        tma_atom_Q: cute.CopyAtom, tma_atom_K: cute.CopyAtom,
        mBlockTable: Optional[cute.Tensor], mbar_q, mbar_full, mbar_empty,
        m_block: Int32, batch_idx: Int32, seqlen_k: Int32, tile_first: Int32, tile_step: Int32,
        n_local: Int32, cta_rank: Int32,
    ):
        NS = self.num_stages
        cpt = self.copies_per_tile
        ncl = self.cluster_m
        rpt = self.rows_per_tma
        lane = cute.arch.lane_idx()
        # Per-TMA partitions: gmem (vals, row_block, 1, page) and smem (vals, stage) per row slice
        # of rows_per_tma rows; slice ncl * c + r of a tile is CTA r's share of copy c.
        gK = cute.flat_divide(mK, (rpt, HEAD_DIM))
        sKd = cute.flat_divide(sK, (rpt, HEAD_DIM))  # (rpt, d, slices, 1, stages)
        tKsK = []
        tKgK = None
        for j in cutlass.range_constexpr(cpt * ncl):
            tKsK_j, tKgK = cpasync.tma_partition(
                tma_atom_K, 0, cute.make_layout(1),
                cute.group_modes(sKd[None, None, j, 0, None], 0, 2),
                cute.group_modes(gK, 0, 2),
            )
            tKsK.append(tKsK_j)
        mcast_mask = cutlass.Int16((1 << ncl) - 1)
        # Q first (its own barrier): the consumers need it before the first K tile.
        gQ = cute.local_tile(mQr[None, None, batch_idx], (TILE_M, HEAD_DIM), (m_block, 0))
        tQsQ, tQgQ = cpasync.tma_partition(
            tma_atom_Q, 0, cute.make_layout(1), cute.group_modes(sQ, 0, 2),
            cute.group_modes(gQ, 0, 2))
        with cute.arch.elect_one():
            cute.arch.mbarrier_arrive_and_expect_tx(mbar_q, self.tx_bytes_Q)
        cute.copy(tma_atom_Q, tQgQ, tQsQ, tma_bar_ptr=mbar_q)
        # Page ids: lane c < cpt holds copy c's page; the next tile's are read before waiting for
        # a free stage, so the block-table load latency hides behind that wait.
        page_next = Int32(0)
        if const_expr(self.paged):
            if n_local > 0:
                slot, _ = self.copy_coords(tile_first, lane % cpt, seqlen_k)
                page_next = mBlockTable[batch_idx, slot]
        for i in cutlass.range(n_local, unroll=1):
            tile = tile_first + i * tile_step
            stage = i % NS
            page_cur = page_next
            if const_expr(self.paged):
                if i + 1 < n_local:
                    slot, _ = self.copy_coords(tile + tile_step, lane % cpt, seqlen_k)
                    page_next = mBlockTable[batch_idx, slot]
            cute.arch.mbarrier_wait(mbar_empty + stage, ((i // NS) % 2) ^ 1)
            with cute.arch.elect_one():
                cute.arch.mbarrier_arrive_and_expect_tx(mbar_full + stage, self.tx_bytes_K)
            for c in cutlass.range_constexpr(cpt):
                _, rb = self.copy_coords(tile, c, seqlen_k)
                pg = batch_idx
                if const_expr(self.paged):
                    pg = cute.arch.shuffle_sync(page_cur, c)
                if const_expr(ncl == 1):
                    cute.copy(tma_atom_K, tKgK[None, rb, 0, pg], tKsK[c][None, stage],
                              tma_bar_ptr=mbar_full + stage)
                else:
                    # This CTA's row slice of copy c, multicast to every CTA of the cluster
                    # (the smem slice is static, so one branch per rank).
                    for r in cutlass.range_constexpr(ncl):
                        if cta_rank == r:
                            cute.copy(tma_atom_K, tKgK[None, ncl * rb + r, 0, pg],
                                      tKsK[ncl * c + r][None, stage],
                                      tma_bar_ptr=mbar_full + stage, mcast_mask=mcast_mask)

    # ------------------------------------------------------------------ consumer pieces
    @staticmethod
    def vt_view(sK: cute.Tensor) -> cute.Tensor:
        """V^T = the first 512 columns of the K stages, viewed (d, key, stage): element (j, n, s)
        of the view is element (n, j, s) of sK (index n + 64 j + 64*576 s)."""
        return cute.composition(sK, cute.make_layout(
            (HEAD_DIM_V, TILE_N, NUM_STAGES), stride=(TILE_N, 1, TILE_N * HEAD_DIM)))

    @cute.jit
    def row_state(
        self, thr_mma_qk, m_block: Int32, num_rows: Int32, num_heads: Int32, seqlen_q: Int32,
        seqlen_k: Int32, scale_log2: Float32, threshold_scale_factor: Float32,
        mFactor: Optional[cute.Tensor], batch_idx: Int32,
    ):
        """Per-thread row bookkeeping of a consumer: (identity partition of S in (row, col)
        view, rows per thread, row valid, per-row key limit, first masked key, the online
        softmax, log2(lambda), skip enabled)."""
        tScS = thr_mma_qk.partition_C(cute.make_identity_tensor((TILE_M, TILE_N)))
        tScS_mn = acc_rows_cols(tScS)
        n_rows_thr = cute.size(tScS_mn, mode=[0])
        row_valid, row_limit, mask_from = packed_row_limits(
            tScS_mn, n_rows_thr, m_block, TILE_M, num_rows, num_heads, seqlen_q, seqlen_k,
            self.causal)
        softmax = OnlineSoftmax(scale_log2, n_rows_thr)
        softmax.reset()
        log2_lambda, skip_enabled = sequence_threshold_log2(
            self.has_skip, self.factor_per_batch, threshold_scale_factor, mFactor, batch_idx,
            seqlen_k)
        return (tScS_mn, n_rows_thr, row_valid, row_limit, mask_from, softmax, log2_lambda,
                skip_enabled)

    @cute.jit
    def mask_tile(self, acc_S: cute.Tensor, tScS_mn: cute.Tensor, row_limit: cute.Tensor,
                  tile: Int32, mask_from: Int32):
        """-inf for the keys a row does not see (key length, causality among the new tokens);
        only tiles reaching past ``mask_from`` have any."""
        if tile * TILE_N + TILE_N > mask_from:
            s_mn = acc_rows_cols(acc_S)
            for r in cutlass.range_constexpr(cute.size(s_mn, mode=[0])):
                lim = row_limit[r] - tile * TILE_N
                for c in cutlass.range_constexpr(cute.size(s_mn, mode=[1])):
                    if tScS_mn[r, c][1] >= lim:
                        s_mn[r, c] = -Float32.inf

    def p_store_atom(self) -> cute.CopyAtom:
        """stmatrix (four 8x8 matrices, not transposed): a warp's P fragment into smem."""
        return cute.make_copy_atom(
            cute.nvgpu.warp.StMatrix8x8x16bOp(transpose=False, num_matrices=4), self.dtype)

    @cute.jit
    def store_counters(self, mVisited: Optional[cute.Tensor], mSkipped: Optional[cute.Tensor],
                       tidx: Int32, batch_idx: Int32, n_local: Int32, num_kept: Int32):
        """Visited and skipped key tiles of this CTA, added by one thread (stats builds only)."""
        if const_expr(self.has_stats):
            if tidx == 0 and n_local > 0:
                cute.arch.atomic_add(elem_ptr(mVisited, (batch_idx,)), n_local)
                cute.arch.atomic_add(elem_ptr(mSkipped, (batch_idx,)), n_local - num_kept)

    @cute.jit
    def release_stage(self, mbar_empty, stage: Int32, cta_rank: Int32):
        """This warp no longer reads K stage ``stage``: one arrival on its empty barrier in every
        CTA of the cluster (each refills its share of the next tile)."""
        with cute.arch.elect_one():
            cute.arch.mbarrier_arrive(mbar_empty + stage)
            for r in cutlass.range_constexpr(1, self.cluster_m):
                cute.arch.mbarrier_arrive(mbar_empty + stage, (cta_rank + r) % self.cluster_m)

    # ------------------------------------------------------------------ consumer warpgroups
    @cute.jit
    def mma(
        self,
        mO: cute.Tensor, mLSE: cute.Tensor,
        sQ: cute.Tensor, sK: cute.Tensor, sP: cute.Tensor,
        sRowMax: cute.Tensor, sRowSum: cute.Tensor,
        mbar_q, mbar_full, mbar_empty,
        tiled_mma_qk: cute.TiledMma, tiled_mma_pv: cute.TiledMma,
        tidx: Int32, m_block: Int32, split_idx: Int32, batch_idx: Int32, num_heads: Int32,
        num_rows: Int32, seqlen_q: Int32, seqlen_k: Int32, tile_first: Int32, tile_step: Int32,
        n_local: Int32,
        scale_log2: Float32, threshold_scale_factor: Float32, mFactor: Optional[cute.Tensor],
        mVisited: Optional[cute.Tensor], mSkipped: Optional[cute.Tensor], cta_rank: Int32,
    ):
        NS = self.num_stages
        nthr = self.num_consumer_threads
        wg = cute.arch.make_warp_uniform(tidx // 128)
        H = num_heads

        # ---- Q (64 packed rows, TMA by the producer; rows past H * Lq_new are zero)
        cute.arch.mbarrier_wait(mbar_q, 0)

        # ---- MMA fragments. The smem operand fragments (wgmma descriptors) come from the warpgroup's slice, a
        # warp-uniform index, so that ptxas builds the descriptors in uniform registers; the
        # thread's own slice only partitions the accumulators. (From the thread's slice the
        # main loop had ~200 more instructions, ~80 of them R2UR moves, and ran 2-5 % slower
        # dense on an H100: perf/results/mla-decode-h100-uniform-fragments.md.)
        thr_mma_qk = tiled_mma_qk.get_slice(tidx)
        thr_mma_pv = tiled_mma_pv.get_slice(tidx)
        wg_mma_qk = tiled_mma_qk.get_slice(wg * 128)
        wg_mma_pv = tiled_mma_pv.get_slice(wg * 128)
        sVt = self.vt_view(sK)
        tSrQ = wg_mma_qk.make_fragment_A(wg_mma_qk.partition_A(sQ))
        tSrK = wg_mma_qk.make_fragment_B(wg_mma_qk.partition_B(sK))
        tOrP = wg_mma_pv.make_fragment_A(wg_mma_pv.partition_A(sP))
        tOrVt = wg_mma_pv.make_fragment_B(wg_mma_pv.partition_B(sVt))
        acc_S_shape = thr_mma_qk.partition_shape_C((TILE_M, TILE_N))
        acc_O = cute.make_rmem_tensor(thr_mma_pv.partition_shape_C((TILE_M, HEAD_DIM_V)), Float32)
        acc_O.fill(0.0)
        st_atom = self.p_store_atom()
        thr_st = cute.make_tiled_copy_C(st_atom, tiled_mma_qk).get_slice(tidx)
        tPsP = thr_st.partition_D(sP)
        (tScS_mn, n_rows_thr, row_valid, row_limit, mask_from, softmax, log2_lambda,
         skip_enabled) = self.row_state(thr_mma_qk, m_block, num_rows, H, seqlen_q, seqlen_k,
                                        scale_log2, threshold_scale_factor, mFactor, batch_idx)
        quad_leader = tidx % 4 == 0

        num_kept = Int32(0)
        for i in cutlass.range(n_local, unroll=1):
            tile = tile_first + i * tile_step
            stage = i % NS
            parity = i % 2
            # ---- S = Q K^T (this warpgroup: 32 of the 64 keys)
            acc_S = cute.make_rmem_tensor(acc_S_shape, Float32)
            cute.arch.mbarrier_wait(mbar_full + stage, (i // NS) % 2)
            wgmma(tiled_mma_qk, acc_S, tSrQ, tSrK[None, None, None, stage], True)
            warpgroup.wait_group(0)
            self.mask_tile(acc_S, tScS_mn, row_limit, tile, mask_from)
            # ---- partial row max over this warpgroup's keys, parked for the other warpgroup
            m_tile = softmax.tile_row_max(acc_S)
            if quad_leader:
                for r in cutlass.range_constexpr(n_rows_thr):
                    sRowMax[parity, wg, tScS_mn[r, 0][0]] = m_tile[r]
            # ---- keep / skip: AND of the per-half votes over both warpgroups (first tile of a
            # split always kept); the barrier also publishes the partial maxima.
            keep = Boolean(True)
            if const_expr(self.has_skip):
                vote = softmax.rows_vote_skip(m_tile, row_valid, log2_lambda)
                vote = vote and skip_enabled and i > 0
                keep = not group_all(vote, int(MlaBarrier.Vote), nthr)
            else:
                cute.arch.barrier(barrier_id=int(MlaBarrier.Consumers), number_of_threads=nthr)
            if keep:
                for r in cutlass.range_constexpr(n_rows_thr):
                    m_tile[r] = cute.arch.fmax(m_tile[r], sRowMax[parity, 1 - wg, tScS_mn[r, 0][0]])
                if i == 0:
                    softmax.update(acc_S, m_tile, True)
                else:
                    rescale_rows(acc_O, softmax.update(acc_S, m_tile, False))
                # P (this warpgroup's 32 columns) -> smem. Both warpgroups finished the previous
                # tile's PV before the vote barrier above, so P is free to overwrite.
                rP = cute.make_rmem_tensor(acc_S.layout, self.dtype)
                convert_f32_to_16bit(acc_S, rP)
                cute.copy(st_atom, thr_st.retile(rP), tPsP)
                cute.arch.fence_proxy("async.shared", space="cta")
                cute.arch.barrier(barrier_id=int(MlaBarrier.PReady), number_of_threads=nthr)
                # ---- O[:, 256 wg : 256 wg + 256] += P V
                wgmma(tiled_mma_pv, acc_O, tOrP, tOrVt[None, None, None, stage], False)
                warpgroup.wait_group(0)
                num_kept += 1
            # The K stage (and V inside it) is no longer read by this warp
            self.release_stage(mbar_empty, stage, cta_rank)

        self.store_counters(mVisited, mSkipped, tidx, batch_idx, n_local, num_kept)

        self.finish(acc_O, softmax, sRowSum, thr_mma_pv, tScS_mn, n_rows_thr, wg, quad_leader,
                    scale_log2, mO, mLSE, m_block, num_rows, H, batch_idx, split_idx)

    @cute.jit
    def finish(
        self, acc_O: cute.Tensor, softmax: OnlineSoftmax, sRowSum: cute.Tensor, thr_mma_pv,
        tScS_mn: cute.Tensor, n_rows_thr: cutlass.Constexpr[int], wg: Int32, quad_leader: Boolean,
        scale_log2: Float32, mO: cute.Tensor, mLSE: cute.Tensor, m_block: Int32,
        num_rows: Int32, H: Int32, batch_idx: Int32, split_idx: Int32,
    ):
        """Normalize and store this warpgroup's half of O (and lse from warpgroup 0). Row sums
        are per-warpgroup partials at the same running max, added through smem."""
        nthr = self.num_consumer_threads
        l_own = cute.make_rmem_tensor(n_rows_thr, Float32)
        for r in cutlass.range_constexpr(n_rows_thr):
            l_own[r] = quad_allreduce_sum(softmax.row_sum[r])
            if quad_leader:
                sRowSum[wg, tScS_mn[r, 0][0]] = l_own[r]
        cute.arch.barrier(barrier_id=int(MlaBarrier.Consumers), number_of_threads=nthr)
        inv_l = cute.make_rmem_tensor(n_rows_thr, Float32)
        lse = cute.make_rmem_tensor(n_rows_thr, Float32)
        for r in cutlass.range_constexpr(n_rows_thr):
            l = l_own[r] + sRowSum[1 - wg, tScS_mn[r, 0][0]]
            empty = l == 0.0 or l != l
            inv_l[r] = cute.arch.rcp_approx(Float32(1.0) if empty else l)
            lse[r] = (
                -Float32.inf
                if empty
                else (softmax.row_max[r] * scale_log2 + cute.math.log2(l, fastmath=True)) * LN_2
            )
        rescale_rows(acc_O, inv_l)
        store_out_lse(acc_O, lse, thr_mma_pv, mO, mLSE, m_block, num_rows, H, None, batch_idx,
                      split_idx, n_rows_thr, TILE_M, HEAD_DIM_V, self.direct_out, self.dtype)

    # ------------------------------------------------------------------ alternate schedule
    @cute.jit
    def mma_alternate(
        self,
        mO: cute.Tensor, mLSE: cute.Tensor,
        sQ: cute.Tensor, sK: cute.Tensor, sRunMax: cute.Tensor, sKeepFlag: cute.Tensor,
        sRowSum: cute.Tensor,
        mbar_q, mbar_full, mbar_empty,
        tiled_mma_qk: cute.TiledMma, tiled_mma_pv: cute.TiledMma, tiled_mma_pv_rs: cute.TiledMma,
        tidx: Int32, m_block: Int32, split_idx: Int32, batch_idx: Int32, num_heads: Int32,
        num_rows: Int32, seqlen_q: Int32, seqlen_k: Int32, tile_first: Int32, tile_step: Int32,
        n_local: Int32,
        scale_log2: Float32, threshold_scale_factor: Float32, mFactor: Optional[cute.Tensor],
        mVisited: Optional[cute.Tensor], mSkipped: Optional[cute.Tensor], cta_rank: Int32,
    ):
        """Consumer warpgroups, alternate schedule: warpgroup w owns the local tiles i with
        i % 2 == w (always K stage w). For its own tile it computes S = Q K^T (64 x 64), the
        mask, the row maxima and the vote (its 128 threads; m_run is the running max after tile
        i - 1, which the other warpgroup decided), then the softmax; it publishes the keep flag,
        the new running max and P (into the stage's rope block, dead once S is computed) and
        arrives at TileReady; its own P V reads P from registers. For the other warpgroup's
        tile it syncs at TileReady, adopts the new max and adds P V from smem. So the two
        warpgroups' QK^T run on different tiles at once, and one tile's softmax overlaps the
        other warpgroup's MMAs. The decisions (and the visit order) are those of the
        split_keys schedule; only the fp32 summation order of the row sums differs."""
        nthr = self.num_consumer_threads
        wg = cute.arch.make_warp_uniform(tidx // 128)
        tid_wg = tidx % 128
        H = num_heads

        cute.arch.mbarrier_wait(mbar_q, 0)

        # ---- MMA fragments (smem operands from the warpgroup's slice: uniform descriptors)
        thr_mma_qk = tiled_mma_qk.get_slice(tid_wg)
        wg_mma_qk = tiled_mma_qk.get_slice(0)
        thr_mma_pv = tiled_mma_pv.get_slice(tidx)
        wg_mma_pv = tiled_mma_pv.get_slice(wg * 128)
        thr_mma_pv_rs = tiled_mma_pv_rs.get_slice(tidx)
        wg_mma_pv_rs = tiled_mma_pv_rs.get_slice(wg * 128)
        NS = self.num_stages
        sVt = self.vt_view(sK)
        # P of a tile: the 64 x 64 rope block (columns 512-575) of its K stage, (64, 64, stage)
        sPk = cute.flat_divide(sK, (TILE_M, HEAD_DIM - HEAD_DIM_V))[
            None, None, 0, HEAD_DIM_V // (HEAD_DIM - HEAD_DIM_V), None]
        tSrQ = wg_mma_qk.make_fragment_A(wg_mma_qk.partition_A(sQ))
        tSrK = wg_mma_qk.make_fragment_B(wg_mma_qk.partition_B(sK))
        tOrPs = wg_mma_pv.make_fragment_A(wg_mma_pv.partition_A(sPk))
        tOrVt = wg_mma_pv.make_fragment_B(wg_mma_pv.partition_B(sVt))
        tOrVt_rs = wg_mma_pv_rs.make_fragment_B(wg_mma_pv_rs.partition_B(sVt))
        tOrPr = thr_mma_pv_rs.make_fragment_A(thr_mma_pv_rs.partition_shape_A((TILE_M, TILE_N)))
        acc_S_shape = thr_mma_qk.partition_shape_C((TILE_M, TILE_N))
        acc_O = cute.make_rmem_tensor(thr_mma_pv.partition_shape_C((TILE_M, HEAD_DIM_V)), Float32)
        acc_O.fill(0.0)
        st_atom = self.p_store_atom()
        thr_st = cute.make_tiled_copy_C(st_atom, tiled_mma_qk).get_slice(tid_wg)
        tPsP = thr_st.partition_D(sPk)
        (tScS_mn, n_rows_thr, row_valid, row_limit, mask_from, softmax, log2_lambda,
         skip_enabled) = self.row_state(thr_mma_qk, m_block, num_rows, H, seqlen_q, seqlen_k,
                                        scale_log2, threshold_scale_factor, mFactor, batch_idx)
        quad_leader = tidx % 4 == 0

        num_kept = Int32(0)  # over all tiles of the CTA (both warpgroups see every flag)
        n_own = (n_local - wg + 1) // 2
        for k in cutlass.range(n_own, unroll=1):
            i = 2 * k + wg
            # ---- the other warpgroup's tile i - 1 (its P V on this warpgroup's half of O),
            # then S = Q K^T of tile i (K stage wg, whole 64 keys). The stage of tile i - 1 is
            # released as soon as that P V is done: the next load into it is on the critical
            # path (two stages, one per warpgroup). Issuing S before waiting for tile i - 1's
            # decision was 5-40 % slower on an H100 (a late K tile then also holds back that
            # P V; perf/results/mla-decode-h100-alternate.md).
            kept_prev = Int32(0)
            if i > 0:
                kept_prev = self.other_tile_decision(i - 1, sKeepFlag)
                num_kept += kept_prev
                self.other_tile_pv(i - 1, kept_prev, acc_O, softmax, sRunMax, tOrPs, tOrVt,
                                   tiled_mma_pv, mbar_empty, tid_wg, n_rows_thr, cta_rank)
                if const_expr(self.early_release):
                    # (the wait inside the branch: unconditional, ptxas serializes every wgmma
                    # of the skip build; test_wgmma_not_serialized)
                    if kept_prev != 0:
                        warpgroup.wait_group(0)  # the P V of tile i - 1
                        self.release_stage(mbar_empty, 1 - wg, cta_rank)
            acc_S = cute.make_rmem_tensor(acc_S_shape, Float32)
            cute.arch.mbarrier_wait(mbar_full + wg, (i // NS) % 2)
            wgmma(tiled_mma_qk, acc_S, tSrQ, tSrK[None, None, None, wg], True)
            if const_expr(not self.early_release):
                if kept_prev != 0:
                    warpgroup.wait_group(1)  # the P V of tile i - 1 (S may still run)
                    self.release_stage(mbar_empty, 1 - wg, cta_rank)
            warpgroup.wait_group(0)
            self.mask_tile(acc_S, tScS_mn, row_limit, tile_first + i * tile_step, mask_from)
            m_tile = softmax.tile_row_max(acc_S)
            keep = Boolean(True)
            if const_expr(self.has_skip):
                vote = softmax.rows_vote_skip(m_tile, row_valid, log2_lambda)
                vote = vote and skip_enabled and i > 0
                keep = not group_all(vote, int(MlaBarrier.VoteWG0) + wg, 128, warp_uniform=True)
            if keep:
                if i == 0:
                    softmax.update(acc_S, m_tile, True)
                else:
                    rescale_rows(acc_O, softmax.update(acc_S, m_tile, False))
                # P for the other warpgroup (smem, the stage's rope block) and for this one
                # (registers, the A operand of its P V)
                rP = cute.make_rmem_tensor(acc_S.layout, self.dtype)
                convert_f32_to_16bit(acc_S, rP)
                cute.copy(st_atom, thr_st.retile(rP), tPsP[None, None, None, wg])
                convert_f32_to_16bit(acc_as_operand_a(acc_S), tOrPr)
                for r in cutlass.range_constexpr(n_rows_thr):
                    sRunMax[r, tid_wg] = softmax.row_max[r]
                cute.arch.fence_proxy("async.shared", space="cta")
                num_kept += 1
            if tid_wg == 0:
                sKeepFlag[i % 2] = Int32(1) if keep else Int32(0)
            cute.arch.barrier_arrive(barrier_id=int(MlaBarrier.TileReadyWG0) + wg,
                                     number_of_threads=nthr)
            if keep:
                wgmma(tiled_mma_pv_rs, acc_O, tOrPr, tOrVt_rs[None, None, None, wg], False)
                warpgroup.wait_group(0)
            self.release_stage(mbar_empty, wg, cta_rank)
        # ---- the other warpgroup's last tile
        if n_local > 0:
            if (n_local - 1) % 2 != wg:
                kept_last = self.other_tile_decision(n_local - 1, sKeepFlag)
                num_kept += kept_last
                self.other_tile_pv(n_local - 1, kept_last, acc_O, softmax, sRunMax, tOrPs, tOrVt,
                                   tiled_mma_pv, mbar_empty, tid_wg, n_rows_thr, cta_rank)
                # (unconditional: ptxas must see the wait on every path before O is read)
                warpgroup.wait_group(0)
                if kept_last != 0:
                    self.release_stage(mbar_empty, 1 - wg, cta_rank)

        self.store_counters(mVisited, mSkipped, tidx, batch_idx, n_local, num_kept)

        self.finish(acc_O, softmax, sRowSum, thr_mma_pv, tScS_mn, n_rows_thr, wg, quad_leader,
                    scale_log2, mO, mLSE, m_block, num_rows, H, batch_idx, split_idx)

    @cute.jit
    def other_tile_decision(self, j: Int32, sKeepFlag: cute.Tensor) -> Int32:
        """Wait until the other warpgroup decided its tile j (alternate schedule); 1 if kept."""
        cute.arch.barrier(barrier_id=int(MlaBarrier.TileReadyWG0) + j % 2,
                          number_of_threads=self.num_consumer_threads)
        # one word for the whole CTA; as a warp-uniform value the branch on it stays uniform
        return cute.arch.make_warp_uniform(sKeepFlag[j % 2])

    @cute.jit
    def other_tile_pv(
        self, j: Int32, kept: Int32, acc_O: cute.Tensor, softmax: OnlineSoftmax,
        sRunMax: cute.Tensor, tOrPs: cute.Tensor, tOrVt: cute.Tensor,
        tiled_mma_pv: cute.TiledMma, mbar_empty, tid_wg: Int32, n_rows_thr: cutlass.Constexpr[int],
        cta_rank: Int32,
    ):
        """The other warpgroup's tile j, decided: if kept, adopt its running max (rescaling
        this half of O and the row sums) and issue O += P V with P from the stage's rope block
        (the caller waits for it and releases the stage); if skipped, release the stage now."""
        stage = j % 2
        if kept != 0:
            m_new = cute.make_rmem_tensor(n_rows_thr, Float32)
            for r in cutlass.range_constexpr(n_rows_thr):
                m_new[r] = sRunMax[r, tid_wg]
            rescale_rows(acc_O, softmax.absorb_max(m_new))
            wgmma(tiled_mma_pv, acc_O, tOrPs[None, None, None, stage],
                  tOrVt[None, None, None, stage], False)
        else:
            self.release_stage(mbar_empty, stage, cta_rank)
