"""Hugging Face transformers: ``attn_implementation="blasst"``.

    from blasst_cute.integrations import transformers as bt
    bt.register()                                     # attention AND mask function, same name
    bt.configure(prefill_factor=..., decode_factor=...)      # or target_sparsity=..., config=...
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="blasst")

What the attention function receives from transformers (5.x) and how it is handled:

* ``query`` [B, Hq, Sq, D] is usually a non-contiguous view of [B, Sq, Hq, D]; transposing back is
  free and gives the [B, S, H, D] layout of :func:`blasst_cute.prefill`.
* ``key``/``value`` [B, Hk, Skv, D(v)] with GQA heads *not* repeated (BLASST does GQA natively),
  and d_v may differ from d_qk (DeepSeek MLA expanded: 192 / 128).
* ``attention_mask`` is the 2-D padding mask of transformers' ``flash_attention_mask`` (registered
  under the same name, else transformers passes ``None`` and padded batches go wrong), or ``None``.
  Padded batches run as varlen (left padding, as ``generate`` pads); a mask shorter than the keys
  marks a static cache's unused tail (without a mask, contiguous ``position_ids`` do).
* Phases: a call whose queries are few (``Sq <= decode_max_query_len``, default 1) and follow a
  cache (``Skv > Sq``) is *decode* and runs :func:`blasst_cute.decode` with the decode factor;
  everything else is *prefill* (chunked prefill included: causal masks are bottom-right aligned)
  with the prefill factor. λ = factor / L_kv per sequence, padding excluded.

Unsupported features (sliding windows shorter than the keys, logit softcapping, attention sinks,
dropout, 4-D masks) raise ``NotImplementedError`` naming them; nothing falls back to dense silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

import blasst_cute
from blasst_cute.sparse_config import PHASES, SkipSoftmaxConfig

NAME = "blasst"
_UNSET = object()


@dataclass
class Settings:
    """What the attention function does; change with :func:`configure` or :func:`settings`."""

    prefill_factor: Optional[float] = None  # threshold_scale_factor for prefill (None/0: dense)
    decode_factor: Optional[float] = None
    decode_max_query_len: int = 1  # calls with at most this many new queries after a cache = decode
    collect_stats: bool = False
    backend: str = "auto"  # passed to blasst_cute.prefill/decode ("auto": kernels on CUDA, reference on CPU)
    calibration: Optional[SkipSoftmaxConfig] = None
    target_sparsity: Dict[str, float] = field(default_factory=dict)
    layer_names: Dict[int, str] = field(default_factory=dict)  # id(module) -> qualified name

    def factor(self, phase: str, layer_name: Optional[str]) -> Optional[float]:
        if self.calibration is not None and layer_name is not None and self.calibration.ignores(layer_name):
            return None  # the checkpoint asks for this layer to stay dense
        return self.prefill_factor if phase == "prefill" else self.decode_factor


@dataclass
class LayerStats:
    """Tile counters summed over the calls of one (phase, layer)."""

    visited: int = 0
    skipped: int = 0
    calls: int = 0

    @property
    def sparsity(self) -> float:
        return self.skipped / self.visited if self.visited else 0.0


_settings = Settings()
_stats: Dict[Tuple[str, int], LayerStats] = {}


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def _check_factor(name, f):
    if f is None:
        return None
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f < 0:
        raise ValueError(f"{name} must be None or a finite number >= 0, got {f!r}")
    return float(f)


def _targets(target_sparsity) -> Dict[str, float]:
    if isinstance(target_sparsity, dict):
        bad = set(target_sparsity) - set(PHASES)
        if bad:
            raise ValueError(f"target_sparsity keys must be among {PHASES}, got {sorted(bad)}")
        return dict(target_sparsity)
    if isinstance(target_sparsity, bool) or not isinstance(target_sparsity, (int, float)):
        raise TypeError(f"target_sparsity must be a number or a dict per phase, got {target_sparsity!r}")
    return {p: float(target_sparsity) for p in PHASES}


def configure(
    *,
    prefill_factor=_UNSET,
    decode_factor=_UNSET,
    target_sparsity=_UNSET,
    config=_UNSET,
    collect_stats=_UNSET,
    backend=_UNSET,
    decode_max_query_len=_UNSET,
    model=None,
) -> Settings:
    """Set the factors of the ``"blasst"`` attention (arguments left out keep their value).

    * ``prefill_factor`` / ``decode_factor``: ``threshold_scale_factor`` per phase (None/0 = dense).
    * ``config``: a calibration (:class:`SkipSoftmaxConfig`, a config.json path, a model
      directory or a config dict). Without explicit factors or ``target_sparsity`` its stored
      ``target_sparsity`` sets the factors; its ``ignore`` patterns keep layers dense.
    * ``target_sparsity``: a number or ``{"prefill": s, "decode": s}``; factors come from the
      calibration, ``a * exp(b * s)`` per phase. Giving it with an explicit factor of the same
      phase is an error.
    * ``collect_stats``: sum tile counters per (phase, layer); read with :func:`layer_stats`.
    * ``model``: lets ``ignore`` patterns match the model's own module names.
    """
    s = _settings
    new = dataclasses.replace(s, target_sparsity=dict(s.target_sparsity), layer_names=dict(s.layer_names))
    if config is not _UNSET:
        new.calibration = (
            None
            if config is None
            else (config if isinstance(config, SkipSoftmaxConfig) else SkipSoftmaxConfig.from_config(config))
        )
    explicit = {}
    if prefill_factor is not _UNSET:
        explicit["prefill"] = _check_factor("prefill_factor", prefill_factor)
    if decode_factor is not _UNSET:
        explicit["decode"] = _check_factor("decode_factor", decode_factor)
    targets = None
    if target_sparsity is not _UNSET and target_sparsity is not None:
        targets = _targets(target_sparsity)
    elif config is not _UNSET and new.calibration is not None and not explicit:
        targets = {p: t for p, t in new.calibration.target_sparsity.items()}
    if targets:
        clash = set(targets) & set(explicit)
        if target_sparsity is not _UNSET and clash:
            raise ValueError(
                f"give either target_sparsity or an explicit factor for {sorted(clash)}, not both"
            )
        if new.calibration is None:
            raise ValueError(
                "target_sparsity needs a calibration: pass config= (a SkipSoftmaxConfig, "
                "a config.json path or dict with sparse_attention_config)"
            )
        for phase, t in targets.items():
            explicit[phase] = new.calibration.factor(phase, t)
        new.target_sparsity = targets
    if "prefill" in explicit:
        new.prefill_factor = explicit["prefill"]
    if "decode" in explicit:
        new.decode_factor = explicit["decode"]
    if collect_stats is not _UNSET:
        if not isinstance(collect_stats, bool):
            raise TypeError(f"collect_stats must be a bool, got {type(collect_stats).__name__}")
        new.collect_stats = collect_stats
    if backend is not _UNSET:
        if backend not in ("auto", "reference", "cute"):
            raise ValueError(f"backend must be 'auto', 'reference' or 'cute', got {backend!r}")
        new.backend = backend
    if decode_max_query_len is not _UNSET:
        if not (isinstance(decode_max_query_len, int) and decode_max_query_len >= 1):
            raise ValueError(f"decode_max_query_len must be an int >= 1, got {decode_max_query_len!r}")
        new.decode_max_query_len = decode_max_query_len
    if model is not None:
        new.layer_names = {id(m): n for n, m in model.named_modules()}
    _set(new)
    return new


def _set(new: Settings) -> None:
    global _settings
    _settings = new


def current() -> Settings:
    """The settings in force."""
    return _settings


def reset() -> None:
    """Back to the defaults (dense, no stats) and clear the stats."""
    _set(Settings())
    reset_stats()


@contextlib.contextmanager
def settings(**kwargs):
    """``with settings(prefill_factor=..., ...):`` configure for a block, then restore."""
    saved = _settings
    try:
        yield configure(**kwargs)
    finally:
        _set(saved)


def layer_stats() -> Dict[str, Dict[int, LayerStats]]:
    """``{phase: {layer_idx: LayerStats}}`` summed since the last :func:`reset_stats`."""
    out: Dict[str, Dict[int, LayerStats]] = {p: {} for p in PHASES}
    for (phase, layer), st in sorted(_stats.items()):
        out[phase][layer] = dataclasses.replace(st)
    return out


def phase_stats(phase: str) -> LayerStats:
    """All layers of ``phase`` together."""
    tot = LayerStats()
    for (p, _), st in _stats.items():
        if p == phase:
            tot.visited += st.visited
            tot.skipped += st.skipped
            tot.calls += st.calls
    return tot


def reset_stats() -> None:
    _stats.clear()


def _record(phase, layer, stats) -> None:
    st = _stats.setdefault((phase, layer), LayerStats())
    st.visited += int(stats.visited.sum())
    st.skipped += int(stats.skipped.sum())
    st.calls += 1


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


def register(name: str = NAME) -> str:
    """Register the attention function and transformers' 2-D padding mask function under ``name``.

    Both are needed: without a mask function of the same name transformers passes
    ``attention_mask=None`` and left-padded batches attend to padding. Idempotent.
    """
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import flash_attention_mask
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "blasst_cute.integrations.transformers needs transformers >= 4.53 "
            f"(AttentionInterface and AttentionMaskInterface): {exc}"
        ) from exc
    AttentionInterface.register(name, blasst_attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


# ----------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------


def _reject_unsupported(module, dropout, sliding_window, softcap, s_aux, kv_len):
    if dropout:
        raise NotImplementedError(
            f"blasst attention has no dropout (got dropout={dropout}); call model.eval() for inference"
        )
    if softcap:
        raise NotImplementedError(f"blasst attention does not support logit softcapping (softcap={softcap})")
    if s_aux is not None:
        raise NotImplementedError("blasst attention does not support attention sinks (s_aux)")
    if sliding_window is not None and sliding_window < kv_len:
        # A window covering every key changes nothing; a shorter one would need window masking.
        raise NotImplementedError(
            f"blasst attention does not support sliding windows (sliding_window={sliding_window} "
            f"< {kv_len} keys, layer {getattr(module, 'layer_idx', '?')})"
        )


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu


def _static_cache_valid_keys(position_ids, q_len: int, kv_len: int) -> int:
    """Keys in use when no mask came: a static cache hands over all its slots, stale tail included,
    and (without padding) transformers passes no mask; contiguous position ids tell the length."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.shape[-1] != q_len or q_len == 0:
        return kv_len
    pos = position_ids.reshape(-1, q_len)
    if q_len > 1 and not bool((pos[:, 1:] - pos[:, :-1] == 1).all()):
        return kv_len  # packed sequences (positions restart): not a cache layout
    used = int(pos[:, -1].max()) + 1
    return used if q_len <= used < kv_len else kv_len


