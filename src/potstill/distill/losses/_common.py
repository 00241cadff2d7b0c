"""Shared plumbing for the distillation losses: argument checks, token masking, reduction.

Every loss in :mod:`potstill.distill.losses` follows the same recipe:

1. check arguments (:func:`check_temperature`, :func:`check_reduction`, :func:`check_pair`);
2. keep only the unmasked token rows, upcast to fp32 (:func:`select_rows`);
3. compute a *sum* of per-token divergences over those rows;
4. normalise (:func:`normalise`): ``"sum"`` keeps the numerator, ``"mean"`` divides by the
   number of unmasked tokens (and returns a graph-connected 0 when there are none).

Selecting rows *before* the fp32 upcast means masked positions (prompt, padding) cost no fp32
memory and cannot inject NaN/inf into the value or the gradient, whatever their logits hold.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from potstill.core.errors import PotstillError

Reduction = Literal["mean", "sum"]
_REDUCTIONS = ("mean", "sum")


class LossConfigError(PotstillError, ValueError):
    """A loss hyper-parameter is out of range (temperature, beta, alpha, reduction, ...).

    It is a :class:`ValueError` for Python callers and a :class:`PotstillError` so that the CLI
    reports a bad config value as a one-line user error (exit code 2).
    """


def check_temperature(temperature: float) -> None:
    """Raise :class:`LossConfigError` unless ``temperature`` is a finite number > 0."""
    if (
        not (isinstance(temperature, (int, float)) and math.isfinite(temperature))
        or temperature <= 0
    ):
        raise LossConfigError(
            f"temperature must be a finite number > 0, got {temperature!r}; "
            "set the distillation temperature to a positive value such as 1.0 or 2.0"
        )


def check_reduction(reduction: str) -> None:
    """Raise :class:`LossConfigError` unless ``reduction`` is ``"mean"`` or ``"sum"``."""
    if reduction not in _REDUCTIONS:
        raise LossConfigError(
            f"reduction must be one of {_REDUCTIONS}, got {reduction!r}; "
            "use 'mean' (per-token average) or 'sum' (then divide by your own token count)"
        )


def check_unit_interval(name: str, value: float) -> None:
    """Raise :class:`LossConfigError` unless ``0 <= value <= 1``."""
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise LossConfigError(f"{name} must be in [0, 1], got {value!r}; pick a value in [0, 1]")


def check_labels(labels: Tensor | None, lead_shape: torch.Size, what: str) -> None:
    """Raise ``ValueError`` unless ``labels`` is None or has shape ``lead_shape``."""
    if labels is not None and labels.shape != lead_shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the {what} shape without its last "
            f"dimension {tuple(lead_shape)}; labels are aligned with logit positions (shift first)"
        )


def check_pair(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None) -> None:
    """Shape checks shared by all student/teacher logit losses (shape errors are caller bugs)."""
    if student_logits.dim() < 2:
        raise ValueError(
            f"student_logits must be [..., V] with at least 2 dims, got {tuple(student_logits.shape)}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape; truncate/pad the teacher "
            "vocabulary to the student's before calling the loss"
        )
    check_labels(labels, student_logits.shape[:-1], "logits")


def keep_mask(labels: Tensor | None, ignore_index: int) -> Tensor | None:
    """Flat ``[N]`` bool mask of positions that count, or None when every position counts."""
    if labels is None:
        return None
    return labels.reshape(-1) != ignore_index


def select_rows(x: Tensor, keep: Tensor | None) -> Tensor:
    """Flatten ``x [..., D]`` to ``[N, D]`` and keep the rows where ``keep`` is True.

    The result stays in ``x``'s dtype; callers upcast what they need. Indexing happens in the
    input dtype so that masked rows never reach an fp32 copy.
    """
    flat = x.reshape(-1, x.shape[-1])
    return flat if keep is None else flat[keep]


def normalise(total: Tensor, n_tokens: int, reduction: str) -> Tensor:
    """Turn a summed loss into the requested reduction.

    ``"mean"`` with ``n_tokens == 0`` returns ``total / 1``: the sum over zero rows is exactly 0
    and still carries a ``grad_fn`` to the inputs, so ``backward()`` yields zero gradients
    instead of NaN.
    """
    if reduction == "sum":
        return total
    return total / max(n_tokens, 1)


def safe_log_ratio(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """``log_p - log_q`` where ``p > 0`` and 0 elsewhere, so that ``p * ratio`` is NaN-free.

    Where ``p == 0`` the KL term ``p * log(p/q)`` is 0 by convention; ``log_p - log_q`` there may
    be ``-inf - -inf = nan`` (both distributions exclude the token). :func:`torch.where` sends a
    zero gradient into the discarded branch, so neither the value nor the gradient sees the NaN.
    """
    return torch.where(
        p > 0, log_p - log_q, torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    )


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row ``KL(p || q) = sum_v p_v (log p_v - log q_v)``: ``[n, V]`` log-probs -> ``[n]``.

    ``p = exp(log_p)``; terms with ``p == 0`` contribute exactly 0 (see :func:`safe_log_ratio`).
    """
    p = log_p.exp()
    return (p * safe_log_ratio(p, log_p, log_q)).sum(dim=-1)


def log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(weight_a * exp(log_a) + (1 - weight_a) * exp(log_b))`` computed in log space.

    Uses :func:`torch.logaddexp` (never ``log(exp(.))``). The endpoints return the matching input
    unchanged so that e.g. ``alpha = 0`` reproduces the plain KL bit for bit.
    """
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    # Clamp -inf to the most negative finite value: logaddexp's backward is exp(x - out), which
    # is nan when both inputs are -inf (a token excluded by both models). The clamped value
    # exp()s to exactly 0, so the mixture probabilities are unchanged.
    floor = torch.finfo(log_a.dtype).min
    return torch.logaddexp(
        (log_a + math.log(weight_a)).clamp_min(floor),
        (log_b + math.log1p(-weight_a)).clamp_min(floor),
    )
