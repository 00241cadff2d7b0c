"""The KV-cache keyword of a transformers causal LM: transformers 5 renamed ``past_key_values``
to ``cache`` (argument and output); every cached decoding loop in potstill asks here."""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["cache_kw", "cache_of"]


def cache_kw(model: Any) -> str:
    """``"cache"`` or ``"past_key_values"``: the keyword ``model.forward`` takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_of(out: Any) -> Any:
    """The KV cache a forward pass returned, under either name."""
    return getattr(out, "cache", None) or out.past_key_values
