"""potstill's default instruction prompts, and reading a prompts file.

:func:`default_prompts` is a deterministic generator (pure function of ``(n, seed)``,
standard-library ``random`` only, so the set is the same on every machine and Python
version ``>= 3.10``). Each prompt is one *task* applied to one *subject* from one *domain*:

* tasks (14): explain, list, summarize a passage, rewrite a passage in a style, compare two
  subjects, classify (sentiment or domain), arithmetic word problem, write code, explain a code
  snippet, translate a passage into simple English, brainstorm, short definition, creative
  writing (poem/story/dialogue), make a plan;
* domains (14) with 12 subjects each: science, history, cooking, sports, programming, finance,
  health, travel, arts, nature, technology, work, language, everyday life;
* lengths: one-liners (definitions), medium requests with an optional constraint (bullets, word
  limit, audience, an example...), and long prompts that carry a generated 3-6 sentence passage.

Tasks are taken round-robin (so every task has ``~n/14`` prompts) and everything else is drawn
from ``random.Random(seed)``; duplicates are skipped, so the result never repeats a prompt. The
first ``n`` prompts for a given seed are a prefix of the first ``n + m``.

A prompts file (:func:`read_prompts`) is JSONL (objects with ``"prompt"`` (a string) or
``"messages"`` (a chat list)) or plain text with one prompt per line.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from potstill.core.errors import PotstillError
from potstill.core.io import jsonl_records
from potstill.core.prompt_vocab import (
    AUDIENCES,
    BRAINSTORM,
    CODE_TASKS,
    CONSTRAINTS,
    CREATIVE,
    DOMAINS,
    ITEMS,
    LANGUAGES,
    LIST_ASPECTS,
    NAMES,
    PASSAGE,
    SENTIMENT,
    SNIPPETS,
    STYLES,
)

Messages = list[dict[str, str]]


def _s(rng: random.Random) -> tuple[str, str]:
    domain = rng.choice(sorted(DOMAINS))
    return domain, rng.choice(DOMAINS[domain])


def _passage(rng: random.Random, domain: str, subject: str) -> str:
    lines = rng.sample(PASSAGE, rng.randint(3, 6))
    text = " ".join(
        x.format(s=subject, S=subject[0].upper() + subject[1:], d=domain) for x in lines
    )
    return text


def _explain(rng: random.Random) -> str:
    _d, s = _s(rng)
    form = rng.choice(
        (
            "Explain {s} to {a}.",
            "How does {s} work, and why does it matter? Explain it for {a}.",
            "Give {a} a clear explanation of {s}.",
        )
    )
    return form.format(s=s, a=rng.choice(AUDIENCES)) + rng.choice(CONSTRAINTS)


def _list(rng: random.Random) -> str:
    _, s = _s(rng)
    return f"List {rng.randint(3, 10)} {rng.choice(LIST_ASPECTS)} {s}." + rng.choice(
        CONSTRAINTS[:4]
    )


def _summarize(rng: random.Random) -> str:
    d, s = _s(rng)
    n = rng.randint(1, 3)
    return (
        f"Summarize the following passage in {n} sentence{'s' * (n > 1)}:\n\n{_passage(rng, d, s)}"
    )


def _rewrite(rng: random.Random) -> str:
    d, s = _s(rng)
    return f"Rewrite this text to make it {rng.choice(STYLES)}:\n\n{_passage(rng, d, s)}"


def _compare(rng: random.Random) -> str:
    d = rng.choice(sorted(DOMAINS))
    a, b = rng.sample(DOMAINS[d], 2)
    form = rng.choice(
        (
            "Compare {a} and {b}.",
            "What are the main similarities and differences between {a} and {b}?",
            "Which is easier for a beginner to learn, {a} or {b}? Explain your reasoning.",
        )
    )
    return form.format(a=a, b=b) + rng.choice(CONSTRAINTS)


def _classify(rng: random.Random) -> str:
    _d, s = _s(rng)
    if rng.random() < 0.5:
        sentence = rng.choice(SENTIMENT).format(s=s)
        return f'Classify the sentiment of this review as positive, negative or neutral, and explain why: "{sentence}"'
    picks = rng.sample(sorted(DOMAINS), 4)
    items = [rng.choice(DOMAINS[p]) for p in picks]
    rng.shuffle(items)
    return f"Classify each of the following into one of the categories {', '.join(picks)}: {'; '.join(items)}."


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    x, y, z = rng.randint(3, 60), rng.randint(2, 12), rng.randint(1, 9)
    forms = (
        f"{a} buys {x} {item} at {y} dollars each and pays with a {100 * (x * y // 100 + 1)}-dollar bill. How much change does {a} get?",
        f"{a} has {x} {item}. {b} gives {a} {y} packs of {z} {item} each. How many {item} does {a} have now?",
        f"A train leaves at {y}:00 travelling at {x + 40} km/h. {a}'s car leaves the same station {z} hours later at {x + 70} km/h. How long until the car catches the train?",
        f"{a} saves {x} dollars a week and spends {z} dollars of it on {item}. After {y} weeks, how much has {a} saved?",
        f"A recipe for {y} people needs {x} grams of flour. How much flour is needed for {y + z} people? Show your steps.",
        f"{a} and {b} share {x * y} {item} in the ratio {z}:{y}. How many does each get?",
    )
    return rng.choice(forms)


def _code(rng: random.Random) -> str:
    name, what = rng.choice(CODE_TASKS)
    lang = rng.choice(LANGUAGES)
    extra = rng.choice(
        (
            "",
            " Include a docstring.",
            " Add two unit tests.",
            " Explain its time complexity.",
            " Handle empty input.",
        )
    )
    return f"Write a {lang} function `{name}` that {what}.{extra}"


def _read_code(rng: random.Random) -> str:
    code = rng.choice(SNIPPETS).format(
        a=rng.randint(2, 9), b=rng.randint(2, 5), c=rng.choice(" ,;-")
    )
    ask = rng.choice(
        (
            "Explain what this code does",
            "Find any bugs or edge cases in this code",
            "Suggest a clearer name for this function and explain why",
        )
    )
    return f"{ask}:\n\n```python\n{code}\n```"


def _simplify(rng: random.Random) -> str:
    d, s = _s(rng)
    return f"Translate this into simple English that {rng.choice(AUDIENCES)} could understand:\n\n{_passage(rng, d, s)}"


def _brainstorm(rng: random.Random) -> str:
    _, s = _s(rng)
    return f"Brainstorm {rng.randint(3, 12)} {rng.choice(BRAINSTORM)} {s}." + rng.choice(
        CONSTRAINTS[:4]
    )


def _define(rng: random.Random) -> str:
    _, s = _s(rng)
    return rng.choice(
        (
            "What is {s}?",
            "Define {s} in one sentence.",
            "Why do people talk about {s}?",
            "Is {s} overrated?",
        )
    ).format(s=s)


def _creative(rng: random.Random) -> str:
    _, s = _s(rng)
    return f"Write {rng.choice(CREATIVE)} about {s}."


def _plan(rng: random.Random) -> str:
    _, s = _s(rng)
    days = rng.choice((3, 5, 7, 14, 30))
    who = rng.choice(AUDIENCES)
    return f"Create a {days}-day plan to help {who} get better at or learn about {s}." + rng.choice(
        CONSTRAINTS[:5]
    )


TASKS: tuple[Callable[[random.Random], str], ...] = (
    _explain, _list, _summarize, _rewrite, _compare, _classify, _arithmetic,
    _code, _read_code, _simplify, _brainstorm, _define, _creative, _plan,
)  # fmt: skip


def default_prompts(n: int = 2000, seed: int = 0) -> list[str]:
    """``n`` distinct instruction prompts, a pure function of ``(n, seed)`` (see module docstring)."""
    if n < 0:
        raise PotstillError(f"the number of prompts must be >= 0, got {n}")
    rng = random.Random(f"potstill-prompts:{seed}")
    out: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        task = TASKS[attempts % len(TASKS)]
        attempts += 1
        prompt = task(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
        if attempts > 50 * n + 1000:  # the arithmetic task alone has millions of forms
            raise PotstillError(f"could not make {n} distinct prompts; ask for fewer")
    return out


def _bad(path: Path, lineno: int, why: str) -> PotstillError:
    return PotstillError(
        f'{path}:{lineno}: {why}; write one JSON object per line with "prompt" (a string) or '
        '"messages" (a list of {"role", "content"}), or use a plain-text file'
    )


def _messages_from_json(obj: object, path: Path, lineno: int) -> Messages:
    if not isinstance(obj, dict):
        raise _bad(path, lineno, f"a JSON {type(obj).__name__}, not an object")
    if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        return [{"role": "user", "content": obj["prompt"]}]
    msgs = obj.get("messages")
    if isinstance(msgs, list) and msgs:
        ok = all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in msgs
        )
        if ok:
            return [{"role": m["role"], "content": m["content"]} for m in msgs]
    raise _bad(path, lineno, 'no non-empty "prompt" string or valid "messages" list')


def read_prompts(source: str | Path | None) -> list[Messages]:
    """Prompts as chat message lists.

    ``None`` or ``"default"`` gives :func:`default_prompts` (each as one user message). A
    ``.jsonl``/``.json`` file holds one object per line; any other file is plain text, one
    prompt per non-blank line. Raises :class:`PotstillError` for a missing or empty file or a
    malformed line (naming ``file:line``).
    """
    if source is None or str(source) == "default":
        return [[{"role": "user", "content": p}] for p in default_prompts()]
    path = Path(source).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PotstillError(
            f"prompts file {path} not found; give an existing .jsonl/.txt file or --prompts default"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PotstillError(f"cannot read prompts file {path} ({e}); check it is UTF-8 text") from e
    if path.suffix.lower() in (".jsonl", ".json"):
        hint = 'one object per line, {"prompt": "..."} or {"messages": [...]}'
        records = jsonl_records(path, text, hint=hint)
        out = [_messages_from_json(obj, path, lineno) for lineno, obj in records]
    else:
        out = [[{"role": "user", "content": ln.strip()}] for ln in text.splitlines() if ln.strip()]
    if not out:
        raise PotstillError(f"prompts file {path} has no prompts; add one prompt per line")
    return out


__all__ = ["DOMAINS", "TASKS", "default_prompts", "read_prompts"]
