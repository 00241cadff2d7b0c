"""Tests for the full-vocabulary KD losses and the CE mix (potstill.distill.losses)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.core.errors import PotstillError
from potstill.distill.losses import (
    LOSSES,
    ce_plus_kd,
    cross_entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)

NAMES = sorted(LOSSES)


# ---------------------------------------------------------------- float64 numpy references
def np_softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = x.astype(np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def np_divergence(name: str, q: np.ndarray, p: np.ndarray, **kw: float) -> np.ndarray:
    """Per-token reference; q = student probs, p = teacher probs."""
    if name == "forward_kl":
        return np_kl(p, q)
    if name == "reverse_kl":
        return np_kl(q, p)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(axis=-1)
    if name == "generalized_jsd":
        b = kw.get("beta", 0.5)
        m = (1 - b) * q + b * p
        return b * np_kl(p, m) + (1 - b) * np_kl(q, m)
    a = kw.get("alpha", 0.1)
    if name == "skew_forward_kl":
        return np_kl(p, a * p + (1 - a) * q)
    if name == "skew_reverse_kl":
        return np_kl(q, a * q + (1 - a) * p)
    raise KeyError(name)


def rand_pair(shape: tuple[int, ...], seed: int, scale: float = 2.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g) * scale
    t = torch.randn(shape, generator=g) * scale
    return s, t


def grad_of(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x)
    return out.detach(), g


# ---------------------------------------------------------------- closed forms
def test_hand_case_v2_forward_and_reverse_kl() -> None:
    # student q = (1/2, 1/2); teacher p = (3/4, 1/4)
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    fkl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert forward_kl(s, t).item() == pytest.approx(fkl, rel=1e-6)
    assert reverse_kl(s, t).item() == pytest.approx(rkl, rel=1e-6)
    assert tvd(s, t).item() == pytest.approx(0.25, rel=1e-6)
    m = (0.625, 0.375)  # symmetric mixture
    js = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    )
    assert generalized_jsd(s, t, beta=0.5).item() == pytest.approx(js, rel=1e-6)
    # skew forward: KL(p || 0.1 p + 0.9 q)
    sk = [0.1 * 0.75 + 0.9 * 0.5, 0.1 * 0.25 + 0.9 * 0.5]
    sfkl = 0.75 * math.log(0.75 / sk[0]) + 0.25 * math.log(0.25 / sk[1])
    assert skew_forward_kl(s, t, alpha=0.1).item() == pytest.approx(sfkl, rel=1e-6)
    # skew reverse: KL(q || 0.1 q + 0.9 p)
    sr = [0.1 * 0.5 + 0.9 * 0.75, 0.1 * 0.5 + 0.9 * 0.25]
    srkl = 0.5 * math.log(0.5 / sr[0]) + 0.5 * math.log(0.5 / sr[1])
    assert skew_reverse_kl(s, t, alpha=0.1).item() == pytest.approx(srkl, rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_matches_numpy_reference(name: str, temperature: float) -> None:
    s, t = rand_pair((2, 5, 3), seed=1)
    labels = torch.zeros(2, 5, dtype=torch.long)
    labels[1, 2:] = -100
    keep = (labels != -100).numpy()
    q = np_softmax(s.numpy(), temperature)
    p = np_softmax(t.numpy(), temperature)
    per_tok = np_divergence(name, q, p) * temperature**2
    expected_sum = per_tok[keep].sum()
    got_sum = LOSSES[name](s, t, labels, temperature=temperature, reduction="sum").item()
    got_mean = LOSSES[name](s, t, labels, temperature=temperature).item()
    assert got_sum == pytest.approx(expected_sum, rel=2e-5, abs=1e-7)
    assert got_mean == pytest.approx(expected_sum / keep.sum(), rel=2e-5, abs=1e-7)


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.9])
def test_generalized_jsd_interior_betas_match_numpy(beta: float) -> None:
    s, t = rand_pair((4, 7), seed=2)
    expected = np_divergence(
        "generalized_jsd", np_softmax(s.numpy()), np_softmax(t.numpy()), beta=beta
    ).mean()
    assert generalized_jsd(s, t, beta=beta).item() == pytest.approx(expected, rel=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_zero_iff_equal(name: str) -> None:
    s, t = rand_pair((3, 4, 20), seed=3)
    same = LOSSES[name](s, s.clone())
    assert 0.0 <= same.item() < 1e-7
    assert LOSSES[name](s, t).item() > 1e-3


# ---------------------------------------------------------------- limits / endpoints
def test_endpoints_equal_plain_kls() -> None:
    s, t = rand_pair((3, 5, 17), seed=4)
    fkl, rkl = forward_kl(s, t), reverse_kl(s, t)
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.0), fkl, rtol=1e-6, atol=0)
    torch.testing.assert_close(generalized_jsd(s, t, beta=1.0), rkl, rtol=1e-6, atol=0)
    torch.testing.assert_close(skew_forward_kl(s, t, alpha=0.0), fkl, rtol=1e-6, atol=0)
    torch.testing.assert_close(skew_reverse_kl(s, t, alpha=0.0), rkl, rtol=1e-6, atol=0)
    assert skew_forward_kl(s, t, alpha=1.0).item() == 0.0
    assert skew_reverse_kl(s, t, alpha=1.0).item() == 0.0
    # the interior formula vanishes at the ends; its slope there is the plain KL (documented)
    eps = 1e-5
    assert generalized_jsd(s, t, beta=eps).item() / eps == pytest.approx(fkl.item(), rel=2e-3)
    assert generalized_jsd(s, t, beta=1 - eps).item() / eps == pytest.approx(rkl.item(), rel=2e-3)


def test_generalized_jsd_symmetric_at_half_and_bounded() -> None:
    s, t = rand_pair((6, 30), seed=5, scale=5.0)
    a, b = generalized_jsd(s, t, beta=0.5), generalized_jsd(t, s, beta=0.5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    assert a.item() <= math.log(2.0)


# ---------------------------------------------------------------- TRL reference
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_trl(temperature: float) -> None:
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    trl_jsd = gkd.GKDTrainer.generalized_jsd_loss
    s, t = rand_pair((3, 7, 50), seed=6)
    labels = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    labels[0, :3] = -100
    labels[2, 5:] = -100
    for beta in [0.0, 0.1, 0.5, 0.9, 1.0]:
        kw: dict[str, Any] = {"beta": beta, "temperature": temperature}
        ours, g_ours = grad_of(
            functools.partial(generalized_jsd, teacher_logits=t, labels=labels, **kw), s
        )
        ref, g_ref = grad_of(functools.partial(trl_jsd, teacher_logits=t, labels=labels, **kw), s)
        # documented mapping: ours == T**2 * TRL("batchmean" with labels), same beta
        torch.testing.assert_close(ours, temperature**2 * ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g_ours, temperature**2 * g_ref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- masking / reductions
@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_do_not_matter(name: str) -> None:
    s, t = rand_pair((2, 6, 11), seed=7)
    labels = torch.ones(2, 6, dtype=torch.long)
    labels[0, :4] = -100
    labels[1, 5] = -100
    masked = labels == -100
    s2, t2 = s.clone(), t.clone()
    s2[masked] = float("nan")  # garbage in masked rows must not leak
    t2[masked] = 1e4
    fn = LOSSES[name]
    v1, g1 = grad_of(lambda x: fn(x, t, labels, temperature=1.5), s)
    v2, g2 = grad_of(lambda x: fn(x, t2, labels, temperature=1.5), s2)
    assert torch.isfinite(v2) and torch.isfinite(g2).all()
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    assert (g2[masked] == 0).all()
    assert (g2[~masked].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_gives_connected_zero(name: str) -> None:
    s, t = rand_pair((2, 3, 5), seed=8)
    s.requires_grad_(True)
    labels = torch.full((2, 3), -100)
    for reduction in ("mean", "sum"):
        out = LOSSES[name](s, t, labels, reduction=reduction)
        assert out.item() == 0.0 and out.grad_fn is not None
        (g,) = torch.autograd.grad(out, s)
        assert (g == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_mean_sum_labels_none_and_flat_shapes(name: str) -> None:
    s, t = rand_pair((3, 4, 9), seed=9)
    labels = torch.zeros(3, 4, dtype=torch.long)
    labels[0, 1] = labels[2, 3] = labels[2, 0] = -100
    fn = LOSSES[name]
    mean, total = fn(s, t, labels), fn(s, t, labels, reduction="sum")
    torch.testing.assert_close(total, mean * 9, rtol=1e-6, atol=0)
    # labels=None counts every position; a custom ignore_index is honoured
    torch.testing.assert_close(fn(s, t), fn(s, t, torch.zeros(3, 4, dtype=torch.long)))
    torch.testing.assert_close(
        fn(s, t, labels.masked_fill(labels == -100, 7), ignore_index=7), mean
    )
    # [N, V] with [N] labels == [B, T, V] with [B, T] labels
    torch.testing.assert_close(fn(s.reshape(12, 9), t.reshape(12, 9), labels.reshape(12)), mean)


def test_gradient_accumulation_invariance() -> None:
    torch.manual_seed(10)
    V, H = 13, 8
    model = torch.nn.Linear(H, V, bias=False)
    x = torch.randn(4, 6, H)
    teacher = torch.randn(4, 6, V) * 2
    labels = torch.zeros(4, 6, dtype=torch.long)
    labels[:2, 1:] = -100  # micro-batch 1: 2 tokens, micro-batch 2: 12 tokens
    micro = [slice(0, 2), slice(2, 4)]
    for name in NAMES:
        fn = LOSSES[name]
        model.zero_grad()
        fn(model(x), teacher, labels).backward()
        assert model.weight.grad is not None
        full = model.weight.grad.clone()

        model.zero_grad()
        n_total = int((labels != -100).sum())
        for mb in micro:
            (fn(model(x[mb]), teacher[mb], labels[mb], reduction="sum") / n_total).backward()
        torch.testing.assert_close(model.weight.grad, full, rtol=1e-5, atol=1e-7)

        model.zero_grad()
        for mb in micro:
            (fn(model(x[mb]), teacher[mb], labels[mb]) / len(micro)).backward()
        naive = model.weight.grad
        assert naive is not None
        naive_err = (naive - full).abs().max() / full.abs().max()
        assert naive_err > 0.05, name  # the naive average of means really is different


# ---------------------------------------------------------------- dtypes / numerics
@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs(name: str) -> None:
    s, t = rand_pair((4, 16, 64), seed=11, scale=3.0)
    fn = LOSSES[name]
    sb, tb = s.bfloat16(), t.bfloat16()
    out = fn(sb, tb)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fn(sb.float(), tb.float()), rtol=0, atol=0)
    torch.testing.assert_close(out, fn(s, t), rtol=3e-2, atol=1e-4)
    _, g = grad_of(lambda x: fn(x, tb), sb)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
    # nearly identical bf16 distributions are where a bf16 JSD went negative (ms-swift #10156)
    for seed in range(5):
        base, noise = rand_pair((8, 32, 128), seed=100 + seed, scale=4.0)
        near = (base + 1e-2 * noise).bfloat16()
        for student, teacher in [(base.bfloat16(), near), (near, base.bfloat16())]:
            assert fn(student, teacher).item() >= 0.0
            assert fn(student, teacher, reduction="sum").item() >= 0.0


@pytest.mark.parametrize("name", NAMES)
def test_extreme_and_infinite_logits(name: str) -> None:
    fn = LOSSES[name]
    s, t = rand_pair((5, 8), seed=12)
    big_s = s.sign() * 1e4
    big_t = t.sign() * 1e4
    v, g = grad_of(lambda x: fn(x, big_t, temperature=1.0), big_s)
    assert torch.isfinite(v) and torch.isfinite(g).all()
    # a token that both models exclude with -inf is the same as a smaller vocabulary
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, 3] = t_inf[:, 3] = float("-inf")
    keep = [i for i in range(8) if i != 3]
    v_inf, g_inf = grad_of(lambda x: fn(x, t_inf, temperature=2.0), s_inf)
    v_ref, g_ref = grad_of(lambda x: fn(x, t[:, keep], temperature=2.0), s[:, keep])
    torch.testing.assert_close(v_inf, v_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_inf[:, keep], g_ref, rtol=1e-5, atol=1e-7)
    assert (g_inf[:, 3] == 0).all()


def test_temperature_scaling_is_t_squared() -> None:
    s, t = rand_pair((3, 10), seed=13)
    for fn in LOSSES.values():
        at_t = fn(s, t, temperature=3.0)
        manual = fn(s / 3.0, t / 3.0) * 9.0
        torch.testing.assert_close(at_t, manual, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- argument validation
@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments(name: str) -> None:
    fn = LOSSES[name]
    s, t = rand_pair((2, 3, 4), seed=14)
    for bad_t in [0.0, -1.0, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="temperature"):
            fn(s, t, temperature=bad_t)
    with pytest.raises(PotstillError, match="reduction"):
        fn(s, t, reduction="batchmean")
    with pytest.raises(ValueError, match="same shape"):
        fn(s, t[..., :3])
    with pytest.raises(ValueError, match="labels shape"):
        fn(s, t, torch.zeros(2, 4, dtype=torch.long))


def test_bad_beta_alpha() -> None:
    s, t = rand_pair((2, 4), seed=15)
    for bad in [-0.1, 1.5]:
        with pytest.raises(ValueError, match="beta"):
            generalized_jsd(s, t, beta=bad)
        with pytest.raises(ValueError, match="alpha"):
            skew_forward_kl(s, t, alpha=bad)
        with pytest.raises(ValueError, match="alpha"):
            skew_reverse_kl(s, t, alpha=bad)
        with pytest.raises(ValueError, match="alpha"):
            ce_plus_kd(torch.tensor(1.0), torch.tensor(2.0), alpha=bad)


# ---------------------------------------------------------------- CE and mix
def test_cross_entropy_matches_torch_and_guards() -> None:
    s, _ = rand_pair((3, 5, 12), seed=16)
    labels = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(1))
    labels[1, :] = -100
    ref = F.cross_entropy(s.double().reshape(-1, 12), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(cross_entropy(s, labels), ref.float(), rtol=1e-6, atol=0)
    ref_sum = F.cross_entropy(s.double().reshape(-1, 12), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(
        cross_entropy(s, labels, reduction="sum"), ref_sum.float(), rtol=1e-6, atol=0
    )
    out = cross_entropy(s.bfloat16(), labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, cross_entropy(s.bfloat16().float(), labels), rtol=0, atol=0)
    _, g = grad_of(lambda x: cross_entropy(x, torch.full((3, 5), -100)), s)
    assert (g == 0).all()
    assert cross_entropy(s, torch.full((3, 5), -100)).item() == 0.0


def test_ce_plus_kd_mixes_linearly() -> None:
    ce, kd = torch.tensor(2.5), torch.tensor(0.01)
    assert ce_plus_kd(ce, kd, alpha=0.0).item() == pytest.approx(0.01)
    assert ce_plus_kd(ce, kd, alpha=1.0).item() == pytest.approx(2.5)
    assert ce_plus_kd(ce, kd, alpha=0.3).item() == pytest.approx(0.3 * 2.5 + 0.7 * 0.01)


def test_registry_is_complete() -> None:
    assert set(LOSSES) == {
        "forward_kl",
        "reverse_kl",
        "generalized_jsd",
        "tvd",
        "skew_forward_kl",
        "skew_reverse_kl",
    }
