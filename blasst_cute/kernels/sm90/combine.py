# blasst_cute: merge of split-KV decode partials by their log-sum-exp (any arch >= sm_80 code,
# compiled for sm_90a here).
#
# One warp per output row (b, pos, head) and chunk of COLS_PER_WARP columns (wide rows, e.g.
# MLA's 512, take several warps: more CTAs pull the partials in): lanes reduce the split lse
# values (max, then the sum of exp(lse_s - max)), then accumulate O = sum_s exp(lse_s - lse) * O_s,
# each lane owning contiguous columns of the chunk. Splits with lse = -inf (no key, or no tile in
# the split) get no weight, so whatever their O slot holds cannot leak in; a row whose splits are
# all empty gets O = 0 and lse = -inf. merge_split_rows_pipelined: the same merge with the loads of
# a batch of splits in flight together (the decode combine's default and the fused merge's).

import math
from typing import Optional

import cuda.bindings.driver as cuda

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
ROWS_PER_CTA = 4  # warps per CTA
COLS_PER_WARP = 128


class BlasstDecodeCombineSm90:
    def __init__(self, dtype, head_dim: int, use_pdl: bool = False, pipelined: bool = False):
        if dtype not in (cutlass.BFloat16, cutlass.Float16):
            raise NotImplementedError(f"blasst combine: dtype {dtype}")
        if head_dim % 32 != 0:
            raise NotImplementedError(f"blasst combine: head_dim {head_dim} (multiple of 32)")
        self.dtype = dtype
        self.head_dim = head_dim
        # Programmatic dependent launch: the grid may start while the split kernel before it
        # drains (launch latency hidden); it reads the partials only after griddepcontrol.wait.
        self.use_pdl = use_pdl
        # One-chunk rows (head_dim <= 128): merge_split_rows_pipelined, the loads of up to 16
        # splits in flight together, instead of merge_split_row.
        self.pipelined = pipelined
        # Column chunks per row: one warp each when head_dim is a multiple of COLS_PER_WARP.
        self.chunks = head_dim // COLS_PER_WARP if head_dim % COLS_PER_WARP == 0 else 1

    @cute.jit
    def launch_ptrs(
        self,
        op_ptr: cute.Pointer,  # fp32 (splits, b, lq, hq, d) contiguous
        lsep_ptr: cute.Pointer,  # fp32 (splits, b, hq, lq) contiguous
        o_ptr: cute.Pointer,  # (b, lq, hq, d) contiguous, q dtype
        lse_ptr: cute.Pointer,  # fp32 (b, hq, lq) contiguous
        num_splits: Int32, batch: Int32, seqlen_q: Int32, num_heads: Int32,
        stream: cuda.CUstream,
    ):
        """Pointer entry point (low host overhead)."""
        d = self.head_dim
        row = seqlen_q * num_heads * d
        mOp = cute.make_tensor(op_ptr, cute.make_layout(
            (num_splits, batch, seqlen_q, num_heads, d),
            stride=(batch * row, row, num_heads * d, d, 1)))
        mLSEp = cute.make_tensor(lsep_ptr, cute.make_layout(
            (num_splits, batch, num_heads, seqlen_q),
            stride=(batch * num_heads * seqlen_q, num_heads * seqlen_q, seqlen_q, 1)))
        mO = cute.make_tensor(o_ptr, cute.make_layout(
            (batch, seqlen_q, num_heads, d), stride=(row, num_heads * d, d, 1)))
        mLSE = cute.make_tensor(lse_ptr, cute.make_layout(
            (batch, num_heads, seqlen_q), stride=(num_heads * seqlen_q, seqlen_q, 1)))
        self.__call__(mOp, mLSEp, mO, mLSE, stream)

    @cute.jit
    def __call__(
        self,
        mOp: cute.Tensor,  # fp32 (splits, b, lq, hq, d)
        mLSEp: cute.Tensor,  # fp32 (splits, b, hq, lq)
        mO: cute.Tensor,  # (b, lq, hq, d) in the q dtype
        mLSE: cute.Tensor,  # fp32 (b, hq, lq)
        stream: cuda.CUstream,
    ):
        if const_expr(mO.element_type != self.dtype):
            raise TypeError(f"expected {self.dtype}, got {mO.element_type}")
        total = mO.shape[0] * mO.shape[1] * mO.shape[2] * self.chunks
        self.kernel(mOp, mLSEp, mO, mLSE, total).launch(
            grid=[(total + ROWS_PER_CTA - 1) // ROWS_PER_CTA, 1, 1],
            block=[32 * ROWS_PER_CTA, 1, 1],
            stream=stream,
            use_pdl=self.use_pdl,
        )

    @cute.kernel
    def kernel(self, mOp: cute.Tensor, mLSEp: cute.Tensor, mO: cute.Tensor, mLSE: cute.Tensor,
               total: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        if const_expr(self.use_pdl):
            cute.arch.griddepcontrol_wait()  # the partials are complete and visible
            cute.arch.griddepcontrol_launch_dependents()
        lane = tidx % 32
        item = bidx * ROWS_PER_CTA + tidx // 32
        if item < total:
            num_heads = mO.shape[2]
            seqlen_q = mO.shape[1]
            row = item // self.chunks
            chunk = item - row * self.chunks
            head = row % num_heads
            t = row // num_heads
            pos = t % seqlen_q
            b = t // seqlen_q
            if const_expr(self.chunks == 1 and self.pipelined):
                merge_split_rows_pipelined(mOp, mLSEp, mO, mLSE, b, [pos], [head], None, lane)
            elif const_expr(self.chunks == 1):
                merge_split_row(mOp, mLSEp, mO, mLSE, b, pos, head, lane)
            else:
                merge_split_rows(mOp, mLSEp, mO, mLSE, b, [pos], [head], None, lane,
                                 per_lane=COLS_PER_WARP // 32, chunk=chunk)


@cute.jit
def merge_split_row(mOp: cute.Tensor, mLSEp: cute.Tensor, mO: cute.Tensor, mLSE: cute.Tensor,
                    b: Int32, pos: Int32, head: Int32, lane: Int32):
    """One warp merges output row (b, pos, head) from its split partials (see the module comment).

    mOp fp32 (splits, b, lq, hq, d), mLSEp fp32 (splits, b, hq, lq), mO (b, lq, hq, d) in the
    output dtype, mLSE fp32 (b, hq, lq)."""
    merge_split_rows(mOp, mLSEp, mO, mLSE, b, [pos], [head], None, lane)


@cute.jit
def merged_lse(mLSEp: cute.Tensor, num_splits: Int32, b: Int32, pos: list, head: list,
               lane: Int32) -> cute.Tensor:
    """The merged lse of rows (b, pos[i], head[i]) over all splits: per-row max, then the sum of
    exp over the splits' lse (lanes stride the splits; the second pass re-reads what the first
    brought into L1); -inf for a row every split left empty."""
    n = len(pos)
    mx = cute.make_rmem_tensor((n,), Float32)
    mx.fill(-Float32.inf)
    for s in cutlass.range(lane, num_splits, 32, unroll=1):
        for i in cutlass.range_constexpr(n):
            mx[i] = cute.arch.fmax(mx[i], mLSEp[s, b, head[i], pos[i]])
    m_safe = cute.make_rmem_tensor((n,), Float32)
    for i in cutlass.range_constexpr(n):
        m = cute.arch.warp_reduction_max(mx[i])
        m_safe[i] = Float32(0.0) if m == -Float32.inf else m
    tot = cute.make_rmem_tensor((n,), Float32)
    tot.fill(0.0)
    for s in cutlass.range(lane, num_splits, 32, unroll=1):
        for i in cutlass.range_constexpr(n):
            tot[i] += cute.math.exp2((mLSEp[s, b, head[i], pos[i]] - m_safe[i]) * LOG2_E, fastmath=True)
    lse = cute.make_rmem_tensor((n,), Float32)
    for i in cutlass.range_constexpr(n):
        total_w = cute.arch.warp_reduction(tot[i], lambda x, y: x + y)
        lse[i] = -Float32.inf
        if total_w > Float32(0.0):
            lse[i] = m_safe[i] + cute.math.log2(total_w, fastmath=False) * LN_2
    return lse


@cute.jit
def _store_rows(mO: cute.Tensor, mLSE: cute.Tensor, accs: list, lse: cute.Tensor, b: Int32,
                pos: list, head: list, valid: Optional[list], lane: Int32, col_tile: Int32,
                per_lane: cutlass.Constexpr):
    """Store the merged rows (valid[i] False: row i is a duplicate and not written)."""
    for i in cutlass.range_constexpr(len(pos)):
        if const_expr(valid is None):
            _store_row(mO, mLSE, accs[i], lse[i], b, pos[i], head[i], lane, col_tile, per_lane)
        else:
            if valid[i]:
                _store_row(mO, mLSE, accs[i], lse[i], b, pos[i], head[i], lane, col_tile, per_lane)


@cute.jit
def merge_split_rows(mOp: cute.Tensor, mLSEp: cute.Tensor, mO: cute.Tensor, mLSE: cute.Tensor,
                     b: Int32, pos: list, head: list, valid: Optional[list], lane: Int32,
                     per_lane: cutlass.Constexpr = None, chunk: Int32 = 0):
    """One warp merges the output rows (b, pos[i], head[i]) of sequence b together: every load of
    a split serves all of them, so the warp waits for memory once per split batch instead of once
    per row and split (the fused merge of a GQA tile has up to 16 rows per warp's share and up to
    ~130 splits). valid[i] False: row i is not written (a duplicate padding the batch); None: all
    rows are written. Lanes own head_dim / 32 contiguous columns, or, with per_lane, the warp
    covers columns [chunk * 32 * per_lane, (chunk + 1) * 32 * per_lane) (chunk 0 writes lse)."""
    n = len(pos)
    if const_expr(per_lane is None):
        per_lane = mO.shape[3] // 32
    col_tile = chunk * 32 + lane
    num_splits = mOp.shape[0]
    lse = merged_lse(mLSEp, num_splits, b, pos, head, lane)

    accs = [cute.make_rmem_tensor((per_lane,), Float32) for _ in range(n)]
    parts = [cute.make_rmem_tensor((per_lane,), Float32) for _ in range(n)]
    for i in cutlass.range_constexpr(n):
        accs[i].fill(0.0)
    # Unrolled so that several splits' loads are in flight at once (the loop is latency-bound
    # otherwise); an empty split's O slot is loaded but never used.
    for s in cutlass.range(num_splits, unroll=8 if n * per_lane <= 8 else 4):
        for i in cutlass.range_constexpr(n):
            src = cute.local_tile(mOp[s, b, pos[i], head[i], None], (per_lane,), (col_tile,))
            cute.autovec_copy(src, parts[i])
        for i in cutlass.range_constexpr(n):
            ls = mLSEp[s, b, head[i], pos[i]]
            if ls > -Float32.inf:
                w = cute.math.exp2((ls - lse[i]) * LOG2_E, fastmath=True)
                for j in cutlass.range_constexpr(per_lane):
                    accs[i][j] = accs[i][j] + w * parts[i][j]
    _store_rows(mO, mLSE, accs, lse, b, pos, head, valid, lane, col_tile, per_lane)


@cute.jit
def _store_row(mO: cute.Tensor, mLSE: cute.Tensor, acc: cute.Tensor, lse: Float32, b: Int32,
               pos: Int32, head: Int32, lane: Int32, col_tile: Int32, per_lane: cutlass.Constexpr):
    out = cute.make_rmem_tensor((per_lane,), mO.element_type)
    out.store(acc.load().to(mO.element_type))
    cute.autovec_copy(out, cute.local_tile(mO[b, pos, head, None], (per_lane,), (col_tile,)))
    if col_tile == 0:  # lane 0 of chunk 0
        mLSE[b, head, pos] = lse


@cute.jit
def merge_split_rows_pipelined(mOp: cute.Tensor, mLSEp: cute.Tensor, mO: cute.Tensor,
                               mLSE: cute.Tensor, b: Int32, pos: list, head: list,
                               valid: Optional[list], lane: Int32):
    """:func:`merge_split_rows` (lanes own head_dim / 32 contiguous columns) with the O pass
    software-pipelined for a latency-bound merge (the fused merge of the decode kernel: one CTA
    reads every split's partial of its q-tile from L2). The O loads of a batch of splits (all
    rows) are issued before any is used and the batch has no branch: a split with lse = -inf is
    masked by a select, not skipped, so a batch costs one memory round trip instead of one per
    split. Splits per batch: 64 registers of partials per lane."""
    n = len(pos)
    per_lane = mO.shape[3] // 32
    num_splits = mOp.shape[0]
    batch = min(16, max(1, 64 // (n * per_lane)))
    lse = merged_lse(mLSEp, num_splits, b, pos, head, lane)

    accs = [cute.make_rmem_tensor((per_lane,), Float32) for _ in range(n)]
    for i in cutlass.range_constexpr(n):
        accs[i].fill(0.0)
    parts = [[cute.make_rmem_tensor((per_lane,), Float32) for _ in range(n)] for _ in range(batch)]
    lsp = cute.make_rmem_tensor((batch, n), Float32)
    for s0 in cutlass.range(0, num_splits, batch, unroll=1):
        # Loads first (splits past the end re-read the last one and get no weight) ...
        for j in cutlass.range_constexpr(batch):
            s = cutlass.min(s0 + j, num_splits - 1)
            for i in cutlass.range_constexpr(n):
                src = cute.local_tile(mOp[s, b, pos[i], head[i], None], (per_lane,), (lane,))
                cute.autovec_copy(src, parts[j][i])
                lsp[j, i] = mLSEp[s, b, head[i], pos[i]]
        # ... then the weighted sums.
        for j in cutlass.range_constexpr(batch):
            for i in cutlass.range_constexpr(n):
                ls = lsp[j, i]
                use = s0 + j < num_splits and ls > -Float32.inf
                w = cute.math.exp2((ls - lse[i]) * LOG2_E, fastmath=True)
                w = w if use else Float32(0.0)
                for e in cutlass.range_constexpr(per_lane):
                    term = w * parts[j][i][e]
                    accs[i][e] = accs[i][e] + (term if use else Float32(0.0))
    _store_rows(mO, mLSE, accs, lse, b, pos, head, valid, lane, lane, per_lane)
