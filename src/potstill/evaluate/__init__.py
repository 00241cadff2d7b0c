"""Held-out evaluation: NLL/perplexity, teacher agreement and KL, comparison tables."""

from __future__ import annotations

from potstill.evaluate.metrics import compare, evaluate_lm, gap_recovered, to_markdown

__all__ = ["compare", "evaluate_lm", "gap_recovered", "to_markdown"]
