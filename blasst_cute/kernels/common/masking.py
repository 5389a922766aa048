"""Causal (bottom-right) and key-length masks applied to a QK^T accumulator tile.

Query i of a sequence sees key j iff j < Lk and (not causal or j <= i + Lk - Lq).
Masked scores become -inf.
"""

import cutlass
import cutlass.cute as cute
from cutlass import Boolean, Float32, Int32, const_expr

from blasst_cute.kernels.common.layout import acc_rows_cols


@cute.jit
def apply_mask(
    acc_S: cute.Tensor,
    tScS: cute.Tensor,
    t0ScS: cute.Tensor,
    m_block: Int32,
    n_block: Int32,
    seqlen_q: Int32,
    seqlen_k: Int32,
    tile_m: cutlass.Constexpr[int],
    tile_n: cutlass.Constexpr[int],
    mask_seqlen: cutlass.Constexpr[bool],
    mask_causal: cutlass.Constexpr[bool],
):
    """Mask one (tile_m, tile_n) score tile.

    tScS / t0ScS: identity-tensor partitions of this thread and of thread 0. Column tests use
    thread 0's (compile-time) column offsets against a limit shifted by this thread's offset.
    """
    if const_expr(mask_seqlen or mask_causal):
        s_mn = acc_rows_cols(acc_S)
        c_mn = acc_rows_cols(tScS)
        c0_mn = acc_rows_cols(t0ScS)
        thr_col = c_mn[0, 0][1]
        key_limit = seqlen_k - n_block * tile_n - thr_col
        ncol = cute.size(s_mn, mode=[1])
        if const_expr(not mask_causal):
            for c in cutlass.range_constexpr(ncol):
                oob = c0_mn[0, c][1] >= key_limit
                for r in cutlass.range_constexpr(cute.size(s_mn, mode=[0])):
                    s_mn[r, c] = -Float32.inf if oob else s_mn[r, c]
        else:
            diag = seqlen_k - seqlen_q - n_block * tile_n - thr_col + 1
            for r in cutlass.range_constexpr(cute.size(s_mn, mode=[0])):
                row = c_mn[r, 0][0] + m_block * tile_m
                limit = row + diag
                if const_expr(mask_seqlen):
                    limit = cutlass.min(limit, key_limit)
                for c in cutlass.range_constexpr(ncol):
                    s_mn[r, c] = -Float32.inf if c0_mn[0, c][1] >= limit else s_mn[r, c]


@cute.jit
def packed_row_limits(
    tScS_mn: cute.Tensor,
    n_rows_thr: cutlass.Constexpr[int],
    m_block: Int32,
    tile_m: cutlass.Constexpr[int],
    num_rows: Int32,
    rows_per_pos: Int32,
    seqlen_q: Int32,
    seqlen_k: Int32,
    causal: cutlass.Constexpr[bool],
):
    """Decode q-tiles that pack rows_per_pos rows per new token (row r: token r // rows_per_pos).

    Returns (row_valid, row_limit, mask_from) for this thread's rows (tScS_mn: its identity
    partition in (row, col) view): row < num_rows, the exclusive key limit of each row, and the
    first key index any row of any q-tile masks (tiles ending at or before it need no mask)."""
    row_valid = cute.make_rmem_tensor(n_rows_thr, Boolean)
    row_limit = cute.make_rmem_tensor(n_rows_thr, Int32)
    for r in cutlass.range_constexpr(n_rows_thr):
        grow = m_block * tile_m + tScS_mn[r, 0][0]
        row_valid[r] = grow < num_rows
        lim = seqlen_k
        if const_expr(causal):
            lim = cutlass.min(lim, grow // rows_per_pos + seqlen_k - seqlen_q + 1)
        row_limit[r] = lim
    mask_from = seqlen_k
    if const_expr(causal):
        mask_from = cutlass.min(seqlen_k, seqlen_k - seqlen_q + 1)
    return row_valid, row_limit, mask_from
