"""The objective of one micro-batch: ``alpha*CE + (1-alpha)*KD`` and its two terms.

:func:`kd_objective` is the same-tokenizer case (full logits or sparse top-k targets);
:func:`cross_tokenizer_terms` the cross-tokenizer one, where the teacher scored the batch in its
own tokenization (:class:`~potstill.distill.teachers.crosstok.CrossTokenizerTeacher`). Both
return token sums; the loop normalises once per optimizer step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.distill.config import LossConfig

__all__ = ["LossTerms", "cross_tokenizer_terms", "kd_objective"]


class LossTerms(NamedTuple):
    """One objective's value and its two terms, each a token *sum* (fp32 scalars)."""

    total: Tensor
    ce: Tensor
    kd: Tensor


def kd_objective(
    student_logits: Tensor,
    teacher: Any,
    labels: Tensor,
    *,
    loss: LossConfig,
    reduction: str = "sum",
    overwrite: bool = False,
) -> LossTerms:
    """``alpha*CE + (1-alpha)*KD`` and its terms, as token sums over ``labels != -100``.

    ``student_logits``: ``[..., V]``; ``teacher``: None (CE only), full logits ``[..., V]``, or
    sparse top-k targets ``(topk_ids, topk_logprobs)`` ``[..., K]``; ``labels``: the leading
    shape. CE alone, forward and reverse KL, generalised JSD and sparse top-k KL go through
    :func:`~potstill.distill.losses.fused.fused_kd_objective` (closed-form gradients in
    cache-sized token chunks: the step's hot spot); TVD and the skew KLs through their
    reference functions. ``reduction`` must be ``"sum"`` (the chunked path passes it); the loop
    normalises once per optimizer step. ``overwrite``: the logits are a temporary the fused
    path may write its gradient over (one ``[N, V]`` buffer fewer per step).
    """
    from potstill.distill.losses import LOSSES, ce_plus_kd, cross_entropy
    from potstill.distill.losses.fused import fused_kd_objective

    if reduction != "sum":
        raise ValueError(f"kd_objective sums over tokens; got reduction={reduction!r}")
    fused_beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "generalized_jsd": loss.beta}.get(loss.kind)
    if teacher is None or isinstance(teacher, tuple) or fused_beta is not None:
        total, ce, kd = fused_kd_objective(
            student_logits, teacher, labels, alpha=loss.ce_weight, temperature=loss.temperature,
            beta=fused_beta or 0.0, overwrite=overwrite,
        )  # fmt: skip
        return LossTerms(total, ce, kd)
    extra: dict[str, float] = {}
    if loss.kind == "generalized_jsd":
        extra["beta"] = loss.beta
    elif loss.kind.startswith("skew_"):
        extra["alpha"] = loss.skew_alpha
    ce = cross_entropy(student_logits, labels, reduction="sum")
    kd = LOSSES[loss.kind](
        student_logits, teacher, labels, temperature=loss.temperature, reduction="sum", **extra
    )
    return LossTerms(ce_plus_kd(ce, kd, alpha=loss.ce_weight), ce, kd)


def cross_tokenizer_terms(
    hidden: Tensor, weight: Tensor, labels: Tensor, scored: Any, vocab_map: tuple[Tensor, Tensor],
    *, loss: LossConfig, student_vocab: int,
) -> LossTerms:  # fmt: skip
    """``alpha*CE + (1-alpha)*KD`` with KD on the byte-aligned positions only.

    ``hidden [B, T, H]`` and ``weight [V_s, H]``: the student's final states and head;
    ``labels [B, T]``; ``scored``: a :class:`~potstill.distill.teachers.crosstok.CrossScored`.
    CE covers every scored position; KD (:func:`~potstill.distill.losses.crosstok.hybrid_kd`
    or ``uld_kd``) the aligned ones, in chunks of ``loss.cross_tokenizer.chunk_rows`` so the
    teacher's ``[rows, V_t]`` logits stay small. Positions with no aligned teacher position get
    CE alone; both sums are divided by the same token count.
    """
    from potstill.distill.losses.crosstok import hybrid_kd, uld_kd

    xt = loss.cross_tokenizer
    assert xt is not None
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    keep = flat_y != -100
    w = weight[:student_vocab]
    ce = F.cross_entropy(F.linear(flat_h[keep], w).float(), flat_y[keep], reduction="sum")
    kd = hidden.new_zeros((), dtype=torch.float32)
    rows = scored.rows.to(hidden.device)
    for lo in range(0, len(rows), xt.chunk_rows):
        s_logits = F.linear(flat_h[rows[lo : lo + xt.chunk_rows]], w)
        with torch.no_grad():
            t_logits = F.linear(scored.hidden[lo : lo + xt.chunk_rows], scored.head)
        if xt.kind == "hybrid":
            kd = kd + hybrid_kd(s_logits, t_logits, vocab_map, temperature=loss.temperature,
                                uld_weight=xt.uld_weight, uld_top=xt.uld_top)  # fmt: skip
        else:
            kd = kd + uld_kd(s_logits, t_logits, temperature=loss.temperature, uld_top=xt.uld_top)
    alpha = loss.ce_weight
    return LossTerms(alpha * ce + (1.0 - alpha) * kd, ce, kd)
