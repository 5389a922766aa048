"""The oracle: exact BLASST semantics in pure torch, for any tile geometry.

Every kernel in this package must reproduce the outputs of this module at its own precision and,
given the kernel's geometry (tile sizes, rows per decision, visit order, splits), its skip
decisions. It also serves as the CPU backend.

Semantics (one q-tile of ``block_m`` rows at a time):

* Rows. ``pack_gqa=False``: the rows of a tile are ``block_m`` consecutive query positions of one
  query head. ``pack_gqa=True``: ``block_m`` consecutive entries of the flattened
  (position, head-in-group) list of one kv head, row ``r = pos * G + g`` with ``G = Hq // Hk``.
* Causal masks are bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + (Lk - Lq)``.
* The tile visits the key tiles (``block_n`` keys each) that hold at least one key visible to at
  least one of its valid rows. ``num_splits`` (or ``split_tiles``) cuts the visited tile range into
  contiguous chunks of ``cs = ceil(n_visit / num_splits)`` tiles (chunk ``c`` holds tile indices
  ``[c·cs, (c+1)·cs)``), each with its own running state, merged by lse; inside a chunk the tiles
  are visited in ascending (``order="forward"``) or descending (``"reverse"``) index order.
  ``interleave_splits=True`` instead deals the visited tiles out round-robin: chunk ``c`` of
  ``num_splits`` holds tiles ``c, c + num_splits, c + 2·num_splits, ...`` (same visit orders).
* ``rows_per_decision`` (default ``block_m``) divides the tile's rows into decision groups that
  decide independently (e.g. one 64-row consumer warpgroup of a 128-row tile).
* ``λ = threshold_scale_factor / Lk`` per sequence. ``None``, ``0`` or ``λ >= 1`` mean no
  skipping for that sequence.
* The first tile of each chunk is never skipped. Any other tile is skipped for a group iff every
  row of the group votes skip. A row votes skip iff it is padding, or sees no key of the tile, or
  ``m_tile - m_run < ln λ``, where ``m_tile`` is its max scaled score over its visible keys of the
  tile and ``m_run`` its running max over the chunk's non-skipped tiles so far.
* A skipped tile changes nothing (m, l, O untouched); otherwise the standard online softmax update.
  Because online softmax is exact, the result equals a softmax over the visible keys of the kept
  tiles, which is how it is computed here (one masked softmax, no sequential accumulation).
* ``out = O / l`` in q's dtype; ``lse = m + ln(l)`` as float32 ``[B, Hq, Lq]``; a row with no
  visible key gives out 0 and lse -inf.
* Stats count (decision group, key tile) pairs, per ``[B, Hq]`` (rows not packed) or ``[B, Hk]``
  (packed). Groups with no valid row are not counted.
* ``rows_per_pv`` (default None: not counted), a multiple of ``rows_per_decision`` dividing
  ``block_m``, adds P·V counts: (P·V group, key tile) pairs, skipped iff every decision group of
  the P·V group skipped the tile (a group of padding rows votes skip). This is the share of the
  P·V MMA a kernel whose MMA spans ``rows_per_pv`` rows skips (a 64-row SM90 warpgroup), and the
  ``s`` of the ideal kernel gain ``1 / (1 - s/2)``. It equals the skip count with
  ``rows_per_decision = rows_per_pv``: a skipping row's tile max is below its running max, so
  the coarser groups' keeps leave its running max unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from .stats import BlasstStats

Factor = Union[None, float, int, torch.Tensor]

# Bound on the fp32 score block materialised at once (elements), ~512 MiB.
_MAX_SCORE_ELEMS = 1 << 27


@dataclass(frozen=True)
class Geometry:
    """The tiling a kernel uses; the reference reproduces its decisions from exactly this."""

    block_m: int = 128
    block_n: int = 128
    pack_gqa: bool = False
    order: str = "forward"
    num_splits: int = 1
    rows_per_decision: Optional[int] = None
    split_tiles: Optional[int] = None
    interleave_splits: bool = False
    rows_per_pv: Optional[int] = None

    def kwargs(self) -> dict:
        return asdict(self)


def _check_geometry(block_m, block_n, order, num_splits, rows_per_decision, split_tiles,
                    interleave_splits=False, rows_per_pv=None):
    if not isinstance(interleave_splits, bool):
        raise TypeError(f"interleave_splits must be a bool, got {interleave_splits!r}")
    if interleave_splits and split_tiles is not None:
        raise ValueError("interleave_splits deals tiles to num_splits chunks: split_tiles must be None")
    if not (isinstance(block_m, int) and block_m > 0):
        raise ValueError(f"block_m must be a positive int, got {block_m!r}")
    if not (isinstance(block_n, int) and block_n > 0):
        raise ValueError(f"block_n must be a positive int, got {block_n!r}")
    if order not in ("forward", "reverse"):
        raise ValueError(f'order must be "forward" or "reverse", got {order!r}')
    if not (isinstance(num_splits, int) and num_splits >= 1):
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    if split_tiles is not None and not (isinstance(split_tiles, int) and split_tiles >= 1):
        raise ValueError(f"split_tiles must be None or an int >= 1, got {split_tiles!r}")
    rpd = block_m if rows_per_decision is None else rows_per_decision
    if not (isinstance(rpd, int) and rpd > 0 and block_m % rpd == 0):
        raise ValueError(
            f"rows_per_decision must be a positive divisor of block_m={block_m}, got {rows_per_decision!r}"
        )
    if rows_per_pv is not None and not (
            isinstance(rows_per_pv, int) and rows_per_pv > 0 and rows_per_pv % rpd == 0
            and block_m % rows_per_pv == 0):
        raise ValueError(
            f"rows_per_pv must be None or a multiple of rows_per_decision={rpd} dividing "
            f"block_m={block_m}, got {rows_per_pv!r}")
    return rpd


def log_threshold(threshold_scale_factor: Factor, seqlens_k: torch.Tensor) -> torch.Tensor:
    """ln λ per sequence as float64 [B]; -inf where skipping is off (factor None/0, λ >= 1, Lk = 0)."""
    lk = seqlens_k.to(torch.float64)
    if threshold_scale_factor is None:
        return torch.full_like(lk, -math.inf)
    f = torch.as_tensor(threshold_scale_factor, dtype=torch.float64).to(lk.device).expand_as(lk)
    lam = f / lk.clamp_min(1)
    on = (f > 0) & (lam < 1) & (lk > 0)
    return torch.where(on, torch.log(lam.clamp_min(1e-300)), torch.full_like(lam, -math.inf))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _units(q, k, v, pack_gqa):
    """Regroup heads into units that own the rows of a tile: a query head, or a kv head with its
    G query heads packed (row r = pos * G + g). Returns qu [B,U,R,D], ku [B,U,Lk,D], vu, row_pos."""
    B, Lq, Hq, D = q.shape
    Hk = k.shape[2]
    G = Hq // Hk
    cdt = _compute_dtype(q.dtype)
    if pack_gqa:
        qu = q.reshape(B, Lq, Hk, G, D).permute(0, 2, 1, 3, 4).reshape(B, Hk, Lq * G, D)
        ku = k.permute(0, 2, 1, 3)
        vu = v.permute(0, 2, 1, 3) if v is not None else None
        row_pos = torch.arange(Lq * G, device=q.device) // G
    else:
        qu = q.permute(0, 2, 1, 3)
        kv_of = torch.arange(Hq, device=q.device) // G
        ku = k.permute(0, 2, 1, 3).index_select(1, kv_of)
        vu = v.permute(0, 2, 1, 3).index_select(1, kv_of) if v is not None else None
        row_pos = torch.arange(Lq, device=q.device)
    return qu.to(cdt), ku.to(cdt), (vu.to(cdt) if vu is not None else None), row_pos


def _score_chunks(qu, ku, row_pos, Lq, causal, scale, block_m, block_n, rpd):
    """Yield the masked scores of consecutive q-tiles, a bounded number at a time.

    Each item: (r0, r1, s [B,U,nt*block_m,n_kt*block_n], m_tile [B,U,nt,ng,rpd,n_kt], n_visit [nt],
    row_valid [nt,ng,rpd], grp_valid [nt,ng]).
    """
    B, U, R, _ = qu.shape
    Lk = ku.shape[2]
    dev = qu.device
    n_qt, n_kt, n_grp = -(-R // block_m), -(-Lk // block_n), block_m // rpd
    key_pos = torch.arange(n_kt * block_n, device=dev)
    key_ok = key_pos < Lk
    tiles_per_chunk = max(1, _MAX_SCORE_ELEMS // max(1, B * U * block_m * n_kt * block_n))
    for t0 in range(0, n_qt, tiles_per_chunk):
        t1 = min(n_qt, t0 + tiles_per_chunk)
        nt = t1 - t0
        rows = torch.arange(t0 * block_m, t1 * block_m, device=dev)
        row_ok = rows < R
        rpos = row_pos[rows.clamp_max(R - 1)]
        vis = row_ok[:, None] & key_ok[None, :]
        if causal:
            vis = vis & (key_pos[None, :] <= rpos[:, None] + (Lk - Lq))
        r0, r1 = t0 * block_m, min(t1 * block_m, R)
        s = torch.full((B, U, nt * block_m, n_kt * block_n), -math.inf, dtype=qu.dtype, device=dev)
        s[:, :, : r1 - r0, :Lk] = (qu[:, :, r0:r1] @ ku.transpose(-1, -2)) * scale
        s = s.masked_fill(~vis, -math.inf)
        m_tile = s.view(B, U, nt, n_grp, rpd, n_kt, block_n).amax(-1)
        # The tiles a q-tile visits: those with a key visible to one of its rows (a prefix).
        tile_vis = vis.view(nt, block_m, n_kt, block_n).any(-1).any(1)
        n_visit = tile_vis.sum(-1)
        assert bool((tile_vis == (torch.arange(n_kt, device=dev)[None] < n_visit[:, None])).all())
        row_valid = row_ok.view(nt, n_grp, rpd)
        yield r0, r1, s, m_tile, n_visit, row_valid, row_valid.any(-1)


def _decide(m_tile, n_visit, row_valid, grp_valid, ln_lam, order, num_splits, split_tiles,
            interleave_splits=False, groups_per_pv=None):
    """The BLASST scan: which (group, key tile) pairs are kept, and the visited/skipped counts.

    m_tile [B,U,nt,ng,rpd,n_kt]; ln_lam [B] (-inf = skipping off). Returns kept [B,U,nt,ng,n_kt]
    (bool), visited [B,U], skipped [B,U] (int64) and, with groups_per_pv (decision groups per
    P·V group), pv [2,B,U] (P·V groups visited, skipped), else None.
    """
    B, U, nt, n_grp, rpd, n_kt = m_tile.shape
    dev = m_tile.device
    visited = torch.zeros(B, U, dtype=torch.int64, device=dev)
    skipped = torch.zeros(B, U, dtype=torch.int64, device=dev)
    pv = torch.zeros(2, B, U, dtype=torch.int64, device=dev) if groups_per_pv else None
    kept = torch.zeros(B, U, nt, n_grp, n_kt, dtype=torch.uint8, device=dev)
    skip_on = torch.isfinite(ln_lam).view(B, 1, 1, 1, 1)
    ln_lam_b = ln_lam.to(m_tile.dtype).view(B, 1, 1, 1, 1, 1)
    if interleave_splits:
        # Chunk c holds tiles c, c + S, c + 2S, ... (S = num_splits).
        n_chunk = min(num_splits, int(n_visit.max())) if nt else 0
        if n_chunk == 0:
            return kept.bool(), visited, skipped, pv
        c_idx = torch.arange(n_chunk, device=dev)[None, :]
        c_start = c_idx.expand(nt, n_chunk)
        c_step = num_splits
        c_len = torch.div(n_visit[:, None] - c_idx + num_splits - 1, num_splits,
                          rounding_mode="floor").clamp(min=0)
    else:
        # Chunks (splits) of the visited range: chunk c holds tiles [c*cs, (c+1)*cs).
        if split_tiles is not None:
            cs = torch.full_like(n_visit, split_tiles)
        else:
            cs = torch.div(n_visit + num_splits - 1, num_splits, rounding_mode="floor").clamp_min(1)
        n_chunk = int(torch.div(n_visit + cs - 1, cs, rounding_mode="floor").max()) if nt else 0
        if n_chunk == 0:
            return kept.bool(), visited, skipped, pv
        c_start = torch.arange(n_chunk, device=dev)[None, :] * cs[:, None]  # [nt, nc]
        c_step = 1
        c_len = (n_visit[:, None] - c_start).clamp(min=0).minimum(cs[:, None])
    counted = grp_valid[None, None, :, None, :]  # [1,1,nt,1,ng]
    if groups_per_pv:
        n_pv = n_grp // groups_per_pv
        pv_counted = grp_valid.view(nt, n_pv, groups_per_pv).any(-1)[None, None, :, None, :]
    m_run = torch.full((B, U, nt, n_chunk, n_grp, rpd), -math.inf, dtype=m_tile.dtype, device=dev)
    for j in range(int(c_len.max())):
        active = (j < c_len)[None, None, :, :, None]  # [1,1,nt,nc,1]
        step = j if order == "forward" else (c_len - 1 - j)
        kt = (c_start + step * c_step).clamp(0, n_kt - 1)  # [nt, nc]; inactive steps clamp harmlessly
        idx = kt.view(1, 1, nt, 1, 1, n_chunk).expand(B, U, nt, n_grp, rpd, n_chunk)
        mt = torch.gather(m_tile, 5, idx).permute(0, 1, 2, 5, 3, 4)  # [B,U,nt,nc,ng,rpd]
        votes = (~row_valid[None, None, :, None]) | (mt == -math.inf) | ((mt - m_run) < ln_lam_b)
        skip = votes.all(-1) & skip_on & active & (j > 0)  # [B,U,nt,nc,ng]
        keep = active & ~skip
        m_run = torch.where(keep.unsqueeze(-1), torch.maximum(m_run, mt), m_run)
        visited += (active & counted).expand_as(skip).sum((2, 3, 4))
        skipped += (skip & counted).sum((2, 3, 4))
        if groups_per_pv:
            pv_skip = skip.view(B, U, nt, n_chunk, n_pv, groups_per_pv).all(-1)
            pv[0] += (active & pv_counted).expand_as(pv_skip).sum((2, 3, 4))
            pv[1] += (pv_skip & pv_counted).sum((2, 3, 4))
        kidx = kt.view(1, 1, nt, 1, n_chunk).expand(B, U, nt, n_grp, n_chunk)
        kept.scatter_reduce_(4, kidx, keep.permute(0, 1, 2, 4, 3).to(torch.uint8), reduce="amax")
    return kept.bool(), visited, skipped, pv


def _attend_batch(q, k, v, *, causal, scale, ln_lam, block_m, block_n, pack_gqa, order,
                  num_splits, rpd, split_tiles, interleave_splits=False, rows_per_pv=None):
    """Equal-length batch. q [B,Lq,Hq,D], k [B,Lk,Hk,D], v [B,Lk,Hk,Dv]; ln_lam [B] float64.

    Returns out [B,U,R,Dv] and lse [B,U,R] in units/rows (see ``_units``), visited, skipped and
    the P·V counts [2,B,U] (None without rows_per_pv).
    """
    B, Lq = q.shape[:2]
    Lk, Dv = k.shape[1], v.shape[3]
    qu, ku, vu, row_pos = _units(q, k, v, pack_gqa)
    U, R = qu.shape[1], qu.shape[2]
    out_u = torch.zeros(B, U, R, Dv, dtype=qu.dtype, device=q.device)
    lse_u = torch.full((B, U, R), -math.inf, dtype=qu.dtype, device=q.device)
    visited = torch.zeros(B, U, dtype=torch.int64, device=q.device)
    skipped = torch.zeros_like(visited)
    gpp = rows_per_pv // rpd if rows_per_pv else None
    pv = torch.zeros(2, B, U, dtype=torch.int64, device=q.device) if gpp else None
    if R == 0 or Lk == 0:
        return out_u, lse_u, visited, skipped, pv
    n_grp = block_m // rpd
    for r0, r1, s, m_tile, n_visit, row_valid, grp_valid in _score_chunks(
            qu, ku, row_pos, Lq, causal, scale, block_m, block_n, rpd):
        kept, vis_c, skip_c, pv_c = _decide(m_tile, n_visit, row_valid, grp_valid, ln_lam, order,
                                            num_splits, split_tiles, interleave_splits, gpp)
        visited += vis_c
        skipped += skip_c
        if gpp:
            pv += pv_c
        # Softmax over the visible keys of the kept tiles.
        nt, n_kt = m_tile.shape[2], m_tile.shape[5]
        allow = kept.view(B, U, nt, n_grp, 1, n_kt, 1).expand(-1, -1, -1, -1, rpd, -1, block_n)
        s = s.masked_fill(~allow.reshape(B, U, nt * block_m, n_kt * block_n), -math.inf)[..., :Lk]
        m = s.amax(-1, keepdim=True)
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m_safe)
        l = p.sum(-1, keepdim=True)
        o = (p @ vu) / torch.where(l > 0, l, torch.ones_like(l))
        lse = torch.where(l > 0, m_safe + torch.log(l), torch.full_like(l, -math.inf)).squeeze(-1)
        out_u[:, :, r0:r1] = o[:, :, : r1 - r0]
        lse_u[:, :, r0:r1] = lse[:, :, : r1 - r0]
        del s, p, allow
    return out_u, lse_u, visited, skipped, pv


def skip_counts(q, k, *, factors: Sequence[float], causal: bool = False,
                softmax_scale: Optional[float] = None, block_m: int = 128, block_n: int = 128,
                pack_gqa: bool = False, order: str = "forward", num_splits: int = 1,
                rows_per_decision: Optional[int] = None, split_tiles: Optional[int] = None,
                seqlens_k: Optional[torch.Tensor] = None, interleave_splits: bool = False,
                rows_per_pv: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Skip decisions only, for many factors at once (calibration): scores are computed once.

    q [B, Lq, Hq, D], k [B, Lk, Hk, D]. Returns (visited, skipped), int64 [len(factors), B, U]
    with U = Hq (or Hk with ``pack_gqa``): exactly the stats ``blasst_attention`` would return
    for each factor (its decision-group counts; ``rows_per_pv`` is checked, not counted).
    """
    _check_qkv(q, k, k, 2)
    rpd = _check_geometry(block_m, block_n, order, num_splits, rows_per_decision, split_tiles,
                          interleave_splits, rows_per_pv)
    B, Lq = q.shape[:2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    lk = seqlens_k if seqlens_k is not None else torch.full((B,), k.shape[1], dtype=torch.int64)
    ln_lams = [log_threshold(f, lk.to(q.device)) for f in factors]
    qu, ku, _, row_pos = _units(q, k, None, pack_gqa)
    U = qu.shape[1]
    visited = torch.zeros(len(factors), B, U, dtype=torch.int64, device=q.device)
    skipped = torch.zeros_like(visited)
    if qu.shape[2] == 0 or k.shape[1] == 0:
        return visited, skipped
    for _, _, s, m_tile, n_visit, row_valid, grp_valid in _score_chunks(
            qu, ku, row_pos, Lq, causal, scale, block_m, block_n, rpd):
        del s
        for i, ln_lam in enumerate(ln_lams):
            _, v_c, s_c, _ = _decide(m_tile, n_visit, row_valid, grp_valid, ln_lam, order,
                                     num_splits, split_tiles, interleave_splits)
            visited[i] += v_c
            skipped[i] += s_c
    return visited, skipped


def _unpack(out_u, lse_u, B, Lq, Hq, Hk, Dv, pack_gqa):
    """Units/rows back to out [B, Lq, Hq, Dv] and lse [B, Hq, Lq]."""
    G = Hq // Hk
    if pack_gqa:
        out = out_u.reshape(B, Hk, Lq, G, Dv).permute(0, 2, 1, 3, 4).reshape(B, Lq, Hq, Dv)
        lse = lse_u.reshape(B, Hk, Lq, G).permute(0, 1, 3, 2).reshape(B, Hq, Lq)
    else:
        out = out_u.permute(0, 2, 1, 3)
        lse = lse_u
    return out, lse


def _check_qkv(q, k, v, seq_dims):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != seq_dims + 2:
            raise ValueError(f"{name} must have {seq_dims + 2} dims, got shape {tuple(t.shape)}")
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"q heads ({q.shape[-2]}) must be a multiple of k heads ({k.shape[-2]})")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree except in the last dim: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")


