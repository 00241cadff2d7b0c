"""Keyed output watermarks on the server: per-request logits processors + audit metadata.

The engine applies a request's processors to one row at a time (``ids [T]``,
``logits [V]``) *before* temperature and top-p. KGW adds ``delta`` to the green
logits there (so at temperature T the effective bias is delta / T, as in
transformers' ``generate``). Gumbel/Aaronson sampling must see the distribution
actually sampled from, so its adapter applies the request's temperature itself
and returns a one-hot mask: whatever the sampler does next, it picks the keyed
choice. Greedy requests (temperature 0) are left unwatermarked by Gumbel, which
has nothing to randomise; top-p is ignored under Gumbel.

The scheme, its parameters and the key id (never the key) go into the server's
metadata file, never into responses, so a later ``potstill audit`` can be run
with exactly the serving settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from potstill.watermark.keys import WatermarkKey
    from potstill.watermark.params import WatermarkParams

__all__ = ["watermark_processors", "write_serve_metadata"]


class _KGWRow:
    def __init__(self, proc: Any) -> None:
        self.proc = proc

    def __call__(self, ids: Tensor, logits: Tensor) -> Tensor:
        return self.proc(ids[None, :], logits[None, :])[0]


class _GumbelRow:
    def __init__(self, proc: Any, temperature: float) -> None:
        self.proc, self.temperature = proc, temperature

    def __call__(self, ids: Tensor, logits: Tensor) -> Tensor:
        return self.proc(ids[None, :], logits[None, :] / self.temperature)[0]


def watermark_processors(
    key: WatermarkKey, params: WatermarkParams
) -> Callable[[dict[str, Any]], list[Callable[[Tensor, Tensor], Tensor]]]:
    """A builder for ServeSettings.processors: request record -> processor chain."""
    if params.scheme == "kgw":
        from potstill.watermark.kgw import KGWProcessor

        kgw = _KGWRow(
            KGWProcessor(
                key, gamma=params.gamma, delta=params.delta, context_width=params.context_width
            )
        )
        return lambda rec: [kgw]
    from potstill.watermark.gumbel import GumbelProcessor

    gumbel = GumbelProcessor(key, context_width=params.context_width)

    def build(rec: dict[str, Any]) -> list[Callable[[Tensor, Tensor], Tensor]]:
        t = float(rec.get("temperature") or 0.0)
        return [_GumbelRow(gumbel, t)] if t > 0 else []

    return build


def write_serve_metadata(
    path: str | Path,
    *,
    model: str,
    key: WatermarkKey | None,
    params: WatermarkParams | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Record how this server transforms outputs (atomically); the key itself never."""
    from potstill.io import atomic_write_json

    meta: dict[str, Any] = {
        "model": model,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if params is not None and key is not None:
        meta["watermark"] = {**params.to_dict(), "key_id": key.key_id}
    meta.update(extra or {})
    return atomic_write_json(path, meta)
