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
    A decision group that holds no valid query row (pure padding) is not counted.
    """

    visited: torch.Tensor
    skipped: torch.Tensor
    v_loaded: Optional[torch.Tensor] = None

    @property
    def sparsity(self) -> float:
        """Fraction of visited tiles that were skipped (0.0 when nothing was visited)."""
        total = int(self.visited.sum())
        return float(self.skipped.sum()) / total if total else 0.0

    def __add__(self, other: "BlasstStats") -> "BlasstStats":
        """Sum the counters of two calls (e.g. two layers, or two tensor-parallel ranks)."""
        v_loaded = None
        if self.v_loaded is not None and other.v_loaded is not None:
            v_loaded = self.v_loaded + other.v_loaded
        return BlasstStats(self.visited + other.visited, self.skipped + other.skipped, v_loaded)

    def __repr__(self) -> str:
        return (
            f"BlasstStats(visited={int(self.visited.sum())}, skipped={int(self.skipped.sum())}, "
            f"sparsity={self.sparsity:.4f}, shape={tuple(self.visited.shape)})"
        )
