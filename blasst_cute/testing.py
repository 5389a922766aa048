"""Yardsticks shared by the tests, the GPU check scripts and the demo (no BLASST logic here)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    softmax_scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense attention in float64, independent of the reference's tiling.

    q [B, Lq, Hq, D], k [B, Lk, Hk, D], v [B, Lk, Hk, Dv] (GQA by repetition); causal is bottom-right
    aligned. Returns out [B, Lq, Hq, Dv] and lse [B, Hq, Lq]; a row with no visible key gives 0 and
    -inf (as the kernels), where SDPA would give NaN.
    """
    Lq, Lk, g = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qd = q.double().transpose(1, 2)
    kd = k.double().transpose(1, 2).repeat_interleave(g, 1)
    vd = v.double().transpose(1, 2).repeat_interleave(g, 1)
    s = (qd @ kd.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (Lk - Lq), -math.inf)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    out = (p @ vd) / torch.where(l > 0, l, torch.ones_like(l))
    lse = torch.where(l > 0, m + torch.log(l), torch.full_like(l, -math.inf)).squeeze(-1)
    return out.transpose(1, 2), lse


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def lse_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a − b| over finite entries of b; inf if the two disagree on which entries are finite."""
    fin = torch.isfinite(b)
    if not bool((torch.isfinite(a) == fin).all()):
        return float("inf")
    if not bool(fin.any()):
        return 0.0
    return float((a[fin].double() - b[fin].double()).abs().max())
