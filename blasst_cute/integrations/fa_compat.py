"""FlashAttention-compatible entry points (FA3 / FA4 argument names and layouts) with BLASST.

    from blasst_cute.integrations.fa_compat import flash_attn_func, flash_attn_varlen_func, \
        flash_attn_with_kvcache
    out = flash_attn_func(q, k, v, causal=True, skip_softmax_threshold_scale_factor=1000.0)

* Layouts as FlashAttention: q [B, Sq, Hq, D] (varlen: [total_q, Hq, D]), k/v [B, Sk, Hk, D(v)]
  with Hq % Hk == 0 (MQA/GQA), paged caches [num_pages, page_size, Hk, D] with an int32
  ``page_table`` [B, max_pages] (``block_table`` is accepted as FA2's name for it). ``causal`` is
  bottom-right aligned.
* ``skip_softmax_threshold_scale_factor`` is FlashInfer's / TensorRT-LLM's knob: λ = factor / L_kv
  per sequence, None/0 = dense. ``return_skip_stats=True`` appends a :class:`BlasstStats`.
* Returns ``out``, or ``(out, softmax_lse)`` with ``return_attn_probs``/``return_lse``
  (``return_softmax_lse`` for the kvcache op), as FA3; stats come last.
* Beyond q, k, v (and, for varlen, the FA2/FA3-common ``cu_seqlens_q, cu_seqlens_k,
  max_seqlen_q, max_seqlen_k``) arguments are keyword-only: FA3 and FA4 order them differently,
  and a silently misread positional argument is worse than a TypeError.
* Performance hints (``num_splits``, ``pack_gqa``, ``deterministic``, ``sm_margin``,
  ``scheduler_metadata``) are accepted and ignored: the tile geometry, and so the skip decisions,
  are blasst_cute's own. Anything that changes the math and is not implemented (sliding window,
  softcap, ALiBi, dropout, sinks, qv, FP8 descales, rotary, score/mask mods...) raises.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import api


def _reject(fn: str, **args) -> None:
    """Raise naming every argument given a value this implementation cannot honour."""
    bad = []
    for name, value in args.items():
        if name == "window_size":
            if tuple(value) not in ((-1, -1), (None, None)):
                bad.append(f"window_size={tuple(value)} (only (-1, -1): no sliding window)")
        elif name in ("softcap", "dropout_p", "attention_chunk"):
            if value:
                bad.append(f"{name}={value}")
        elif value is not None:
            bad.append(name)
    if bad:
        raise NotImplementedError(f"{fn}: blasst_cute does not support {', '.join(bad)}")


def _result(out, lse, stats, want_lse, want_stats):
    res = (out,) + ((lse,) if want_lse else ()) + ((stats,) if want_stats else ())
    return res[0] if len(res) == 1 else res


def _int32_vector(name, t, n=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor, got {type(t).__name__}")
    if t.dtype != torch.int32 or t.dim() != 1:
        raise TypeError(f"{name} must be a 1-D int32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} must have {n} entries, got {t.numel()}")


def flash_attn_func(
    q,
    k,
    v,
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    alibi_slopes=None,
    qv=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    attention_chunk: int = 0,
    learnable_sink=None,
    num_splits: int = 1,
    pack_gqa=None,
    deterministic: bool = False,
    sm_margin: int = 0,
    return_attn_probs: bool = False,
    return_lse: bool = False,
    skip_softmax_threshold_scale_factor=None,
    return_skip_stats: bool = False,
    backend: str = "auto",
):
    """FA ``flash_attn_func``: q [B, Sq, Hq, D], k/v [B, Sk, Hk, D(v)] -> out [B, Sq, Hq, Dv]."""
    _reject(
        "flash_attn_func",
        window_size=window_size,
        softcap=softcap,
        dropout_p=dropout_p,
        alibi_slopes=alibi_slopes,
        qv=qv,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        attention_chunk=attention_chunk,
        learnable_sink=learnable_sink,
    )
    out, lse, stats = api.prefill(
        q,
        k,
        v,
        causal=causal,
        softmax_scale=softmax_scale,
        threshold_scale_factor=skip_softmax_threshold_scale_factor,
        return_lse=True,
        return_stats=True,
        backend=backend,
    )
    return _result(out, lse, stats, return_attn_probs or return_lse, return_skip_stats)


def _gather_keys(k, v, cu_seqlens_k, seqused_k, page_table, batch):
    """Packed keys [total, Hk, D(v)] and their cu_seqlens, from any FA key layout.

    Layouts: varlen (cu_seqlens_k), varlen prefix (cu_seqlens_k + seqused_k: the first
    seqused_k[b] keys of each slot), paged (page_table + seqused_k).
    """
    if page_table is not None:
        if cu_seqlens_k is not None:
            raise ValueError("page_table and cu_seqlens_k are exclusive (paged keys use seqused_k)")
        if seqused_k is None:
            raise ValueError("page_table needs seqused_k (the number of keys of each sequence)")
        if (
            not isinstance(page_table, torch.Tensor)
            or page_table.dtype != torch.int32
            or page_table.dim() != 2
        ):
            raise TypeError("page_table must be a 2-D int32 tensor [batch, max_pages]")
        if page_table.shape[0] != batch:
            raise ValueError(f"page_table must have {batch} rows, got {page_table.shape[0]}")
        if k.dim() != 4 or v.dim() != 4:
            raise ValueError("paged k/v must be [num_pages, page_size, Hk, D]")
        _int32_vector("seqused_k", seqused_k, batch)
        ps, lens = k.shape[1], seqused_k.cpu().tolist()
        if any(n < 0 or n > page_table.shape[1] * ps for n in lens):
            raise ValueError(
                f"seqused_k must lie in [0, {page_table.shape[1] * ps}] (the page table capacity)"
            )
        ks, vs = [], []
        for b, n in enumerate(lens):
            pages = page_table[b, : -(-n // ps)].long()
            if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= k.shape[0]):
                raise ValueError(f"page_table[{b}] refers to pages outside [0, {k.shape[0]})")
            ks.append(k[pages].reshape(-1, *k.shape[2:])[:n])
            vs.append(v[pages].reshape(-1, *v.shape[2:])[:n])
        used = torch.tensor(lens, dtype=torch.int32)
        return torch.cat(ks), torch.cat(vs), _cu(used, k.device)
    if cu_seqlens_k is None:
        raise ValueError("cu_seqlens_k is required unless page_table is given")
    if seqused_k is None:
        return k, v, cu_seqlens_k
    _int32_vector("seqused_k", seqused_k, batch)
    cu = cu_seqlens_k.cpu().tolist()
    used = seqused_k.cpu()
    slot = torch.tensor([cu[b + 1] - cu[b] for b in range(batch)])
    if bool((used < 0).any()) or bool((used > slot).any()):
        raise ValueError("seqused_k must lie in [0, cu_seqlens_k[b+1] - cu_seqlens_k[b]] for every sequence")
    idx = torch.cat([torch.arange(cu[b], cu[b] + int(used[b])) for b in range(batch)]).to(k.device)
    return k.index_select(0, idx), v.index_select(0, idx), _cu(used, k.device)


def _cu(lengths: torch.Tensor, device) -> torch.Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths.to(torch.int64), 0)
    return cu.to(device)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    *,
    seqused_q=None,
    seqused_k=None,
    page_table=None,
    block_table=None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    alibi_slopes=None,
    qv=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    attention_chunk: int = 0,
    learnable_sink=None,
    min_seqlen_k=None,
    num_splits: int = 1,
    pack_gqa=None,
    deterministic: bool = False,
    sm_margin: int = 0,
    scheduler_metadata=None,
    return_attn_probs: bool = False,
    return_lse: bool = False,
    skip_softmax_threshold_scale_factor=None,
    return_skip_stats: bool = False,
    backend: str = "auto",
):
    """FA ``flash_attn_varlen_func``: q [total_q, Hq, D]; k/v [total_k, Hk, D(v)] with
    ``cu_seqlens_k`` (optionally only the first ``seqused_k[b]`` keys of each sequence used), or
    paged k/v [num_pages, page_size, Hk, D(v)] with ``page_table`` and ``seqused_k``.

    ``seqused_q`` uses the first ``seqused_q[b]`` queries of each sequence; the other rows of the
    output are 0. Returns out [total_q, Hq, Dv] (and lse [Hq, total_q]).
    """
    _reject(
        "flash_attn_varlen_func",
        window_size=window_size,
        softcap=softcap,
        dropout_p=dropout_p,
        alibi_slopes=alibi_slopes,
        qv=qv,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        attention_chunk=attention_chunk,
        learnable_sink=learnable_sink,
    )
    if block_table is not None:
        if page_table is not None:
            raise ValueError("give page_table or block_table (FA2's name for it), not both")
        page_table = block_table
    if cu_seqlens_q is None:
        raise ValueError("cu_seqlens_q is required")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be [total_q, Hq, D], got shape {tuple(q.shape)}")
    _int32_vector("cu_seqlens_q", cu_seqlens_q)
    batch = cu_seqlens_q.numel() - 1
    if cu_seqlens_k is not None:
        _int32_vector("cu_seqlens_k", cu_seqlens_k, batch + 1)
    k_p, v_p, cu_k = _gather_keys(k, v, cu_seqlens_k, seqused_k, page_table, batch)
    q_p, cu_q, q_rows = q, cu_seqlens_q, None
    if seqused_q is not None:
        _int32_vector("seqused_q", seqused_q, batch)
        cq, used = cu_seqlens_q.cpu().tolist(), seqused_q.cpu()
        if bool((used < 0).any()) or any(int(used[b]) > cq[b + 1] - cq[b] for b in range(batch)):
            raise ValueError("seqused_q must lie in [0, cu_seqlens_q[b+1] - cu_seqlens_q[b]]")
        q_rows = torch.cat([torch.arange(cq[b], cq[b] + int(used[b])) for b in range(batch)]).to(q.device)
        q_p, cu_q = q.index_select(0, q_rows), _cu(used, q.device)
    # max_seqlen_* are launch hints for FA; the reference/kernels derive them from cu_seqlens.
    out, lse, stats = api.prefill(
        q_p,
        k_p,
        v_p,
        causal=causal,
        softmax_scale=softmax_scale,
        threshold_scale_factor=skip_softmax_threshold_scale_factor,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        return_lse=True,
        return_stats=True,
        backend=backend,
    )
    if q_rows is not None:
        full = out.new_zeros(q.shape[0], *out.shape[1:])
        full.index_copy_(0, q_rows, out)
        full_lse = lse.new_full((lse.shape[0], q.shape[0]), float("-inf"))
        full_lse[:, q_rows] = lse
        out, lse = full, full_lse
    return _result(out, lse, stats, return_attn_probs or return_lse, return_skip_stats)


def _append_to_cache(k_cache, v_cache, k, v, cache_seqlens, page_table):
    """FA semantics: write the new keys/values into the cache (in place) at cache_seqlens."""
    B, n = k.shape[0], k.shape[1]
    for b in range(B):
        start = int(cache_seqlens[b])
        pos = torch.arange(start, start + n, device=k.device)
        if page_table is None:
            if start + n > k_cache.shape[1]:
                raise ValueError(
                    f"the cache of sequence {b} holds {k_cache.shape[1]} keys; cannot append {n} at {start}"
                )
            k_cache[b, start : start + n] = k[b]
            v_cache[b, start : start + n] = v[b]
        else:
            ps = k_cache.shape[1]
            if start + n > page_table.shape[1] * ps:
                raise ValueError(
                    f"page_table row {b} holds {page_table.shape[1] * ps} keys; cannot append {n} at {start}"
                )
            pages = page_table[b, (pos // ps).long()].long()
            k_cache[pages, pos % ps] = k[b]
            v_cache[pages, pos % ps] = v[b]


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    *,
    cache_seqlens=None,
    page_table=None,
    block_table=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    alibi_slopes=None,
    qv=None,
    rotary_cos=None,
    rotary_sin=None,
    rotary_interleaved: bool = True,
    rotary_seqlens=None,
    cu_seqlens_q=None,
    cu_seqlens_k_new=None,
    max_seqlen_q=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    attention_chunk: int = 0,
    num_splits: int = 0,
    pack_gqa=None,
    sm_margin: int = 0,
    scheduler_metadata=None,
    return_softmax_lse: bool = False,
    skip_softmax_threshold_scale_factor=None,
    return_skip_stats: bool = False,
    backend: str = "auto",
):
    """FA ``flash_attn_with_kvcache``: q [B, Sq, Hq, D] (the new tokens) against a KV cache.

    k_cache/v_cache: [B, capacity, Hk, D(v)], or [num_pages, page_size, Hk, D(v)] with
    ``page_table`` [B, max_pages] int32. ``cache_seqlens`` (int or int32 [B]) counts the keys in the
    cache; if ``k``/``v`` [B, Sq_new, Hk, D] are given they are first written into the cache in
    place at ``cache_seqlens`` (as FA) and attention covers ``cache_seqlens + Sq_new`` keys.
    Runs :func:`blasst_cute.decode` (decode tile geometry, λ = factor / keys of the sequence);
    with ``causal=False`` and several new queries it runs prefill without a causal mask.
    """
    _reject(
        "flash_attn_with_kvcache",
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        qv=qv,
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        rotary_seqlens=rotary_seqlens,
        cache_leftpad=cache_leftpad,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k_new=cu_seqlens_k_new,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        attention_chunk=attention_chunk,
    )
    if block_table is not None:
        if page_table is not None:
            raise ValueError("give page_table or block_table (FA2's name for it), not both")
        page_table = block_table
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError("q must be a [B, Sq, Hq, D] tensor")
    B = q.shape[0]
    if cache_seqlens is None:
        raise ValueError("cache_seqlens is required (the number of keys in the cache per sequence)")
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    _int32_vector("cache_seqlens", cache_seqlens, B)
    if cache_batch_idx is not None:
        if page_table is not None:
            raise NotImplementedError("cache_batch_idx with a paged cache is not supported")
        _int32_vector("cache_batch_idx", cache_batch_idx, B)
        if k is not None:
            raise NotImplementedError("cache_batch_idx together with new k/v is not supported")
        k_cache = k_cache.index_select(0, cache_batch_idx.long())
        v_cache = v_cache.index_select(0, cache_batch_idx.long())
    if (k is None) != (v is None):
        raise ValueError("k and v (the new keys/values) must be given together")
    lens = cache_seqlens
    if k is not None:
        if k.dim() != 4 or k.shape[0] != B:
            raise ValueError(f"k must be [B={B}, Sq_new, Hk, D], got shape {tuple(k.shape)}")
        _append_to_cache(k_cache, v_cache, k, v, cache_seqlens.cpu(), page_table)
        lens = cache_seqlens + k.shape[1]
    if not causal and q.shape[1] > 1:
        # Several new queries that see all keys: not a decode step, a non-causal prefill.
        cu_q = _cu(torch.full((B,), q.shape[1]), q.device)
        keys = (
            dict(page_table=page_table, seqused_k=lens)
            if page_table is not None
            else dict(cu_seqlens_k=_cu(torch.full((B,), k_cache.shape[1]), q.device), seqused_k=lens)
        )
        kc = k_cache if page_table is not None else k_cache.reshape(-1, *k_cache.shape[2:])
        vc = v_cache if page_table is not None else v_cache.reshape(-1, *v_cache.shape[2:])
        res = flash_attn_varlen_func(
            q.reshape(-1, *q.shape[2:]),
            kc,
            vc,
            cu_q,
            causal=False,
            softmax_scale=softmax_scale,
            skip_softmax_threshold_scale_factor=skip_softmax_threshold_scale_factor,
            return_lse=True,
            return_skip_stats=True,
            backend=backend,
            **keys,
        )
        out, lse, stats = res
        out = out.view(*q.shape[:3], out.shape[-1])
        lse = lse.view(lse.shape[0], B, q.shape[1]).permute(1, 0, 2)
        return _result(out, lse, stats, return_softmax_lse, return_skip_stats)
    out, lse, stats = api.decode(
        q,
        k_cache,
        v_cache,
        cache_seqlens=lens,
        block_table=page_table,
        softmax_scale=softmax_scale,
        threshold_scale_factor=skip_softmax_threshold_scale_factor,
        return_lse=True,
        return_stats=True,
        backend=backend,
    )
    return _result(out, lse, stats, return_softmax_lse, return_skip_stats)


__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]
