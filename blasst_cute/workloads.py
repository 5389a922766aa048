"""Synthetic long-context Q/K/V whose attention looks like a real LLM's.

No model weights can be downloaded where this package is tested, so demos, tests and benchmarks use
inputs built so that the scaled logits ``q_i·k_j·scale`` have the structure seen in long-context
LLM attention:

* attention sinks: the first ``sink_tokens`` keys get a large logit from every query;
* a strong local window: each position carries a smooth random "position code" (an AR(1)
  process, correlation ``rho**|i-j|``), shared by its query and key, so nearby keys score high;
* retrieval needles: a few keys far back carry a direction that a fraction of the queries also
  carry, so a few distant tiles must not be skipped;
* heads of differing sharpness: each query head scales its logits by its own temperature
  (log-uniform in ``sharpness``), so some heads are diffuse and others peaked;
* background noise from random components in the remaining dimensions.

With these defaults the block sparsity of BLASST (128x128 tiles) sweeps from about 0% to about 95%
as ``threshold_scale_factor`` grows from ~0.1 to a few thousand at 8k-32k tokens.
The construction is deterministic given ``seed`` and cheap (it runs on the target device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class WorkloadSpec:
    """Knobs of the synthetic attention pattern (logit magnitudes are in scaled-logit units)."""

    sink_tokens: int = 4
    sink_logit: float = 9.0
    local_logit: float = 9.0
    local_rho: float = 0.995
    position_dims: int = 32
    needles: int = 4
    needle_logit: float = 10.0
    needle_query_fraction: float = 0.02
    noise: float = 1.0
    sharpness: Tuple[float, float] = (0.5, 1.6)


def _position_codes(n: int, dims: int, rho: float, gen: torch.Generator) -> torch.Tensor:
    """AR(1) unit-variance codes p_t with E[p_i·p_j] ~= rho**|i-j| (float64, [n, dims])."""
    eps = torch.randn(n, dims, generator=gen, dtype=torch.float64) / math.sqrt(dims)
    # p_t = rho p_{t-1} + sqrt(1 - rho^2) eps_t, vectorised by chunked prefix sums of rho^-t terms.
    out = torch.empty_like(eps)
    prev = torch.randn(dims, generator=gen, dtype=torch.float64) / math.sqrt(dims)
    c = math.sqrt(1 - rho * rho)
    chunk = 512
    for s in range(0, n, chunk):
        e = eps[s:s + chunk] * c
        m = e.shape[0]
        t = torch.arange(1, m + 1, dtype=torch.float64)
        w = rho ** (-t)  # bounded: chunk * |ln rho| stays small for rho close to 1
        acc = torch.cumsum(e * w[:, None], 0)
        block = (rho ** t)[:, None] * (prev[None, :] + acc)
        out[s:s + chunk] = block
        prev = block[-1]
    return out


def synthetic_qkv(batch: int, seqlen_q: int, seqlen_k: int, heads_q: int, heads_kv: int,
                  head_dim: int, head_dim_v: Optional[int] = None, *, dtype=torch.bfloat16,
                  device="cpu", seed: int = 0, spec: WorkloadSpec = WorkloadSpec()):
    """Q [B, Lq, Hq, D], K [B, Lk, Hkv, D], V [B, Lk, Hkv, Dv] with LLM-like attention structure.

    Query ``i`` sits at position ``Lk - Lq + i`` (the last Lq positions, as in prefill of a
    suffix or decode). The logits assume ``softmax_scale = 1/sqrt(head_dim)``.
    """
    if heads_q % heads_kv:
        raise ValueError(f"heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv})")
    dv = head_dim if head_dim_v is None else head_dim_v
    d_pos = min(spec.position_dims, head_dim // 4)
    d_needle = spec.needles if head_dim - d_pos - 1 - spec.needles >= head_dim // 4 else 0
    d_noise = head_dim - d_pos - 1 - d_needle
    if d_noise <= 0:
        raise ValueError(f"head_dim {head_dim} is too small for this workload spec")
    gen = torch.Generator().manual_seed(seed)
    root_d = math.sqrt(head_dim)  # undo the softmax scale so knobs are in scaled-logit units
    off = seqlen_k - seqlen_q

    qs, ks, vs = [], [], []
    for _ in range(batch):
        pos = _position_codes(seqlen_k, d_pos, spec.local_rho, gen)  # shared by all heads
        k = torch.zeros(seqlen_k, heads_kv, head_dim, dtype=torch.float64)
        q = torch.zeros(seqlen_q, heads_q, head_dim, dtype=torch.float64)
        a_loc = math.sqrt(spec.local_logit * root_d)
        k[:, :, :d_pos] = a_loc * pos[:, None, :]
        qpos = pos[max(off, 0):] if off >= 0 else torch.cat(
            [torch.zeros(-off, d_pos, dtype=torch.float64), pos])
        q[:, :, :d_pos] = a_loc * qpos[:seqlen_q, None, :]
        # Sinks: one shared dimension, large on the first keys, constant on every query.
        a_sink = math.sqrt(spec.sink_logit * root_d)
        k[: spec.sink_tokens, :, d_pos] = a_sink
        q[:, :, d_pos] = a_sink
        # Needles: key n carries direction n; a few queries (after the needle) carry it too.
        if d_needle:
            a_n = math.sqrt(spec.needle_logit * root_d)
            lo = spec.sink_tokens
            hi = max(lo + 1, seqlen_k // 2)
            where = torch.randint(lo, hi, (d_needle,), generator=gen)
            for n in range(d_needle):
                k[where[n], :, d_pos + 1 + n] = a_n
                pick = torch.rand(seqlen_q, heads_q, generator=gen) < spec.needle_query_fraction
                q[:, :, d_pos + 1 + n] = a_n * pick.double()
        # Background noise: dot of the noise parts has variance ~ noise^2 after scaling.
        sn = math.sqrt(spec.noise * root_d / math.sqrt(d_noise))
        k[:, :, head_dim - d_noise:] = sn * torch.randn(seqlen_k, heads_kv, d_noise, generator=gen,
                                                        dtype=torch.float64)
        q[:, :, head_dim - d_noise:] = sn * torch.randn(seqlen_q, heads_q, d_noise, generator=gen,
                                                        dtype=torch.float64)
        # Head sharpness: a per-q-head temperature (log-uniform).
        lo_s, hi_s = spec.sharpness
        temp = torch.exp(math.log(lo_s) + (math.log(hi_s) - math.log(lo_s))
                         * torch.rand(heads_q, generator=gen, dtype=torch.float64))
        q = q * temp[None, :, None]
        v = torch.randn(seqlen_k, heads_kv, dv, generator=gen, dtype=torch.float64)
        qs.append(q)
        ks.append(k)
        vs.append(v)
    to = dict(dtype=dtype, device=device)
    return (torch.stack(qs).to(**to), torch.stack(ks).to(**to), torch.stack(vs).to(**to))


def random_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, head_dim_v=None, *,
               dtype=torch.bfloat16, device="cpu", seed=0):
    """Plain Gaussian Q/K/V (no structure: BLASST finds almost nothing to skip)."""
    gen = torch.Generator().manual_seed(seed)
    dv = head_dim if head_dim_v is None else head_dim_v
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, generator=gen)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, generator=gen)
    v = torch.randn(batch, seqlen_k, heads_kv, dv, generator=gen)
    return tuple(t.to(dtype=dtype, device=device) for t in (q, k, v))


def to_paged(k: torch.Tensor, v: torch.Tensor, page_size: int, *, seed: int = 0,
             extra_pages: int = 3):
    """A shuffled paged copy of a contiguous cache [B, L, Hkv, D]: (k_cache, v_cache, block_table).

    Pages are assigned in a random order (non-contiguous, as a real allocator hands them out).
    """
    B, L, H, D = k.shape
    Dv = v.shape[-1]
    per_seq = -(-L // page_size)
    n_pages = B * per_seq + extra_pages
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_pages, generator=gen)[: B * per_seq].view(B, per_seq)
    # Unused pages hold random data, so a kernel that reads a wrong page gives a wrong answer.
    dgen = torch.Generator(device=k.device).manual_seed(seed)
    k_cache = torch.randn(n_pages, page_size, H, D, generator=dgen, device=k.device).to(k.dtype)
    v_cache = torch.randn(n_pages, page_size, H, Dv, generator=dgen, device=k.device).to(v.dtype)
    pad = per_seq * page_size - L
    kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(B, per_seq, page_size, H, D)
    vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).view(B, per_seq, page_size, H, Dv)
    idx = perm.to(k.device)
    k_cache[idx.reshape(-1)] = kp.reshape(-1, page_size, H, D)
    v_cache[idx.reshape(-1)] = vp.reshape(-1, page_size, H, Dv)
    return k_cache, v_cache, perm.to(torch.int32).to(k.device)
