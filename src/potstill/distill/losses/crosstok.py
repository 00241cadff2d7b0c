"""Cross-tokenizer distillation losses: a teacher and a student with different vocabularies.

The positions compared are byte-aligned first (:mod:`potstill.distill.data.align`): row ``n`` of
``student_logits`` and of ``teacher_logits`` are predictions made after the same text. What is
left is comparing a distribution over ``V_t`` teacher tokens with one over ``V_s`` student
tokens. ``vocab_map = (teacher_ids [S], student_ids [S])`` lists the *shared* tokens: the same
bytes (or the same special token) in both vocabularies.

:func:`hybrid_kd` (the default):

* **exact KL on the shared tokens.** Both distributions are coarsened to ``S + 1`` buckets, the
  shared tokens one by one plus one bucket for everything else, and
  ``KL(p_teacher || q_student)`` is taken over the buckets. On identical tokenizers every token
  is shared, the extra bucket is empty on both sides, and this *is* the forward KL;
* **ULD on the rest** (Boizard et al. 2024): the teacher's probabilities of its unshared tokens
  and the student's of its own, each sorted and cut to the ``uld_top`` largest, compared by L1
  (zero-padded). Sorting discards token identity, so this only asks the student to spread its
  unshared mass with the teacher's *shape*; weighted by ``uld_weight``.

:func:`uld_kd` is ULD alone on the whole distributions (the baseline GOLD and ULD papers use).

Known failure: when the token the text actually continues with exists only in the teacher's
vocabulary (e.g. a merged word the student spells in two tokens), the teacher's confidence
lands in the "rest" bucket and in ULD's sorted vector: the student is told *how much* mass goes
outside the shared set, never *which* of its tokens should carry it. The CE term on the
student's own next token (``alpha``) is what supplies that signal.

Shapes: ``student_logits [N, V_s]``, ``teacher_logits [N, V_t]`` (real tokens only: cut padded
logit rows first), any float dtype, computed in fp32. Returns the token *sum* (``reduction=
"sum"``) or mean over the ``N`` rows, times ``T**2``; 0 (with a gradient path) for ``N = 0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.distill.losses._common import (
    Reduction,
    check_reduction,
    check_temperature,
    normalise,
    safe_log_ratio,
)

__all__ = ["hybrid_kd", "sorted_l1", "uld_kd"]

#: Bucket masses at or below this count as empty (fp32 rounding of 1 - sum of S probabilities).
REST_FLOOR = 1e-6


def sorted_l1(p: Tensor, q: Tensor, top: int) -> Tensor:
    """Per row, ``sum_k |p_(k) - q_(k)|`` over the ``top`` largest entries of each (sorted
    descending, the shorter zero-padded): ULD's distance. ``p [N, A]``, ``q [N, B]`` -> ``[N]``."""
    a = p.topk(min(top, p.shape[-1]), dim=-1).values if p.shape[-1] else p.new_zeros(p.shape[0], 0)
    b = q.topk(min(top, q.shape[-1]), dim=-1).values if q.shape[-1] else q.new_zeros(q.shape[0], 0)
    width = max(a.shape[-1], b.shape[-1])
    a = F.pad(a, (0, width - a.shape[-1]))
    b = F.pad(b, (0, width - b.shape[-1]))
    return (a - b).abs().sum(-1)


def _rest(log_probs: Tensor, shared: Tensor) -> Tensor:  # the student's side
    """log of the mass outside ``shared`` (bool [V]) per row; -inf where nothing is outside."""
    if bool(shared.all()):
        return log_probs.new_full(log_probs.shape[:1], float("-inf"))
    return torch.logsumexp(log_probs[:, ~shared], dim=-1)


def hybrid_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    vocab_map: tuple[Tensor, Tensor],
    *,
    temperature: float = 1.0,
    uld_weight: float = 1.0,
    uld_top: int = 256,
    reduction: Reduction = "sum",
) -> Tensor:
    """Bucketed forward KL on the shared tokens plus ``uld_weight`` x ULD on the rest (module
    docstring). ``vocab_map``: ``(teacher_ids [S], student_ids [S])`` int64, one-to-one."""
    check_temperature(temperature)
    check_reduction(reduction)
    t_ids, s_ids = vocab_map
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    lp_sh, p_rest, p_other = _teacher_side(teacher_logits, t_ids, temperature, uld_top)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    lq = log_q[:, s_ids]
    s_shared = torch.zeros(log_q.shape[-1], dtype=torch.bool, device=log_q.device)
    s_shared[s_ids] = True
    lq_rest = _rest(log_q, s_shared)
    p_sh = lp_sh.exp()
    kl = (p_sh * safe_log_ratio(p_sh, lp_sh, lq)).sum(-1)
    # A rest bucket the teacher leaves (almost) empty adds nothing, whatever the student's.
    has_rest = p_rest > REST_FLOOR
    lp_rest = torch.log(p_rest.clamp_min(REST_FLOOR))
    rest_term = torch.where(has_rest, p_rest * (lp_rest - lq_rest), torch.zeros_like(p_rest))
    rows = kl + rest_term
    if uld_weight:
        rows = rows + uld_weight * sorted_l1(p_other, log_q[:, ~s_shared].exp(), uld_top)
    return normalise(rows.sum() * temperature**2, rows.shape[0], reduction)


@torch.no_grad()
def _teacher_side(
    teacher_logits: Tensor, t_ids: Tensor, temperature: float, top: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's shared log-probs ``[N, S]``, rest mass ``[N]`` and largest unshared
    probabilities ``[N, <= top]``, in a few passes over its ``[N, V_t]`` logits (a constant: no
    gradient; with V_t = 262,144 each extra pass is ~0.1 s per 256 rows on a CPU)."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    lp_sh = log_p[:, t_ids]
    p_rest = (1.0 - lp_sh.exp().sum(-1)).clamp_min(0.0)
    p = log_p.exp_()  # in place: log_p is not needed any more
    p.index_fill_(1, t_ids, 0.0)  # the unshared tokens' probabilities, shared ones zeroed
    n_other = p.shape[-1] - int(t_ids.numel())
    other = p.topk(min(top, n_other), dim=-1).values if n_other > 0 else p[:, :0]
    return lp_sh, p_rest, other


def uld_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    uld_top: int = 256,
    reduction: Reduction = "sum",
) -> Tensor:
    """ULD alone: L1 between the sorted top-``uld_top`` probabilities of the two whole
    distributions, per aligned row (no token identity used)."""
    check_temperature(temperature)
    check_reduction(reduction)
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    q = F.softmax(student_logits.float() / temperature, dim=-1)
    p = F.softmax(teacher_logits.float() / temperature, dim=-1)
    rows = sorted_l1(p, q, uld_top)
    return normalise(rows.sum() * temperature**2, rows.shape[0], reduction)
