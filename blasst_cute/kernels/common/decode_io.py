"""Gmem I/O of the sm90 decode and MLA decode kernels.

Host side (trace time): their gmem tensors from raw pointers and sizes, q / O in (b, lq, h, d),
lse in (b, h, lq), the per-split fp32 partials, the small per-sequence index tensors; called
from the ``@cute.jit`` pointer entry points (``launch_ptrs``), plain Python traced inline.
Device side: the epilogue's stores of the valid rows of a packed q-tile (``store_out_lse``).
"""

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr

from blasst_cute.kernels.common.layout import acc_rows_cols


def bshd_tensor(ptr: cute.Pointer, batch, seqlen, heads, d: int) -> cute.Tensor:
    """(b, lq, h, d), contiguous."""
    return cute.make_tensor(ptr, cute.make_layout(
        (batch, seqlen, heads, d), stride=(seqlen * heads * d, heads * d, d, 1)))


def lse_tensor(ptr: cute.Pointer, batch, heads, seqlen) -> cute.Tensor:
    """(b, h, lq), contiguous."""
    return cute.make_tensor(ptr, cute.make_layout(
        (batch, heads, seqlen), stride=(heads * seqlen, seqlen, 1)))


def out_lse_tensors(o_ptr: cute.Pointer, lse_ptr: cute.Pointer, batch, seqlen_q, num_heads,
                    dv: int, num_splits, direct: bool):
    """(mO, mLSE) of a decode launch. direct: O (b, lq, h, dv) and lse (b, h, lq); else the
    per-split partials O (splits, b, lq, h, dv) and lse (splits, b, h, lq)."""
    if direct:
        return (bshd_tensor(o_ptr, batch, seqlen_q, num_heads, dv),
                lse_tensor(lse_ptr, batch, num_heads, seqlen_q))
    per_split = batch * seqlen_q * num_heads * dv
    mO = cute.make_tensor(o_ptr, cute.make_layout(
        (num_splits, batch, seqlen_q, num_heads, dv),
        stride=(per_split, seqlen_q * num_heads * dv, num_heads * dv, dv, 1)))
    mLSE = cute.make_tensor(lse_ptr, cute.make_layout(
        (num_splits, batch, num_heads, seqlen_q),
        stride=(batch * num_heads * seqlen_q, num_heads * seqlen_q, seqlen_q, 1)))
    return mO, mLSE


def vector_tensor(ptr, batch):
    """(b,) contiguous, or None without a pointer (seqlens, per-sequence factors, counters)."""
    if ptr is None:
        return None
    return cute.make_tensor(ptr, cute.make_layout((batch,)))


def block_table_tensor(bt_ptr, batch, max_pages, bt_stride):
    """(b, max_pages) int32 with row stride bt_stride, or None (contiguous cache)."""
    if bt_ptr is None:
        return None
    return cute.make_tensor(bt_ptr, cute.make_layout((batch, max_pages), stride=(bt_stride, 1)))


@cute.jit
def store_out_lse(
    acc_O: cute.Tensor, lse: cute.Tensor, thr_mma_pv, mO: cute.Tensor, mLSE: cute.Tensor,
    m_block: Int32, num_rows: Int32, rows_per_pos: Int32, head_kv, batch_idx: Int32,
    split_idx: Int32,
    n_rows_thr: cutlass.Constexpr[int], tile_m: cutlass.Constexpr[int],
    head_dim_v: cutlass.Constexpr[int], direct: cutlass.Constexpr[bool], out_dtype,
):
    """Epilogue stores of this thread's rows of a packed q-tile: the normalized acc_O (the PV
    accumulator of thr_mma_pv) and lse (one value per row, written by the thread holding
    column 0). Packed row r of q-tile m_block is new token r // rows_per_pos, head
    head_kv * rows_per_pos + r % rows_per_pos (head_kv None: r % rows_per_pos). direct: O
    (b, lq, h, dv) in out_dtype and lse (b, h, lq); else the fp32 partials of split_idx."""
    cO = cute.make_identity_tensor((tile_m, head_dim_v))
    tOcO_mn = acc_rows_cols(thr_mma_pv.partition_C(cO))
    acc_O_mn = acc_rows_cols(acc_O)
    for r in cutlass.range_constexpr(n_rows_thr):
        grow = m_block * tile_m + tOcO_mn[r, 0][0]
        if grow < num_rows:
            pos = grow // rows_per_pos
            if const_expr(head_kv is None):
                head = grow - pos * rows_per_pos
            else:
                head = head_kv * rows_per_pos + (grow - pos * rows_per_pos)
            if const_expr(direct):
                gO = mO[batch_idx, pos, head, None]
            else:
                gO = mO[split_idx, batch_idx, pos, head, None]
            for c in cutlass.range_constexpr(cute.size(acc_O_mn, mode=[1])):
                val = acc_O_mn[r, c]
                if const_expr(direct):
                    gO[tOcO_mn[r, c][1]] = val.to(out_dtype)
                else:
                    gO[tOcO_mn[r, c][1]] = val
            if tOcO_mn[r, 0][1] == 0:
                if const_expr(direct):
                    mLSE[batch_idx, head, pos] = lse[r]
                else:
                    mLSE[split_idx, batch_idx, head, pos] = lse[r]
