"""Choose the backend and tile geometry for a validated call, and run it.

The geometry of a configuration is data: the CuTe DSL kernel uses it, and the reference (the CPU
backend, and the oracle in tests) is called with the very same geometry, so both take the same
skip decisions. Compiled kernels are cached by :mod:`blasst_cute.kernels.launch`.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import reference
from .reference import Geometry
from .stats import BlasstStats

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class PrefillCall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    softmax_scale: Optional[float]
    threshold_scale_factor: object
    cu_seqlens_q: Optional[torch.Tensor]
    cu_seqlens_k: Optional[torch.Tensor]
    max_seqlen_q: Optional[int]
    max_seqlen_k: Optional[int]
    want_stats: bool

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None


@dataclass
class DecodeCall:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor
    block_table: Optional[torch.Tensor]
    softmax_scale: Optional[float]
    threshold_scale_factor: object
    want_stats: bool
    want_lse: bool = True
    # The API's validated metadata signature (shapes, strides, dtypes, devices of every tensor):
    # keys the support verdict and the kernel's launch plan without rebuilding them per call.
    signature: object = None


@functools.lru_cache(maxsize=None)
def _kernel_module(name: str):
    """(module, None) for the kernel glue module ``blasst_cute.kernels.<name>``, or (None, why)."""
    try:
        return importlib.import_module(f"{__package__}.kernels.{name}"), None
    except Exception as exc:  # pragma: no cover - depends on the installation
        return None, f"the CuTe DSL kernels could not be imported ({type(exc).__name__}: {exc})"


_capabilities: dict = {}


def _capability(t: torch.Tensor) -> Tuple[int, int]:
    """The compute capability of a CUDA tensor's device (queried once per device)."""
    idx = t.get_device()
    cap = _capabilities.get(idx)
    if cap is None:
        cap = _capabilities[idx] = torch.cuda.get_device_capability(t.device)
    return cap


def prefill_geometry(head_dim: int, head_dim_v: int, causal: bool, dtype: torch.dtype) -> Geometry:
    """The tile geometry the Hopper prefill kernel uses for this configuration."""
    launch, _ = _kernel_module("launch")
    # The geometry does not depend on the dtype: fp32/fp64 reference calls take the bf16 kernel's,
    # so CPU and GPU runs of one workload skip the same tiles.
    kdtype = dtype if dtype in KERNEL_DTYPES else torch.bfloat16
    if launch is not None and hasattr(launch, "prefill_geometry"):
        try:
            return Geometry(**launch.prefill_geometry(head_dim, head_dim_v, causal, kdtype))
        except NotImplementedError:
            pass  # a head dim no kernel takes: the reference still runs, at the default tiling
    return Geometry(block_m=128, block_n=128)


