"""The fused objective equals the reference losses, value and gradient."""

from __future__ import annotations

import pytest
import torch

from potstill.distill.losses import cross_entropy, forward_kl, sparse_topk_kl, topk_from_logits
from potstill.distill.losses.fused import fused_kd_objective


def _case(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(3, 7, 50, generator=g) * 3).to(dtype)
    t = (torch.randn(3, 7, 50, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, 6] = -100
    return s, t, labels


def _reference(s, teacher, labels, alpha, temperature):  # type: ignore[no-untyped-def]
    ce = cross_entropy(s, labels, reduction="sum")
    if teacher is None:
        return ce
    if isinstance(teacher, tuple):
        kd = sparse_topk_kl(s, *teacher, labels, temperature=temperature, reduction="sum")
    else:
        kd = forward_kl(s, teacher, labels, temperature=temperature, reduction="sum")
    return alpha * ce + (1 - alpha) * kd


def _grads(fn, s):  # type: ignore[no-untyped-def]
    x = s.clone().requires_grad_(True)
    out = fn(x)
    total = out[0] if isinstance(out, tuple) else out
    (total * 1.7).backward()
    return total.detach(), x.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_dense_matches_reference(temperature: float, alpha: float, chunk: int) -> None:
    s, t, labels = _case(0)
    ref_v, ref_g = _grads(lambda x: _reference(x, t, labels, alpha, temperature), s)
    v, g = _grads(
        lambda x: fused_kd_objective(
            x, t, labels, alpha=alpha, temperature=temperature, chunk_tokens=chunk
        ),
        s,
    )
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 8, 50])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_matches_reference(k: int, temperature: float) -> None:
    s, t, labels = _case(1)
    ids, lps = topk_from_logits(t, k, temperature=temperature)
    if k == 8:  # fewer entries known at some positions, as API logprobs can be
        ids[1, 2, 5:] = -1
        ids[2, 0, 1:] = -1
    teacher = (ids, lps)
    ref_v, ref_g = _grads(lambda x: _reference(x, teacher, labels, 0.25, temperature), s)
    v, g = _grads(
        lambda x: fused_kd_objective(
            x, teacher, labels, alpha=0.25, temperature=temperature, chunk_tokens=4
        ),
        s,
    )
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6)


def test_all_invalid_topk_row_and_ce_only() -> None:
    s, t, labels = _case(2)
    ids, lps = topk_from_logits(t, 4)
    ids[0, 4] = -1  # no teacher information at this position: the tail holds everything
    ref_v, ref_g = _grads(lambda x: _reference(x, (ids, lps), labels, 0.0, 1.0), s)
    v, g = _grads(lambda x: fused_kd_objective(x, (ids, lps), labels), s)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6)
    ref_v, ref_g = _grads(lambda x: cross_entropy(x, labels, reduction="sum"), s)
    v, g = _grads(lambda x: fused_kd_objective(x, None, labels, alpha=1.0), s)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6)


def test_terms_and_bf16() -> None:
    s, t, labels = _case(3, torch.bfloat16)
    total, ce, kd = fused_kd_objective(s, t, labels, alpha=0.4, temperature=1.5)
    assert total.dtype == torch.float32
    torch.testing.assert_close(ce, cross_entropy(s, labels, reduction="sum"), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        kd, forward_kl(s, t, labels, temperature=1.5, reduction="sum"), rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(total, 0.4 * ce + 0.6 * kd)
    x = s.clone().requires_grad_(True)
    fused_kd_objective(x, t, labels, alpha=0.4)[0].backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert torch.all(x.grad[0, :3] == 0)  # masked positions get no gradient


def test_all_masked_is_zero_not_nan() -> None:
    s, t, _ = _case(4)
    labels = torch.full((3, 7), -100)
    x = s.clone().requires_grad_(True)
    total, _, _ = fused_kd_objective(x, t, labels, alpha=0.5)
    total.backward()
    assert float(total.detach()) == 0.0 and torch.all(x.grad == 0)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_generalized_jsd_matches_reference_and_trl(
    beta: float, temperature: float, alpha: float
) -> None:
    """The closed-form JSD gradient against autograd through the reference loss, which the
    losses tests check against TRL's own generalized_jsd_loss."""
    from potstill.distill.losses import generalized_jsd

    s, t, labels = _case(3)

    def ref(x: torch.Tensor) -> torch.Tensor:
        ce = cross_entropy(x, labels, reduction="sum")
        kd = generalized_jsd(x, t, labels, beta=beta, temperature=temperature, reduction="sum")
        return alpha * ce + (1 - alpha) * kd

    ref_v, ref_g = _grads(ref, s)
    v, g = _grads(lambda x: fused_kd_objective(x, t, labels, alpha=alpha, temperature=temperature,
                                               chunk_tokens=4, beta=beta), s)  # fmt: skip
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6)


def test_reverse_kl_is_generalized_jsd_at_beta_one() -> None:
    from potstill.distill.losses import reverse_kl

    s, t, labels = _case(4)
    ref_v, ref_g = _grads(lambda x: reverse_kl(x, t, labels, reduction="sum"), s)
    v, g = _grads(lambda x: fused_kd_objective(x, t, labels, beta=1.0), s)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_with_underflowing_and_masked_probabilities(beta: float) -> None:
    """The mixture is formed in probability space: where the teacher's and the student's
    probabilities underflow fp32 (log-probs near -300), or a logit is -inf, the value and the
    gradient still equal autograd through the log-space reference, with nothing NaN."""
    from potstill.distill.losses import generalized_jsd

    s, t, labels = _case(5)
    s[0, 3:, :10] = -300.0  # both sides below fp32's smallest probability on these ids
    t[0, 3:, :10] = -300.0
    t[1, :, 10:20] = -300.0  # the teacher alone underflows
    s[2, :, 20:25] = -300.0  # the student alone underflows
    t[2, :, 25] = float("-inf")  # a token the teacher rules out
    ref_v, ref_g = _grads(lambda x: generalized_jsd(x, t, labels, beta=beta, reduction="sum"), s)
    v, g = _grads(lambda x: fused_kd_objective(x, t, labels, beta=beta), s)
    assert torch.isfinite(v) and bool(torch.isfinite(g).all())
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6)


def test_default_chunks_give_the_same_result_as_one_row_at_a_time() -> None:
    """The default chunk (about 1 MiB of fp32 per temporary) only regroups rows."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(40, 9000, generator=g) * 3  # 29 rows per default chunk: two chunks
    t = torch.randn(40, 9000, generator=g) * 3
    labels = torch.randint(0, 9000, (40,), generator=g)
    one_v, one_g = _grads(lambda x: fused_kd_objective(x, t, labels, beta=0.5, chunk_tokens=1), s)
    v, grad = _grads(lambda x: fused_kd_objective(x, t, labels, beta=0.5), s)
    torch.testing.assert_close(v, one_v, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(grad, one_g, rtol=1e-6, atol=1e-9)


def _teacher_of(kind: str, t: torch.Tensor) -> object:
    return {"dense": t, "sparse": topk_from_logits(t, 8), "ce": None}[kind]


@pytest.mark.parametrize("kind", ["dense", "sparse", "ce"])
@pytest.mark.parametrize("masked", [False, True])
def test_overwrite_writes_the_reference_gradient_over_the_logits(kind: str, masked: bool) -> None:
    """``overwrite``: the logits' own buffer ends up holding the reference gradient (masked
    rows 0), and the returned gradient is that buffer, scaled in place by the upstream 1.7."""
    s, t, labels = _case(6)
    if not masked:
        labels = torch.randint(0, 50, labels.shape, generator=torch.Generator().manual_seed(9))
    teacher, alpha = _teacher_of(kind, t), 1.0 if kind == "ce" else 0.3
    ref_v, ref_g = _grads(
        lambda x: _reference(x, teacher, labels, alpha, 2.0 if kind != "ce" else 1.0), s
    )
    leaf = s.clone().requires_grad_(True)
    logits = leaf * 1.0  # a temporary, as the head's output is
    total, _, _ = fused_kd_objective(
        logits, teacher, labels, alpha=alpha, temperature=2.0 if kind != "ce" else 1.0,
        chunk_tokens=4, overwrite=True,
    )  # fmt: skip
    torch.testing.assert_close(total.detach(), ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.detach(), ref_g / 1.7, rtol=1e-5, atol=1e-6)
    (total * 1.7).backward()
    torch.testing.assert_close(leaf.grad, ref_g, rtol=1e-5, atol=1e-6)
    if masked:
        assert torch.all(leaf.grad[0, :3] == 0)


def test_the_in_place_backward_refuses_a_second_pass() -> None:
    """The saved gradient is scaled in place, so a retained graph's second backward must fail
    autograd's version check rather than return a gradient scaled twice."""
    s, t, labels = _case(7)
    x = s.clone().requires_grad_(True)
    total, _, _ = fused_kd_objective(x, t, labels)
    (total * 2.0).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (total * 2.0).backward()
