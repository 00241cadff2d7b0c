"""Sparse (top-k) distillation: forward KL against a teacher known only by its top-k log-probs.

API teachers and stored teacher outputs usually keep only the ``K`` most likely tokens per
position. :func:`sparse_topk_kl` compares the two distributions over ``K + 1`` buckets: the ``K``
given tokens, plus one *tail* bucket that holds all remaining probability mass. This keeps the
loss a proper KL between two distributions (dropping the tail would let the student push all
non-top-k tokens to zero probability for free).

Shapes, masking (labels aligned with logit positions, ``ignore_index``), reductions and the
``T**2`` temperature factor follow :mod:`potstill.distill.losses.divergence`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.distill.losses._common import (
    Reduction,
    check_labels,
    check_reduction,
    check_temperature,
    keep_mask,
    normalise,
    safe_log_ratio,
    select_rows,
)

#: Teacher tail masses at or below this are treated as 0 (no tail bucket). Summing K fp32
#: probabilities leaves rounding errors of ~1e-7; without the floor such noise against a student
#: tail of ~0 mass would be an arbitrary, possibly huge, term.
TAIL_FLOOR = 1e-6


class TopKTargets(NamedTuple):
    """A teacher known by its top-k: ``ids`` ``[..., K]`` (pad slots -1) and fp32 ``logprobs``
    ``[..., K]``. A tuple, so the losses that take ``(ids, logprobs)`` take it too; the type
    tells :func:`~potstill.distill.losses.fused_linear_kd_loss` it is not a (hidden, weight)
    pair."""

    ids: Tensor
    logprobs: Tensor


def topk_from_logits(
    teacher_logits: Tensor, k: int, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Top-``k`` token ids and fp32 log-probabilities of ``softmax(teacher_logits / temperature)``.

    Args:
        teacher_logits: ``[..., V]``, any float dtype.
        k: number of tokens to keep, ``1 <= k <= V``.
    Returns:
        ``(ids [..., k] int64, logprobs [..., k] float32)``, most likely first. The log-probs are
        normalised over the full vocabulary, as an API would report them.
    """
    check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V={vocab}], got {k}")
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    logprobs, ids = torch.topk(log_p, k, dim=-1)
    return ids.long(), logprobs


def _student_tail_logprob(logits: Tensor, in_topk: Tensor, log_norm: Tensor) -> Tensor:
    """``log(sum of student probs outside the top-k)`` per row, in log space: ``[n]``.

    Equals ``logsumexp(logits with top-k set to -inf) - logsumexp(logits)``; never
    ``log(1 - sum(p_topk))``, which cancels catastrophically when the top-k holds almost all mass.
    Rows whose tail is empty get ``-inf`` with a zero (not NaN) gradient.
    """
    tail_logits = logits.masked_fill(in_topk, float("-inf"))
    empty = torch.isneginf(tail_logits).all(dim=-1)
    # logsumexp's backward is exp(x - lse) = nan on an all -inf row: feed those rows zeros instead
    # and put -inf back afterwards (the where() blocks the gradient of the placeholder).
    safe = torch.where(empty.unsqueeze(-1), torch.zeros_like(tail_logits), tail_logits)
    tail_lse = torch.logsumexp(safe, dim=-1)
    return torch.where(empty, torch.full_like(tail_lse, float("-inf")), tail_lse - log_norm)


def sparse_topk_kl(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> Tensor:
    """Forward ``KL(p_teacher || q_student)`` over the teacher's top-k tokens plus one tail bucket.

    Args:
        student_logits: ``[B, T, V]`` or ``[N, V]``; divided by ``temperature`` before softmax.
        teacher_topk_ids: ``[..., K]`` int64 token ids, distinct within a position. Slots holding
            ``-1`` (fewer than ``K`` tokens reported) are ignored.
        teacher_topk_logprobs: ``[..., K]`` teacher log-probabilities of those ids, normalised over
            the full vocabulary and ALREADY at ``temperature`` (they are used as given; produce
            them with :func:`topk_from_logits` at the same temperature). Values at ``-1`` slots
            are ignored.
        labels: leading shape or None; positions equal to ``ignore_index`` are masked.

    Teacher tail mass is ``1 - sum(exp(logprobs))`` clamped to ``>= 0``; if it is at most
    :data:`TAIL_FLOOR`, or the student has no tail at all (the ids cover the vocabulary), the tail
    term is 0. Student bucket log-probs are gathered from ``log_softmax``; the student tail is
    computed in log space. The result is multiplied by ``temperature**2``; with ``K = V`` it equals
    :func:`~potstill.distill.losses.forward_kl`.
    """
    check_temperature(temperature)
    check_reduction(reduction)
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
            f"{tuple(teacher_topk_logprobs.shape)} must have the same shape [..., K]"
        )
    if teacher_topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher top-k leading shape {tuple(teacher_topk_ids.shape[:-1])} must match "
            f"student_logits leading shape {tuple(student_logits.shape[:-1])}"
        )
    check_labels(labels, student_logits.shape[:-1], "logits")

    keep = keep_mask(labels, ignore_index)
    logits = select_rows(student_logits, keep).float()
    if temperature != 1.0:
        logits = logits / temperature
    ids = select_rows(teacher_topk_ids, keep).long()
    valid = ids >= 0
    safe_ids = ids.clamp_min(0)  # -1 slots gather/scatter at 0 but are masked out below

    log_norm = torch.logsumexp(logits, dim=-1)
    log_q = torch.gather(logits, -1, safe_ids) - log_norm.unsqueeze(-1)  # [n, K]
    # scatter_add (not scatter) so a -1 slot aliased to id 0 cannot overwrite a real id-0 entry
    hits = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device)
    hits.scatter_add_(-1, safe_ids, valid.to(torch.int32))
    log_q_tail = _student_tail_logprob(logits, hits > 0, log_norm)

    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    log_p = torch.where(valid, select_rows(teacher_topk_logprobs, keep).float(), neg_inf)
    p = log_p.exp()
    bucket_terms = (p * safe_log_ratio(p, log_p, log_q)).sum(dim=-1)

    p_tail = (1.0 - p.sum(dim=-1)).clamp_min(0.0)
    has_tail = (p_tail > TAIL_FLOOR) & torch.isfinite(log_q_tail)
    p_tail = torch.where(has_tail, p_tail, torch.zeros_like(p_tail))
    log_p_tail = torch.where(has_tail, torch.log(p_tail.clamp_min(TAIL_FLOOR)), neg_inf)
    tail_term = p_tail * safe_log_ratio(p_tail, log_p_tail, log_q_tail)

    total = (bucket_terms + tail_term).clamp_min(0.0).sum()
    if temperature != 1.0:
        total = total * (temperature**2)
    return normalise(total, logits.shape[0], reduction)


__all__ = ["TAIL_FLOOR", "sparse_topk_kl", "topk_from_logits"]
