"""Tests for the memory-bounded chunked/fused KD paths (potstill.distill.losses.chunked)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from potstill.distill.losses import (
    LOSSES,
    chunked_kd_loss,
    forward_kl,
    fused_linear_kd_loss,
    generalized_jsd,
)

NAMES = sorted(LOSSES)


def make(shape: tuple[int, ...], seed: int, scale: float = 2.0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def value_and_grads(fn: Callable[..., Tensor], *inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    # a non-unit upstream gradient checks that backward scales by grad_output
    grads = torch.autograd.grad(2.5 * out, leaves)
    return out.detach(), list(grads)


LABELS = torch.tensor([[-100, -100, 3, 4, 5, -100, 7], [1, 2, -100, 4, 5, 6, 7]])  # 10 kept


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_equals_unchunked(name: str, chunk: int, reduction: str) -> None:
    s, t = make((2, 7, 23), 0), make((2, 7, 23), 1)
    fn = LOSSES[name]
    kw: dict[str, Any] = {"temperature": 2.0, "reduction": reduction}
    v_ref, (g_ref,) = value_and_grads(lambda x: fn(x, t, LABELS, **kw), s)
    v, (g,) = value_and_grads(
        lambda x: chunked_kd_loss(fn, x, t, LABELS, chunk_tokens=chunk, **kw), s
    )
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
    assert (g[LABELS == -100] == 0).all()


def test_chunked_passes_loss_kwargs_and_no_labels() -> None:
    s, t = make((9, 11), 2), make((9, 11), 3)
    for beta in [0.0, 0.3, 1.0]:
        v_ref, (g_ref,) = value_and_grads(lambda x, b=beta: generalized_jsd(x, t, beta=b), s)
        v, (g,) = value_and_grads(
            lambda x, b=beta: chunked_kd_loss(generalized_jsd, x, t, chunk_tokens=4, beta=b), s
        )
        torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_chunked_bf16_and_all_masked() -> None:
    s, t = make((2, 7, 23), 4).bfloat16(), make((2, 7, 23), 5).bfloat16()
    v_ref, (g_ref,) = value_and_grads(lambda x: forward_kl(x, t, LABELS), s)
    v, (g,) = value_and_grads(
        lambda x: chunked_kd_loss(forward_kl, x, t, LABELS, chunk_tokens=3), s
    )
    assert g.dtype == torch.bfloat16 and v.dtype == torch.float32
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=1e-2, atol=1e-4)
    masked = torch.full((2, 7), -100)
    v0, (g0,) = value_and_grads(lambda x: chunked_kd_loss(forward_kl, x, t, masked), s)
    assert v0.item() == 0.0 and (g0 == 0).all()
    with pytest.raises(ValueError, match="temperature"):  # validated even with no tokens
        chunked_kd_loss(forward_kl, s, t, masked, temperature=-1.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_kd_loss(forward_kl, s, t, chunk_tokens=0)


def test_non_contiguous_inputs() -> None:
    # the caller's causal shift, logits[:, :-1], is not viewable as [N, V]
    s_full, t_full = make((2, 8, 23), 28), make((2, 8, 23), 29)
    h_full, w = make((2, 8, 6), 30, 1.0), make((23, 6), 31, 0.5)
    v_ref, (g_ref,) = value_and_grads(
        lambda x: forward_kl(x[:, :-1], t_full[:, :-1], LABELS), s_full
    )
    v, (g,) = value_and_grads(
        lambda x: chunked_kd_loss(forward_kl, x[:, :-1], t_full[:, :-1], LABELS, chunk_tokens=3),
        s_full,
    )
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
    assert (g[:, -1] == 0).all() and g.abs().sum() > 0
    v_ref, (gh_ref, gw_ref) = value_and_grads(
        lambda h, w_: forward_kl(h[:, :-1] @ w_.T, t_full[:, :-1], LABELS), h_full, w
    )
    v, (gh, gw) = value_and_grads(
        lambda h, w_: fused_linear_kd_loss(
            forward_kl, h[:, :-1], w_, t_full[:, :-1], LABELS, chunk_tokens=4
        ),
        h_full,
        w,
    )
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-7)


def test_no_chunk_gradients_under_no_grad() -> None:
    seen: list[bool] = []

    def spy(student: Tensor, *args: Any, **kw: Any) -> Tensor:
        seen.append(student.requires_grad)
        return forward_kl(student, *args, **kw)

    s = make((9, 11), 24).requires_grad_(True)
    t = make((9, 11), 25)
    hidden, weight = make((9, 4), 26).requires_grad_(True), make((11, 4), 27).requires_grad_(True)
    with torch.no_grad():
        v = chunked_kd_loss(spy, s, t, chunk_tokens=4)
        v_fused = fused_linear_kd_loss(spy, hidden, weight, t, chunk_tokens=4)
    assert seen == [False] * 6  # 3 chunks each, none asked for a gradient
    torch.testing.assert_close(v, forward_kl(s, t).detach())
    torch.testing.assert_close(v_fused, forward_kl(hidden @ weight.T, t).detach())
    chunked_kd_loss(spy, s, t, chunk_tokens=4).backward()
    assert seen[6:] == [True] * 3 and s.grad is not None


# ---------------------------------------------------------------- fused linear + KD
N, H, HT, V = 12, 6, 5, 19
FUSED_LABELS = torch.tensor([0, -100, 2, 3, -100, -100, 6, 7, 8, -100, 10, 11])  # 8 kept


def fused_reference(loss_fn: Callable[..., Tensor], teacher_logits: Tensor, **kw: Any) -> Callable:
    def run(hidden: Tensor, weight: Tensor) -> Tensor:
        return loss_fn(hidden @ weight.T, teacher_logits, FUSED_LABELS, **kw)

    return run


@pytest.mark.parametrize("loss_fn", [forward_kl, generalized_jsd])
@pytest.mark.parametrize("chunk", [1, 4, 5, 100])
@pytest.mark.parametrize("teacher_as", ["logits", "projection"])
def test_fused_linear_equals_reference(
    loss_fn: Callable[..., Tensor], chunk: int, teacher_as: str
) -> None:
    hidden, weight = make((N, H), 6, 1.0), make((V, H), 7, 0.5)
    t_hidden, t_weight = make((N, HT), 8, 1.0), make((V, HT), 9, 0.7)
    t_logits = t_hidden @ t_weight.T
    teacher: Any = t_logits if teacher_as == "logits" else (t_hidden, t_weight)
    kw: dict[str, Any] = {"temperature": 1.5}
    if loss_fn is generalized_jsd:
        kw["beta"] = 0.3
    v_ref, (gh_ref, gw_ref) = value_and_grads(
        fused_reference(loss_fn, t_logits, **kw), hidden, weight
    )
    v, (gh, gw) = value_and_grads(
        lambda h, w: fused_linear_kd_loss(
            loss_fn, h, w, teacher, FUSED_LABELS, chunk_tokens=chunk, **kw
        ),
        hidden,
        weight,
    )
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-7)
    assert (gh[FUSED_LABELS == -100] == 0).all() and gw.abs().sum() > 0


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_linear_returns_auxiliary_terms_summed_like_the_loss(reduction: str) -> None:
    """A loss_fn returning ``(loss, *aux)``: the result is the same tuple summed over chunks,
    each term equal to the direct call's, and only ``loss`` carries a gradient."""

    def with_terms(s: Tensor, t: Tensor, labels: Tensor | None, **kw: Any) -> tuple[Tensor, ...]:
        kd = forward_kl(s, t, labels, **kw)
        ce = torch.nn.functional.cross_entropy(
            s, labels, ignore_index=-100, reduction=kw["reduction"]
        )
        return 0.3 * ce + 0.7 * kd, ce, kd

    hidden, weight = make((N, H), 6, 1.0), make((V, H), 7, 0.5)
    t_logits = make((N, V), 8, 1.5)
    hidden.requires_grad_(True)
    got = fused_linear_kd_loss(
        with_terms, hidden, weight, t_logits, FUSED_LABELS, chunk_tokens=3, reduction=reduction
    )
    want = with_terms(hidden.detach() @ weight.T, t_logits, FUSED_LABELS, reduction=reduction)
    assert isinstance(got, tuple) and len(got) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert got[0].requires_grad and not got[1].requires_grad and not got[2].requires_grad
    (g_fused,) = torch.autograd.grad(got[0], hidden)
    hidden_ref = hidden.detach().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(
        with_terms(hidden_ref @ weight.T, t_logits, FUSED_LABELS, reduction=reduction)[0],
        hidden_ref,
    )
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-5, atol=1e-7)


