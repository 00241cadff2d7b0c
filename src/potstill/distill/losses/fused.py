"""The training objective ``alpha*CE + (1-alpha)*KD`` with closed-form gradients, in token chunks.

The reference losses (:mod:`~potstill.distill.losses.divergence`, :mod:`~potstill.distill.losses.sparse`)
let autograd differentiate a chain of full-vocabulary ops; every op is another pass over a
``[N, V]`` fp32 tensor in DRAM, forward and backward. For the two objectives a distillation
step spends its time on -- forward KL against full teacher logits, and forward KL against a
teacher's top-k log-probs with a tail bucket -- the gradient has a closed form:

* cross-entropy (T = 1):   ``dCE/ds = softmax(s) - onehot(label)``
* forward KL at T:         ``d(T^2 KL)/ds = T * (q - p)``,  ``q = softmax(s/T)``, ``p = softmax(t/T)``
* generalised JSD (GKD, ``0 < beta < 1``, ``m = (1-beta) q + beta p``):
  ``d(T^2 JSD)/ds = T (1-beta) q * (log(q/m) - KL(q||m))``; at ``beta = 1`` (reverse KL)
  ``T q * (log(q/p) - KL(q||p))`` (the ``dL/dq`` terms of ``p`` and ``m`` cancel: see
  :func:`_jsd_rows`)
* top-k KL with a tail:    ``d(T^2 KL)/ds_j = T * (q_j S - p_j)`` for the K listed tokens and
  ``T * q_j (S - p_tail / q_tail)`` for the rest, where ``S = sum_k p_k + p_tail`` (1 when
  the tail bucket is used, the listed mass otherwise) and ``q_tail`` is the student's mass
  outside the list.

:func:`fused_kd_objective` walks the unmasked tokens in chunks small enough to stay in cache,
computes value and gradient together in one forward pass, and keeps only the gradient
(in the student logits' dtype) for backward. Values equal the reference losses (the same
masking, ``TAIL_FLOOR`` and per-token clamp at 0), and gradients equal autograd's through
them; the tests check both. The teacher is a constant (no gradient flows into it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.distill.losses._common import check_temperature, check_unit_interval
from potstill.distill.losses.sparse import TAIL_FLOOR

Teacher = Tensor | tuple[Tensor, Tensor] | None

# The smallest positive fp32 (a subnormal): the floor under a mixture probability before its log.
_TINY = 1e-45
# Rows per chunk: about this many bytes of one [rows, V] fp32 temporary. A chunk's dozen
# temporaries then stay in a core's L2 (2 MiB here); at V = 49,152, 32-row chunks (6 MiB each)
# made the generalised JSD 1.5x slower than 4-row ones, measured forward + backward.
_CHUNK_BYTES = 1 << 20
# Top-k targets keep three [rows, V] temporaries but run ~25 small ops on [rows, K] per chunk,
# so small chunks are dispatch-bound: at V = 49,152 and 2,048 rows (forward + backward),
# 5-row chunks took 229 ms and 32- to 512-row ones 163-169 ms (2-core EPYC VM, best of 5).
_SPARSE_CHUNK_BYTES = 8 << 20


def _ce_rows(ls1: Tensor, targets: Tensor) -> Tensor:
    """Per-row cross-entropy ``[c]`` from the rows' log-softmax (T = 1)."""
    return -ls1.gather(-1, targets[:, None])[:, 0]


