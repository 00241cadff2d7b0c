"""Soft open-mode radioactivity: the suspect's whole next-token distribution, not its argmax.

A student that learned part of our KGW green bias moves probability mass onto green
tokens long before its top-1 prediction flips; the argmax test
(:func:`potstill.detect.radioactivity.radioactivity_open`) sees nothing until it does.
This test scores the green *mass*.

Statistic. Teacher-force our watermarked texts through the suspect. At each position with
a full window ``w`` (the k previous text tokens) keep the suspect's top-``K`` next-token
probabilities. Windows are merged over the corpus: ``a[w, t]`` is the summed probability
of token ``t`` over the occurrences of ``w`` (``weighting="sum"``) or its mean
(``weighting="mean"``). The statistic is ``X = sum_{w, t} a[w, t] B[w, t]``, where
``B[w, t] = 1`` iff ``t`` is green after ``w`` under the key.

Null model (H0: the suspect's distributions do not depend on the key). Under a random
key, the ``B[w, t]`` are independent Bernoulli(gamma) across distinct (w, t) (the
per-token keyed hash of :mod:`potstill.core.watermark.kgw`), and independent of the weights
``a``, which come from the suspect alone. So ``X`` is a weighted sum of independent
Bernoullis with known weights: ``E X = gamma sum a``, ``Var X = gamma (1 - gamma) sum a^2``
(for ``weighting="sum"`` this is the issue's exact ``gamma (1 - gamma) sum_t (sum_occ p_t)^2``:
one window has one green list, so its occurrences are never counted as independent).
Keeping only the top ``K`` tokens is a choice of weights (zero on the rest) that the key
does not influence, so it costs a little power and no validity.

What would break the independence of ``a`` and ``B`` for a clean model, and is removed:

- a window seen earlier in the same text: the text's token after it was drawn from the
  window's green list, and a model that copies in context (induction) would put mass on it
  (the soft form of copy exclusion);
- a window found in the prompts (watermarked prompts can be continued or quoted).

Tail. ``p_value`` is the Lugannani-Rice saddlepoint approximation of ``P(X >= x)`` from
the exact cumulant generating function ``K(l) = sum log(1 - gamma + gamma e^{l a})``; its
relative error is O(1/n) out to the far tail, where a normal tail is anti-conservative
(the summands are right-skewed at gamma < 1/2). ``p_bound = exp(K(l) - l x)`` is the
Chernoff bound: a rigorous upper bound on the same probability, for a reader who accepts
no approximation. ``z`` is the normal score. The calibration of ``p_value`` over fresh keys
on clean models is in ``benchmarks/radioactivity.py`` and ``tests/test_soft_radioactivity.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from potstill.core.errors import PotstillError
from potstill.detect.radioactivity import CorpusTest

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedTokenizerBase

    from potstill.core.watermark.keys import WatermarkKey
    from potstill.core.watermark.params import WatermarkParams

__all__ = [
    "SoftCorpus",
    "SoftResult",
    "collect_soft",
    "green_pairs",
    "radioactivity_soft",
    "score_soft",
    "weighted_bernoulli_tail",
]

Weighting = Literal["mean", "sum"]
WEIGHTINGS = ("mean", "sum")


@dataclass
class SoftCorpus:
    """The suspect's top-K next-token mass per distinct window, merged over the corpus.

    Ragged, flattened over (window, token) pairs: ``windows`` (N distinct k-grams, first
    occurrence order), ``pair_window [M]`` (index into ``windows``), ``pair_token [M]``,
    ``pair_mass [M]`` (summed probability over the window's occurrences), ``n_occ [N]``.
    Counts: ``n_candidates`` positions with a full window, of which
    ``n_excluded_repeats`` (window seen earlier in the same text), ``n_excluded_prompt``
    and ``n_filtered_out`` were dropped before merging.
    """

    context_width: int
    top_k: int
    windows: list[tuple[int, ...]]
    pair_window: np.ndarray
    pair_token: np.ndarray
    pair_mass: np.ndarray
    n_occ: np.ndarray
    n_texts: int
    n_tokens: int
    n_candidates: int
    n_excluded_repeats: int
    n_excluded_prompt: int
    n_filtered_out: int

    def weights(self, weighting: Weighting) -> np.ndarray:
        """float64 ``[M]``: ``a[w, t]`` for ``"sum"``, or divided by the window's count."""
        if weighting not in WEIGHTINGS:
            raise PotstillError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if weighting == "sum":
            return self.pair_mass
        return self.pair_mass / self.n_occ[self.pair_window]


@dataclass(frozen=True)
class SoftResult(CorpusTest):
    """One soft test. ``statistic``: the green share of the scored mass (gamma under H0).

    ``green_mass`` is ``x`` and ``expected_mass`` its null mean; ``n_scored`` distinct windows;
    ``n_excluded_copies`` counts windows dropped as repeats within a text; ``p_bound`` is the
    Chernoff bound and ``log10_p`` stays finite where ``p_value`` underflows.
    """

    z: float
    p_bound: float
    log10_p: float
    green_mass: float
    expected_mass: float
    settings: dict[str, Any] = field(default_factory=dict)


def _log1pexp(x: np.ndarray) -> np.ndarray:
    import numpy as np

    return np.logaddexp(0.0, x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(x)


def _saddlepoint(x: float, a: np.ndarray, logit: float, guess: float) -> float:
    """The root of ``K'(l) = sum a sigmoid(l a + logit) = x`` (``l > 0``), Newton in a bracket.

    ``K'`` increases from the mean (l = 0) to ``sum a``; ``K'' > 0`` is its slope. Newton from
    the normal guess converges in a few steps; a step that leaves the bracket bisects instead.
    """
    lo, hi = 0.0, max(guess, 1e-3)
    while float((a * _sigmoid(hi * a + logit)).sum()) < x:
        lo, hi = hi, hi * 2.0
    lam = min(max(guess, lo), hi)
    for _ in range(100):
        s = _sigmoid(lam * a + logit)
        f = float((a * s).sum()) - x
        if f < 0:
            lo = lam
        else:
            hi = lam
        slope = float((a * a * s * (1.0 - s)).sum())
        step = lam - f / slope if slope > 0 else 0.5 * (lo + hi)
        nxt = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(nxt - lam) <= 1e-12 * max(1.0, lam):
            return nxt
        lam = nxt
    return lam


def weighted_bernoulli_tail(x: float, a: np.ndarray, gamma: float) -> tuple[float, float, float]:
    """``(p, log10 p, chernoff bound)`` for ``P(sum_i a_i B_i >= x)``, ``B_i ~ Bernoulli(gamma)``.

    ``a``: float64 ``[M]`` weights ``>= 0``. ``p`` is Lugannani-Rice on the exact CGF
    ``K(l) = sum_i log(1 - gamma + gamma e^{l a_i})``; the bound is ``exp(K(l) - l x)`` at the
    saddlepoint ``K'(l) = x``. At or below the mean (no evidence) the normal tail is used and
    the bound is 1.
    """
    import numpy as np
    from scipy.special import log_ndtr, ndtr

    a = np.asarray(a, dtype=np.float64)
    a = a[a > 0]
    mean = gamma * float(a.sum())
    sd = math.sqrt(gamma * (1.0 - gamma) * float((a * a).sum()))
    if sd == 0.0:
        raise PotstillError("the soft statistic has zero null variance: nothing was scored")
    z = (x - mean) / sd
    if z <= 1e-6:
        p = float(ndtr(-z))
        return p, math.log10(max(p, 1e-300)), 1.0
    total = float(a.sum())
    if x >= total:  # every weighted token green: P = gamma^M exactly
        logp = a.size * math.log(gamma)
        return math.exp(logp), logp / math.log(10), math.exp(logp)
    logit = math.log(gamma / (1.0 - gamma))
    lam = _saddlepoint(x, a, logit, (x - mean) / (sd * sd))
    s = _sigmoid(lam * a + logit)
    cgf = float((math.log(1.0 - gamma) + _log1pexp(lam * a + logit)).sum())
    k2 = float((a * a * s * (1.0 - s)).sum())
    log_bound = min(0.0, cgf - lam * x)
    r = math.sqrt(max(2.0 * (lam * x - cgf), 0.0))
    u = lam * math.sqrt(k2)
    if r < 1e-8 or u < 1e-8:
        p = float(ndtr(-z))
        return p, math.log10(max(p, 1e-300)), math.exp(log_bound)
    # log(Phi(-r) + phi(r) (1/u - 1/r)) without underflow at large r
    log_tail = float(log_ndtr(-r))
    log_phi = -0.5 * r * r - 0.5 * math.log(2 * math.pi)
    ratio = math.exp(log_phi - log_tail) * (1.0 / u - 1.0 / r)
    logp = log_tail + math.log1p(ratio) if ratio > -1.0 else log_tail
    logp = min(logp, log_bound)  # the bound is rigorous; the approximation never exceeds it
    return math.exp(logp), logp / math.log(10), math.exp(log_bound)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def _top_k_rows(model: Any, chunk: list[list[int]], top_k: int, pad: int) -> tuple[Any, Any]:
    """(probs [B, T, K] float64, ids [B, T, K]) of the model's next-token distributions."""
    import torch

    params = list(model.parameters()) if hasattr(model, "parameters") else []
    device = params[0].device if params else torch.device("cpu")
    width = max(len(s) for s in chunk)
    inp = torch.full((len(chunk), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(chunk), width), dtype=torch.int64)
    for i, s in enumerate(chunk):
        inp[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logits = model(input_ids=inp.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # fp32: the mass must sum to 1
        top, ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
    return top.exp().double().cpu().numpy(), ids.cpu().numpy()


def collect_soft(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    context_width: int,
    *,
    top_k: int = 64,
    batch_size: int = 4,
    max_tokens: int = 512,
    prompt_windows: set[tuple[int, ...]] | None = None,
    filter_windows: set[tuple[int, ...]] | None = None,
) -> SoftCorpus:
    """Run the suspect once over ``texts``; merge its top-``top_k`` mass per window.

    ``model(input_ids [B, T], attention_mask [B, T]).logits`` is ``[B, T, V]``; each text is
    cut to ``max_tokens`` tokens and ``batch_size`` texts run per pass. The position after a
    text's last token counts too (it needs no actual next token).
    """
    import numpy as np

    k = context_width
    ids = [s[:max_tokens] for s in _encode(tokenizer, texts)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    merged: dict[tuple[int, ...], dict[int, float]] = {}
    n_occ: dict[tuple[int, ...], int] = {}
    n_cand = n_rep = n_prompt = n_filt = 0
    for start in range(0, len(ids), batch_size):
        chunk = [s for s in ids[start : start + batch_size] if len(s) >= k]
        if not chunk:
            continue
        probs, top = _top_k_rows(model, chunk, top_k, pad)
        for row, s in enumerate(chunk):
            seen: set[tuple[int, ...]] = set()
            for j in range(k - 1, len(s)):
                window = tuple(s[j - k + 1 : j + 1])
                n_cand += 1
                if window in seen:
                    n_rep += 1
                    continue
                seen.add(window)
                if prompt_windows is not None and window in prompt_windows:
                    n_prompt += 1
                    continue
                if filter_windows is not None and window not in filter_windows:
                    n_filt += 1
                    continue
                mass = merged.setdefault(window, {})
                for t, p in zip(top[row, j].tolist(), probs[row, j].tolist()):
                    mass[t] = mass.get(t, 0.0) + p
                n_occ[window] = n_occ.get(window, 0) + 1
    windows = list(merged)
    sizes = [len(merged[w]) for w in windows]
    pair_window = np.repeat(np.arange(len(windows), dtype=np.int64), sizes)
    pair_token = np.fromiter((t for w in windows for t in merged[w]), np.int64, sum(sizes))
    pair_mass = np.fromiter(
        (p for w in windows for p in merged[w].values()), np.float64, sum(sizes)
    )
    return SoftCorpus(
        context_width=k,
        top_k=top_k,
        windows=windows,
        pair_window=pair_window,
        pair_token=pair_token,
        pair_mass=pair_mass,
        n_occ=np.array([n_occ[w] for w in windows], dtype=np.float64),
        n_texts=len(texts),
        n_tokens=sum(len(s) for s in ids),
        n_candidates=n_cand,
        n_excluded_repeats=n_rep,
        n_excluded_prompt=n_prompt,
        n_filtered_out=n_filt,
    )


def green_pairs(corpus: SoftCorpus, key: WatermarkKey, params: WatermarkParams) -> np.ndarray:
    """Bool ``[M]``: each (window, token) pair green under ``key`` (one HMAC per window)."""
    import torch

    from potstill.core.watermark.kgw import KGW_DOMAIN
    from potstill.core.watermark.prf import SeedCache, hash32

    words = SeedCache(key, KGW_DOMAIN).words(corpus.windows, torch.device("cpu"))
    idx = torch.from_numpy(corpus.pair_window)
    tok = torch.from_numpy(corpus.pair_token)
    green = hash32(tok, words[idx, 0], words[idx, 1]) < round(params.gamma * 2**32)
    return green.numpy()


def score_soft(
    corpus: SoftCorpus,
    key: WatermarkKey,
    params: WatermarkParams,
    *,
    weighting: Weighting = "mean",
    extra_settings: dict[str, Any] | None = None,
) -> SoftResult:
    """The soft test of ``corpus`` under ``key`` (KGW only). PotstillError if nothing is left."""
    if params.scheme != "kgw":
        raise PotstillError(
            f"the soft score needs a KGW watermark (green lists), not {params.scheme!r}: "
            "use --score argmax for Gumbel"
        )
    if not corpus.windows:
        raise PotstillError(
            f"nothing to score in soft open mode: {corpus.n_candidates} windows from "
            f"{corpus.n_texts} texts, {corpus.n_excluded_repeats} repeated within a text, "
            f"{corpus.n_excluded_prompt} in the prompts, {corpus.n_filtered_out} filtered out; "
            "give more or longer watermarked texts"
        )
    a = corpus.weights(weighting)
    x = float(a[green_pairs(corpus, key, params)].sum())
    p, log10_p, bound = weighted_bernoulli_tail(x, a, params.gamma)
    mean = params.gamma * float(a.sum())
    sd = math.sqrt(params.gamma * (1 - params.gamma) * float((a * a).sum()))
    n = len(corpus.windows)
    settings = {
        "mode": "open",
        "score": "soft",
        **params.to_dict(detection=True),
        "weighting": weighting,
        "top_k": corpus.top_k,
        "key_id": key.key_id,
        **(extra_settings or {}),
    }
    kept = corpus.n_candidates - corpus.n_excluded_repeats - corpus.n_excluded_prompt
    return SoftResult(
        mode="open",
        scheme="kgw",
        n_texts=corpus.n_texts,
        n_tokens=corpus.n_tokens,
        n_candidates=corpus.n_candidates,
        n_excluded_prompt=corpus.n_excluded_prompt,
        n_excluded_copies=corpus.n_excluded_repeats,
        n_filtered_out=corpus.n_filtered_out,
        n_duplicates=kept - corpus.n_filtered_out - n,
        n_scored=n,
        statistic=x / float(a.sum()),
        p_value=p,
        z=(x - mean) / sd,
        p_bound=bound,
        log10_p=log10_p,
        green_mass=x,
        expected_mass=mean,
        settings=settings,
    )


def radioactivity_soft(
    suspect_model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    keys: Sequence[WatermarkKey],
    params: WatermarkParams,
    *,
    prompts: Sequence[str] | None = None,
    filter_texts: Sequence[str] | None = None,
    exclude_prompt_windows: bool = True,
    weighting: Weighting = "mean",
    top_k: int = 64,
    batch_size: int = 4,
    max_tokens: int = 512,
) -> list[SoftResult]:
    """Soft open-mode tests of one suspect under each key (the suspect runs once).

    ``tokenizer`` must be the suspect's and the watermarking model's (same ids).
    """
    from potstill.detect.radioactivity import window_sets

    if not texts or not any(t.strip() for t in texts):
        raise PotstillError("the watermarked corpus is empty: give at least one non-empty text")
    k = params.context_width
    excl, filt = window_sets(tokenizer, k, prompts, filter_texts, exclude_prompt_windows)
    corpus = collect_soft(
        suspect_model,
        tokenizer,
        texts,
        k,
        top_k=top_k,
        batch_size=batch_size,
        max_tokens=max_tokens,
        prompt_windows=excl,
        filter_windows=filt,
    )
    extra = {
        "prompts_given": prompts is not None,
        "exclude_prompt_windows": excl is not None,
        "filter": filter_texts is not None,
        "max_tokens": max_tokens,
    }
    return [
        score_soft(corpus, key, params, weighting=weighting, extra_settings=extra) for key in keys
    ]
