"""The torch-facing functions: validation (one place), output allocation, dispatch, stats.

Every argument is checked here, before any device work; kernels assume validated inputs.
Bad input raises ``TypeError``/``ValueError`` naming the argument and what was expected; a valid
configuration that no kernel supports raises ``NotImplementedError`` naming what is unsupported.
Nothing ever falls back silently to a dense or a reference path on the GPU.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from . import dispatch
from .stats import BlasstStats

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "reference", "cute")

# Checks of the *contents* of device tensors (cu_seqlens order, cache_seqlens range, block_table
# entries) need a device-to-host copy, i.e. a sync. They run by default; a serving engine that
# validates upstream can turn them off for lower host overhead, and they are always skipped while
# a CUDA graph is being captured (a sync there would break the capture).
_CHECK_CONTENTS = True


def set_content_checks(enabled: bool) -> None:
    """Turn the synchronising checks of index-tensor contents on (default) or off."""
    global _CHECK_CONTENTS
    _CHECK_CONTENTS = bool(enabled)


def _contents_checkable(t: torch.Tensor) -> bool:
    if not t.is_cuda:
        return True
    return _CHECK_CONTENTS and not torch.cuda.is_current_stream_capturing()

Factor = Union[None, float, int, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------

def _require_tensor(name, t, ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    return t


def _check_float(name, t, dtype=None):
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of q ({dtype}), got {t.dtype}")


def _check_device(name, t, device):
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of q), got {t.device}")


def _check_last_contiguous(name, t):
    if t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last (head) dim, got strides {t.stride()}")


def _check_bool(name, x):
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_scale(softmax_scale):
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be finite and > 0, got {softmax_scale}")


def _check_factor(factor, batch, device):
    """threshold_scale_factor: None, a finite number >= 0, or a float tensor [batch] on q's device."""
    if factor is None:
        return
    if isinstance(factor, torch.Tensor):
        if factor.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"threshold_scale_factor tensor must be float32, got {factor.dtype}")
        if factor.dim() != 1 or factor.shape[0] != batch:
            raise ValueError(
                f"threshold_scale_factor tensor must have shape [{batch}] (one factor per sequence), "
                f"got {tuple(factor.shape)}")
        _check_device("threshold_scale_factor", factor, device)
        if factor.device.type == "cpu":  # on the GPU the kernel treats non-finite/negative as off
            if not bool(torch.isfinite(factor).all()) or bool((factor < 0).any()):
                raise ValueError("threshold_scale_factor must be finite and >= 0 for every sequence")
        return
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
        raise TypeError(
            f"threshold_scale_factor must be None, a number or a float tensor, got {type(factor).__name__}")
    if not math.isfinite(factor) or factor < 0:
        raise ValueError(f"threshold_scale_factor must be finite and >= 0 (None or 0 = dense), got {factor}")


def _check_cu_seqlens(name, cu, device, total, batch=None):
    _require_tensor(name, cu, 1)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    _check_device(name, cu, device)
    if cu.numel() < 2:
        raise ValueError(f"{name} must hold at least 2 entries (batch + 1), got {cu.numel()}")
    if batch is not None and cu.numel() != batch + 1:
        raise ValueError(f"{name} must have {batch + 1} entries like cu_seqlens_q, got {cu.numel()}")
    if not _contents_checkable(cu):
        return None
    host = cu.cpu()
    if int(host[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(host[0])}")
    if bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing")
    if int(host[-1]) != total:
        raise ValueError(f"{name}[-1] must equal the total number of tokens ({total}), got {int(host[-1])}")
    return host


def _check_qkv(q, k, v, ndim, what):
    for name, t in (("q", q), ("k" + what, k), ("v" + what, v)):
        _require_tensor(name, t, ndim)
    _check_float("q", q)
    _check_float("k" + what, k, q.dtype)
    _check_float("v" + what, v, q.dtype)
    _check_device("k" + what, k, q.device)
    _check_device("v" + what, v, q.device)
    for name, t in (("q", q), ("k" + what, k), ("v" + what, v)):
        _check_last_contiguous(name, t)
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"k{what} and v{what} must have the same shape except the head dim: "
            f"{tuple(k.shape)} vs {tuple(v.shape)}")
    hq, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the number of q heads ({hq}) must be a positive multiple of kv heads ({hk})")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k{what} must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError("head dims must be > 0")


