"""Layout views of wgmma fragments (SM90) used by softmax, masking and the epilogue."""

from typing import Optional

import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_helpers
from cutlass import const_expr
from cutlass.cute.nvgpu import warpgroup
from cutlass.tensor_utils import LayoutEnum


def smem_layout(dtype, rows: int, cols: int, stages: Optional[int] = None):
    """Row-major (rows, cols[, stages]) smem layout with the widest wgmma swizzle atom for cols."""
    atom = warpgroup.make_smem_layout_atom(
        sm90_helpers.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dtype, cols), dtype
    )
    if stages is None:
        return cute.tile_to_shape(atom, (rows, cols), order=(0, 1))
    return cute.tile_to_shape(atom, (rows, cols, stages), order=(0, 1, 2))


def select_modes(t: cute.Tensor, modes) -> cute.Tensor:
    """Re-order the modes of a tensor (no data movement)."""
    return cute.make_tensor(t.iterator, cute.select(t.layout, mode=list(modes)))


def assume_rows_aligned(t: cute.Tensor, align_bits: int = 128) -> cute.Tensor:
    """Assert every stride but the last (contiguous) one is a multiple of 16 bytes."""
    divby = align_bits // t.element_type.width
    strides = tuple(
        s if isinstance(s, int) else cute.assume(s, divby=divby) for s in t.stride[:-1]
    )
    return cute.make_tensor(t.iterator, cute.make_layout(t.shape, stride=(*strides, t.stride[-1])))


def transpose_mn(t: cute.Tensor) -> cute.Tensor:
    """View an (M, N, ...) smem tensor as (N, M, ...)."""
    shape = (t.shape[1], t.shape[0], *t.shape[2:])
    order = (1, 0, *range(2, cute.rank(t)))
    return cute.composition(t, cute.make_ordered_layout(shape, order=order))


def _acc_layout_rows_cols(acc_layout: cute.Layout) -> cute.Layout:
    # wgmma accumulator per thread: ((2, 2, V), MMA_M, MMA_N).
    #   mode 0.0: 2 adjacent columns, mode 0.1: rows r and r + 8, mode 0.2: V column groups of 8.
    # Rows view: ((2, MMA_M), (2, V, MMA_N)).
    flat = cute.make_layout(acc_layout.shape)
    s, d = flat.shape, flat.stride
    rows_shape = (s[0][1], s[1])
    rows_stride = (d[0][1], d[1])
    cols_shape = (s[0][0], *s[0][2:], s[2])
    cols_stride = (d[0][0], *d[0][2:], d[2])
    view = cute.make_layout((rows_shape, cols_shape), stride=(rows_stride, cols_stride))
    return cute.composition(acc_layout, view)


def acc_rows_cols(acc: cute.Tensor) -> cute.Tensor:
    """(rows, cols) view of an SM90 wgmma accumulator fragment owned by one thread."""
    return cute.make_tensor(acc.iterator, _acc_layout_rows_cols(acc.layout))


def acc_as_operand_a(acc: cute.Tensor) -> cute.Tensor:
    """View a 16-bit-convertible QK accumulator as the register A operand of the PV wgmma.

    ((2, 2, V), MMA_M, MMA_N) -> ((2, 2, 2), MMA_M, (V / 2, MMA_N)): every k-block of 16 columns
    of P is two 8-column accumulator groups.
    """
    l = acc.layout
    assert cute.rank(l.shape[0]) == 3
    pair = 2 if const_expr(l.shape[0][2] % 2 == 0) else 1
    d = cute.logical_divide(l, ((None, None, pair), None, None))
    view = cute.make_layout(
        ((d.shape[0][0], d.shape[0][1], d.shape[0][2][0]), d.shape[1], (d.shape[0][2][1], d.shape[2])),
        stride=(
            (d.stride[0][0], d.stride[0][1], d.stride[0][2][0]),
            d.stride[1],
            (d.stride[0][2][1], d.stride[2]),
        ),
    )
    return cute.make_tensor(acc.iterator, view)
