"""Per-CTA sequence and key-tile bookkeeping (dense batch or varlen via cu_seqlens)."""

from typing import Optional

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr


class SeqInfo:
    """Lengths and packed offsets of one batch entry."""

    def __init__(
        self,
        batch_idx: Int32,
        seqlen_q_static,
        seqlen_k_static,
        mCuSeqlensQ: Optional[cute.Tensor] = None,
        mCuSeqlensK: Optional[cute.Tensor] = None,
    ):
        self.varlen_q = mCuSeqlensQ is not None
        self.varlen_k = mCuSeqlensK is not None
        if const_expr(self.varlen_q):
            self.offset_q = mCuSeqlensQ[batch_idx]
            self.seqlen_q = mCuSeqlensQ[batch_idx + 1] - self.offset_q
        else:
            self.offset_q = Int32(0)
            self.seqlen_q = Int32(seqlen_q_static)
        if const_expr(self.varlen_k):
            self.offset_k = mCuSeqlensK[batch_idx]
            self.seqlen_k = mCuSeqlensK[batch_idx + 1] - self.offset_k
        else:
            self.offset_k = Int32(0)
            self.seqlen_k = Int32(seqlen_k_static)

    def q_slice(self, mX: cute.Tensor, head: Int32, batch: Int32) -> cute.Tensor:
        """(seqlen, d) view of Q/O for (head, batch). mX is (s, d, h, b) or varlen (total, d, h)."""
        if const_expr(self.varlen_q):
            return cute.domain_offset((self.offset_q, 0), mX[None, None, head])
        return mX[None, None, head, batch]

    def k_slice(self, mX: cute.Tensor, head: Int32, batch: Int32) -> cute.Tensor:
        if const_expr(self.varlen_k):
            return cute.domain_offset((self.offset_k, 0), mX[None, None, head])
        return mX[None, None, head, batch]

    def lse_slice(self, mLSE: cute.Tensor, head: Int32, batch: Int32) -> cute.Tensor:
        """(seqlen,) view of LSE. mLSE is (s, h, b) or varlen (total, h)."""
        if const_expr(self.varlen_q):
            return cute.domain_offset((self.offset_q,), mLSE[None, head])
        return mLSE[None, head, batch]


class KeyTileRange:
    """Key tiles a q-tile visits: those holding a key visible to at least one of its valid rows.

    Bottom-right causal: row i sees key j iff j <= i + Lk - Lq.  Tiles are visited from
    n_block_max - 1 down to n_block_min ("reverse" order); tiles at or above ``n_block_causal``
    cross the diagonal and need the causal mask.
    """

    def __init__(self, tile_m: int, tile_n: int, causal: bool):
        self.tile_m = tile_m
        self.tile_n = tile_n
        self.causal = causal

    @cute.jit
    def get(self, seq: SeqInfo, m_block: Int32):
        n_block_max = (seq.seqlen_k + self.tile_n - 1) // self.tile_n
        n_block_min = Int32(0)
        n_block_causal = n_block_max
        if const_expr(self.causal):
            # Last key seen by the tile's last row (padding rows only see keys >= Lk).
            n_idx = (m_block + 1) * self.tile_m + seq.seqlen_k - seq.seqlen_q
            n_idx = cutlass.max(n_idx, 0)
            n_block_max = cutlass.min(n_block_max, (n_idx + self.tile_n - 1) // self.tile_n)
            first_diag = cutlass.max(m_block * self.tile_m + seq.seqlen_k - seq.seqlen_q, 0)
            n_block_causal = cutlass.max(first_diag // self.tile_n, n_block_min)
        return n_block_min, n_block_max, n_block_causal
