"""Held-out evaluation: NLL/perplexity, teacher agreement and KL, comparison tables, and the
verifiable tasks of :mod:`potstill.distill.evaluate.tasks` (stdlib only; importing it stays light)."""

from __future__ import annotations

from potstill.core.lazy import lazy_exports

_EXPORTS = {name: "metrics" for name in ("compare", "evaluate_lm", "gap_recovered", "to_markdown")}

__all__ = ["compare", "evaluate_lm", "gap_recovered", "to_markdown"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