def test_fused_linear_batched_shapes_sum_bf16() -> None:
    hidden, weight = make((2, 6, H), 10, 1.0), make((V, H), 11, 0.5)
    teacher = make((2, 6, V), 12)
    labels = FUSED_LABELS.reshape(2, 6)
    v_ref, (gh_ref, gw_ref) = value_and_grads(
        lambda h, w: forward_kl(h @ w.T, teacher, labels, reduction="sum"), hidden, weight
    )
    v, (gh, gw) = value_and_grads(
        lambda h, w: fused_linear_kd_loss(
            forward_kl, h, w, teacher, labels, chunk_tokens=3, reduction="sum"
        ),
        hidden,
        weight,
    )
    assert gh.shape == (2, 6, H)
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    v16, (gh16, gw16) = value_and_grads(
        lambda h, w: fused_linear_kd_loss(forward_kl, h, w, teacher, labels, chunk_tokens=3), hb, wb
    )
    v_up = forward_kl(hb.float() @ wb.float().T, teacher, labels)
    assert gh16.dtype == torch.bfloat16 and gw16.dtype == torch.bfloat16
    torch.testing.assert_close(v16, v_up, rtol=1e-5, atol=1e-6)


def test_fused_linear_shape_errors() -> None:
    hidden, weight = make((N, H), 13), make((V, H), 14)
    with pytest.raises(ValueError, match="vocabulary size"):
        fused_linear_kd_loss(forward_kl, hidden, weight, make((N, V + 3), 15))
    with pytest.raises(ValueError, match="vocabulary size"):
        fused_linear_kd_loss(forward_kl, hidden, weight, (make((N, HT), 16), make((V - 1, HT), 17)))
    with pytest.raises(ValueError, match="student_weight"):
        fused_linear_kd_loss(forward_kl, hidden, make((V, H + 1), 18), make((N, V), 19))
    with pytest.raises(ValueError, match="leading shape"):
        fused_linear_kd_loss(forward_kl, hidden, weight, make((N + 1, V), 20))