def _pack_result(out, lse, stats, return_lse, return_stats):
    res = [out]
    if return_lse:
        res.append(lse)
    if return_stats:
        res.append(stats)
    return res[0] if len(res) == 1 else tuple(res)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def prefill(q, k, v, *, causal: bool = False, softmax_scale: Optional[float] = None,
            threshold_scale_factor: Factor = None, cu_seqlens_q: Optional[torch.Tensor] = None,
            cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
            max_seqlen_k: Optional[int] = None, return_lse: bool = False,
            return_stats: bool = False, backend: str = "auto"):
    """BLASST attention for prefill.

    Batched: q [B, Lq, Hq, D], k [B, Lk, Hk, D], v [B, Lk, Hk, Dv] (Hq % Hk == 0: MHA, GQA, MQA).
    Varlen (as ``flash_attn_varlen_func``): q [total_q, Hq, D], k/v [total_k, Hk, D(v)] with
    ``cu_seqlens_q``/``cu_seqlens_k`` int32 [B + 1].

    ``causal`` is bottom-right aligned. ``threshold_scale_factor`` (None/0 = dense) sets
    λ = factor / Lk per sequence; a float32 tensor [B] gives one factor per sequence (it may be
    updated in place between CUDA-graph replays). ``softmax_scale`` defaults to 1/sqrt(D).

    Returns ``out`` [.., Hq, Dv] in q's dtype, then ``lse`` (float32 [B, Hq, Lq], or
    [Hq, total_q] varlen) if ``return_lse``, then a :class:`BlasstStats` if ``return_stats``.

    ``backend``: "auto" runs the CuTe DSL kernel for CUDA tensors and the reference on CPU;
    "reference" always runs the pure-torch reference; "cute" requires the kernel.
    """
    _check_backend(backend)
    _check_bool("causal", causal)
    _check_bool("return_lse", return_lse)
    _check_bool("return_stats", return_stats)
    _check_scale(softmax_scale)
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
        _check_qkv(q, k, v, 3, "")
        cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, q.shape[0])
        ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, k.shape[0],
                               batch=cu_seqlens_q.numel() - 1)
        batch = cu_seqlens_q.numel() - 1
        for name, given, cu in (("max_seqlen_q", max_seqlen_q, cq), ("max_seqlen_k", max_seqlen_k, ck)):
            if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < 0):
                raise ValueError(f"{name} must be a non-negative int, got {given!r}")
            if cu is None:
                continue
            longest = int((cu[1:] - cu[:-1]).max())
            if given is not None and given < longest:
                raise ValueError(f"{name} must be an int >= the longest sequence ({longest}), got {given!r}")
        if cq is None and max_seqlen_q is None:
            raise ValueError("max_seqlen_q is required when cu_seqlens content checks are off "
                             "(e.g. under CUDA-graph capture)")
        max_seqlen_q = max_seqlen_q if max_seqlen_q is not None else int((cq[1:] - cq[:-1]).max())
        max_seqlen_k = max_seqlen_k if max_seqlen_k is not None or ck is None else int((ck[1:] - ck[:-1]).max())
    else:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q/max_seqlen_k are only meaningful with cu_seqlens_q/cu_seqlens_k")
        _check_qkv(q, k, v, 4, "")
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
        batch = q.shape[0]
    _check_factor(threshold_scale_factor, batch, q.device)

    call = dispatch.PrefillCall(
        q=q, k=k, v=v, causal=causal, softmax_scale=softmax_scale,
        threshold_scale_factor=threshold_scale_factor, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        want_stats=return_stats)
    out, lse, stats = dispatch.run_prefill(call, backend)
    return _pack_result(out, lse, stats, return_lse, return_stats)


