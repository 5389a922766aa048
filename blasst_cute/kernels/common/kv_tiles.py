"""Key tiles of a split-KV decode CTA and the page / row-block coordinates of their TMA copies
(paged or contiguous cache). Shared by the sm90 decode and MLA decode kernels; plain Python
(no dynamic control flow), traced inline into the kernels."""

import cutlass
from cutlass import Int32


def visited_tile_count(seqlen_k, seqlen_q, m_block, rows_per_pos, tile_m: int, tile_n: int,
                       causal: bool):
    """Key tiles the q-tile sees: all of them, or (causal) up to the one holding the last key
    visible to its last valid row. Rows of a q-tile pack rows_per_pos rows per new token
    (bottom-right aligned causality)."""
    n_visit = (seqlen_k + tile_n - 1) // tile_n
    if causal:
        # Last key seen by the q-tile's last valid row (bottom-right aligned).
        pos_max = cutlass.min((m_block * tile_m + tile_m - 1) // rows_per_pos, seqlen_q - 1)
        last_key = pos_max + seqlen_k - seqlen_q
        n_visit = cutlass.max(last_key + tile_n, 0) // tile_n
    return n_visit


def split_tile_range(seqlen_k, seqlen_q, m_block, rows_per_pos, split_idx, num_splits,
                     tile_m: int, tile_n: int, causal: bool):
    """(tile_lo, tile_hi, n_local): the split's contiguous slice of the key tiles the q-tile sees;
    each split takes ceil(n_visit / num_splits) tiles (at least one)."""
    n_visit = visited_tile_count(seqlen_k, seqlen_q, m_block, rows_per_pos, tile_m, tile_n, causal)
    split_len = cutlass.max((n_visit + num_splits - 1) // num_splits, 1)
    tile_lo = split_idx * split_len
    tile_hi = cutlass.min(tile_lo + split_len, n_visit)
    n_local = cutlass.max(tile_hi - tile_lo, 0)
    return tile_lo, tile_hi, n_local


def split_tiles_interleaved(seqlen_k, seqlen_q, m_block, rows_per_pos, split_idx, num_splits,
                            tile_m: int, tile_n: int, causal: bool):
    """(first tile, tile step, n_local): the split's tiles when splits interleave, split s taking
    tiles s, s + num_splits, s + 2 num_splits, ... of the visited range. Every split then samples
    the whole sequence, so the kept tiles (clustered at the sinks and the recent keys) spread
    evenly over the CTAs, and each split's running max sees the high-scoring regions early."""
    n_visit = visited_tile_count(seqlen_k, seqlen_q, m_block, rows_per_pos, tile_m, tile_n, causal)
    n_local = cutlass.max((n_visit - split_idx + num_splits - 1) // num_splits, 0)
    return split_idx, num_splits, n_local


def page_copy_coords(tile, c: int, seqlen_k, tile_n: int, rows_per_copy: int, page_size,
                     paged: bool):
    """(page slot in the block table, row block inside the page) of copy c of a key tile.
    Contiguous cache: (0, tile)."""
    if paged:
        key0 = tile * tile_n + c * rows_per_copy
        last_page = cutlass.max((seqlen_k + page_size - 1) // page_size - 1, 0)
        # Copies past the sequence's last page re-read that page (finite data, masked out).
        slot = cutlass.min(key0 // page_size, last_page)
        rb = (key0 % page_size) // rows_per_copy
        return slot, rb
    return Int32(0), tile
