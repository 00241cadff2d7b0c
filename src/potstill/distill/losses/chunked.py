"""Memory-bounded distillation losses: process the tokens in chunks, never all at once.

A full-vocabulary KD loss on ``N`` tokens materialises several fp32 ``[N, V]`` tensors (two
log-softmaxes, probabilities, products) and keeps some of them for backward. With ``V = 128k`` and
``N = 16k`` one such tensor is 8 GiB. The two entry points here compute the *same value and
gradients* as the plain loss but hold fp32 softmaxes for at most ``chunk_tokens`` tokens:

* :func:`chunked_kd_loss` takes full logits (e.g. bf16 model outputs) and, in forward, computes each
  chunk's loss and its gradient w.r.t. that chunk of student logits. Only the gradient (in the
  student logits' dtype) is kept for backward.
* :func:`fused_linear_kd_loss` also folds in the student's final projection (``hidden @ W.T``), so
  student logits never exist for more than one chunk either; it returns gradients for the hidden
  states and the projection weight. Peak memory then does not grow with ``N * V``.

Both normalise by the GLOBAL number of unmasked tokens (``reduction="mean"``), not per chunk, and
only unmasked tokens are visited. The teacher side is a constant: no gradient flows to it.
``loss_fn`` is any loss with the :func:`potstill.distill.losses.forward_kl` signature; it is called
per chunk with ``reduction="sum"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from potstill.distill.losses._common import check_labels, check_pair, check_reduction, keep_mask
from potstill.distill.losses.sparse import TopKTargets

LossFn = Callable[..., Any]  # -> Tensor, or (loss, *aux) for fused_linear_kd_loss


Where = tuple[Tensor, ...]  # one index tensor per leading (token) dimension


def _kept_rows(
    labels: Tensor | None, ignore_index: int, lead_shape: torch.Size, device: torch.device
) -> Tensor:
    """Flat indices ``[n]`` of the positions that count (all positions when ``labels`` is None)."""
    keep = keep_mask(labels, ignore_index)
    if keep is None:
        return torch.arange(lead_shape.numel(), device=device)
    return keep.nonzero().squeeze(1)


def _chunks(rows: Tensor, chunk_tokens: int, lead_shape: torch.Size) -> list[Where]:
    """Split ``rows`` into pieces of ``chunk_tokens`` as per-dimension indices (``x[where]`` is
    ``[n_chunk, D]``). Indexing the leading dims directly, instead of ``reshape(-1, V)``, avoids
    copying a whole non-contiguous input such as ``logits[:, :-1]``. With no rows there is one
    empty piece, so that ``loss_fn`` still runs once (it validates its hyper-parameters)."""
    pieces = [rows] if rows.numel() == 0 else list(rows.split(chunk_tokens))
    return [tuple(torch.unravel_index(idx, lead_shape)) for idx in pieces]


def _check_chunk(chunk_tokens: int) -> None:
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")


def _split_kwargs(loss_kwargs: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
    """Pull ``reduction`` and ``ignore_index`` out of the loss kwargs (the chunks always sum)."""
    kwargs = dict(loss_kwargs)
    reduction = kwargs.pop("reduction", "mean")
    check_reduction(reduction)
    ignore_index = int(kwargs.get("ignore_index", -100))
    return reduction, ignore_index, kwargs


def _chunk_loss_and_grad(
    loss_fn: LossFn,
    student: Tensor,
    teacher: Tensor | TopKTargets | None,
    labels: Tensor | None,
    need_grad: bool,
    kwargs: dict[str, Any],
) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...]]:
    """Sum-reduced loss of one chunk, its gradient w.r.t. the fp32 student logits chunk, and
    the detached auxiliary terms when ``loss_fn`` returns ``(loss, *aux)``."""
    student = student.detach().float().requires_grad_(need_grad)
    if isinstance(teacher, Tensor):
        teacher = teacher.detach()
    with torch.enable_grad():
        out = loss_fn(student, teacher, labels, reduction="sum", **kwargs)
        loss, aux = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, ())
        grad = torch.autograd.grad(loss, student)[0] if need_grad else None
    return loss.detach().float(), grad, tuple(a.detach().float() for a in aux)


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None,
        loss_fn: LossFn,
        chunk_tokens: int,
        reduction: str,
        ignore_index: int,
        kwargs: dict[str, Any],
        grad_enabled: bool,
    ) -> Tensor:
        lead = student_logits.shape[:-1]
        rows = _kept_rows(labels, ignore_index, lead, student_logits.device)
        scale = 1.0 / max(rows.numel(), 1) if reduction == "mean" else 1.0
        # needs_input_grad is True even under torch.no_grad(); skip the chunk grads in eval
        need_grad = grad_enabled and bool(ctx.needs_input_grad[0])
        grad = (
            torch.zeros(student_logits.shape, dtype=student_logits.dtype, device=rows.device)
            if need_grad
            else None
        )
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for where in _chunks(rows, chunk_tokens, lead):
            loss, g, _ = _chunk_loss_and_grad(
                loss_fn,
                student_logits[where],
                teacher_logits[where],
                None if labels is None else labels[where],
                need_grad,
                kwargs,
            )
            total += loss
            if grad is not None and g is not None:
                # scale before the cast: keeps bf16 grads in range and exact normalisation
                grad.index_put_(where, (g * scale).to(grad.dtype))
        ctx.save_for_backward(grad)
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * grad_output,) + (None,) * 8


def chunked_kd_loss(
    loss_fn: LossFn,
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    chunk_tokens: int = 1024,
    **loss_kwargs: Any,
) -> Tensor:
    """``loss_fn(student_logits, teacher_logits, labels, **loss_kwargs)`` computed in token chunks.

    Same value (fp32 scalar) and same gradient w.r.t. ``student_logits`` as the direct call, for
    ``reduction="mean"`` or ``"sum"``, but fp32 softmaxes exist for at most ``chunk_tokens``
    tokens at a time. Memory kept for backward: one gradient of ``student_logits``' shape and
    dtype. ``teacher_logits`` receives no gradient.

    Args:
        loss_fn: e.g. :func:`~potstill.distill.losses.forward_kl` or any entry of ``LOSSES``.
        student_logits, teacher_logits: ``[B, T, V]`` or ``[N, V]``, same shape.
        labels: leading shape or None; ``labels == ignore_index`` masks a position.
        chunk_tokens: tokens per chunk (> 0); masked tokens are skipped, not counted.
        loss_kwargs: forwarded to ``loss_fn`` (``temperature``, ``beta``, ``alpha``,
            ``ignore_index``, ``reduction``).
    """
    _check_chunk(chunk_tokens)
    check_pair(student_logits, teacher_logits, labels)
    reduction, ignore_index, kwargs = _split_kwargs(loss_kwargs)
    out = _ChunkedKD.apply(
        student_logits,
        teacher_logits,
        labels,
        loss_fn,
        chunk_tokens,
        reduction,
        ignore_index,
        kwargs,
        torch.is_grad_enabled(),
    )
    return cast(Tensor, out)


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        teacher_logits: Tensor | None,
        teacher_hidden: Tensor | None,
        teacher_weight: Tensor | None,
        topk: TopKTargets | None,
        labels: Tensor | None,
        loss_fn: LossFn,
        chunk_tokens: int,
        reduction: str,
        ignore_index: int,
        kwargs: dict[str, Any],
        grad_enabled: bool,
    ) -> Tensor | tuple[Tensor, ...]:
        lead = hidden.shape[:-1]
        w32 = weight.detach().float()
        rows = _kept_rows(labels, ignore_index, lead, hidden.device)
        scale = 1.0 / max(rows.numel(), 1) if reduction == "mean" else 1.0
        need_h = grad_enabled and bool(ctx.needs_input_grad[0])
        need_w = grad_enabled and bool(ctx.needs_input_grad[1])
        grad_h = (
            torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        )
        grad_w = torch.zeros_like(w32) if need_w else None  # fp32 accumulator over chunks
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        aux_sums: list[Tensor] = []
        # One [chunk, V] buffer for every chunk's logits: a fresh one per chunk would be
        # page-faulted afresh each time (glibc maps blocks this big on each allocation); a
        # loss_fn that writes its gradient over the logits (kd_objective(overwrite=True))
        # then needs no second one. Under autocast the projection stays autocast's (an op
        # with out= is not autocast), in a fresh tensor per chunk.
        autocast = torch.is_autocast_enabled(hidden.device.type)
        work = None if autocast else hidden.new_empty(
            (min(chunk_tokens, rows.numel()), w32.shape[0]), dtype=torch.float32
        )  # fmt: skip
        for where in _chunks(rows, chunk_tokens, lead):
            h32 = hidden[where].detach().float()
            with torch.no_grad():
                logits = h32 @ w32.T if work is None else torch.mm(h32, w32.T, out=work[: len(h32)])
                t_chunk: Tensor | TopKTargets | None = None
                if teacher_logits is not None:
                    t_chunk = teacher_logits[where]
                elif topk is not None:
                    t_chunk = TopKTargets(topk.ids[where], topk.logprobs[where])
                elif teacher_hidden is not None and teacher_weight is not None:
                    # teacher's own dtype, as its lm_head would compute the logits
                    t_chunk = teacher_hidden[where] @ teacher_weight.T
            loss, g, aux = _chunk_loss_and_grad(
                loss_fn,
                logits,
                t_chunk,
                None if labels is None else labels[where],
                need_h or need_w,
                kwargs,
            )
            total += loss
            aux_sums = list(aux) if not aux_sums else [a + b for a, b in zip(aux_sums, aux)]
            if g is None:
                continue
            if scale != 1.0:
                g = g.mul_(scale)  # the chunk's own gradient (autograd's, or the overwritten work)
            if grad_h is not None:
                grad_h.index_put_(where, (g @ w32).to(grad_h.dtype))
            if grad_w is not None:
                grad_w.addmm_(g.T, h32)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        if not aux_sums:
            return total * scale
        aux_out = tuple(a * scale for a in aux_sums)
        ctx.mark_non_differentiable(*aux_out)
        return (total * scale, *aux_out)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, *_aux: Any) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_output
        gw = None if grad_w is None else grad_w * grad_output
        return (gh, gw) + (None,) * 11


def _check_fused_shapes(
    hidden: Tensor,
    weight: Tensor,
    teacher: Tensor | tuple[Tensor, Tensor] | TopKTargets | None,
    labels: Tensor | None,
) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"student_weight must be [V, H] with H = student_hidden.shape[-1]; got weight "
            f"{tuple(weight.shape)} and hidden {tuple(hidden.shape)}"
        )
    vocab = weight.shape[0]
    if teacher is None or isinstance(teacher, TopKTargets):
        if teacher is not None and teacher.ids.shape != teacher.logprobs.shape:
            raise ValueError(
                f"top-k ids {tuple(teacher.ids.shape)} and logprobs "
                f"{tuple(teacher.logprobs.shape)} must have one shape"
            )
        t_vocab, t_lead = vocab, hidden.shape[:-1] if teacher is None else teacher.ids.shape[:-1]
    elif isinstance(teacher, Tensor):
        t_vocab, t_lead = teacher.shape[-1], teacher.shape[:-1]
    else:
        th, tw = teacher
        if not (th.is_floating_point() and tw.is_floating_point()):
            raise ValueError(
                "a (teacher_hidden, teacher_weight) pair must be float tensors; pass top-k "
                "targets as TopKTargets(ids, logprobs)"
            )
        if tw.dim() != 2 or th.shape[-1] != tw.shape[1]:
            raise ValueError(
                f"teacher_weight must be [V, Ht] with Ht = teacher_hidden.shape[-1]; got weight "
                f"{tuple(tw.shape)} and hidden {tuple(th.shape)}"
            )
        t_vocab, t_lead = tw.shape[0], th.shape[:-1]
    if t_vocab != vocab:
        raise ValueError(
            f"teacher vocabulary size {t_vocab} != student vocabulary size {vocab}; truncate the "
            "teacher logits/weight to the student's vocabulary before calling"
        )
    if t_lead != hidden.shape[:-1]:
        raise ValueError(
            f"teacher leading shape {tuple(t_lead)} must equal student_hidden leading shape "
            f"{tuple(hidden.shape[:-1])}"
        )
    check_labels(labels, hidden.shape[:-1], "student_hidden")


def fused_linear_kd_loss(
    loss_fn: LossFn,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher: Tensor | tuple[Tensor, Tensor] | TopKTargets | None,
    labels: Tensor | None = None,
    *,
    chunk_tokens: int = 1024,
    **loss_kwargs: Any,
) -> Any:
    """KD loss of ``student_hidden @ student_weight.T`` against the teacher, fused and chunked.

    Equal (value, and gradients w.r.t. ``student_hidden`` and ``student_weight``) to
    ``loss_fn(student_hidden.float() @ student_weight.float().T, teacher_logits, labels,
    **loss_kwargs)``, with the projection done per chunk in fp32. No bias (Llama-style heads have
    none). Peak extra memory: ``O(chunk_tokens * V)`` fp32 plus gradients of the hidden states
    (their dtype) and of the weight (an fp32 ``[V, H]`` accumulator).

    Args:
        loss_fn: a loss with the :func:`~potstill.distill.losses.forward_kl` signature. If it
            returns a tuple ``(loss, *aux)`` (e.g. a total and its CE and KD terms), the result
            is the tuple ``(loss, *aux)`` summed over chunks the same way, ``aux`` detached
            (only ``loss`` is differentiated).
        student_hidden: ``[N, H]`` or ``[B, T, H]`` final hidden states (after the final norm).
        student_weight: ``[V, H]`` output projection (``lm_head.weight``).
        teacher: either teacher logits ``[..., V]`` (same leading shape as ``student_hidden``),
            or a pair ``(teacher_hidden [..., Ht], teacher_weight [V, Ht])`` from which the teacher
            logits are computed per chunk under ``no_grad``, in the teacher's dtype. The teacher
            vocabulary must equal the student's (``ValueError`` otherwise: truncate first).
            Or :class:`~potstill.distill.losses.TopKTargets` ``[..., K]``, or None (no teacher),
            for a ``loss_fn`` that takes them (``kd_objective``).
        labels: leading shape or None, aligned with the hidden positions; ``ignore_index`` masks.
        chunk_tokens: unmasked tokens per chunk (> 0).
        loss_kwargs: forwarded to ``loss_fn`` (``temperature``, ``beta``, ``reduction``, ...).
    """
    _check_chunk(chunk_tokens)
    _check_fused_shapes(student_hidden, student_weight, teacher, labels)
    reduction, ignore_index, kwargs = _split_kwargs(loss_kwargs)
    t_logits, t_hidden, t_weight, topk = None, None, None, None
    if isinstance(teacher, TopKTargets):
        topk = teacher
    elif isinstance(teacher, Tensor):
        t_logits = teacher
    elif teacher is not None:
        t_hidden, t_weight = teacher
    out = _FusedLinearKD.apply(
        student_hidden,
        student_weight,
        t_logits,
        t_hidden,
        t_weight,
        topk,
        labels,
        loss_fn,
        chunk_tokens,
        reduction,
        ignore_index,
        kwargs,
        torch.is_grad_enabled(),
    )
    return out


__all__ = ["chunked_kd_loss", "fused_linear_kd_loss"]