_decode_validated: dict = {}  # signature -> (cache capacity, token)
_TENSOR = torch.Tensor


def _decode_signature(q, k_cache, v_cache, cache_seqlens, block_table):
    """Everything the metadata checks of :func:`decode` read, or None (a non-tensor argument)."""
    if not (type(q) is _TENSOR and type(k_cache) is _TENSOR and type(v_cache) is _TENSOR
            and type(cache_seqlens) is _TENSOR
            and (block_table is None or type(block_table) is _TENSOR)):
        return None
    return (q.shape, q.stride(), q.dtype, q.device, k_cache.shape, k_cache.stride(), k_cache.dtype,
            k_cache.device, v_cache.shape, v_cache.stride(), v_cache.dtype, v_cache.device,
            cache_seqlens.shape, cache_seqlens.stride(), cache_seqlens.dtype, cache_seqlens.device,
            None if block_table is None else
            (block_table.shape, block_table.stride(), block_table.dtype, block_table.device))


def _check_kernel_alignment(**tensors):
    """The kernels read q and the caches with 16-byte vector loads and TMA."""
    for name, t in tensors.items():
        if t.data_ptr() % 16:
            raise ValueError(f"{name} must start at a 16-byte aligned address for the CUDA kernels, "
                             f"got {t.data_ptr():#x} (a view with an element offset?)")


def _check_decode_metadata(q, k_cache, v_cache, cache_seqlens, block_table) -> int:
    """The checks of :func:`decode` that need no tensor contents; returns the cache capacity."""
    _check_qkv(q, k_cache, v_cache, 4, "_cache")
    if q.shape[1] < 1:
        raise ValueError(f"q must hold at least one new token per sequence (dim 1), got {q.shape[1]}")
    batch = q.shape[0]
    _require_tensor("cache_seqlens", cache_seqlens, 1)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    _check_device("cache_seqlens", cache_seqlens, q.device)
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens must have shape [{batch}], got {tuple(cache_seqlens.shape)}")
    if block_table is not None:
        _require_tensor("block_table", block_table, 2)
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table must be int32, got {block_table.dtype}")
        _check_device("block_table", block_table, q.device)
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table must have {batch} rows (one per sequence), got {block_table.shape[0]}")
        return block_table.shape[1] * k_cache.shape[1]
    if k_cache.shape[0] != batch:
        raise ValueError(
            f"without block_table, k_cache must be [B, capacity, Hk, D] with B={batch}, "
            f"got {tuple(k_cache.shape)}")
    return k_cache.shape[1]


def _check_cache_contents(cache_seqlens, block_table, capacity: int, num_pages: int, page_size: int):
    """Index-tensor contents (needs a host copy): lengths within the capacity, used pages in range."""
    lens = cache_seqlens.cpu()
    if not lens.numel():
        return
    if int(lens.min()) < 0 or int(lens.max()) > capacity:
        raise ValueError(f"cache_seqlens must lie in [0, {capacity}] (the cache capacity), "
                         f"got range [{int(lens.min())}, {int(lens.max())}]")
    if block_table is not None:
        pages_needed = (lens + page_size - 1) // page_size
        bt = block_table.cpu()
        used = torch.arange(bt.shape[1])[None, :] < pages_needed[:, None]
        bad = used & ((bt < 0) | (bt >= num_pages))
        if bool(bad.any()):
            b, p = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {p}] = {int(bt[b, p])} is out of range [0, {num_pages})")


