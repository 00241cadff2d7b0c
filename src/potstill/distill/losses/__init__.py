"""Knowledge-distillation losses: pure functions of logits, fp32 inside, token-normalised.

Conventions (details in :mod:`potstill.distill.losses.divergence`):

* ``student_logits`` / ``teacher_logits``: ``[B, T, V]`` or ``[N, V]``; ``labels``: ``[B, T]`` /
  ``[N]`` or None, ALIGNED with the logit positions (the caller shifts); ``labels ==
  ignore_index`` masks a position.
* ``reduction="mean"``: nats per unmasked token; ``"sum"``: the numerator only (divide by the
  token count of the whole gradient-accumulation window yourself).
* ``temperature``: logits divided by ``T``, loss multiplied by ``T**2``.

``LOSSES`` maps config names to the full-vocabulary divergences, all with the signature
``fn(student_logits, teacher_logits, labels=None, *, temperature, ignore_index, reduction, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from potstill.distill.losses._common import LossConfigError
from potstill.distill.losses.chunked import chunked_kd_loss, fused_linear_kd_loss
from potstill.distill.losses.divergence import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from potstill.distill.losses.mix import ce_plus_kd, cross_entropy
from potstill.distill.losses.sparse import (
    TAIL_FLOOR,
    TopKTargets,
    sparse_topk_kl,
    topk_from_logits,
)

LOSSES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "tvd": tvd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
}

__all__ = [
    "LOSSES",
    "TAIL_FLOOR",
    "LossConfigError",
    "TopKTargets",
    "ce_plus_kd",
    "chunked_kd_loss",
    "cross_entropy",
    "forward_kl",
    "fused_linear_kd_loss",
    "generalized_jsd",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sparse_topk_kl",
    "topk_from_logits",
    "tvd",
]
