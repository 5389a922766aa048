"""Skip statistics returned by every backend (reference and kernels alike)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class BlasstStats:
    """Tile counters of one attention call.

    ``visited[b, h]`` counts the (decision group, key tile) pairs that the attention of batch
    element ``b`` and head ``h`` visited, ``skipped[b, h]`` those whose softmax and P·V were
    skipped. ``h`` indexes query heads, or kv heads when the rows of a tile pack the query heads
    of one kv head (GQA packing, decode). ``v_loaded`` (decode kernels only) counts V tiles read.
    ``pv_visited`` / ``pv_skipped`` (the SM90 prefill kernel, and the reference given
    ``rows_per_pv``) count (P·V group, key tile) pairs and those whose P·V MMA was skipped: a
    64-row warpgroup skips it only when all 4 of its 16-row decision groups skipped the tile.
    A decision (or P·V) group that holds no valid query row (pure padding) is not counted.
    """

    visited: torch.Tensor
    skipped: torch.Tensor
    v_loaded: Optional[torch.Tensor] = None
    pv_visited: Optional[torch.Tensor] = None
    pv_skipped: Optional[torch.Tensor] = None

    @property
    def sparsity(self) -> float:
        """Fraction of visited tiles that were skipped (0.0 when nothing was visited)."""
        return _ratio(self.skipped, self.visited)

    @property
    def pv_sparsity(self) -> Optional[float]:
        """Fraction of P·V products skipped (None without P·V counters): the ``s`` of the ideal
        kernel gain ``1 / (1 - s/2)``, since QK^T always runs."""
        if self.pv_visited is None:
            return None
        return _ratio(self.pv_skipped, self.pv_visited)

    def __add__(self, other: "BlasstStats") -> "BlasstStats":
        """Sum the counters of two calls (e.g. two layers, or two tensor-parallel ranks); an
        optional counter is kept only if both calls have it."""
        def both(a, b):
            return a + b if a is not None and b is not None else None
        return BlasstStats(self.visited + other.visited, self.skipped + other.skipped,
                           both(self.v_loaded, other.v_loaded),
                           both(self.pv_visited, other.pv_visited),
                           both(self.pv_skipped, other.pv_skipped))

    def __repr__(self) -> str:
        pv = "" if self.pv_visited is None else (
            f", pv_visited={int(self.pv_visited.sum())}, pv_skipped={int(self.pv_skipped.sum())}, "
            f"pv_sparsity={self.pv_sparsity:.4f}")
        return (
            f"BlasstStats(visited={int(self.visited.sum())}, skipped={int(self.skipped.sum())}, "
            f"sparsity={self.sparsity:.4f}{pv}, shape={tuple(self.visited.shape)})"
        )


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    total = int(den.sum())
    return float(num.sum()) / total if total else 0.0
