"""A KV cache that grows in place: spare columns after the last one, so a decode step writes
its new key and value instead of copying the whole cache.

transformers' ``DynamicLayer.update`` appends with ``torch.cat``, which copies every cached
key and value of the layer at every step: at SmolLM2-135M, 8 rows and ~100 cached positions
that is 60 copies of ~300 KB per step, 3.6 ms of a 28.8 ms bf16 step (profiled on the
project's 2-core Xeon). :class:`SlackLayer` keeps each layer's keys and values in a buffer with
room for more columns (``[B, H, capacity, D]``) and exposes the filled part as a view
(``[B, H, length, D]``); the buffer is reallocated, with half as much room again, only when
it is full.

The engine still reshapes the batch by assigning ``layer.keys`` / ``layer.values`` (merging
new rows, dropping finished ones): an assigned tensor becomes the buffer, with no spare
room, and the next update makes room. Attention reads the same numbers either way.

This module imports transformers: the engine imports it only when it builds a cache.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["SlackLayer", "slack_cache"]

#: The fewest spare columns a reallocation leaves (and at least half the length again).
MIN_SLACK = 64


class SlackLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views of buffers with spare columns.

    Keys and values keep their own filled length, as the engine assigns one and then reads
    the other to compute its new value."""

    def __init__(self, **kwargs: Any) -> None:
        self._buf: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self._len = {"keys": 0, "values": 0}
        super().__init__(**kwargs)

    def _get(self, name: str) -> torch.Tensor | None:
        buf = self._buf[name]
        if buf is None or buf.dim() != 4:
            return buf  # None, or the empty placeholder of lazy_initialization
        return buf[:, :, : self._len[name]]

    def _set(self, name: str, t: torch.Tensor | None) -> None:
        self._buf[name] = t
        self._len[name] = t.shape[-2] if t is not None and t.dim() == 4 else 0

    keys = property(lambda self: self._get("keys"), lambda self, t: self._set("keys", t))  # type: ignore[assignment]
    values = property(lambda self: self._get("values"), lambda self, t: self._set("values", t))  # type: ignore[assignment]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key_states``/``value_states`` ``[B, H, n, D]`` after the filled columns;
        returns the filled keys and values ``[B, H, length, D]``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self._len["keys"]
        assert length == self._len["values"], "keys and values of a layer differ in length"
        end = length + key_states.shape[-2]
        for name, new in (("keys", key_states), ("values", value_states)):
            buf = self._buf[name]
            if buf is None or buf.dim() != 4 or end > buf.shape[-2]:
                buf = self._grow(name, new, end)
            buf[:, :, length:end] = new
            self._len[name] = end
        return self.keys, self.values

    def _grow(self, name: str, new: torch.Tensor, need: int) -> torch.Tensor:
        """A buffer for ``need`` columns and room for more, holding the filled ones."""
        b, h, _, d = new.shape
        buf = new.new_empty((b, h, need + max(MIN_SLACK, need // 2), d))
        old, length = self._buf[name], self._len[name]
        if old is not None and old.dim() == 4 and length:
            buf[:, :, :length] = old[:, :, :length]
        self._buf[name] = buf
        return buf


def slack_cache(config: Any) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers are :class:`SlackLayer`s
    (sliding-window and other layer kinds are kept as transformers builds them)."""
    cache = DynamicCache(config=config)
    cache.layers = [
        SlackLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache
