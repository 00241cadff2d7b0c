"""Tests for the sparse top-k KD loss (potstill.distill.losses.sparse)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from potstill.distill.losses import TAIL_FLOOR, forward_kl, sparse_topk_kl, topk_from_logits


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_logsumexp(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


def grads(student: Tensor, *args: Tensor, **kw: float) -> tuple[Tensor, Tensor]:
    x = student.detach().clone().requires_grad_(True)
    out = sparse_topk_kl(x, *args, **kw)  # type: ignore[arg-type]
    (g,) = torch.autograd.grad(out, x)
    return out.detach(), g


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocab_topk_equals_forward_kl(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 40, generator=g) * 2, torch.randn(2, 6, 40, generator=g) * 2
    labels = torch.zeros(2, 6, dtype=torch.long)
    labels[0, :2] = -100
    ids, lp = topk_from_logits(t, 40, temperature=temperature)
    v_sparse, g_sparse = grads(s, ids, lp, labels, temperature=temperature)
    x = s.clone().requires_grad_(True)
    v_ref = forward_kl(x, t, labels, temperature=temperature)
    (g_ref,) = torch.autograd.grad(v_ref, x)
    torch.testing.assert_close(v_sparse, v_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_sparse, g_ref, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(g_sparse).all()


def test_hand_case_with_tail() -> None:
    s = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    ids = torch.tensor([[2, 0]])
    lp = torch.log(torch.tensor([[0.6, 0.3]]))
    q = np.exp(np_log_softmax(np.array([0.0, 1.0, 2.0, 3.0])))
    expected = (
        0.6 * math.log(0.6 / q[2])
        + 0.3 * math.log(0.3 / q[0])
        + 0.1 * math.log(0.1 / (q[1] + q[3]))
    )
    assert sparse_topk_kl(s, ids, lp).item() == pytest.approx(expected, rel=1e-5)
    # with temperature: student softened by T, loss times T**2, teacher used as given
    qt = np.exp(np_log_softmax(np.array([0.0, 1.0, 2.0, 3.0]) / 2.0))
    expected_t = 4.0 * (
        0.6 * math.log(0.6 / qt[2])
        + 0.3 * math.log(0.3 / qt[0])
        + 0.1 * math.log(0.1 / (qt[1] + qt[3]))
    )
    assert sparse_topk_kl(s, ids, lp, temperature=2.0).item() == pytest.approx(expected_t, rel=1e-5)


@pytest.mark.parametrize("big", [50.0, 1e4])
def test_student_tail_is_stable_for_extreme_logits(big: float) -> None:
    # the student puts ~all mass on token 0 (the teacher's top-1); its tail mass is ~exp(-big),
    # which log(1 - sum(p_topk)) would round to log(0) = -inf in fp32
    V = 16
    logits = np.full(V, -big)
    logits[0] = big
    s = torch.tensor(logits, dtype=torch.float32).reshape(1, V)
    ids = torch.tensor([[0, 5]])
    lp = torch.log(torch.tensor([[0.7, 0.2]]))
    log_q = np_log_softmax(logits)
    log_q_tail = np_logsumexp(np.delete(logits, [0, 5])) - np_logsumexp(logits)
    expected = (
        0.7 * (math.log(0.7) - log_q[0])
        + 0.2 * (math.log(0.2) - log_q[5])
        + 0.1 * (math.log(0.1) - log_q_tail)
    )
    value, g = grads(s, ids, lp)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert torch.isfinite(g).all()


def test_padded_slots_are_ignored() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 10, generator=g)
    ids = torch.tensor([[0, 4], [7, 2], [9, 0]])
    lp = torch.log(torch.tensor([[0.5, 0.2], [0.6, 0.1], [0.3, 0.3]]))
    v_ref, g_ref = grads(s, ids, lp)
    # -1 slots with garbage values; -1 aliases id 0 internally, which must not remove a real id 0
    ids_pad = torch.tensor([[0, 4, -1, -1], [7, -1, 2, -1], [9, 0, -1, -1]])
    junk = torch.tensor([[0.0, 5.0], [float("nan"), 3.0], [0.0, float("-inf")]])
    lp_pad = torch.stack(
        [
            torch.cat([lp[0], junk[0]]),
            torch.stack([lp[1, 0], junk[1, 0], lp[1, 1], junk[1, 1]]),
            torch.cat([lp[2], junk[2]]),
        ]
    )
    v_pad, g_pad = grads(s, ids_pad, lp_pad)
    torch.testing.assert_close(v_pad, v_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_pad, g_ref, rtol=1e-6, atol=0)
    # an all-padding position has the whole teacher mass in the tail: KL = -log(1) = 0
    v_empty = sparse_topk_kl(s[:1], torch.full((1, 3), -1), torch.zeros(1, 3))
    assert v_empty.item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_tail_rounding_below_floor_is_dropped() -> None:
    s = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    ids = torch.tensor([[0, 2]])
    # the two probs sum to 1 + 1e-7 (rounding): tail clamps to 0 -> bucket terms only
    p = torch.tensor([[0.4, 0.6 + 1e-7]])
    log_q = np_log_softmax(s.numpy()[0])
    expected = float(
        0.4 * (math.log(0.4) - log_q[0]) + float(p[0, 1]) * (math.log(float(p[0, 1])) - log_q[2])
    )
    assert sparse_topk_kl(s, ids, torch.log(p)).item() == pytest.approx(expected, rel=1e-5)
    # a genuine tail above the floor is used
    p2 = torch.tensor([[0.4, 0.6 - 10 * TAIL_FLOOR]])
    assert sparse_topk_kl(s, ids, torch.log(p2)).item() != pytest.approx(expected, rel=1e-7)


def test_masking_reduction_and_grads() -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 5, 30, generator=g) * 3
    t = torch.randn(2, 5, 30, generator=g) * 3
    ids, lp = topk_from_logits(t, 5)
    labels = torch.ones(2, 5, dtype=torch.long)
    labels[1, 1:] = -100
    s_bad = s.clone()
    s_bad[labels == -100] = float("nan")
    v, gr = grads(s, ids, lp, labels)
    v_bad, g_bad = grads(s_bad, ids, lp, labels)
    torch.testing.assert_close(v, v_bad, rtol=0, atol=0)
    torch.testing.assert_close(gr, g_bad, rtol=0, atol=0)
    assert torch.isfinite(g_bad).all() and (g_bad[labels == -100] == 0).all()
    total = sparse_topk_kl(s, ids, lp, labels, reduction="sum")
    torch.testing.assert_close(total, v * 6, rtol=1e-6, atol=0)
    # the sparse KL of a top-5 teacher is a lower bound of the full KL (data processing ineq.)
    assert 0 < v.item() <= forward_kl(s, t, labels).item() + 1e-6
    # all masked: connected zero, zero grads
    v0, g0 = grads(s, ids, lp, torch.full((2, 5), -100))
    assert v0.item() == 0.0 and (g0 == 0).all()
    out = sparse_topk_kl(s.bfloat16(), ids, lp, labels)
    assert out.dtype == torch.float32 and out.item() >= 0.0


def test_topk_from_logits() -> None:
    t = torch.tensor([[1.0, 3.0, 2.0, -1.0]], dtype=torch.bfloat16)
    ids, lp = topk_from_logits(t, 2, temperature=2.0)
    assert ids.dtype == torch.int64 and lp.dtype == torch.float32
    assert ids.tolist() == [[1, 2]]
    ref = np_log_softmax(np.array([1.0, 3.0, 2.0, -1.0]) / 2.0)[[1, 2]]
    np.testing.assert_allclose(lp.numpy()[0], ref, rtol=1e-6)
    for bad_k in [0, 5]:
        with pytest.raises(ValueError, match="k must be"):
            topk_from_logits(t, bad_k)
    with pytest.raises(ValueError, match="temperature"):
        topk_from_logits(t, 2, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        sparse_topk_kl(t.float(), ids, lp[:, :1])
