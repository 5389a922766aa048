"""The checkpoint schema NVIDIA Model-Optimizer, TensorRT-LLM and vLLM-Omni use for skip-softmax.

``config.json`` -> ``sparse_attention_config.config_groups.group_N`` with
``algorithm: "skip_softmax"``::

    {"algorithm": "skip_softmax",
     "threshold_scale_factor": {"formula": "a * exp(b * target_sparsity)",
                                "prefill": {"a": ..., "b": ...}, "decode": {"a": ..., "b": ...}},
     "target_sparsity": {"prefill": 0.5, "decode": 0.5},
     "ignore": ["fnmatch patterns of layers left dense"]}

``threshold_scale_factor = a * exp(b * target_sparsity)`` per phase, and at run time
``λ = threshold_scale_factor / L_kv`` per sequence. Variants seen in the wild are read too:
phase-agnostic ``"coefficients": {"a", "b"}`` and a scalar ``target_sparsity``. Only the formula
above is evaluated; any other formula is rejected loudly rather than guessed.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

ALGORITHM = "skip_softmax"
FORMULA = "a * exp(b * target_sparsity)"
PHASES = ("prefill", "decode")

ConfigSource = Union[str, os.PathLike, dict]


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def _check_target(name: str, target) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(target).__name__}")
    if not (0.0 <= float(target) < 1.0):
        raise ValueError(f"{name} must lie in [0, 1), got {target}")
    return float(target)


def _check_coeff(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    return float(x)


@dataclass
class SkipSoftmaxConfig:
    """Calibrated coefficients (a, b) per phase, default targets and layers left dense.

    ``coefficients["prefill"] = (a, b)`` means
    ``threshold_scale_factor = a * exp(b * target_sparsity)`` for prefill.
    """

    coefficients: Dict[str, Tuple[float, float]]
    target_sparsity: Dict[str, float] = field(default_factory=dict)
    ignore: List[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.coefficients:
            raise ValueError("coefficients must hold (a, b) for at least one phase")
        for phase, ab in self.coefficients.items():
            _check_phase(phase)
            a, b = ab
            if _check_coeff(f"{phase}.a", a) <= 0:
                raise ValueError(f"{phase}.a must be > 0, got {a}")
            _check_coeff(f"{phase}.b", b)
        for phase, t in self.target_sparsity.items():
            _check_phase(phase)
            _check_target(f"target_sparsity[{phase!r}]", t)

    def factor(self, phase: str, target_sparsity: Optional[float] = None) -> float:
        """``threshold_scale_factor`` of ``phase`` at ``target_sparsity`` (default: the stored target).

        A target of 0 means dense and returns 0.0 (the formula itself never reaches 0).
        """
        _check_phase(phase)
        if phase not in self.coefficients:
            raise ValueError(
                f"this calibration has no {phase!r} coefficients (it has {sorted(self.coefficients)})"
            )
        if target_sparsity is None:
            if phase not in self.target_sparsity:
                raise ValueError(f"no target_sparsity given and none stored for {phase!r}")
            target_sparsity = self.target_sparsity[phase]
        t = _check_target("target_sparsity", target_sparsity)
        if t == 0.0:
            return 0.0
        a, b = self.coefficients[phase]
        return a * math.exp(b * t)

    def ignores(self, layer_name: str) -> bool:
        """True if ``layer_name`` matches an ``ignore`` pattern (also as a suffix: ``layers.0.*``
        matches ``model.layers.0.self_attn``)."""
        parts = layer_name.split(".")
        names = {".".join(parts[i:]) for i in range(len(parts))}
        return any(fnmatch.fnmatchcase(n, pat) for pat in self.ignore for n in names)

    # -- schema ------------------------------------------------------------------------------

    def to_group(self) -> dict:
        """The ``config_groups`` entry (``algorithm: skip_softmax``)."""
        tsf = {"formula": FORMULA}
        for phase in PHASES:
            if phase in self.coefficients:
                a, b = self.coefficients[phase]
                tsf[phase] = {"a": float(a), "b": float(b)}
        group = {"algorithm": ALGORITHM, "threshold_scale_factor": tsf}
        if self.target_sparsity:
            group["target_sparsity"] = {
                p: float(self.target_sparsity[p]) for p in PHASES if p in self.target_sparsity
            }
        group["ignore"] = list(self.ignore)
        return group

    @classmethod
    def from_group(cls, group: dict) -> "SkipSoftmaxConfig":
        """Parse one ``config_groups`` entry whose algorithm is ``skip_softmax``."""
        if not isinstance(group, dict):
            raise TypeError(f"a config group must be a dict, got {type(group).__name__}")
        if group.get("algorithm") != ALGORITHM:
            raise ValueError(f"config group algorithm must be {ALGORITHM!r}, got {group.get('algorithm')!r}")
        tsf = group.get("threshold_scale_factor")
        if not isinstance(tsf, dict):
            raise ValueError(
                "the skip_softmax group has no threshold_scale_factor dict "
                "(uncalibrated groups carry no coefficients to read)"
            )
        formula = " ".join(str(tsf.get("formula", FORMULA)).split())
        if formula != FORMULA:
            raise NotImplementedError(
                f"threshold_scale_factor.formula {formula!r} is not supported (only {FORMULA!r})"
            )
        coeffs = {}
        if "coefficients" in tsf:  # phase-agnostic variant: one (a, b) for every phase
            c = tsf["coefficients"]
            coeffs = {p: (c["a"], c["b"]) for p in PHASES}
        for phase in PHASES:
            if phase in tsf:
                coeffs[phase] = (tsf[phase]["a"], tsf[phase]["b"])
        ts = group.get("target_sparsity", {})
        if isinstance(ts, (int, float)) and not isinstance(ts, bool):
            ts = {p: float(ts) for p in coeffs}
        elif not isinstance(ts, dict):
            raise ValueError(f"target_sparsity must be a number or a dict per phase, got {ts!r}")
        ignore = group.get("ignore", [])
        if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
            raise ValueError(f"ignore must be a list of fnmatch patterns, got {ignore!r}")
        return cls(coefficients=coeffs, target_sparsity=dict(ts), ignore=list(ignore))

    @classmethod
    def from_config(cls, source: ConfigSource) -> "SkipSoftmaxConfig":
        """Read from a ``config.json`` path, a model directory holding one, a loaded config.json
        dict, or a ``sparse_attention_config`` dict."""
        cfg = _load(source)
        sac = cfg.get("sparse_attention_config", cfg)
        groups = sac.get("config_groups") if isinstance(sac, dict) else None
        if not isinstance(groups, dict):
            raise ValueError("no sparse_attention_config.config_groups found in the config")
        skip = [g for g in groups.values() if isinstance(g, dict) and g.get("algorithm") == ALGORITHM]
        if not skip:
            raise ValueError(f"no config group with algorithm {ALGORITHM!r} in sparse_attention_config")
        if len(skip) > 1:
            raise ValueError(f"at most one config group may use {ALGORITHM!r}, found {len(skip)}")
        return cls.from_group(skip[0])

    def merge_into(self, config: Optional[dict] = None) -> dict:
        """A copy of ``config`` (a config.json dict) with this calibration as ``group_0``.

        Other (non skip-softmax) groups are kept, renumbered after it; an existing skip-softmax
        group is replaced.
        """
        out = copy.deepcopy(config) if config else {}
        sac = out.setdefault("sparse_attention_config", {})
        old = sac.get("config_groups", {}) or {}
        others = [g for g in old.values() if not (isinstance(g, dict) and g.get("algorithm") == ALGORITHM)]
        groups = {"group_0": self.to_group()}
        for i, g in enumerate(others, start=1):
            groups[f"group_{i}"] = g
        sac["config_groups"] = groups
        sac.setdefault("producer", {"name": "blasst_cute"})
        return out

    def write(self, path: Union[str, os.PathLike]) -> str:
        """Write into ``path`` (a config.json file or a directory): existing content is kept and
        only the skip-softmax group replaced. Returns the file written."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        existing = _load(path) if os.path.exists(path) else {}
        with open(path, "w") as f:
            json.dump(self.merge_into(existing), f, indent=2)
            f.write("\n")
        return path


def _load(source: ConfigSource) -> dict:
    if isinstance(source, dict):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"config must be a dict or a path, got {type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"config file {path!r} does not exist")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} does not hold a JSON object")
    return data


__all__ = ["SkipSoftmaxConfig", "FORMULA", "ALGORITHM", "PHASES"]