# ---------------------------------------------------------------- memory bound
def max_fp32_output_numel(fn: Callable[[], Tensor]) -> int:
    """Largest fp32 tensor any aten op produces while running ``fn`` forward and backward."""
    dispatch = pytest.importorskip("torch.utils._python_dispatch")

    class Track(dispatch.TorchDispatchMode):  # type: ignore[name-defined]
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, Tensor) and o.dtype == torch.float32:
                    Track.biggest = max(Track.biggest, o.numel())
            return out

    with Track():
        fn().backward()
    return Track.biggest


def test_fused_and_chunked_never_materialise_full_fp32_logits() -> None:
    n, h, v, chunk = 256, 8, 512, 32
    hidden = make((n, h), 21, 1.0).bfloat16().requires_grad_(True)
    weight = make((v, h), 22, 0.5).bfloat16().requires_grad_(True)
    teacher = make((n, v), 23).bfloat16()
    # fp32 temporaries are bounded by one chunk of logits, or by the fp32 [V, H] accumulator
    bound = max(chunk * v, v * h)
    fused = max_fp32_output_numel(
        lambda: fused_linear_kd_loss(generalized_jsd, hidden, weight, teacher, chunk_tokens=chunk)
    )
    assert fused <= bound < n * v
    unfused = max_fp32_output_numel(lambda: generalized_jsd(hidden @ weight.T, teacher))
    assert unfused >= n * v  # the plain path does build [N, V] fp32 tensors: the check can fail

    logits = (hidden.detach() @ weight.detach().T).requires_grad_(True)
    chunked = max_fp32_output_numel(
        lambda: chunked_kd_loss(forward_kl, logits, teacher, chunk_tokens=chunk)
    )
    assert chunked <= chunk * v