def _dense_rows(ls: Tensor, q: Tensor, t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Forward KL per row ``[c]`` and ``dKL/d(s/T) = q - p`` ``[c, V]`` (before the T factor)."""
    tt = t.float()
    if temperature != 1.0:
        tt = tt / temperature
    lt = F.log_softmax(tt, dim=-1)
    p = lt.exp()
    # p (lt - ls), with 0 where p = 0 and lt = -inf (a masked teacher token: 0 * -inf = nan);
    # an infinite term (p > 0 on a -inf student logit) stays infinite. One pass in place,
    # against a compare, a where and two temporaries (measured ~15% of the objective).
    terms = torch.sub(lt, ls).mul_(p).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    return terms.sum(-1), q - p


def _jsd_rows(
    ls: Tensor, q: Tensor, t: Tensor, temperature: float, beta: float
) -> tuple[Tensor, Tensor]:
    """Generalised JSD per row ``[c]`` (TRL's convention, as
    :func:`~potstill.distill.losses.divergence.generalized_jsd`) and its gradient w.r.t. ``s/T``.

    With ``L = beta KL(p||m) + (1-beta) KL(q||m)``, ``dL/dq_i = (1-beta) log(q_i/m_i)`` (the
    ``-p/m`` and ``-q/m`` terms sum to ``-m/m``, cancelling the ``+1``); the softmax Jacobian
    turns ``g`` into ``q * (g - sum(q g))``. ``beta = 0`` is forward KL, ``beta = 1`` reverse KL.
    """
    if beta == 0.0:
        return _dense_rows(ls, q, t, temperature)
    tt = t.float() / temperature if temperature != 1.0 else t.float()
    lt = F.log_softmax(tt, dim=-1)
    zero = torch.zeros((), device=q.device)
    if beta == 1.0:  # reverse KL(q || p)
        ratio = ls - lt
        kl = torch.where(q > 0, q * ratio, zero).sum(-1)
        return kl, q * (torch.where(q > 0, ratio, zero) - kl[:, None])
    p = lt.exp()
    # The mixture in probability space: one fused add and one log instead of logaddexp's
    # exp, log1p and max (measured ~20% of the objective at V = 49,152). A term whose p and q
    # both underflow has weight 0 either way; the clamp keeps log(m) finite there.
    lm = torch.add(q, p, alpha=beta / (1.0 - beta)).mul_(1.0 - beta).clamp_min_(_TINY).log_()
    kl_p = torch.where(p > 0, p * (lt - lm), zero).sum(-1)
    r_q = torch.where(q > 0, ls - lm, zero)  # a -inf student logit has q = 0: no 0 * inf
    kl_q = (q * r_q).sum(-1)
    grad = r_q.sub_(kl_q[:, None]).mul_(q).mul_(1.0 - beta)
    return beta * kl_p + (1.0 - beta) * kl_q, grad


def _sparse_rows(ls: Tensor, q: Tensor, ids: Tensor, lps: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k + tail forward KL per row ``[c]`` and its gradient w.r.t. ``s/T`` ``[c, V]``."""
    valid = ids >= 0
    # Pad slots (-1) point at the row's first listed id, so duplicate scatters write equal values.
    first = ids[:, :1].clamp_min(0)
    sid = torch.where(valid, ids, first)
    p_top = torch.where(valid, lps.float().exp(), torch.zeros((), device=q.device))
    log_p_top = torch.where(valid, lps.float(), torch.zeros((), device=q.device))
    log_q_top = ls.gather(-1, sid)
    # Student mass outside the list: 1 - sum(q_top) is exact enough unless the list holds
    # nearly everything; those rows take the log-space route (logsumexp of the unlisted).
    q_top_sum = torch.where(valid, ls.gather(-1, sid).exp(), torch.zeros((), device=q.device)).sum(
        -1
    )
    q_rest = 1.0 - q_top_sum
    log_q_tail = torch.log(q_rest.clamp_min(1e-30))
    close = (q_rest < 1e-2).nonzero()[:, 0]
    if close.numel():
        listed = torch.zeros((close.numel(), ls.shape[1]), dtype=torch.bool, device=ls.device)
        listed.scatter_(-1, sid[close], valid[close, :1].expand(-1, sid.shape[1]).contiguous())
        tail_ls = ls[close].masked_fill(listed, float("-inf"))
        log_q_tail[close] = torch.logsumexp(tail_ls, dim=-1)  # -inf: the list covers the vocab
    p_tail = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    has_tail = (p_tail > TAIL_FLOOR) & torch.isfinite(log_q_tail)
    p_tail = torch.where(has_tail, p_tail, torch.zeros_like(p_tail))
    zero = torch.zeros((), device=q.device)
    bucket = torch.where(p_top > 0, p_top * (log_p_top - log_q_top), zero).sum(-1)
    log_p_tail = torch.log(p_tail.clamp_min(TAIL_FLOOR))
    tail = torch.where(has_tail, p_tail * (log_p_tail - log_q_tail), zero)
    mass = p_top.sum(-1) + p_tail  # S
    q_tail = torch.where(has_tail, log_q_tail.exp(), torch.ones_like(log_q_tail))
    grad = q * (mass - p_tail / q_tail)[:, None]
    top_val = q.gather(-1, sid) * mass[:, None] - p_top
    fallback = torch.where(valid[:, :1], top_val[:, :1], grad.gather(-1, sid[:, :1]))
    grad.scatter_(-1, sid, torch.where(valid, top_val, fallback))
    return bucket + tail, grad


class _FusedObjective(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        teacher: Tensor | None,
        ids: Tensor | None,
        lps: Tensor | None,
        labels: Tensor | None,
        alpha: float,
        temperature: float,
        chunk: int,
        ignore_index: int,
        beta: float,
        overwrite: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        vocab = student.shape[-1]
        s = student.detach().reshape(-1, vocab)
        keep = None if labels is None else labels.reshape(-1) != ignore_index
        # Packed text scores every row: then a chunk is a slice (a view), not a gathered copy.
        every = keep is None or bool(keep.all())
        # A fresh [N, V] buffer costs its page faults: glibc maps a block this big afresh on
        # each allocation (a pass over a new 400 MB buffer took 110-125 ms on the 2-core VM,
        # over a reused one 9-15 ms). ``overwrite`` writes the gradient over the logits
        # instead, each row once its values are used; masked rows then get a zero gradient.
        zeroed = not every  # masked rows must read 0; a kept row is written in the loop
        if overwrite and student.is_contiguous():  # then s is a view of the logits
            grad = s
            if keep is not None and zeroed:
                grad[~keep] = 0.0
        else:
            grad = torch.zeros_like(s) if zeroed else torch.empty_like(s)
        rows = torch.arange(s.shape[0], device=s.device) if keep is None else keep.nonzero()[:, 0]
        flat_labels = None if labels is None else labels.reshape(-1)
        t = None if teacher is None else teacher.reshape(-1, teacher.shape[-1])
        k_ids = None if ids is None else ids.reshape(-1, ids.shape[-1])
        k_lps = None if lps is None else lps.reshape(-1, lps.shape[-1])
        ce_sum = torch.zeros((), dtype=torch.float32, device=s.device)
        kd_sum = torch.zeros((), dtype=torch.float32, device=s.device)
        has_kd = teacher is not None or ids is not None
        alpha = alpha if has_kd else 1.0  # without a teacher the objective is CE alone
        for start in range(0, rows.shape[0], chunk):
            r: Tensor | slice = (
                slice(start, start + chunk) if every else rows[start : start + chunk]
            )
            x = s[r].float()
            ls1 = F.log_softmax(x, dim=-1)
            g = None
            if has_kd:
                ls = ls1 if temperature == 1.0 else F.log_softmax(x / temperature, dim=-1)
                q = ls.exp()
                if t is not None:
                    kd, g = _jsd_rows(ls, q, t[r], temperature, beta)
                else:
                    assert k_ids is not None and k_lps is not None
                    kd, g = _sparse_rows(ls, q, k_ids[r].long(), k_lps[r])
                # Rows whose divergence rounds below 0 are clamped there (as the reference
                # losses do), which zeroes their gradient.
                scale = (1.0 - alpha) * temperature
                if scale != 1.0 or not bool((kd >= 0).all()):  # else a pass that multiplies by 1
                    g.mul_((kd >= 0).to(x.dtype)[:, None] * scale)
                kd_sum += kd.clamp_min(0.0).sum()
            if flat_labels is not None:
                targets = flat_labels[r]
                ce_sum += _ce_rows(ls1, targets).sum()
                if alpha > 0:  # alpha * (softmax(x) - onehot(target))
                    q1 = q if has_kd and temperature == 1.0 else ls1.exp()
                    g = alpha * q1 if g is None else g.add_(q1, alpha=alpha)
                    g.scatter_add_(
                        -1, targets[:, None], torch.full((len(x), 1), -alpha, device=g.device)
                    )
            if g is not None:
                grad[r] = g.to(grad.dtype)
            elif not zeroed:  # no teacher and no labels: nothing to differentiate
                grad[r] = 0.0
        kd_scaled = kd_sum * temperature**2
        total = alpha * ce_sum + (1.0 - alpha) * kd_scaled if has_kd else ce_sum.clone()
        ctx.save_for_backward(grad)
        ctx.shape = student.shape
        ctx.mark_non_differentiable(ce_sum, kd_scaled)
        return total, ce_sum, kd_scaled

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        # In place: the buffer is this function's own (or the overwritten logits), read once.
        # A second backward through the graph would fail autograd's version check on it.
        grad.mul_(grad_total.to(grad.dtype))
        return (grad.reshape(ctx.shape),) + (None,) * 10


def fused_kd_objective(
    student_logits: Tensor,
    teacher: Teacher,
    labels: Tensor | None,
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    beta: float = 0.0,
    overwrite: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``alpha*CE + (1-alpha)*T^2*KD`` summed over unmasked tokens, with its CE and KD terms.

    Args:
        student_logits: ``[B, T, V]`` or ``[N, V]``, any float dtype (the gradient comes back in it).
        teacher: full teacher logits of the same shape (forward KL), a ``(ids, logprobs)`` pair of
            ``[..., K]`` top-k log-probs (sparse KL with a tail bucket, pad ids -1), or None (CE).
        labels: ``[B, T]`` / ``[N]`` next-token targets aligned with the logits; ``ignore_index``
            masks a position. Needed for the CE term; None counts every position (then CE is 0).
        alpha: CE weight in [0, 1]. CE is at temperature 1; KD at ``temperature`` times ``T^2``.
        beta: with full teacher logits, the divergence is the generalised JSD at ``beta``
            (0 = forward KL, the default; 1 = reverse KL); ignored for top-k targets (forward KL).
        chunk_tokens: rows per chunk; default about 1 MiB of fp32 per ``[rows, V]`` temporary
            (8 MiB with top-k targets, whose chunks are bound by per-op dispatch).
        overwrite: the logits are a temporary (e.g. the head's output, read by nothing else):
            the gradient is written over them instead of into a new ``[N, V]`` buffer, and
            they must not be read afterwards. Ignored unless ``student_logits`` is contiguous.

    Returns:
        ``(total, ce_sum, kd_sum)``: fp32 scalars in nats, summed (not averaged) over the
        unmasked tokens; only ``total`` carries a gradient (to ``student_logits``).
    """
    check_temperature(temperature)
    check_unit_interval("alpha", alpha)
    check_unit_interval("beta", beta)
    if chunk_tokens is None:
        per_chunk = _SPARSE_CHUNK_BYTES if isinstance(teacher, tuple) else _CHUNK_BYTES
        chunk_tokens = max(1, per_chunk // (4 * student_logits.shape[-1]))
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    dense = teacher if isinstance(teacher, Tensor) else None
    ids, lps = teacher if isinstance(teacher, tuple) else (None, None)
    if dense is not None and dense.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(dense.shape)} must match student logits "
            f"{tuple(student_logits.shape)}; truncate both to the shared vocabulary first"
        )
    if dense is not None:
        dense = dense.detach()
    result: tuple[Tensor, Tensor, Tensor] = _FusedObjective.apply(
        student_logits,
        dense,
        ids,
        lps,
        labels,
        float(alpha),
        float(temperature),
        int(chunk_tokens),
        int(ignore_index),
        float(beta),
        bool(overwrite),
    )
    return result


__all__ = ["fused_kd_objective"]
