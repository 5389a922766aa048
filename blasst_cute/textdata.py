"""Offline long-context texts: calibration prompts, RULER-style NIAH tasks, perplexity documents.

Nothing is downloaded. The prose comes from the Python documentation topics shipped with every
CPython (``pydoc_data.topics``, ~465k characters of English technical prose, ~110k tokens), the
stand-in for RULER's Paul Graham essays; RULER's own "noise" haystack (a few repeated sentences)
is used for variable tracking, as RULER does.

Task templates follow RULER (NVIDIA/RULER ``synthetic.yaml``): needles are
"One of the special magic numbers for {key} is: {value}." and the scoring is RULER's
``string_match_all`` (the fraction of reference strings found in the prediction).
Prompts are built to an exact token count for a given tokenizer (the chat template is applied
when the tokenizer has one).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_WORDS = (
    "apple",
    "river",
    "falcon",
    "lantern",
    "marble",
    "copper",
    "violet",
    "harbor",
    "meadow",
    "thunder",
    "pepper",
    "glacier",
    "saddle",
    "orchid",
    "canyon",
    "ember",
    "willow",
    "quartz",
    "badger",
    "cobalt",
    "juniper",
    "walnut",
    "beacon",
    "tundra",
)
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt")
NIAH_PREFIX = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "it. I will quiz you about the numbers afterwards.\n"
)

_corpus_cache: Dict[str, str] = {}
_ids_cache: Dict[int, List[int]] = {}


def corpus_text() -> str:
    """The offline prose corpus: the Python docs topics, underline rows removed, fixed order."""
    if "text" not in _corpus_cache:
        from pydoc_data.topics import topics

        parts = []
        for name in sorted(topics):
            lines = [ln for ln in topics[name].splitlines() if not re.fullmatch(r"\s*[*=\-~^]{3,}\s*", ln)]
            parts.append("\n".join(lines).strip())
        _corpus_cache["text"] = "\n\n".join(parts)
    return _corpus_cache["text"]


def corpus_ids(tokenizer) -> List[int]:
    """The corpus as token ids of ``tokenizer`` (cached per tokenizer object)."""
    key = id(tokenizer)
    if key not in _ids_cache:
        _ids_cache[key] = tokenizer(corpus_text(), add_special_tokens=False).input_ids
    return _ids_cache[key]


@dataclass
class Sample:
    """One prompt: token ids, the reference answers (all must appear) and generation budget."""

    task: str
    length: int
    input_ids: List[int]
    answers: List[str]
    max_new_tokens: int


def _render(tokenizer, chat: bool) -> Callable[[str, str], str]:
    """(user message, answer prefix) -> prompt text."""
    if chat and getattr(tokenizer, "chat_template", None):

        def render(user, prefix):
            msgs = [{"role": "user", "content": user}]
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + prefix

        return render
    return lambda user, prefix: user + "\n" + prefix


def _encode(tokenizer, text: str, chat: bool) -> List[int]:
    # A rendered chat template already carries its special tokens.
    special = not (chat and getattr(tokenizer, "chat_template", None))
    return tokenizer(text, add_special_tokens=special).input_ids


def _insert(hay: str, needles: Sequence[str], depths: Sequence[float]) -> str:
    """Insert each needle at a sentence boundary near its relative depth in ``hay``."""
    bounds = [m.end() for m in re.finditer(r"[.!?]\s+", hay)] or [len(hay)]
    out, last = [], 0
    for needle, depth in sorted(zip(needles, depths), key=lambda x: x[1]):
        target = depth * len(hay)
        pos = min(bounds, key=lambda b: abs(b - target))
        pos = max(pos, last)
        out.append(hay[last:pos])
        out.append(needle + " ")
        last = pos
    out.append(hay[last:])
    return "".join(out)


def compose(
    tokenizer,
    length: int,
    *,
    user: Callable[[str], str],
    answer_prefix: str,
    needles: Sequence[str],
    depths: Sequence[float],
    haystack_ids: Sequence[int],
    offset: int = 0,
    chat: bool = True,
) -> List[int]:
    """Token ids of a prompt of (as nearly as tokenization allows, never more than) ``length``
    tokens: haystack tokens from ``offset`` with the needles inserted, wrapped by ``user``."""
    render = _render(tokenizer, chat)
    overhead = len(_encode(tokenizer, render(user(" ".join(needles)), answer_prefix), chat))
    budget = max(0, length - overhead)
    best = None
    for _ in range(8):  # re-tokenization at the seams shifts the count by a few tokens
        need = offset + budget
        hay_ids = (
            list(haystack_ids) * (need // max(1, len(haystack_ids)) + 1)
            if need > len(haystack_ids)
            else haystack_ids
        )
        hay = tokenizer.decode(hay_ids[offset : offset + budget])
        ids = _encode(tokenizer, render(user(_insert(hay, needles, depths)), answer_prefix), chat)
        if len(ids) <= length and (best is None or len(ids) > len(best)):
            best = ids
        if len(ids) == length:
            break
        budget = max(0, budget + length - len(ids))
    if best is None:
        raise ValueError(f"cannot fit the task's fixed text in {length} tokens")
    return best


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def niah_sample(tokenizer, task: str, length: int, seed: int, *, chat: bool = True) -> Sample:
    """One RULER-style sample: ``niah_single`` (one needle), ``niah_multikey`` (4 needles, one
    queried), ``niah_multivalue`` (4 values of one key, all asked), ``vt`` (variable tracking: a
    chain of 5 assignments in RULER's noise haystack, all variable names asked)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    rng = random.Random(f"{task}-{length}-{seed}")
    prose = corpus_ids(tokenizer)
    offset = rng.randrange(0, max(1, len(prose) - length))
    if task in ("niah_single", "niah_multikey"):
        keys = rng.sample(KEY_WORDS, 1 if task == "niah_single" else 4)
        values = [_number(rng) for _ in keys]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        qi = rng.randrange(len(keys))
        key, answers = keys[qi], [values[qi]]
        question = f"What is the special magic number for {key} mentioned in the provided text?"
        prefix = f"The special magic number for {key} mentioned in the provided text is"
        max_new = 12
    elif task == "niah_multivalue":
        key = rng.choice(KEY_WORDS)
        answers = [_number(rng) for _ in range(4)]
        needles = [f"One of the special magic numbers for {key} is: {v}." for v in answers]
        question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
        prefix = f"The special magic numbers for {key} mentioned in the provided text are"
        max_new = 40
    else:  # vt
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(5)]
        value = str(rng.randint(10000, 99999))
        needles = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)
        ]
        answers = names
        question = f"Question: Find all variables that are assigned the value {value} in the text above."
        prefix = (
            f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables "
            f"are assigned the value {value}, they are:"
        )
        max_new = 30
    depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
    if task == "vt":
        noise_ids = tokenizer(NOISE * 4, add_special_tokens=False).input_ids
        hay_ids, offset = noise_ids, 0
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        user = lambda ctx: intro + ctx + "\n" + question  # noqa: E731
    else:
        hay_ids = prose
        user = lambda ctx: NIAH_PREFIX + ctx + "\n" + question  # noqa: E731
    ids = compose(
        tokenizer,
        length,
        user=user,
        answer_prefix=prefix,
        needles=needles,
        depths=depths,
        haystack_ids=hay_ids,
        offset=offset,
        chat=chat,
    )
    return Sample(task, length, ids, answers, max_new)


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's metric: the fraction of ``answers`` contained in ``prediction`` (case-insensitive)."""
    p = prediction.lower()
    return sum(a.lower() in p for a in answers) / len(answers)


def calibration_prompts(
    tokenizer, lengths: Sequence[int], per_length: int = 1, seed: int = 0
) -> List[Sample]:
    """Default calibration inputs: RULER-like single-needle prompts in the prose haystack (as
    ModelOpt calibrates on RULER), ``per_length`` at each length."""
    return [
        niah_sample(tokenizer, "niah_single", L, seed + 1000 + i) for L in lengths for i in range(per_length)
    ]


def documents(tokenizer, length: int, count: int, seed: int = 0) -> List[List[int]]:
    """``count`` disjoint stretches of ``length`` corpus tokens (perplexity documents)."""
    ids = corpus_ids(tokenizer)
    if count * length > len(ids):
        raise ValueError(f"the corpus holds {len(ids)} tokens: cannot cut {count} documents of {length}")
    slots = len(ids) // length
    picks = random.Random(seed).sample(range(slots), count)
    return [ids[i * length : (i + 1) * length] for i in picks]


__all__ = [
    "TASKS",
    "Sample",
    "niah_sample",
    "string_match_all",
    "calibration_prompts",
    "documents",
    "corpus_text",
    "corpus_ids",
    "compose",
]
