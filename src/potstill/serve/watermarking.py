"""Keyed output watermarks on the server: batched logits processors + audit metadata.

The engine calls each processor once per decode step with all its rows (``DecodeRows``,
``scores [B, V]``) *before* temperature and top-p. KGW adds ``delta`` to the green logits
there (so at temperature T the effective bias is delta / T, as in transformers'
``generate``). Gumbel/Aaronson sampling must see the distribution actually sampled from, so
its adapter applies each row's temperature itself and returns a one-hot mask: whatever the
sampler does next, it picks the keyed choice. Greedy rows (temperature 0) are left
unwatermarked by Gumbel, which has nothing to randomise; top-p is ignored under Gumbel. Rows
with fewer than ``context_width`` tokens of context have no key for their green list yet and
are left as they are.

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

    from potstill.core.watermark.keys import WatermarkKey
    from potstill.core.watermark.params import WatermarkParams
    from potstill.serve.sampling import DecodeRows, LogitsProcessor

__all__ = ["ServedGumbel", "ServedKGW", "watermark_processors", "write_serve_metadata"]


class ServedKGW:
    """KGW over a decode batch: ``delta`` on each row's green tokens."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc

    def __call__(self, rows: DecodeRows, scores: Tensor) -> Tensor:
        return self.apply_(rows, scores.clone())

    def apply_(self, rows: DecodeRows, scores: Tensor) -> Tensor:
        """:meth:`__call__` in place on ``scores`` (returned)."""
        tails, idx = rows.tails(self.proc.context_width)
        if len(idx) == len(rows):  # every row has a full context: no gather, no scatter
            return self.proc.bias_(tails, scores)
        if idx:
            scores[idx] = self.proc.bias_(tails, scores[idx])
        return scores


class ServedGumbel:
    """Gumbel/Aaronson over a decode batch: a one-hot mask on each sampled row's keyed choice."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc

    def __call__(self, rows: DecodeRows, scores: Tensor) -> Tensor:
        import torch

        sampled = [i for i, t in enumerate(rows.temperatures) if t > 0]
        tails, idx = rows.tails(self.proc.context_width, sampled)
        if not idx:
            return scores
        temps = torch.tensor([rows.temperatures[i] for i in idx], dtype=scores.dtype)
        out = scores.clone()
        out[idx] = self.proc(tails, scores[idx] / temps[:, None])
        return out

    def apply_(self, rows: DecodeRows, scores: Tensor) -> Tensor:
        """:meth:`__call__`, written into ``scores`` (returned)."""
        return scores.copy_(self(rows, scores))


def watermark_processors(
    key: WatermarkKey, params: WatermarkParams
) -> Callable[[dict[str, Any]], list[LogitsProcessor]]:
    """A builder for ServeSettings.processors: request record -> processor chain. The
    processor is built once here and shared by every request (one call per decode step)."""
    proc: LogitsProcessor
    if params.scheme == "kgw":
        from potstill.core.watermark.kgw import KGWProcessor

        proc = ServedKGW(
            KGWProcessor(
                key, gamma=params.gamma, delta=params.delta, context_width=params.context_width
            )
        )
    else:
        from potstill.core.watermark.gumbel import GumbelProcessor

        proc = ServedGumbel(GumbelProcessor(key, context_width=params.context_width))
    gumbel = params.scheme != "kgw"

    def build(rec: dict[str, Any]) -> list[LogitsProcessor]:
        # a greedy request is not watermarked by Gumbel: no processor, so its logprobs and
        # echo behave as undefended (they are: the argmax of the raw logits)
        if gumbel and not float(rec.get("temperature") or 0.0) > 0:
            return []
        return [proc]

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
    from potstill.core.io import atomic_write_json

    meta: dict[str, Any] = {
        "model": model,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if params is not None and key is not None:
        meta["watermark"] = {**params.to_dict(), "key_id": key.key_id}
    meta.update(extra or {})
    return atomic_write_json(path, meta)
