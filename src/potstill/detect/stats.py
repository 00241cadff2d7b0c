"""Multiple testing: Holm–Bonferroni over several keys and/or suspects.

Auditing m (key, suspect) pairs at level alpha each would flag *something* with
probability up to m·alpha on clean models. Holm's step-down procedure controls the
family-wise error rate at alpha for any dependence between the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["holm_adjusted", "holm_bonferroni"]


def _check(pvalues: Sequence[float]) -> None:
    for p in pvalues:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-values must lie in [0, 1], got {p}")


def holm_adjusted(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in input order.

    With ``p_(1) <= ... <= p_(m)`` sorted: ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``.
    Hypothesis i is rejected at level alpha iff ``adj_i < alpha``.
    """
    _check(pvalues)
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def holm_bonferroni(pvalues: Sequence[float], alpha: float) -> list[bool]:
    """Which hypotheses Holm's step-down procedure rejects at family-wise level ``alpha``.

    Step down through the sorted p-values, rejecting while ``p_(i) < alpha / (m - i + 1)``;
    stop at the first that fails. Same decisions as ``holm_adjusted(p) < alpha``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    _check(pvalues)
    m = len(pvalues)
    reject = [False] * m
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        if pvalues[i] >= alpha / (m - rank):
            break
        reject[i] = True
    return reject
