"""potstill's output watermarks inside vLLM's v1 engine, as a ``vllm`` logits processor.

vLLM keeps a persistent batch. Before each step it tells every logits processor how the batch
changed (``BatchUpdate``: slots removed, requests added, slots moved or swapped), then calls
``apply(logits [B, V])`` with one row per slot, before penalties and temperature (where
potstill's own engine runs its processors too). :class:`PotstillWatermark` keeps, per slot,
the request's prompt ids, a reference to its live list of output ids and its temperature, and
calls the *same* served processors as potstill's engine (:class:`ServedKGW`,
:class:`ServedGumbel`) on :class:`DecodeRows` built from that state. The key, the keyed hash,
the parameters and the context rule (the last ``context_width`` ids of prompt + output) are
therefore the ones ``potstill audit`` checks, whichever engine wrote the text.

What vLLM does around it, and why the watermark survives:

* prefix caching and chunked prefill change how the KV cache is filled, not the logits rows or
  the ids the processor reads;
* a preempted request is re-added with the output ids it already has, so its context resumes;
* ``n > 1`` runs each sample as its own request in its own slot.

vLLM builds the processor itself, in its engine process, from this class; the settings travel
in ``additional_config={"potstill": {...}}`` (:func:`vllm_config_for`): the key file's path and
the watermark's parameters, never the key. :class:`potstill.defend.vllm_processors.PotstillDefences`
extends it with antidistillation (``potstill serve --engine vllm`` loads that one). This module imports ``vllm`` and is only imported
where vLLM is installed (``pip install 'potstill[vllm]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from potstill.core.errors import PotstillError
from potstill.core.watermark.keys import resolve_key
from potstill.core.watermark.params import WatermarkParams
from potstill.serve.sampling import DecodeRows
from potstill.serve.sampling import LogitsProcessor as ServedProcessor
from potstill.serve.vllm_engine import CONFIG_KEY, settings_of, vllm_config_for
from potstill.serve.watermarking import watermark_processors

__all__ = ["CONFIG_KEY", "PotstillWatermark", "settings_of", "vllm_config_for", "watermark_builder"]

Builder = Callable[[dict[str, Any]], list[ServedProcessor]]


def watermark_builder(settings: dict[str, Any]) -> Builder:
    """The watermark's chain builder from ``settings["watermark"]`` (the key is read here)."""
    wm = dict(settings["watermark"])
    key = resolve_key(wm.pop("key_file", None))
    return watermark_processors(key, WatermarkParams(**wm))


class _Context(Sequence[int]):
    """Prompt ids followed by the live output ids, without copying either (vLLM appends to the
    output list in place between steps)."""

    def __init__(self, prompt: Sequence[int], output: list[int]) -> None:
        self.prompt, self.output = prompt, output

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            n = len(self.prompt)
            head = list(self.prompt[start : min(stop, n)]) if start < n else []
            return head + self.output[max(start - n, 0) : max(stop - n, 0)]
        j = i + len(self) if i < 0 else i
        n = len(self.prompt)
        return self.prompt[j] if j < n else self.output[j - n]


@dataclass
class _Slot:
    key: int  # stable for the request's life in the batch (DecodeRows.keys)
    context: _Context
    temperature: float
    chain: tuple[Any, ...]  # the request's processors, chosen once when it is added


class PotstillWatermark(LogitsProcessor):
    """KGW or Gumbel watermarking of every request vLLM serves, from ``additional_config``."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self._build = self.builder(settings_of(vllm_config), device)
        self._slots: dict[int, _Slot] = {}
        self._keys = count()

    def builder(self, settings: dict[str, Any], device: torch.device) -> Builder:
        """Request record -> processor chain, from ``additional_config["potstill"]``."""
        if "watermark" not in settings:
            raise PotstillError(
                "PotstillWatermark needs additional_config={'potstill': {'watermark': "
                "{'key_file': ..., 'scheme': ...}}}: build it with "
                "potstill.serve.vllm_processors.vllm_config_for"
            )
        return watermark_builder(settings)

    def is_argmax_invariant(self) -> bool:
        return False  # KGW moves the argmax; Gumbel replaces the draw

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._slots.pop(index, None)
        for index, params, prompt, output in batch_update.added:
            temperature = float(getattr(params, "temperature", 1.0) or 0.0)
            chain = tuple(self._build({"temperature": temperature}))
            context = _Context(prompt or [], output)
            self._slots[index] = _Slot(next(self._keys), context, temperature, chain)
        for a, b, direction in batch_update.moved:
            first, second = self._slots.pop(a, None), self._slots.pop(b, None)
            if first is not None:
                self._slots[b] = first
            if direction == MoveDirectionality.SWAP and second is not None:
                self._slots[a] = second

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [B, V]`` with each slot's watermark applied, in place: vLLM hands over its
        own logits tensor and reads the returned one, and at ~66 ms a step on a CPU each
        ``[B, V]`` copy shows (``benchmarks/vllm_watermark.py``)."""
        groups: dict[tuple[int, ...], list[int]] = {}  # slots sharing one processor chain
        for index in range(logits.shape[0]):
            slot = self._slots.get(index)
            if slot is not None and slot.chain:  # e.g. Gumbel leaves greedy requests as they are
                groups.setdefault(tuple(map(id, slot.chain)), []).append(index)
        for index in groups.values():
            slots = [self._slots[i] for i in index]
            rows = DecodeRows(
                tuple(s.key for s in slots),
                tuple(s.context for s in slots),
                tuple(s.temperature for s in slots),
            )
            if len(index) == logits.shape[0]:  # the usual case: one chain for every row
                for proc in slots[0].chain:
                    proc.apply_(rows, logits)
                continue
            scores = logits[index]
            for proc in slots[0].chain:
                proc.apply_(rows, scores)
            logits[index] = scores
        return logits