def blasst_attention(q, k, v, *, causal: bool = False, softmax_scale: Optional[float] = None,
                     threshold_scale_factor: Factor = None, block_m: int = 128, block_n: int = 128,
                     pack_gqa: bool = False, order: str = "forward", num_splits: int = 1,
                     rows_per_decision: Optional[int] = None, split_tiles: Optional[int] = None,
                     seqlens_k: Optional[torch.Tensor] = None, interleave_splits: bool = False,
                     rows_per_pv: Optional[int] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, BlasstStats]:
    """BLASST attention for an equal-length batch; see the module docstring for the semantics.

    q [B, Lq, Hq, D], k [B, Lk, Hk, D], v [B, Lk, Hk, Dv]. ``threshold_scale_factor`` is a number
    or a float tensor [B] (one factor per sequence). ``seqlens_k`` [B] optionally overrides the Lk
    that divides the factor (the caller's per-sequence KV length); keys are not masked by it.
    Returns ``(out [B, Lq, Hq, Dv] in q.dtype, lse [B, Hq, Lq] float32, BlasstStats)``; the
    stats hold P·V counts when ``rows_per_pv`` is given.
    """
    _check_qkv(q, k, v, 2)
    rpd = _check_geometry(block_m, block_n, order, num_splits, rows_per_decision, split_tiles,
                          interleave_splits, rows_per_pv)
    B, Lq, Hq, _ = q.shape
    Lk, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    lk = seqlens_k if seqlens_k is not None else torch.full((B,), Lk, dtype=torch.int64)
    ln_lam = log_threshold(threshold_scale_factor, lk.to(q.device))
    out_u, lse_u, visited, skipped, pv = _attend_batch(
        q, k, v, causal=causal, scale=scale, ln_lam=ln_lam, block_m=block_m, block_n=block_n,
        pack_gqa=pack_gqa, order=order, num_splits=num_splits, rpd=rpd, split_tiles=split_tiles,
        interleave_splits=interleave_splits, rows_per_pv=rows_per_pv)
    out, lse = _unpack(out_u, lse_u, B, Lq, Hq, Hk, Dv, pack_gqa)
    return out.to(q.dtype), lse.float(), _stats(visited, skipped, pv)


