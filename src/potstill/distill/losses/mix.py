"""Hard-label cross-entropy and its mix with a distillation term.

Scale warning: a KD term is often 100-1000x smaller than the CE term (a well-initialised student
is already close to its teacher per token, while CE stays near the data entropy), so with
``alpha = 0.5`` the CE gradient can dominate. Log both terms separately, not only the mix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.distill.losses._common import (
    Reduction,
    check_labels,
    check_reduction,
    check_unit_interval,
    keep_mask,
    normalise,
    select_rows,
)


def cross_entropy(
    student_logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> Tensor:
    """Next-token cross-entropy in fp32 with the same masking/reduction rules as the KD losses.

    Args:
        student_logits: ``[B, T, V]`` or ``[N, V]``, any float dtype (upcast to fp32).
        labels: ``[B, T]`` or ``[N]`` target ids ALIGNED with the logit positions (the caller
            shifts); positions equal to ``ignore_index`` are masked.
        reduction: ``"mean"`` (nats per unmasked token; 0.0 with a zero gradient when every
            position is masked) or ``"sum"`` (nats).
    """
    check_reduction(reduction)
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits must be [..., V], got {tuple(student_logits.shape)}")
    check_labels(labels, student_logits.shape[:-1], "logits")
    keep = keep_mask(labels, ignore_index)
    logits = select_rows(student_logits, keep).float()
    targets = labels.reshape(-1) if keep is None else labels.reshape(-1)[keep]
    log_q = F.log_softmax(logits, dim=-1)
    total = -torch.gather(log_q, -1, targets.long().unsqueeze(-1)).sum()
    return normalise(total, logits.shape[0], reduction)


def ce_plus_kd(ce: Tensor, kd: Tensor, *, alpha: float) -> Tensor:
    """``alpha * ce + (1 - alpha) * kd``; ``alpha = 1`` is pure CE, ``alpha = 0`` pure KD.

    Both terms should use the same reduction and token normalisation. KD is typically 100-1000x
    smaller than CE (module docstring): log ``ce`` and ``kd`` separately when training.
    """
    check_unit_interval("alpha", alpha)
    return alpha * ce + (1.0 - alpha) * kd


__all__ = ["ce_plus_kd", "cross_entropy"]
