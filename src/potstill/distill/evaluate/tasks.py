"""A small verifiable task with exact-match scoring: addition with a carry trace.

Tiny byte-level models learn it on a CPU in minutes, and its outputs have *slack*: many
different outputs are equally correct, so a defence that perturbs the teacher's sampling
(e.g. antidistillation) can change tokens without breaking correctness, as a reasoning
trace allows in a real model.

Prompt ``"47+38"`` (two ``digits``-digit operands, no leading zeros). Output: one step per
digit column, least significant first, then the answer after a last ``=``::

    7+8=15 4+3+1=8 =85        (or "8+7=15 1+3+4=8 =85", "8+7=15 3+1+4=8 =85", ...)

Step ``i`` adds the operands' ``i``-th digits and the carry of step ``i - 1`` (written only
when it is 1) in any order, and writes their full sum. Each step's operand order is drawn
at random, so a ``d``-digit example has up to ``2 * 6**(d-1)`` equally valid traces.

Scoring (:func:`is_correct`): the completion (surrounding whitespace stripped) must have the
trace's shape (``STEP STEP ... =ANSWER``, each ``STEP`` being ``n+n[+n...]=n``) and the
number after the last ``=`` must equal the answer exactly. As with final-answer scoring of
reasoning traces, the steps' arithmetic is not checked.

Splits: every unordered operand pair belongs to ``"train"`` or ``"test"`` by a fixed hash
(about :data:`TEST_FRACTION` of the pairs are test), whatever the seed, so ``a+b`` and
``b+a`` always share a split and no train seed can reach a test prompt. Sets drawn with
one call are distinct; to get several disjoint sets, draw once and slice.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from potstill.core.errors import PotstillError

__all__ = [
    "TEST_FRACTION",
    "TaskExample",
    "accuracy",
    "is_correct",
    "make_examples",
    "n_valid_traces",
    "parse_prompt",
    "reference_output",
]

TEST_FRACTION = 0.2
MAX_DIGITS = 6
Split = Literal["train", "test"]
_PROMPT_RE = re.compile(r"([1-9]\d*)\+([1-9]\d*)")
# STEP (space STEP)* space =ANSWER, or just =ANSWER; digits only, no signs or spaces inside.
_OUTPUT_RE = re.compile(r"(?:\d+(?:\+\d+)+=\d+ )*=(\d+)")


@dataclass(frozen=True)
class TaskExample:
    """One addition problem: ``prompt`` like ``"47+38"``, ``answer`` like ``"85"``."""

    prompt: str
    answer: str


def _check_digits(digits: int) -> None:
    if not (isinstance(digits, int) and 1 <= digits <= MAX_DIGITS):
        raise PotstillError(f"digits must be an integer in 1..{MAX_DIGITS}, got {digits!r}")


def _split_of(a: int, b: int) -> Split:
    """``"test"`` for about TEST_FRACTION of unordered pairs, fixed by a hash (seed-free)."""
    lo, hi = min(a, b), max(a, b)
    h = int.from_bytes(hashlib.sha256(f"{lo}+{hi}".encode()).digest()[:8], "big")
    return "test" if h / 2**64 < TEST_FRACTION else "train"


def make_examples(
    n: int, *, seed: int, digits: int = 2, split: Split = "train"
) -> list[TaskExample]:
    """``n`` distinct problems of the ``split``, drawn without replacement (deterministic
    given ``seed``); operands have exactly ``digits`` digits.

    PotstillError if the split holds fewer than ``n`` problems (about 8,100 ordered pairs at
    2 digits, 20% of them test).
    """
    _check_digits(digits)
    if split not in ("train", "test"):
        raise PotstillError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise PotstillError(f"n must be >= 0, got {n}")
    lo, hi = 10 ** (digits - 1), 10**digits
    space = (hi - lo) ** 2
    expected = space * (TEST_FRACTION if split == "test" else 1 - TEST_FRACTION)
    rng = random.Random(f"potstill-addition-{digits}-{seed}")
    out: list[TaskExample] = []
    if n > expected / 2:  # dense: enumerate the split, then sample from it
        pool = [(a, b) for a in range(lo, hi) for b in range(lo, hi) if _split_of(a, b) == split]
        if n > len(pool):
            raise PotstillError(
                f"the {split!r} split of {digits}-digit addition has {len(pool)} problems, "
                f"fewer than n={n}: lower n or raise digits"
            )
        pairs = rng.sample(pool, n)
    else:  # sparse: rejection-sample distinct pairs (at most half the split is needed)
        seen: set[tuple[int, int]] = set()
        pairs = []
        while len(pairs) < n:
            ab = (rng.randrange(lo, hi), rng.randrange(lo, hi))
            if ab not in seen and _split_of(*ab) == split:
                seen.add(ab)
                pairs.append(ab)
    for a, b in pairs:
        out.append(TaskExample(f"{a}+{b}", str(a + b)))
    return out


def parse_prompt(prompt: str) -> tuple[int, int]:
    """``"47+38" -> (47, 38)``; PotstillError for anything else."""
    m = _PROMPT_RE.fullmatch(prompt.strip())
    if m is None:
        raise PotstillError(f"not an addition prompt: {prompt!r} (expected like '47+38')")
    return int(m.group(1)), int(m.group(2))


def _columns(a: int, b: int) -> list[tuple[list[int], int]]:
    """Per digit column, least significant first: (terms incl. a carry of 1, column sum)."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    carry, out = 0, []
    for i in range(max(len(xs), len(ys))):
        terms = [int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0]
        terms += [1] if carry else []
        total = sum(terms)
        out.append((terms, total))
        carry = total // 10
    return out


def reference_output(example: TaskExample, rng: random.Random) -> str:
    """One valid trace plus the answer, each step's operand order drawn from ``rng``."""
    a, b = parse_prompt(example.prompt)
    steps = []
    for terms, total in _columns(a, b):
        order = list(terms)
        rng.shuffle(order)
        steps.append("+".join(map(str, order)) + f"={total}")
    return " ".join(steps) + f" ={a + b}"


def n_valid_traces(example: TaskExample) -> int:
    """Number of distinct traces :func:`reference_output` can write for ``example`` (orders
    of equal digits, e.g. ``4+4``, count once)."""
    a, b = parse_prompt(example.prompt)
    n = 1
    for terms, _ in _columns(a, b):
        perms = math.factorial(len(terms))
        for c in Counter(terms).values():
            perms //= math.factorial(c)
        n *= perms
    return n


def is_correct(example: TaskExample, completion: str) -> bool:
    """True iff ``completion`` (stripped) has the trace's shape and its final answer, after
    the last ``=``, equals ``example.answer`` exactly."""
    m = _OUTPUT_RE.fullmatch(completion.strip())
    return m is not None and m.group(1) == example.answer


def accuracy(examples: Sequence[TaskExample], completions: Sequence[str]) -> float:
    """Fraction of ``completions`` that :func:`is_correct` accepts (paired by position)."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
    if not examples:
        raise ValueError("accuracy of an empty set is undefined")
    return sum(is_correct(e, c) for e, c in zip(examples, completions)) / len(examples)
