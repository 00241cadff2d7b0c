"""Soft open-mode radioactivity: the saddlepoint tail, null calibration, power, exclusions."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from potstill.core.errors import PotstillError
from potstill.core.watermark import KGWProcessor, WatermarkKey, WatermarkParams
from potstill.detect.radioactivity import radioactivity_open
from potstill.detect.soft import (
    collect_soft,
    radioactivity_soft,
    score_soft,
    weighted_bernoulli_tail,
)

V = 384
GAMMA = 0.25
PARAMS = WatermarkParams("kgw", gamma=GAMMA, delta=2.0, context_width=2)
OWNER = WatermarkKey(bytes(range(32)))


def rand_key(i: int) -> WatermarkKey:
    return WatermarkKey(random.Random(90_000 + i).randbytes(32))


# ------------------------------------------------------------------ the tail against exact sums


def _exact_tail(a: np.ndarray, x: float, gamma: float) -> float:
    total = 0.0
    for bits in itertools.product((0, 1), repeat=a.size):
        b = np.array(bits)
        if a @ b >= x - 1e-12:
            total += gamma ** b.sum() * (1 - gamma) ** (a.size - b.sum())
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tail_matches_the_exact_distribution_and_the_bound_holds(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.dirichlet(np.ones(14)) * 4.0  # 14 weights: 16,384 outcomes enumerated exactly
    mean = GAMMA * a.sum()
    for x in np.linspace(mean + 0.3, 0.95 * a.sum(), 6):
        exact = _exact_tail(a, x, GAMMA)
        if exact == 0.0:
            continue
        p, log10_p, bound = weighted_bernoulli_tail(float(x), a, GAMMA)
        assert bound >= exact  # Chernoff is a rigorous upper bound
        assert p <= bound
        assert abs(np.log(p / exact)) < 0.35, (x, p, exact)  # saddlepoint: within ~40%
        assert log10_p == pytest.approx(np.log10(p))


def test_tail_far_out_stays_finite_and_below_the_normal_tail_never() -> None:
    """Skewed summands (gamma < 1/2): the true right tail is heavier than the normal one."""
    a = np.full(400, 0.5)
    x = GAMMA * a.sum() + 12 * np.sqrt(GAMMA * (1 - GAMMA) * (a * a).sum())
    p, log10_p, bound = weighted_bernoulli_tail(float(x), a, GAMMA)
    exact = stats.binom.sf(np.ceil(x / 0.5) - 1, 400, GAMMA)  # equal weights: a binomial
    assert p > stats.norm.sf(12)
    assert abs(np.log(p / exact)) < 0.5
    assert -40 < log10_p < -15 and bound >= exact


def test_tail_at_or_below_the_mean_is_no_evidence() -> None:
    a = np.full(50, 0.3)
    p, _, bound = weighted_bernoulli_tail(GAMMA * a.sum(), a, GAMMA)
    assert p == pytest.approx(0.5) and bound == 1.0
    with pytest.raises(PotstillError, match="zero null variance"):
        weighted_bernoulli_tail(0.0, np.zeros(3), GAMMA)


# ------------------------------------------------------------------ a bigram "model" and texts


class Bigram(torch.nn.Module):
    """A fixed random bigram LM; ``boost`` adds that much to the logits of ``key``'s green
    tokens after each 2-token window (the ideal radioactive student at small boost)."""

    def __init__(self, seed: int, boost: float = 0.0, key: WatermarkKey | None = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=g) * 2.0, requires_grad=False)
        self.wm = KGWProcessor(key, gamma=GAMMA, delta=boost) if key is not None else None

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> Any:
        logits = self.table[input_ids]  # [B, T, V]
        if self.wm is not None:
            rows = []
            for t in range(input_ids.shape[1]):
                rows.append(self.wm(input_ids[:, : t + 1], logits[:, t]))
            logits = torch.stack(rows, dim=1)
        return _Out(logits)


@dataclass
class _Out:
    logits: torch.Tensor


class IdTokenizer:
    """Texts are space-separated token ids."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [int(t) for t in text.split()]}