@pytest.mark.parametrize("targets", ["topk", "none"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_fused_linear_with_topk_or_no_teacher_equals_the_whole_head(
    targets: str, chunk: int
) -> None:
    """Top-k targets (the logit cache's) and CE alone through the fused head, with the objective
    writing its gradient over the reused chunk buffer, equal the reference sparse KL and CE on
    whole logits: value, and gradients w.r.t. the hidden states and the head."""
    import functools

    from potstill.distill.config import LossConfig
    from potstill.distill.losses import TopKTargets, cross_entropy, sparse_topk_kl, topk_from_logits
    from potstill.distill.train.objective import kd_objective

    hidden, w = make((N, H), 40), make((V, H), 41, scale=0.5)
    ids, lps = topk_from_logits(make((N, V), 42), 5)
    ids[2, 3:] = -1  # a position whose teacher listed fewer tokens
    topk = TopKTargets(ids, lps) if targets == "topk" else None
    alpha = 0.3 if targets == "topk" else 1.0
    cfg = LossConfig(kind="forward_kl", ce_weight=alpha, temperature=1.5)

    def reference(h: Tensor, w_: Tensor) -> Tensor:
        logits = h @ w_.T
        ce = cross_entropy(logits, FUSED_LABELS, reduction="sum")
        if topk is None:
            return ce
        kd = sparse_topk_kl(logits, ids, lps, FUSED_LABELS, temperature=1.5, reduction="sum")
        return alpha * ce + (1 - alpha) * kd

    objective = functools.partial(kd_objective, loss=cfg, overwrite=True)
    v_ref, (gh_ref, gw_ref) = value_and_grads(reference, hidden, w)
    v, (gh, gw) = value_and_grads(
        lambda h, w_: fused_linear_kd_loss(
            objective, h, w_, topk, FUSED_LABELS, chunk_tokens=chunk, reduction="sum"
        )[0],
        hidden,
        w,
    )
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)
    assert (gh[FUSED_LABELS == -100] == 0).all()


def test_fused_linear_refuses_mismatched_topk_shapes() -> None:
    from potstill.distill.losses import TopKTargets

    ids = torch.zeros((N, 4), dtype=torch.long)
    with pytest.raises(ValueError, match="top-k ids"):
        fused_linear_kd_loss(forward_kl, make((N, H), 1), make((V, H), 2),
                             TopKTargets(ids, torch.zeros((N, 3))))  # fmt: skip
    with pytest.raises(ValueError, match="leading shape"):
        fused_linear_kd_loss(forward_kl, make((N, H), 1), make((V, H), 2),
                             TopKTargets(ids[:5], torch.zeros((5, 4))))  # fmt: skip


def test_fused_linear_under_autocast_projects_in_the_autocast_dtype() -> None:
    """Under bf16 autocast the per-chunk projection is autocast's bf16 GEMM (as the model's own
    head would run), not an fp32 one into the reused buffer."""
    hidden, w, t = make((N, H), 50), make((V, H), 51), make((N, V), 52)
    bf16_ref = forward_kl((hidden.bfloat16() @ w.bfloat16().T).float(), t, FUSED_LABELS)
    fp32_ref = forward_kl(hidden @ w.T, t, FUSED_LABELS)
    with torch.autocast("cpu", torch.bfloat16):
        got = fused_linear_kd_loss(forward_kl, hidden, w, t, FUSED_LABELS, chunk_tokens=4)
    torch.testing.assert_close(got, bf16_ref, rtol=1e-5, atol=1e-5)
    assert abs(float(got) - float(fp32_ref)) > 1e-4  # the two projections differ here
    got32 = fused_linear_kd_loss(forward_kl, hidden, w, t, FUSED_LABELS, chunk_tokens=4)
    torch.testing.assert_close(got32, fp32_ref, rtol=1e-5, atol=1e-6)


def test_a_plain_ids_tuple_is_refused_as_a_teacher_pair() -> None:
    ids = torch.zeros((N, 4), dtype=torch.long)
    with pytest.raises(ValueError, match="TopKTargets"):
        fused_linear_kd_loss(
            forward_kl, make((N, H), 1), make((V, H), 2), (ids, torch.zeros((N, 4)))
        )