def decode_geometry(q_shape, k_cache_shape, block_table_shape=None, num_sms: Optional[int] = None) -> Geometry:
    """The tile geometry the Hopper decode kernel uses for these shapes.

    The rows of a tile pack the G query heads x new tokens of one kv head; the split count is
    planned from the cache capacity and the SM count (132, an H100/H200, when no GPU is given),
    never from cache_seqlens, so the same shapes always take the same decisions.
    """
    B, lq, hq, _ = q_shape
    hk = k_cache_shape[2]
    if block_table_shape is not None:
        page_size, cap = k_cache_shape[1], block_table_shape[1] * k_cache_shape[1]
    else:
        page_size, cap = None, k_cache_shape[1]
    launch, _ = _kernel_module("launch_decode")
    if launch is not None:
        try:
            return Geometry(**launch.decode_geometry_sm90(hq // hk, lq, page_size, B, hk, cap,
                                                          num_sms or 132))
        except NotImplementedError:  # a page size no kernel takes: the reference still runs
            return Geometry(**launch.decode_geometry_sm90(hq // hk, lq, None, B, hk, cap, num_sms or 132))
    return Geometry(block_m=64, block_n=128, pack_gqa=True)


def _sm90_unsupported(q: torch.Tensor, kernel: str) -> Optional[str]:
    """What every sm90 kernel needs of q: a 16-bit float dtype and a Hopper device."""
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (the kernels take float16 or bfloat16)"
    major, minor = _capability(q)
    if major != 9:
        return f"compute capability {major}.{minor} (the {kernel} kernel targets sm_90a: H100/H200)"
    return None


# ----------------------------------------------------------------------------------------------
# Prefill
# ----------------------------------------------------------------------------------------------

def _prefill_unsupported(call: PrefillCall) -> Optional[str]:
    """Why the sm90 prefill kernel cannot run this call (None when it can)."""
    q, v = call.q, call.v
    why = _sm90_unsupported(q, "prefill")
    if why is not None:
        return why
    launch, why = _kernel_module("launch")
    if launch is None:
        return why
    pairs = getattr(launch, "SUPPORTED_HEAD_DIM_PAIRS", ((64, 64), (128, 128), (256, 256)))
    if (q.shape[-1], v.shape[-1]) not in pairs:
        return (f"head dims q/k={q.shape[-1]}, v={v.shape[-1]} (supported q/k/v: "
                f"{', '.join(f'{d}/{dv}' for d, dv in pairs)})")
    if not hasattr(launch, "run_prefill_sm90"):
        return "the sm90 prefill kernel is not built in this version"
    return None


def run_prefill(call: PrefillCall, backend: str) -> Tuple[torch.Tensor, torch.Tensor, Optional[BlasstStats]]:
    on_gpu = call.q.is_cuda
    if backend == "reference" or (backend == "auto" and not on_gpu):
        return _prefill_reference(call)
    if not on_gpu:
        raise NotImplementedError("backend='cute' needs CUDA tensors; q is on the CPU")
    why = _prefill_unsupported(call)
    if why is not None:
        raise NotImplementedError(f"blasst_cute.prefill has no CuTe DSL kernel for {why}; "
                                  "pass backend='reference' to run the (slow) reference explicitly")
    return _prefill_kernel(call)


def _prefill_reference(call: PrefillCall):
    geom = prefill_geometry(call.q.shape[-1], call.v.shape[-1], call.causal, call.q.dtype)
    common = dict(causal=call.causal, softmax_scale=call.softmax_scale,
                  threshold_scale_factor=call.threshold_scale_factor, **geom.kwargs())
    if call.varlen:
        out, lse, stats = reference.blasst_attention_varlen(
            call.q, call.k, call.v, cu_seqlens_q=call.cu_seqlens_q, cu_seqlens_k=call.cu_seqlens_k, **common)
    else:
        out, lse, stats = reference.blasst_attention(call.q, call.k, call.v, **common)
    return out, lse, (stats if call.want_stats else None)


def _prefill_kernel(call: PrefillCall):
    launch, _ = _kernel_module("launch")
    q, k, v = call.q, call.k, call.v
    hq = q.shape[-2]
    if call.varlen:
        batch = call.cu_seqlens_q.numel() - 1
        lse = torch.empty(hq, q.shape[0], dtype=torch.float32, device=q.device)
    else:
        batch = q.shape[0]
        lse = torch.empty(batch, hq, q.shape[1], dtype=torch.float32, device=q.device)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    counts = None
    if call.want_stats:  # visited, skipped, then the P·V counts
        counts = torch.zeros(4, batch, hq, dtype=torch.int32, device=q.device)
    launch.run_prefill_sm90(
        q, k, v, out, lse, causal=call.causal, softmax_scale=call.softmax_scale,
        threshold_scale_factor=call.threshold_scale_factor, cu_seqlens_q=call.cu_seqlens_q,
        cu_seqlens_k=call.cu_seqlens_k, max_seqlen_q=call.max_seqlen_q,
        max_seqlen_k=call.max_seqlen_k, visited=None if counts is None else counts[0],
        skipped=None if counts is None else counts[1],
        pv_counts=None if counts is None else counts[2:])
    stats = None
    if call.want_stats:
        c = counts.long()
        stats = BlasstStats(c[0], c[1], pv_visited=c[2], pv_skipped=c[3])
    return out, lse, stats


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------

# signature -> (None or why unsupported, make q / block_table / cache_seqlens contiguous?)
_decode_ok: dict = {}
# API signature token -> the kernel launcher, for signatures that need no fix-ups: later calls
# with that signature (and no stats) go straight to it (host time per decode step).
_decode_direct: dict = {}


def direct_decode_launcher(signature):
    """``launch_decode.decode_sm90`` when a validated signature is known to run the kernel as is
    (no copies, no reference), else None."""
    return _decode_direct.get(signature)


def _decode_unsupported(call: DecodeCall) -> Optional[str]:
    """Why the sm90 decode kernel cannot run this call (None when it can)."""
    q, kc, vc = call.q, call.k_cache, call.v_cache
    why = _sm90_unsupported(q, "decode")
    if why is not None:
        return why
    if q.shape[-1] not in (64, 128) or vc.shape[-1] != q.shape[-1]:
        return f"head dims q/k={q.shape[-1]}, v={vc.shape[-1]} (supported: 64, 128 with Dv == D)"
    launch, why = _kernel_module("launch_decode")
    if launch is None:
        return why
    if call.block_table is not None and kc.shape[1] not in launch.SUPPORTED_PAGE_SIZES:
        return f"page size {kc.shape[1]} (supported: {sorted(launch.SUPPORTED_PAGE_SIZES)})"
    if kc.stride() != vc.stride():
        return f"k_cache and v_cache with different strides ({kc.stride()} vs {vc.stride()})"
    # Any token / head / page strides (e.g. transformers' [B, H, S, D] cache seen as [B, S, H, D],
    # or FlashInfer's HND pages): the TMA descriptor takes them as long as they are 16-byte
    # multiples (the kernel keeps the token and head strides in 32 bits).
    if any(st % 8 for st in kc.stride()[:3]):
        return f"a KV cache whose strides are not multiples of 16 bytes (strides {kc.stride()})"
    if max(kc.stride(1), kc.stride(2)) >= 2 ** 31:
        return f"a KV cache with token/head strides >= 2**31 elements (strides {kc.stride()})"
    return None


def run_decode(call: DecodeCall, backend: str):
    q = call.q
    on_gpu = q.is_cuda
    if backend == "reference" or (backend == "auto" and not on_gpu):
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if on_gpu else None
        geom = decode_geometry(q.shape, call.k_cache.shape,
                               None if call.block_table is None else call.block_table.shape, num_sms)
        out, lse, stats = reference.blasst_attention_paged(
            q, call.k_cache, call.v_cache, cache_seqlens=call.cache_seqlens,
            block_table=call.block_table, causal=True, softmax_scale=call.softmax_scale,
            threshold_scale_factor=call.threshold_scale_factor, **geom.kwargs())
        return out, lse, (stats if call.want_stats else None)
    if not on_gpu:
        raise NotImplementedError("backend='cute' needs CUDA tensors; q is on the CPU")
    kc = call.k_cache
    # The support verdict depends only on metadata: memoized per signature (the API's token, or
    # the metadata read here). The API's token also fixes every stride, so the contiguity
    # fix-ups below are memoized with it.
    sig = call.signature
    if sig is None:
        sig = (q.get_device(), q.dtype, q.shape[-1], call.v_cache.shape[-1], kc.shape,
               kc.stride(), call.v_cache.stride(), call.block_table is None)
    verdict = _decode_ok.get(sig)
    if verdict is None:
        if len(_decode_ok) > 4096:
            _decode_ok.clear()
        table = call.block_table
        verdict = (_decode_unsupported(call), not q.is_contiguous(),
                   table is not None and table.stride(-1) != 1,
                   not call.cache_seqlens.is_contiguous())
        if call.signature is None:  # strides of q / table / lens not in the key: per call
            verdict = (verdict[0], None, None, None)
        _decode_ok[sig] = verdict
    why, fix_q, fix_table, fix_lens = verdict
    if why is not None:
        raise NotImplementedError(f"blasst_cute.decode has no CuTe DSL kernel for {why}; "
                                  "pass backend='reference' to run the (slow) reference explicitly")
    launch, _ = _kernel_module("launch_decode")
    if call.signature is not None and not (fix_q or fix_table or fix_lens):
        if len(_decode_direct) > 4096:
            _decode_direct.clear()
        _decode_direct[call.signature] = launch.decode_sm90
    if fix_q is None:
        fix_q = not q.is_contiguous()
        fix_table = call.block_table is not None and call.block_table.stride(-1) != 1
        fix_lens = not call.cache_seqlens.is_contiguous()
    if fix_q:
        q = q.contiguous()
    visited = skipped = v_loaded = None
    if call.want_stats:
        cnt = torch.zeros(3, q.shape[0], kc.shape[2], dtype=torch.int32, device=q.device)
        visited, skipped, v_loaded = cnt[0], cnt[1], cnt[2]
    table = call.block_table
    if fix_table:
        table = table.contiguous()
    lens = call.cache_seqlens
    if fix_lens:
        lens = lens.contiguous()
    out, lse = launch.decode_sm90(
        q, kc, call.v_cache, cache_seqlens=lens, block_table=table,
        softmax_scale=call.softmax_scale, threshold_scale_factor=call.threshold_scale_factor,
        visited=visited, skipped=skipped, v_loaded=v_loaded, want_lse=call.want_lse,
        plan_key=call.signature)
    stats = None
    if call.want_stats:
        stats = BlasstStats(visited.long(), skipped.long(), v_loaded.long())
    return out, lse, stats


# ----------------------------------------------------------------------------------------------
# Absorbed MLA decode (one latent kv head; K = the 576-dim row, V = its first head_dim_v dims)
# ----------------------------------------------------------------------------------------------

MLA_HEAD_DIM = 576
MLA_HEAD_DIM_V = 512


@dataclass
class DecodeMlaCall:
    q: torch.Tensor  # [B, Lq_new, H, 576]
    kv_cache: torch.Tensor  # paged [pages, page_size, 576] or contiguous [B, capacity, 576]
    cache_seqlens: torch.Tensor
    block_table: Optional[torch.Tensor]
    softmax_scale: float
    threshold_scale_factor: object
    head_dim_v: int
    want_stats: bool


def mla_decode_geometry(q_shape, kv_cache_shape, block_table_shape=None,
                        num_sms: Optional[int] = None) -> Geometry:
    """The tile geometry the Hopper MLA decode kernel uses for these shapes.

    Rows of a tile pack the H heads x new tokens of a sequence; key tiles of 64; the split count
    is planned from the cache capacity and the SM count (132 when no GPU is given), never from
    cache_seqlens. The reference reproduces the kernel's decisions from exactly this.
    """
    B, lq, H, _ = q_shape
    if block_table_shape is not None:
        page_size, cap = kv_cache_shape[1], block_table_shape[1] * kv_cache_shape[1]
    else:
        page_size, cap = None, kv_cache_shape[1]
    launch, _ = _kernel_module("launch_mla")
    if launch is not None:
        try:
            return Geometry(**launch.mla_decode_geometry_sm90(H, lq, page_size, B, cap, num_sms or 132))
        except NotImplementedError:  # a page size the kernel does not take: the reference runs
            return Geometry(**launch.mla_decode_geometry_sm90(H, lq, None, B, cap, num_sms or 132))
    return Geometry(block_m=64, block_n=64, pack_gqa=True, rows_per_decision=64)


def _mla_unsupported(call: DecodeMlaCall) -> Optional[str]:
    """Why the sm90 MLA decode kernel cannot run this call (None when it can)."""
    q, kv = call.q, call.kv_cache
    why = _sm90_unsupported(q, "MLA decode")
    if why is not None:
        return why
    if q.shape[-1] != MLA_HEAD_DIM or call.head_dim_v != MLA_HEAD_DIM_V:
        return (f"head dims q/k={q.shape[-1]}, v={call.head_dim_v} (supported: "
                f"{MLA_HEAD_DIM}/{MLA_HEAD_DIM_V})")
    launch, why = _kernel_module("launch_mla")
    if launch is None:
        return why
    if call.block_table is not None and kv.shape[1] not in launch.SUPPORTED_PAGE_SIZES:
        return f"page size {kv.shape[1]} (supported: {sorted(launch.SUPPORTED_PAGE_SIZES)})"
    if kv.stride(0) % 8 or kv.stride(1) % 8 or kv.data_ptr() % 16:
        return (f"a latent cache whose rows are not 16-byte aligned (strides {kv.stride()}, "
                f"address {kv.data_ptr():#x})")
    return None


def run_decode_mla(call: DecodeMlaCall, backend: str):
    """(out [B, Lq, H, Dv], lse [B, H, Lq], stats with counters [B, 1] or None)."""
    q, kv = call.q, call.kv_cache
    on_gpu = q.is_cuda
    if backend == "reference" or (backend == "auto" and not on_gpu):
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if on_gpu else None
        geom = mla_decode_geometry(q.shape, kv.shape,
                                   None if call.block_table is None else call.block_table.shape,
                                   num_sms)
        out, lse, stats = reference.blasst_attention_paged(
            q, kv.unsqueeze(2), kv[..., :call.head_dim_v].unsqueeze(2),
            cache_seqlens=call.cache_seqlens, block_table=call.block_table, causal=True,
            softmax_scale=call.softmax_scale, threshold_scale_factor=call.threshold_scale_factor,
            **geom.kwargs())
        return out, lse, (stats if call.want_stats else None)
    if not on_gpu:
        raise NotImplementedError("backend='cute' needs CUDA tensors; q is on the CPU")
    why = _mla_unsupported(call)
    if why is not None:
        raise NotImplementedError(f"blasst_cute.decode_mla has no CuTe DSL kernel for {why}; "
                                  "pass backend='reference' to run the (slow) reference explicitly")
    launch, _ = _kernel_module("launch_mla")
    if not q.is_contiguous():
        q = q.contiguous()
    visited = skipped = None
    if call.want_stats:
        cnt = torch.zeros(2, q.shape[0], dtype=torch.int32, device=q.device)
        visited, skipped = cnt[0], cnt[1]
    table = call.block_table
    if table is not None and table.stride(-1) != 1:
        table = table.contiguous()
    lens = call.cache_seqlens
    if not lens.is_contiguous():
        lens = lens.contiguous()
    out, lse = launch.mla_decode_sm90(
        q, kv, cache_seqlens=lens, block_table=table, softmax_scale=call.softmax_scale,
        threshold_scale_factor=call.threshold_scale_factor, visited=visited, skipped=skipped)
    stats = None
    if call.want_stats:
        stats = BlasstStats(visited.long()[:, None], skipped.long()[:, None])
    return out, lse, stats
