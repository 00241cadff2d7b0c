"""Full-vocabulary distillation divergences between student and teacher logits.

Conventions shared by every function here
-----------------------------------------
Shapes
    ``student_logits`` and ``teacher_logits``: ``[B, T, V]`` or ``[N, V]`` (any leading dims, same
    shape for both). ``labels``: the leading shape (``[B, T]`` or ``[N]``) or ``None``.
Labels are ALIGNED with logit positions
    ``labels[..., i]`` decides whether position ``i`` of the logits counts. The caller does the
    causal shift (``logits[:, :-1]`` with ``labels[:, 1:]``) before calling. A position is masked
    when ``labels == ignore_index``; with ``labels=None`` every position counts. The label *values*
    are not used by the KD losses, only the mask.
Notation
    ``p`` is the teacher distribution, ``q`` the student distribution, both
    ``softmax(logits / temperature)``. "Forward KL" is ``KL(p || q)`` (mode covering, the classic
    Hinton KD loss); "reverse KL" is ``KL(q || p)`` (mode seeking).
Reduction (units: nats per token)
    The per-token divergence is summed over the vocabulary. ``"sum"`` returns the sum over
    unmasked tokens; ``"mean"`` divides it by the number of unmasked tokens. Use ``"sum"`` and
    divide by the token count of the whole gradient-accumulation window to make accumulation exact
    (averaging per-micro-batch means over-weights short micro-batches). ``"mean"`` with zero
    unmasked tokens returns 0.0 connected to the graph (zero gradients), never NaN.
Temperature
    Both logits are divided by ``temperature`` and the loss is multiplied by ``temperature**2``
    (Hinton et al., 2015): the gradient of a softened KL scales like ``1/T**2``, so the factor keeps
    gradient magnitudes comparable across temperatures. ``temperature`` must be > 0.
Numerics
    Inputs of any float dtype (bf16 included) are upcast to fp32 after masked positions are
    dropped; the result is an fp32 scalar. Probabilities are only ever formed as
    ``exp(log_softmax(.))``, mixtures via ``logaddexp``; terms with zero probability contribute
    exactly 0, so finite extreme logits (``±1e4``) and ``-inf`` logits excluded by both models are
    fine. Each per-token divergence is clamped at 0 to remove fp32 rounding noise (``~1e-7``) on
    near-identical distributions; mathematically they are all non-negative.
Gradients
    Flow to ``student_logits``, and to ``teacher_logits`` too if it requires grad (it normally is
    produced under ``torch.no_grad()``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from potstill.distill.losses._common import (
    Reduction,
    check_pair,
    check_reduction,
    check_temperature,
    check_unit_interval,
    keep_mask,
    kl_rows,
    log_mix,
    normalise,
    select_rows,
)

# (log q_student [n, V], log p_teacher [n, V]) -> per-token divergence [n]
_TokenDivergence = Callable[[Tensor, Tensor], Tensor]


def _distill(
    divergence: _TokenDivergence,
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    temperature: float,
    ignore_index: int,
    reduction: str,
) -> Tensor:
    """Mask, upcast, temper, apply ``divergence`` per token, scale by ``T**2`` and reduce."""
    check_temperature(temperature)
    check_reduction(reduction)
    check_pair(student_logits, teacher_logits, labels)
    keep = keep_mask(labels, ignore_index)
    student = select_rows(student_logits, keep).float()
    teacher = select_rows(teacher_logits, keep).float()
    if temperature != 1.0:
        student = student / temperature
        teacher = teacher / temperature
    per_token = divergence(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1))
    total = per_token.clamp_min(0.0).sum()
    if temperature != 1.0:
        total = total * (temperature**2)
    return normalise(total, student.shape[0], reduction)


def _forward_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    return kl_rows(log_p, log_q)


def _reverse_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    return kl_rows(log_q, log_p)


def _tvd_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    return 0.5 * (log_q.exp() - log_p.exp()).abs().sum(dim=-1)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> Tensor:
    """Forward KL, ``KL(p_teacher || q_student)`` per token (module docstring: shapes, masking).

    Returns an fp32 scalar in nats per token (``"mean"``) or nats (``"sum"``), times ``T**2``.
    """
    return _distill(
        _forward_rows, student_logits, teacher_logits, labels, temperature, ignore_index, reduction
    )


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> Tensor:
    """Reverse KL, ``KL(q_student || p_teacher)`` per token (mode seeking; MiniLLM-style)."""
    return _distill(
        _reverse_rows, student_logits, teacher_logits, labels, temperature, ignore_index, reduction
    )


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> Tensor:
    """Total variation distance ``0.5 * sum_v |q_v - p_v|`` per token (in [0, 1] before ``T**2``)."""
    return _distill(
        _tvd_rows, student_logits, teacher_logits, labels, temperature, ignore_index, reduction
    )


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024), TRL's convention.

    For ``0 < beta < 1``, with mixture ``M = (1 - beta) * q_student + beta * p_teacher``::

        loss = beta * KL(p_teacher || M) + (1 - beta) * KL(q_student || M)

    ``beta = 0`` is *defined* as forward ``KL(p || q)`` and ``beta = 1`` as reverse ``KL(q || p)``,
    exactly as ``trl``'s ``GKDTrainer.generalized_jsd_loss`` (trl 1.16) special-cases them; the
    ``beta`` argument maps to TRL's ``beta`` one to one. Note the formula itself tends to 0 (not to
    the KLs) as ``beta -> 0`` or ``1``: the endpoints are discontinuous by definition, and small
    interior betas give losses of order ``beta * KL``. ``beta = 0.5`` is the symmetric JS
    divergence (bounded by ``ln 2`` per token before ``T**2``).

    Relation to TRL (same masked tokens): ``ours("mean") == T**2 * trl(reduction="batchmean",
    labels given)``. TRL divides logits by ``T`` but does not multiply by ``T**2``; with
    ``labels=None`` TRL's "batchmean" divides by the batch size ``B`` rather than by ``B*T``.
    """
    check_unit_interval("beta", beta)
    if beta == 0.0:
        divergence: _TokenDivergence = _forward_rows
    elif beta == 1.0:
        divergence = _reverse_rows
    else:

        def divergence(log_q: Tensor, log_p: Tensor) -> Tensor:
            log_m = log_mix(log_p, log_q, beta)
            return beta * kl_rows(log_p, log_m) + (1.0 - beta) * kl_rows(log_q, log_m)

    return _distill(
        divergence, student_logits, teacher_logits, labels, temperature, ignore_index, reduction
    )


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> Tensor:
    """Skew forward KL of DistiLLM (Ko et al., 2024): ``KL(p || alpha * p + (1 - alpha) * q)``.

    ``p`` is the teacher, ``q`` the student. ``alpha = 0`` is forward KL; ``alpha = 1`` is 0.
    Mixing some teacher mass into the second argument bounds the loss (at most ``-log alpha``) and
    its gradient where the student puts ~0 mass on a teacher token.
    """
    check_unit_interval("alpha", alpha)

    def divergence(log_q: Tensor, log_p: Tensor) -> Tensor:
        return kl_rows(log_p, log_mix(log_p, log_q, alpha))

    return _distill(
        divergence, student_logits, teacher_logits, labels, temperature, ignore_index, reduction
    )


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> Tensor:
    """Skew reverse KL of DistiLLM: ``KL(q || alpha * q + (1 - alpha) * p)``, ``q`` the student.

    ``alpha = 0`` is reverse KL; ``alpha = 1`` is 0.
    """
    check_unit_interval("alpha", alpha)

    def divergence(log_q: Tensor, log_p: Tensor) -> Tensor:
        return kl_rows(log_q, log_mix(log_q, log_p, alpha))

    return _distill(
        divergence, student_logits, teacher_logits, labels, temperature, ignore_index, reduction
    )


__all__ = [
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
]
