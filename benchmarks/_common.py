"""What the benchmarks share: a timestamped log, chat-templated prompt batches, the KV-cache
plumbing of a batched sampling loop, the fixed-length sampler, and the atomic result write.

Benchmarks are scripts (``python benchmarks/NAME.py``); each puts this folder on ``sys.path``
and imports from here, so one copy of each helper serves all of them.
"""

from __future__ import annotations

import inspect
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from potstill.core.io import atomic_write_text
from potstill.core.kvcache import cache_kw, cache_of


def median_time(fn: Any, reps: int) -> float:
    """Median wall seconds of ``fn()`` over ``reps`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(n_bytes: int = 256 << 20) -> float:
    """Bytes/s moved by a large tensor copy (each byte read once and written once)."""
    a = torch.empty(n_bytes // 4, dtype=torch.float32).uniform_()
    b = torch.empty_like(a)
    return 2 * n_bytes / median_time(lambda: b.copy_(a), 5)


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so wall times are honest."""
    if device == "cuda":
        torch.cuda.synchronize()


def make_log(name: str) -> Callable[[str], None]:
    """``log(msg)`` printing ``[name HH:MM:SS] msg``, flushed (long runs are watched live)."""

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    return log


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN or inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def write_result(path: Path, result: dict[str, Any]) -> Path:
    """The run's one JSON file, written atomically (NaN and inf become null; numpy scalars
    are written as floats)."""
    text = json.dumps(finite_or_none(result), indent=2, default=float) + "\n"
    return atomic_write_text(path, text)


def apply_settings(ap: Any, s: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``--set NAME=VALUE`` overrides (JSON values) applied to the settings ``s``; an unknown
    name is an argparse error naming the known ones."""
    for item in items:
        name, _, value = item.partition("=")
        if name not in s:
            ap.error(f"unknown setting {name!r}; known: {', '.join(s)}")
        s[name] = json.loads(value)
    return s


def encode_prompts(tok: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-templated single-turn prompts, left-padded: (ids [B, T], attention_mask [B, T])."""
    tok.padding_side = "left"
    rendered = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def last_logits_only(model: Any) -> dict[str, Any]:
    """Prefill kwargs that keep the last position's logits only ([B, T, V] would be ~1 GB for
    Gemma's 262k vocabulary), where the model supports it."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def generate(
    model: Any,
    tok: Any,
    prompts: list[str],
    n_new: int,
    *,
    processors: list[Any],
    seed: int,
    temperature: float,
    marked: list[bool] | None = None,
    watermark: Any = None,
) -> list[list[int]]:
    """Exactly ``n_new`` sampled ids per chat-templated prompt, one left-padded KV-cached batch.

    Per step: logits / temperature, EOS set to -inf (so every answer has ``n_new`` tokens),
    ``processors`` on every row, ``watermark`` only on rows with ``marked[i]`` (so watermarked
    and clean answers share one batch), then a multinomial draw.
    """
    ids, am = encode_prompts(tok, prompts)
    kw = cache_kw(model)
    rows = torch.tensor([bool(m) for m in (marked or [False] * len(prompts))])
    gen = torch.Generator().manual_seed(seed)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    new: list[torch.Tensor] = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True,
                    **last_logits_only(model))  # fmt: skip
        pos = pos[:, -1:]
        for step in range(n_new):
            logits = out.logits[:, -1].float() / temperature
            logits[:, tok.eos_token_id] = float("-inf")
            for proc in processors:
                logits = proc(ids, logits)
            if watermark is not None and bool(rows.any()):
                logits[rows] = watermark(ids[rows], logits[rows])
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            new.append(nxt)
            ids = torch.cat([ids, nxt], 1)
            am = torch.cat([am, torch.ones_like(nxt)], 1)
            pos = pos + 1
            if step < n_new - 1:
                out = model(input_ids=nxt, attention_mask=am, position_ids=pos, use_cache=True,
                            **{kw: cache_of(out)})  # fmt: skip
    return torch.cat(new, 1).tolist()
