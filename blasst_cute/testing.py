"""Yardsticks shared by the tests, the GPU check scripts and the demo (no BLASST logic here)."""

from __future__ import annotations

import math
import time
import traceback
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


# ---------------------------------------------------------------------------------------------
# GPU timing (the check scripts under tests/kernels and the perf scripts); CUDA needed only when
# called.
# ---------------------------------------------------------------------------------------------

def round_order(items, round_idx: int) -> list:
    """The order in which an interleaved A/B runs its variants in round ``round_idx``: as given
    on even rounds, reversed on odd ones. A fixed order biases variants by their place in the
    round (H100 at its power cap: up to ~4%, the clock recovering during lighter variants)."""
    items = list(items)
    return items if round_idx % 2 == 0 else items[::-1]


def tee_log(path: str):
    """A ``log(msg="")`` for benchmark scripts: prints each line and appends it to ``path``."""
    def log(msg: str = "") -> None:
        print(msg, flush=True)
        with open(path, "a") as fh:
            fh.write(msg + "\n")
    return log


def time_per_call(fn, iters: int = 20, warmup: int = 3) -> float:
    """Seconds per call of ``fn`` run back to back on the current stream (CUDA events), after
    ``warmup`` untimed calls and a device sync."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / iters * 1e-3


def alternated_medians(fns, rounds: int = 3, iters: int = 10, warmup: int = 1,
                       timer=None) -> list:
    """Median time of each of ``fns`` (e.g. CUDA-graph replays), all timed in each of ``rounds``
    rounds in ``round_order``. Timed one after the other instead, the first variant after
    building the inputs read 11-18 % slow on an H100 (perf/results/decode-h100-mixed.md).
    ``timer(fn, iters, warmup)`` times one entry (default :func:`time_per_call`: seconds per
    call); an entry is whatever the timer takes."""
    timer = timer or time_per_call
    times = [[] for _ in fns]
    for r in range(rounds):
        for i in round_order(range(len(fns)), r):
            times[i].append(timer(fns[i], iters, warmup))
    return [sorted(t)[len(t) // 2] for t in times]


def capture_graph(fn, eager_first: bool = True) -> torch.cuda.CUDAGraph:
    """``fn`` captured once in a CUDA graph: (optionally an eager call and a sync), one warm-up
    call on a side stream, then the capture."""
    if eager_first:
        fn()
        torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def time_graph(fn, iters: int = 20, warmup: int = 3) -> float:
    """Device seconds per call: ``fn`` captured once in a CUDA graph (:func:`capture_graph`),
    the graph replayed back to back (:func:`time_per_call`)."""
    return time_per_call(capture_graph(fn).replay, iters, warmup)


def capture_cycle(fns, calls: int = 16) -> torch.cuda.CUDAGraph:
    """``calls`` calls cycling through ``fns`` captured in ONE CUDA graph (after one eager call
    of each and a warm-up call on a side stream)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fns[0]()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    return g


def time_graph_cycle(fns, calls: int = 16, iters: int = 10) -> float:
    """Device seconds per call: ``calls`` calls cycling through ``fns`` (e.g. one per input set,
    so that together they overflow the L2) captured in ONE CUDA graph and replayed; the launch
    gaps are amortized over the calls, each kernel's ramp-up and tail are not."""
    return time_per_call(capture_cycle(fns, calls).replay, iters, warmup=2) / calls


def replay_matches_eager(call, factor: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                         counters, factors=(5.0, 300.0)):
    """``call`` (writing out, lse and the [visited, skipped, ...] counters it zeroes itself)
    captured once in a CUDA graph; for each value of the factor tensor: poison out, replay, then
    run ``call`` eagerly. Returns [(factor, replay bitwise equal to eager, skipped, visited)]."""
    graph = capture_graph(call, eager_first=False)
    res = []
    for f in factors:
        factor.fill_(f)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        o_g, l_g, c_g = out.clone(), lse.clone(), [c.clone() for c in counters]
        call()
        torch.cuda.synchronize()
        same = bool(torch.equal(o_g, out)) and bool(torch.equal(l_g, lse)) and all(
            torch.equal(a, b) for a, b in zip(c_g, counters))
        res.append((f, same, int(c_g[1].sum()), int(c_g[0].sum())))
    return res


class CheckRecorder:
    """Runs named checks of the GPU check scripts: ``rec(name, fn)`` calls fn() -> (ok, message),
    logs a PASS/FAIL line with its time (an exception counts as FAIL, with its traceback) and
    keeps the verdicts in ``results``."""

    def __init__(self, log):
        self.log = log
        self.results = []

    def __call__(self, name, fn):
        t0 = time.time()
        try:
            ok, msg = fn()
        except Exception as e:  # noqa: BLE001
            ok, msg = False, f"EXC {type(e).__name__}: {e}"
            traceback.print_exc()
        self.results.append(ok)
        self.log(f"[{'PASS' if ok else 'FAIL'}] {name}: {msg} ({time.time() - t0:.1f}s)")