def watermarked_texts(n: int, length: int, seed: int) -> list[str]:
    """Samples of Bigram(0) under the owner's KGW watermark (delta 2)."""
    model, wm = Bigram(0), KGWProcessor(OWNER, gamma=GAMMA, delta=2.0)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, V, (1, 2), generator=gen)
        for _ in range(length - 2):
            scores = wm(ids, model.table[ids[0, -1]][None])
            nxt = torch.multinomial(torch.softmax(scores, -1), 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
        out.append(" ".join(map(str, ids[0].tolist())))
    return out


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return watermarked_texts(24, 60, seed=1)


def test_null_p_values_are_uniform_over_fresh_keys(texts: list[str]) -> None:
    """A clean model (no key in its weights) on watermarked text, 400 random keys."""
    corpus = collect_soft(Bigram(3), IdTokenizer(), texts, 2)
    for weighting in ("mean", "sum"):
        ps = np.array([score_soft(corpus, rand_key(i), PARAMS, weighting=weighting).p_value
                       for i in range(400)])  # fmt: skip
        assert stats.kstest(ps, "uniform").pvalue > 0.01
        assert np.mean(ps < 0.05) < 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)
    # the model that wrote the texts is clean too, even under the owner's own key
    res = radioactivity_soft(Bigram(0), IdTokenizer(), texts, [OWNER], PARAMS)[0]
    assert res.p_value > 1e-3


def test_repeated_texts_keep_the_null_exact_under_sum_weighting(texts: list[str]) -> None:
    """One window, one green list: 10 copies of each text are not 10x the evidence."""
    corpus = collect_soft(Bigram(3), IdTokenizer(), texts[:6] * 10, 2)
    assert corpus.n_occ.max() >= 10
    ps = np.array([score_soft(corpus, rand_key(i), PARAMS, weighting="sum").p_value
                   for i in range(400)])  # fmt: skip
    assert np.mean(ps < 0.05) < 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)
    assert stats.kstest(ps, "uniform").pvalue > 0.01


def test_soft_detects_a_bias_the_argmax_test_misses(texts: list[str]) -> None:
    """A student that learned a small green bias (+0.1 logits): mass moves, argmax barely."""
    student = Bigram(0, boost=0.1, key=OWNER)
    soft = radioactivity_soft(student, IdTokenizer(), texts, [OWNER], PARAMS)[0]
    hard = radioactivity_open(student, IdTokenizer(), texts, OWNER, PARAMS)
    assert soft.p_value < 1e-6 and soft.p_bound < 1e-4
    assert hard.p_value > 1e-3
    assert soft.statistic > GAMMA
    # under a key it never learned, the same student is clean
    assert (
        radioactivity_soft(student, IdTokenizer(), texts, [rand_key(7)], PARAMS)[0].p_value > 1e-3
    )


class Copier(torch.nn.Module):
    """An induction head: after a window seen earlier in the text, predict what followed it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> Any:
        b, t = input_ids.shape
        logits = torch.zeros(b, t, V)
        for i in range(b):
            seq = input_ids[i].tolist()
            last: dict[tuple[int, int], int] = {}
            for j in range(1, t):
                w = (seq[j - 1], seq[j])
                if w in last:
                    logits[i, j, last[w]] = 8.0
                if j + 1 < t:
                    last[w] = seq[j + 1]
        return _Out(logits)


def test_windows_repeated_within_a_text_are_dropped() -> None:
    """Copying a watermarked text's own earlier continuation is not radioactivity."""
    base = watermarked_texts(1, 40, seed=5)[0].split()
    looped = [" ".join(base * 4) for _ in range(1)] + watermarked_texts(6, 40, seed=6)
    corpus = collect_soft(Copier(), IdTokenizer(), looped, 2)
    assert corpus.n_excluded_repeats >= 3 * 38
    ps = [
        score_soft(corpus, OWNER, PARAMS).p_value,
        score_soft(corpus, rand_key(1), PARAMS).p_value,
    ]
    assert min(ps) > 1e-3


def test_prompt_windows_and_filter_are_counted(texts: list[str]) -> None:
    tok = IdTokenizer()
    res = radioactivity_soft(Bigram(3), tok, texts, [OWNER], PARAMS, prompts=texts[:2],
                             filter_texts=texts[:12])[0]  # fmt: skip
    assert res.n_excluded_prompt > 0 and res.n_filtered_out > 0
    assert res.settings["exclude_prompt_windows"] and res.settings["filter"]
    assert res.n_scored + res.n_excluded_prompt + res.n_filtered_out + res.n_excluded_copies \
        + res.n_duplicates == res.n_candidates  # fmt: skip


def test_bad_input_is_refused(texts: list[str]) -> None:
    tok = IdTokenizer()
    with pytest.raises(PotstillError, match="KGW"):
        radioactivity_soft(Bigram(3), tok, texts, [OWNER], WatermarkParams("gumbel"))
    with pytest.raises(PotstillError, match="empty"):
        radioactivity_soft(Bigram(3), tok, ["  "], [OWNER], PARAMS)
    with pytest.raises(PotstillError, match="nothing to score"):
        radioactivity_soft(Bigram(3), tok, texts[:2], [OWNER], PARAMS, prompts=texts[:2])