def decode(q, k_cache, v_cache, *, cache_seqlens: torch.Tensor,
           block_table: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
           threshold_scale_factor: Factor = None, return_lse: bool = False,
           return_stats: bool = False, backend: str = "auto"):
    """BLASST attention for decode against a (paged) KV cache.

    q [B, Lq_new, Hq, D] holds the new tokens (Lq_new >= 1: speculative tokens are causal among
    themselves); the cache already holds their keys, ``cache_seqlens[b]`` keys in all.
    Paged (vLLM/FlashInfer convention): k_cache/v_cache [num_pages, page_size, Hk, D(v)],
    ``block_table`` [B, max_pages] int32. Contiguous: k_cache/v_cache [B, capacity, Hk, D(v)].
    The caches may be strided views (head dim contiguous, other strides 16-byte multiples, k and
    v with equal strides): transformers' [B, Hk, S, D] cache as ``.transpose(1, 2)``, or HND pages
    [num_pages, Hk, page_size, D] as ``.transpose(1, 2)``, are read in place.
    λ = threshold_scale_factor / cache_seqlens[b]. Returns like :func:`prefill` (lse [B, Hq, Lq_new]).
    """
    # Common argument values are accepted inline (host time per decode step); anything else
    # goes through the shared checks, which raise the errors.
    if backend not in BACKENDS:
        _check_backend(backend)
    if type(return_lse) is not bool or type(return_stats) is not bool:
        _check_bool("return_lse", return_lse)
        _check_bool("return_stats", return_stats)
    if softmax_scale is not None:
        _check_scale(softmax_scale)
    # The metadata checks below depend only on (shape, stride, dtype, device) of the tensors:
    # a signature that passed them once is remembered (host overhead of repeated decode steps).
    sig = _decode_signature(q, k_cache, v_cache, cache_seqlens, block_table)
    entry = _decode_validated.get(sig) if sig is not None else None
    if entry is None:
        capacity = _check_decode_metadata(q, k_cache, v_cache, cache_seqlens, block_table)
        token = None
        if sig is not None:
            if len(_decode_validated) > 4096:
                _decode_validated.clear()
            # A unique token stands for the signature downstream (hashed by identity: cheap).
            token = object()
            _decode_validated[sig] = (capacity, token)
    else:
        capacity, token = entry
    batch = q.shape[0]
    # (_CHECK_CONTENTS first: with checks off, a CUDA call skips even the capture query.)
    if (_CHECK_CONTENTS or not cache_seqlens.is_cuda) and _contents_checkable(cache_seqlens):
        _check_cache_contents(cache_seqlens, block_table, capacity, k_cache.shape[0], k_cache.shape[1])
    f = threshold_scale_factor
    if not (f is None or (type(f) is float and 0.0 <= f < math.inf)):
        _check_factor(f, batch, q.device)
    if (q.data_ptr() | k_cache.data_ptr() | v_cache.data_ptr()) & 15 and q.is_cuda \
            and backend != "reference":
        _check_kernel_alignment(q=q, k_cache=k_cache, v_cache=v_cache)

    if token is not None and not return_stats and backend != "reference":
        launch = dispatch.direct_decode_launcher(token)
        if launch is not None:  # this signature ran the kernel before, with no fix-ups
            out, lse = launch(q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=block_table,
                              softmax_scale=softmax_scale, threshold_scale_factor=f,
                              want_lse=return_lse, plan_key=token)
            return (out, lse) if return_lse else out
    call = dispatch.DecodeCall(
        q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, block_table=block_table,
        softmax_scale=softmax_scale, threshold_scale_factor=threshold_scale_factor,
        want_stats=return_stats, want_lse=return_lse, signature=token)
    out, lse, stats = dispatch.run_decode(call, backend)
    return _pack_result(out, lse, stats, return_lse, return_stats)


