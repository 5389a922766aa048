# blasst_cute: merge of split-KV decode partials by their log-sum-exp (any arch >= sm_80 code,
# compiled for sm_90a here).
#
# One warp per output row (b, pos, head): lanes reduce the split lse values (max, then the sum of
# exp(lse_s - max)), then accumulate O = sum_s exp(lse_s - lse) * O_s with each lane owning
# head_dim / 32 contiguous columns. Splits with lse = -inf (no key, or no tile in the split) are
# not read at all, so whatever their O slot holds cannot leak in; a row whose splits are all empty
# gets O = 0 and lse = -inf.

import math

import cuda.bindings.driver as cuda

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
ROWS_PER_CTA = 4


class BlasstDecodeCombineSm90:
    def __init__(self, dtype, head_dim: int):
        if dtype not in (cutlass.BFloat16, cutlass.Float16):
            raise NotImplementedError(f"blasst combine: dtype {dtype}")
        if head_dim % 32 != 0:
            raise NotImplementedError(f"blasst combine: head_dim {head_dim} (multiple of 32)")
        self.dtype = dtype
        self.head_dim = head_dim
        self.per_lane = head_dim // 32

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
        total = mO.shape[0] * mO.shape[1] * mO.shape[2]
        self.kernel(mOp, mLSEp, mO, mLSE, total).launch(
            grid=[(total + ROWS_PER_CTA - 1) // ROWS_PER_CTA, 1, 1],
            block=[32 * ROWS_PER_CTA, 1, 1],
            stream=stream,
        )

    @cute.kernel
    def kernel(self, mOp: cute.Tensor, mLSEp: cute.Tensor, mO: cute.Tensor, mLSE: cute.Tensor,
               total: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % 32
        row = bidx * ROWS_PER_CTA + tidx // 32
        if row < total:
            num_heads = mO.shape[2]
            seqlen_q = mO.shape[1]
            head = row % num_heads
            t = row // num_heads
            pos = t % seqlen_q
            b = t // seqlen_q
            merge_split_row(mOp, mLSEp, mO, mLSE, b, pos, head, lane)


@cute.jit
def merge_split_row(mOp: cute.Tensor, mLSEp: cute.Tensor, mO: cute.Tensor, mLSE: cute.Tensor,
                    b: Int32, pos: Int32, head: Int32, lane: Int32):
    """One warp merges output row (b, pos, head) from its split partials (see the module comment).

    mOp fp32 (splits, b, lq, hq, d), mLSEp fp32 (splits, b, hq, lq), mO (b, lq, hq, d) in the
    output dtype, mLSE fp32 (b, hq, lq). Also used by the decode kernel's fused merge."""
    per_lane = mO.shape[3] // 32
    num_splits = mOp.shape[0]
    m = -Float32.inf
    for s in cutlass.range(lane, num_splits, 32, unroll=1):
        m = cute.arch.fmax(m, mLSEp[s, b, head, pos])
    m = cute.arch.warp_reduction_max(m)
    m_safe = Float32(0.0) if m == -Float32.inf else m
    total_w = Float32(0.0)
    for s in cutlass.range(lane, num_splits, 32, unroll=1):
        total_w += cute.math.exp2((mLSEp[s, b, head, pos] - m_safe) * LOG2_E, fastmath=True)
    total_w = cute.arch.warp_reduction(total_w, lambda x, y: x + y)
    lse = -Float32.inf
    if total_w > Float32(0.0):
        lse = m_safe + cute.math.log2(total_w, fastmath=False) * LN_2

    acc = cute.make_rmem_tensor((per_lane,), Float32)
    acc.fill(0.0)
    part = cute.make_rmem_tensor((per_lane,), Float32)
    # Unrolled so that several splits' loads are in flight at once (the loop is latency-bound
    # otherwise); an empty split's O slot is loaded but never used.
    for s in cutlass.range(num_splits, unroll=4):
        ls = mLSEp[s, b, head, pos]
        src = cute.local_tile(mOp[s, b, pos, head, None], (per_lane,), (lane,))
        cute.autovec_copy(src, part)
        if ls > -Float32.inf:
            w = cute.math.exp2((ls - lse) * LOG2_E, fastmath=True)
            for j in cutlass.range_constexpr(per_lane):
                acc[j] = acc[j] + w * part[j]
    out = cute.make_rmem_tensor((per_lane,), mO.element_type)
    out.store(acc.load().to(mO.element_type))
    cute.autovec_copy(out, cute.local_tile(mO[b, pos, head, None], (per_lane,), (lane,)))
    if lane == 0:
        mLSE[b, head, pos] = lse