def _packed_cu_seqlens(kwargs, batch, q_len, kv_len, device):
    """cu_seqlens of a padding-free packed batch (batch 1), or None when the batch is not packed."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None:
            raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be given together")
        return cu_q.to(device=device, dtype=torch.int32), cu_k.to(device=device, dtype=torch.int32)
    pos = kwargs.get("position_ids")
    if (
        batch == 1
        and q_len == kv_len
        and q_len > 1
        and isinstance(pos, torch.Tensor)
        and pos.numel() == q_len
    ):
        starts = (pos.reshape(-1) == 0).nonzero().flatten()
        if starts.numel() > 1 or (starts.numel() == 1 and int(starts[0]) != 0):
            # Position ids restart inside the row: several sequences packed without padding.
            starts = starts if int(starts[0]) == 0 else torch.cat([starts.new_zeros(1), starts])
            bounds = torch.cat([starts, starts.new_tensor([q_len])]).to(torch.int32)
            return bounds, bounds
    return None


def blasst_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    s_aux: Optional[torch.Tensor] = None,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """The transformers attention interface: returns (out [B, Sq, Hq, Dv], None)."""
    s = _settings
    B, Hq, Sq, _ = query.shape
    Skv = key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    q = query.transpose(1, 2)  # [B, Sq, Hq, D]: free, FA layout
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)

    mask = attention_mask
    if mask is not None:
        if mask.dim() != 2:
            raise NotImplementedError(
                f"blasst attention takes the 2-D padding mask of its registered mask function, got a "
                f"{mask.dim()}-D mask of shape {tuple(mask.shape)} (call register() before loading the model)"
            )
        mask = mask.to(torch.bool)
        if mask.shape[1] < Skv:  # static cache: slots past the mask are unused
            Skv = mask.shape[1]
            k, v = k[:, :Skv], v[:, :Skv]
        elif mask.shape[1] > Skv:
            mask = mask[:, -Skv:]
        if bool(mask.all()):
            mask = None
    else:
        Skv = _static_cache_valid_keys(kwargs.get("position_ids"), Sq, Skv)
        k, v = k[:, :Skv], v[:, :Skv]
    _reject_unsupported(module, dropout, sliding_window, softcap, s_aux, Skv)

    decode = causal and Sq <= s.decode_max_query_len and Skv > Sq
    phase = "decode" if decode else "prefill"
    layer = getattr(module, "layer_idx", -1)
    name = s.layer_names.get(id(module), f"model.layers.{layer}.self_attn")
    factor = s.factor(phase, name)
    if factor:
        _warn_if_dense(phase, factor, int(mask.sum(1).min()) if mask is not None else Skv)
    common = dict(
        softmax_scale=scaling, threshold_scale_factor=factor, return_stats=s.collect_stats, backend=s.backend
    )

    if decode:
        out, stats = _decode(q, k, v, mask, common)
    else:
        packed = _packed_cu_seqlens(kwargs, B, Sq, Skv, q.device) if mask is None else None
        if packed is not None:
            cu_q, cu_k = packed
            res = blasst_cute.prefill(
                q[0], k[0], v[0], causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **common
            )
            out, stats = _split(res, s.collect_stats)
            out = out[None]
        elif mask is None:
            out, stats = _split(blasst_cute.prefill(q, k, v, causal=causal, **common), s.collect_stats)
        else:
            out, stats = _prefill_padded(q, k, v, mask, causal, common)
    if stats is not None:
        _record(phase, layer, stats)
    return out, None


_warned = set()


def _warn_if_dense(phase: str, factor: float, kv_len: int) -> None:
    """λ = factor / L >= 1 skips nothing: say so (once per phase, factor and power-of-2 length)."""
    if factor >= kv_len > 0:
        key = (phase, factor, kv_len.bit_length())
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"blasst {phase}: threshold_scale_factor {factor:g} >= {kv_len} keys, so λ >= 1 and "
                "no tile is skipped at this length (the target sparsity is not reachable here)",
                RuntimeWarning,
                stacklevel=3,
            )


def _split(res, with_stats):
    return (res[0], res[1]) if with_stats else (res, None)


def _prefill_padded(q, k, v, mask, causal, common):
    """Padded batch -> varlen (as transformers' flash path: the last Sq mask columns are the queries)."""
    B, Sq, Hq, D = q.shape
    Skv, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    idx_k = mask.reshape(-1).nonzero().flatten()
    q_mask = (
        mask
        if Sq == Skv
        else (torch.ones(B, Sq, dtype=torch.bool, device=q.device) if Sq == 1 else mask[:, -Sq:])
    )
    idx_q = q_mask.reshape(-1).nonzero().flatten()
    cu_k = _cu_seqlens(mask.sum(1))
    cu_q = _cu_seqlens(q_mask.sum(1))
    q_u = q.reshape(B * Sq, Hq, D).index_select(0, idx_q)
    k_u = k.reshape(B * Skv, Hk, D).index_select(0, idx_k)
    v_u = v.reshape(B * Skv, Hk, Dv).index_select(0, idx_k)
    res = blasst_cute.prefill(q_u, k_u, v_u, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **common)
    out_u, stats = _split(res, common["return_stats"])
    out = out_u.new_zeros(B * Sq, Hq, Dv)  # padding rows give 0, as FlashAttention
    out.index_copy_(0, idx_q, out_u)
    return out.view(B, Sq, Hq, Dv), stats


def _decode(q, k, v, mask, common):
    """New tokens against the cache; a padded cache is compacted so valid keys form a prefix."""
    B, Skv = k.shape[0], k.shape[1]
    if mask is None:
        lens = torch.full((B,), Skv, dtype=torch.int32, device=q.device)
    else:
        lens = mask.sum(1).to(torch.int32)
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # valid keys first, in order
        k = torch.gather(k, 1, order[:, :, None, None].expand(-1, -1, *k.shape[2:]))
        v = torch.gather(v, 1, order[:, :, None, None].expand(-1, -1, *v.shape[2:]))
    # transformers keeps the cache as [B, H, S, D]: k and v are its [B, S, H, D] views, which the
    # decode kernel reads in place (any 16-byte strides), so no per-step copy of the cache.
    if k.stride() != v.stride():  # the kernel takes one set of strides for both
        k, v = k.contiguous(), v.contiguous()
    res = blasst_cute.decode(q, k, v, cache_seqlens=lens, **common)
    return _split(res, common["return_stats"])


__all__ = [
    "register",
    "configure",
    "settings",
    "current",
    "reset",
    "layer_stats",
    "phase_stats",
    "reset_stats",
    "blasst_attention_forward",
    "Settings",
    "LayerStats",
    "NAME",
]