def blasst_attention_varlen(q, k, v, *, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                            causal: bool = False, softmax_scale: Optional[float] = None,
                            threshold_scale_factor: Factor = None, **geometry
                            ) -> Tuple[torch.Tensor, torch.Tensor, BlasstStats]:
    """Varlen form (as ``flash_attn_varlen_func``): q [total_q, Hq, D], k/v [total_k, Hk, D(v)].

    Sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and likewise for k/v, with its
    own Lk (and so its own λ). Returns out [total_q, Hq, Dv], lse [Hq, total_q] float32 and stats
    with one row per sequence.
    """
    _check_qkv(q, k, v, 1)
    n = cu_seqlens_q.numel() - 1
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    factors = _per_sequence_factor(threshold_scale_factor, n)
    Hq, Hk, Dv = q.shape[1], k.shape[1], v.shape[2]
    out = q.new_zeros(q.shape[0], Hq, Dv)
    lse = torch.full((Hq, q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    units = Hk if geometry.get("pack_gqa", False) else Hq
    counts = torch.zeros(4, n, units, dtype=torch.int64, device=q.device)
    for b in range(n):
        o, l, st = blasst_attention(
            q[cq[b]:cq[b + 1]][None], k[ck[b]:ck[b + 1]][None], v[ck[b]:ck[b + 1]][None],
            causal=causal, softmax_scale=softmax_scale, threshold_scale_factor=factors[b], **geometry)
        out[cq[b]:cq[b + 1]] = o[0]
        lse[:, cq[b]:cq[b + 1]] = l[0]
        _store_counts(counts, b, st)
    return out, lse, _stats_of(counts, geometry)


def blasst_attention_paged(q, k_cache, v_cache, *, cache_seqlens: torch.Tensor,
                           block_table: Optional[torch.Tensor] = None, causal: bool = True,
                           softmax_scale: Optional[float] = None, threshold_scale_factor: Factor = None,
                           **geometry) -> Tuple[torch.Tensor, torch.Tensor, BlasstStats]:
    """Decode form: q [B, Lq_new, Hq, D] against a KV cache holding ``cache_seqlens[b]`` keys.

    With ``block_table`` [B, max_pages] int32 the cache is paged, k_cache/v_cache
    [num_pages, page_size, Hk, D(v)], and key ``j`` of sequence ``b`` lives in page
    ``block_table[b, j // page_size]`` at slot ``j % page_size``. Without it, k_cache/v_cache are
    [B, capacity, Hk, D(v)]. The cache already holds the new tokens' keys (the last Lq_new), so
    ``causal=True`` is causality among the new tokens (bottom-right aligned).
    """
    B = q.shape[0]
    lens = cache_seqlens.tolist()
    factors = _per_sequence_factor(threshold_scale_factor, B)
    Hq, Hk, Dv = q.shape[2], k_cache.shape[2], v_cache.shape[3]
    out = q.new_zeros(*q.shape[:3], Dv)
    lse = torch.full((B, Hq, q.shape[1]), -math.inf, dtype=torch.float32, device=q.device)
    units = Hk if geometry.get("pack_gqa", False) else Hq
    counts = torch.zeros(4, B, units, dtype=torch.int64, device=q.device)
    for b in range(B):
        L = lens[b]
        if block_table is not None:
            ps = k_cache.shape[1]
            pages = block_table[b, : -(-L // ps)].long()
            kb = k_cache[pages].reshape(-1, Hk, k_cache.shape[3])[:L]
            vb = v_cache[pages].reshape(-1, Hk, Dv)[:L]
        else:
            kb, vb = k_cache[b, :L], v_cache[b, :L]
        o, l, st = blasst_attention(q[b:b + 1], kb[None], vb[None], causal=causal,
                                    softmax_scale=softmax_scale, threshold_scale_factor=factors[b],
                                    **geometry)
        out[b], lse[b] = o[0], l[0]
        _store_counts(counts, b, st)
    return out, lse, _stats_of(counts, geometry)


def _store_counts(counts: torch.Tensor, b: int, st: BlasstStats) -> None:
    """Sequence b's counters (a one-sequence call's stats) into counts [4, n, U]."""
    counts[0, b], counts[1, b] = st.visited[0], st.skipped[0]
    if st.pv_visited is not None:
        counts[2, b], counts[3, b] = st.pv_visited[0], st.pv_skipped[0]


def _stats_of(counts: torch.Tensor, geometry: dict) -> BlasstStats:
    return _stats(counts[0], counts[1], counts[2:] if geometry.get("rows_per_pv") else None)


def _stats(visited, skipped, pv=None) -> BlasstStats:
    """The stats of the counters, with the P·V counts pv [2, ...] (visited, skipped) if any."""
    if pv is None:
        return BlasstStats(visited, skipped)
    return BlasstStats(visited, skipped, pv_visited=pv[0], pv_skipped=pv[1])


def _per_sequence_factor(threshold_scale_factor: Factor, n: int):
    if isinstance(threshold_scale_factor, torch.Tensor) and threshold_scale_factor.dim() > 0:
        return [float(x) for x in threshold_scale_factor.reshape(-1).tolist()]
    return [threshold_scale_factor] * n
