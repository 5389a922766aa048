"""Accuracy harness: dense vs BLASST at calibrated target sparsities, on any local HF causal LM.

    python -m blasst_cute eval --model smollm2 --config calib/config.json --targets 0.5 0.7 0.9

* RULER-style needle-in-a-haystack (:mod:`blasst_cute.textdata`: ``niah_single``,
  ``niah_multikey``, ``niah_multivalue``, ``vt``) generated offline at the requested lengths,
  greedy decoding, RULER's ``string_match_all`` score.
* Perplexity on long documents: ``prefill`` mode scores the second half of each document from one
  forward pass; ``decode`` mode prefills all but the last N tokens densely and scores those N
  tokens one decode step at a time (so the decode factor is what is measured).
* Configurations: ``dense`` (transformers' SDPA), and per phase and target ``prefill@t`` (BLASST
  prefill, dense decode) / ``decode@t`` (dense prefill, BLASST decode). The factor of a target comes
  from the calibration (``a * exp(b * t)``); the tile sparsity measured on the run is reported
  next to the accuracy. Where λ = factor / L >= 1 BLASST skips nothing, so that cell is the dense
  result and is marked as such (the target is unreachable there), not run again.

BLASST runs through ``attn_implementation="blasst"`` (:mod:`blasst_cute.integrations.transformers`):
on CPU tensors the exact pure-torch reference, on CUDA the CuTe DSL kernels. Dense phases run with
SDPA; the test suite checks that BLASST with factor 0 gives the same tokens and logits.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .calibrate import Progress
from .sparse_config import SkipSoftmaxConfig
from .textdata import TASKS, documents, niah_sample, string_match_all


@dataclass(frozen=True)
class RunConfig:
    """One column of the comparison: which phase is sparse, at which factor."""

    name: str
    phase: Optional[str] = None  # None: dense
    target: Optional[float] = None
    factor: Optional[float] = None

    def lam(self, length: int) -> float:
        return self.factor / length if self.factor else 0.0

    def runs_dense_at(self, length: int) -> bool:
        """λ >= 1 (or no factor): BLASST would skip nothing at this length."""
        return self.phase is None or not self.factor or self.factor >= length


def run_configs(
    calibration: SkipSoftmaxConfig, targets: Sequence[float], phases: Sequence[str]
) -> List[RunConfig]:
    """``dense`` then ``{phase}@{target}`` for every phase and target, factors from the calibration."""
    out = [RunConfig("dense")]
    for ph in phases:
        for t in targets:
            out.append(RunConfig(f"{ph}@{t:g}", ph, t, calibration.factor(ph, t)))
    return out


@dataclass
class Cell:
    """Accumulated results of one (config, metric group)."""

    score: float = 0.0
    n: int = 0
    visited: int = 0
    skipped: int = 0
    nll: float = 0.0
    tokens: int = 0
    dense_equivalent: bool = False  # λ >= 1 everywhere: not run, equals dense
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.score / self.n if self.n else float("nan")

    @property
    def sparsity(self) -> float:
        return self.skipped / self.visited if self.visited else 0.0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


class Runner:
    """Switches the model between SDPA and BLASST per phase and collects BLASST's tile counters."""

    def __init__(self, model, tokenizer):
        from .integrations import transformers as bt

        self.bt = bt
        bt.register()
        from .integrations.hf_models import cache_kwarg

        self.model, self.tok = model, tokenizer
        self.cache_arg = cache_kwarg(model)
        self.eos = {
            i
            for i in [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
            if isinstance(i, int) and i >= 0
        }

    def _impl(self, factor: Optional[float], phase: str):
        if factor:
            # Only this phase is sparse: a call of the other phase would run dense through BLASST.
            other = "decode" if phase == "prefill" else "prefill"
            self.bt.configure(**{f"{phase}_factor": factor, f"{other}_factor": None}, collect_stats=True)
            self.model.set_attn_implementation(self.bt.NAME)
        else:
            self.model.set_attn_implementation("sdpa")

    def forward(self, ids: torch.Tensor, prefill_factor: Optional[float]):
        """Prefill ``ids`` [1, L]: (logits [1, L, V], cache)."""
        self._impl(prefill_factor, "prefill")
        with torch.no_grad():
            out = self.model(ids.to(self.model.device), use_cache=True)
        return out.logits, out.past_key_values

    def step(self, token: torch.Tensor, cache, decode_factor: Optional[float]):
        self._impl(decode_factor, "decode")
        with torch.no_grad():
            out = self.model(
                token.view(1, 1).to(self.model.device), use_cache=True, **{self.cache_arg: cache}
            )
        return out.logits[:, -1], out.past_key_values

    def greedy(
        self, last_logits: torch.Tensor, cache, max_new: int, decode_factor: Optional[float]
    ) -> List[int]:
        toks = []
        nxt = last_logits.argmax(-1)
        for i in range(max_new):
            toks.append(int(nxt))
            if toks[-1] in self.eos or i == max_new - 1:
                break
            logits, cache = self.step(nxt, cache, decode_factor)
            nxt = logits.argmax(-1)
        return toks

    def stats(self, phase: str) -> Tuple[int, int]:
        st = self.bt.phase_stats(phase)
        return st.visited, st.skipped


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


@dataclass
class EvalResult:
    model: str
    configs: List[RunConfig]
    niah: Dict[str, Dict[str, Cell]] = field(default_factory=dict)  # config -> "task@L" -> cell
    ppl: Dict[str, Dict[str, Cell]] = field(default_factory=dict)  # config -> "prefill@L"/"decode@L"
    predictions: List[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        def cells(d):
            return {
                c: {
                    k: dict(asdict(v), accuracy=v.accuracy, sparsity=v.sparsity, ppl=v.ppl)
                    for k, v in m.items()
                }
                for c, m in d.items()
            }

        return {
            "model": self.model,
            "configs": [asdict(c) for c in self.configs],
            "niah": cells(self.niah),
            "ppl": cells(self.ppl),
            "predictions": self.predictions,
            "seconds": self.seconds,
        }


def result_from_json(d: dict) -> EvalResult:
    """Inverse of :meth:`EvalResult.to_json` (re-render tables without running again)."""
    fields = {f for f in Cell.__dataclass_fields__}

    def cells(m):
        return {
            c: {k: Cell(**{f: v for f, v in cell.items() if f in fields}) for k, cell in kv.items()}
            for c, kv in m.items()
        }

    return EvalResult(
        d["model"],
        [RunConfig(**c) for c in d["configs"]],
        cells(d["niah"]),
        cells(d["ppl"]),
        d["predictions"],
        d["seconds"],
    )


def evaluate(
    model,
    tokenizer,
    configs: Sequence[RunConfig],
    *,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int] = (1024, 2048, 4096),
    samples: int = 1,
    prefill_lengths: Optional[Sequence[int]] = None,
    prefill_tasks: Optional[Sequence[str]] = None,
    ppl_length: int = 0,
    ppl_docs: int = 0,
    ppl_decode_tokens: int = 32,
    model_name: str = "",
    progress: bool = True,
) -> EvalResult:
    """Run NIAH and perplexity for every config; see the module docstring.

    ``prefill_lengths`` / ``prefill_tasks`` limit where the (costly on CPU) BLASST prefill configs
    run; elsewhere their cells stay empty.
    """
    run = Runner(model, tokenizer)
    res = EvalResult(model_name, list(configs))
    for c in configs:
        res.niah[c.name], res.ppl[c.name] = {}, {}
    t_all = time.perf_counter()
    work = [(t, L, i) for L in lengths for t in tasks for i in range(samples)]
    bar = Progress(len(work) + ppl_docs, "eval", enabled=progress)
    for task, L, i in work:
        s = niah_sample(tokenizer, task, L, seed=i)
        ids = torch.tensor([s.input_ids])
        key = f"{task}@{L}"
        t0 = time.perf_counter()
        logits, cache = run.forward(ids, None)
        dense_last, dense_cache = logits[:, -1], cache
        dense_toks = run.greedy(dense_last, copy.deepcopy(dense_cache), s.max_new_tokens, None)
        for c in configs:
            cell = res.niah[c.name].setdefault(key, Cell())
            if c.phase == "prefill" and (
                (prefill_lengths and L not in prefill_lengths)
                or (prefill_tasks and task not in prefill_tasks)
            ):
                continue
            t1 = time.perf_counter()
            run.bt.reset_stats()
            if c.runs_dense_at(L):
                toks = dense_toks
                cell.dense_equivalent = c.phase is not None
            elif c.phase == "prefill":
                logits, cache = run.forward(ids, c.factor)
                toks = run.greedy(logits[:, -1], cache, s.max_new_tokens, None)
            else:
                toks = run.greedy(dense_last, copy.deepcopy(dense_cache), s.max_new_tokens, c.factor)
            text = tokenizer.decode(toks, skip_special_tokens=True)
            score = string_match_all(text, s.answers)
            cell.score += score
            cell.n += 1
            if c.phase and not c.runs_dense_at(L):
                v, k = run.stats(c.phase)
                cell.visited += v
                cell.skipped += k
            cell.seconds += time.perf_counter() - t1
            res.predictions.append(
                {
                    "config": c.name,
                    "task": task,
                    "length": L,
                    "sample": i,
                    "answers": s.answers,
                    "prediction": text,
                    "score": score,
                }
            )
        bar.update(note=f"{key} #{i} ({time.perf_counter() - t0:.0f}s)")
    if ppl_docs:
        _perplexity(run, res, configs, tokenizer, ppl_length, ppl_docs, ppl_decode_tokens, bar)
    model.set_attn_implementation("sdpa")
    res.seconds = time.perf_counter() - t_all
    return res


def _perplexity(run, res, configs, tokenizer, L, n_docs, n_dec, bar):
    for doc in documents(tokenizer, L, n_docs, seed=1):
        ids = torch.tensor([doc])
        logits, _ = run.forward(ids, None)
        nll = _nll(logits[0, :-1], ids[0, 1:])  # nll[i] predicts token i + 1
        half = slice(L // 2 - 1, L - 1)  # the second half of the document
        dec = slice(L - n_dec, L - 1)  # the tokens predicted by the n_dec - 1 decode steps
        for c in configs:
            mode = c.phase or "both"
            modes = ["prefill", "decode"] if mode == "both" else [mode]
            for m in modes:
                cell = res.ppl[c.name].setdefault(f"{m}@{L}", Cell())
                sl = half if m == "prefill" else dec
                t1 = time.perf_counter()
                run.bt.reset_stats()
                if c.runs_dense_at(L):
                    part = nll[sl]
                    cell.dense_equivalent = c.phase is not None
                elif m == "prefill":
                    lg, _ = run.forward(ids, c.factor)
                    part = _nll(lg[0, :-1], ids[0, 1:])[sl]
                else:
                    # Dense prefill of all but the last n_dec tokens, then one decode step per token.
                    _, cache = run.forward(ids[:, : L - n_dec], None)
                    preds = []
                    for j in range(L - n_dec, L - 1):
                        last, cache = run.step(ids[0, j], cache, c.factor)
                        preds.append(last)
                    part = _nll(torch.cat(preds), ids[0, L - n_dec + 1 :])
                cell.nll += float(part.sum())
                cell.tokens += int(part.numel())
                if c.phase and not c.runs_dense_at(L):
                    v, k = run.stats(c.phase)
                    cell.visited += v
                    cell.skipped += k
                cell.seconds += time.perf_counter() - t1
        bar.update(note=f"ppl doc ({L} tokens)")


def markdown(res: EvalResult) -> str:
    """Two tables: per config, accuracy next to dense on the same samples and the measured tile
    sparsity; then per (task, length), every config's score."""
    keys = sorted({k for m in res.niah.values() for k in m}, key=lambda k: (int(k.split("@")[1]), k))
    pkeys = sorted({k for m in res.ppl.values() for k in m})
    dense = res.configs[0].name
    lines = [
        "| config | factor | NIAH samples | NIAH score | dense, same samples | NIAH tile sparsity "
        "| PPL (mode@tokens) | dense PPL | Δ PPL | PPL tile sparsity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res.configs:
        ran = [k for k in keys if (cell := res.niah[c.name].get(k)) is not None and cell.n]
        n = sum(res.niah[c.name][k].n for k in ran)
        score = sum(res.niah[c.name][k].score for k in ran)
        d_score = sum(res.niah[dense][k].score for k in ran)
        vis = sum(res.niah[c.name][k].visited for k in ran)
        skp = sum(res.niah[c.name][k].skipped for k in ran)
        eq = sum(res.niah[c.name][k].dense_equivalent for k in ran)
        spars = "—" if c.phase is None else (f"{100 * skp / vis:.1f}%" if vis else "0% (λ≥1)")
        note = f" ({eq} = dense, λ≥1)" if eq else ""
        ppl_cells = [
            (k, res.ppl[c.name][k])
            for k in pkeys
            if k in res.ppl[c.name]
            and res.ppl[c.name][k].tokens
            and (c.phase is None or k.startswith(c.phase))
        ]
        for i, (k, cell) in enumerate(ppl_cells or [(None, None)]):
            head = (
                [
                    c.name,
                    "—" if c.factor is None else f"{c.factor:.4g}",
                    f"{n}{note}",
                    f"{100 * score / n:.1f}" if n else "—",
                    f"{100 * d_score / n:.1f}" if n else "—",
                    spars,
                ]
                if i == 0
                else ["", "", "", "", "", ""]
            )
            if cell is None:
                tail = ["—"] * 4
            else:
                dppl = res.ppl[dense][k].ppl
                sp = (
                    "—"
                    if c.phase is None
                    else (f"{100 * cell.sparsity:.1f}%" if cell.visited else "0% (λ≥1, = dense)")
                )
                tail = [
                    f"{k} ({cell.tokens})",
                    f"{cell.ppl:.3f}",
                    f"{dppl:.3f}",
                    f"{100 * (cell.ppl / dppl - 1):+.1f}%",
                    sp,
                ]
            lines.append("| " + " | ".join(head + tail) + " |")
    lines += [
        "",
        "| task@length | " + " | ".join(c.name for c in res.configs) + " |",
        "|---|" + "---|" * len(res.configs),
    ]
    for k in keys:
        row = []
        for c in res.configs:
            cell = res.niah[c.name].get(k)
            if cell is None or not cell.n:
                row.append("·")
            else:
                sp = (
                    f" ({100 * cell.sparsity:.0f}%)"
                    if cell.visited
                    else (" (=)" if cell.dense_equivalent else "")
                )
                row.append(f"{100 * cell.accuracy:.0f}{sp}")
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m blasst_cute eval",
        description="Accuracy of BLASST at calibrated target sparsities vs dense: RULER-style NIAH "
        "and long-document perplexity, offline, on a local Hugging Face causal LM.",
    )
    p.add_argument("--model", required=True, help="local model path, .gguf file or 'smollm2'")
    p.add_argument(
        "--config",
        required=True,
        help="calibration: config.json / model dir / file with sparse_attention_config",
    )
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--phases", nargs="+", default=["prefill", "decode"], choices=("prefill", "decode"))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="NIAH lengths")
    p.add_argument("--samples", type=int, default=1, help="NIAH samples per task and length")
    p.add_argument("--prefill-lengths", type=int, nargs="*", help="run prefill configs only at these lengths")
    p.add_argument(
        "--prefill-tasks", nargs="*", choices=TASKS, help="run prefill configs only on these tasks"
    )
    p.add_argument("--ppl-length", type=int, default=4096)
    p.add_argument("--ppl-docs", type=int, default=1)
    p.add_argument("--ppl-decode-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the reference's small ops lose more to contention "
        "on a shared machine than they gain from a second thread)",
    )
    p.add_argument("--report", help="write the markdown table here")
    p.add_argument("--json", help="write all results (with predictions) here")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m blasst_cute eval``."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from .integrations.hf_models import load_causal_lm

    cal = SkipSoftmaxConfig.from_config(args.config)
    configs = run_configs(cal, args.targets, args.phases)
    model, tok = load_causal_lm(args.model, dtype=getattr(torch, args.dtype))
    res = evaluate(
        model,
        tok,
        configs,
        tasks=args.tasks,
        lengths=args.lengths,
        samples=args.samples,
        prefill_lengths=args.prefill_lengths,
        prefill_tasks=args.prefill_tasks,
        ppl_length=args.ppl_length,
        ppl_docs=args.ppl_docs,
        ppl_decode_tokens=args.ppl_decode_tokens,
        model_name=args.model,
        progress=not args.quiet,
    )
    text = markdown(res)
    print(text)
    print(f"({res.seconds:.0f} s)")
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.to_json(), f, indent=1)
    return 0


__all__ = ["evaluate", "run_configs", "RunConfig", "EvalResult", "markdown", "main"]