def decode_mla(q, kv_cache, *, cache_seqlens: torch.Tensor, block_table: Optional[torch.Tensor] = None,
               softmax_scale: float, threshold_scale_factor: Factor = None, head_dim_v: int = 512,
               return_lse: bool = False, return_stats: bool = False, backend: str = "auto"):
    """Absorbed multi-head latent attention (DeepSeek-style MLA) decode with BLASST.

    q [B, Lq_new, H, 576] (512 latent + 64 rope dims); one latent row per token, shared by every
    head: paged ``kv_cache`` [num_pages, page_size, 576] with ``block_table`` [B, max_pages] int32,
    or contiguous [B, capacity, 576]. K is the whole row, V its first ``head_dim_v`` (512) dims.
    ``softmax_scale`` is required (MLA folds 1/sqrt(192) with YaRN terms). The rows of a tile are
    all H heads x new tokens of a sequence, so a tile is skipped only when every head agrees.
    λ = threshold_scale_factor / cache_seqlens[b].
    Returns out [B, Lq_new, H, head_dim_v] (+ lse [B, H, Lq_new], + stats [B, 1]).

    CUDA tensors run the sm90 kernel (bf16/fp16, D 576, head_dim_v 512, page sizes
    16/32/64/128/256 or a contiguous cache); anything else raises NotImplementedError unless
    ``backend="reference"``. The reference (CPU, or ``backend="reference"``) uses the kernel's
    tile geometry, so both take the same skip decisions.

    Skipping saves the exp and the P·V product, never bytes (V is part of the K row). It pays
    where a latent row feeds the most MMA work: H=128 (B=64 L=32k, ~70 % skipped: 1.2x its dense
    on an H100, 1.3-1.4x on an H200). At H=16/64 the dense kernel already runs at the DRAM roof,
    and the skip build at ~70 % ran 0.94-0.95x of dense on an H100
    (perf/results/mla-decode-h100-table.md): leave the factor None there.
    """
    _check_backend(backend)
    _check_bool("return_lse", return_lse)
    _check_bool("return_stats", return_stats)
    _require_tensor("q", q, 4)
    _require_tensor("kv_cache", kv_cache, 3)
    if softmax_scale is None:
        raise ValueError("softmax_scale is required for MLA (e.g. 1/sqrt(192) times the YaRN factor)")
    _check_scale(softmax_scale)
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) \
            or not 0 < head_dim_v <= kv_cache.shape[-1]:
        raise ValueError(f"head_dim_v must be an int in (0, {kv_cache.shape[-1]}], got {head_dim_v!r}")
    _check_float("q", q)
    _check_float("kv_cache", kv_cache, q.dtype)
    _check_device("kv_cache", kv_cache, q.device)
    _check_last_contiguous("kv_cache", kv_cache)
    if q.shape[-1] != kv_cache.shape[-1]:
        raise ValueError(f"q and kv_cache must have the same head dim (576 for DeepSeek MLA), got "
                         f"{q.shape[-1]} and {kv_cache.shape[-1]}")
    if q.shape[2] < 1:
        raise ValueError(f"q must hold at least one head (dim 2), got shape {tuple(q.shape)}")
    if block_table is None and kv_cache.shape[0] != q.shape[0]:
        raise ValueError(
            f"without block_table, kv_cache must be [B, capacity, 576] with B={q.shape[0]}, "
            f"got {tuple(kv_cache.shape)}")
    k_cache = kv_cache.unsqueeze(2)
    v_cache = kv_cache[..., :head_dim_v].unsqueeze(2)
    # Shapes, dtypes, devices, index tensors (the decode checks on the one-head expanded form).
    capacity = _check_decode_metadata(q, k_cache, v_cache, cache_seqlens, block_table)
    batch = q.shape[0]
    if _contents_checkable(cache_seqlens):
        _check_cache_contents(cache_seqlens, block_table, capacity, kv_cache.shape[0], kv_cache.shape[1])
    _check_factor(threshold_scale_factor, batch, q.device)

    call = dispatch.DecodeMlaCall(
        q=q, kv_cache=kv_cache, cache_seqlens=cache_seqlens, block_table=block_table,
        softmax_scale=float(softmax_scale), threshold_scale_factor=threshold_scale_factor,
        head_dim_v=head_dim_v, want_stats=return_stats)
    out, lse, stats = dispatch.run_decode_mla(call, backend)
    return _pack_result(out, lse, stats, return_lse, return_stats)


__all__ = ["prefill", "decode", "decode_mla", "BlasstStats"]
