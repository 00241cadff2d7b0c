"""Watermark detection as a hypothesis test, with exact tails.

H0: the text does not depend on the key. Then each scored (context, token) tuple is,
over the random key, green with probability gamma (KGW) or has ``-log(1 - r) ~ Exp(1)``
(Gumbel), independently across *distinct* tuples. Hence, over ``n`` distinct tuples:

- KGW: the green count ``S ~ Binomial(n, gamma)``; ``p = P(X >= S)
  = I_gamma(S, n - S + 1)`` (regularised incomplete beta, ``scipy.special.betainc``),
  ``p = 1`` at ``S = 0``. ``z = (S - gamma n) / sqrt(n gamma (1 - gamma))`` is reported
  alongside but the p-value is the exact tail, not a normal approximation.
- Gumbel: ``S = sum -log(1 - r) ~ Gamma(n, 1)``; ``p = Q(n, S)`` (``scipy.special.gammaincc``).

A repeated tuple is the same draw, not new evidence: counting it twice breaks the
independence and inflates significance (a repeated phrase alone looks watermarked), so
``dedup=True`` (default) scores each distinct tuple once. The first k tokens of a text
have no full context and are not scored unless a prompt prefix supplies it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from potstill.core.errors import PotstillError
from potstill.core.watermark.params import WatermarkParams

if TYPE_CHECKING:
    import torch

    from potstill.core.watermark.gumbel import GumbelProcessor
    from potstill.core.watermark.keys import WatermarkKey
    from potstill.core.watermark.kgw import KGWProcessor

__all__ = [
    "DetectionResult",
    "ScoreTuple",
    "binomial_tail",
    "dedup_tuples",
    "detect_gumbel",
    "detect_kgw",
    "detect_segments",
    "detect_text",
    "gamma_tail",
    "make_processor",
    "pooled_pvalue",
    "text_tuples",
    "tuple_scores",
    "z_score",
]

# (context: the k previous token ids, token): the unit that gets scored.
ScoreTuple = tuple[tuple[int, ...], int]


def binomial_tail(s: int, n: int, gamma: float) -> float:
    """``P(X >= s)`` for ``X ~ Binomial(n, gamma)``, exact (``betainc(s, n - s + 1, gamma)``)."""
    from scipy.special import betainc

    if not 0 <= s <= n:
        raise ValueError(f"need 0 <= s <= n, got s={s}, n={n}")
    if s == 0:
        return 1.0
    return float(betainc(s, n - s + 1, gamma))


def gamma_tail(s: float, n: int) -> float:
    """``P(X >= s)`` for ``X ~ Gamma(n, 1)`` (sum of n Exp(1)), exact (``gammaincc(n, s)``)."""
    from scipy.special import gammaincc

    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    return float(gammaincc(n, max(s, 0.0)))


def z_score(s: int, n: int, gamma: float) -> float:
    """``(s - gamma n) / sqrt(n gamma (1 - gamma))``: the green count in null std units."""
    return (s - gamma * n) / math.sqrt(n * gamma * (1.0 - gamma))


def make_processor(key: WatermarkKey, params: WatermarkParams) -> KGWProcessor | GumbelProcessor:
    """The logits processor (and scoring oracle) for ``params.scheme``."""
    if params.scheme == "kgw":
        from potstill.core.watermark.kgw import KGWProcessor

        return KGWProcessor(
            key, gamma=params.gamma, delta=params.delta, context_width=params.context_width
        )
    from potstill.core.watermark.gumbel import GumbelProcessor

    return GumbelProcessor(key, context_width=params.context_width)


def text_tuples(
    token_ids: Sequence[int], context_width: int, prefix: Sequence[int] = ()
) -> list[ScoreTuple]:
    """(k previous ids, token) for every token of ``token_ids`` with a full context.

    ``prefix`` (e.g. the prompt's ids) precedes the text and supplies context for the
    first k tokens; its own tokens are never scored.
    """
    full = [int(t) for t in prefix] + [int(t) for t in token_ids]
    k = context_width
    start = max(len(prefix), k)
    return [(tuple(full[j - k : j]), full[j]) for j in range(start, len(full))]


def dedup_tuples(tuples: Iterable[ScoreTuple]) -> list[ScoreTuple]:
    """Distinct tuples, first occurrence order."""
    return list(dict.fromkeys(tuples))


def tuple_scores(
    tuples: Sequence[ScoreTuple], key: WatermarkKey, params: WatermarkParams
) -> torch.Tensor:
    """float64 ``[N]``: 1/0 green (KGW) or ``-log(1 - r)`` (Gumbel) per tuple."""
    import torch

    if not tuples:
        return torch.zeros(0, dtype=torch.float64)
    return make_processor(key, params).score_tuples(tuples)


def pooled_pvalue(statistic: float, n: int, params: WatermarkParams) -> tuple[float, float | None]:
    """(p-value, z or None) for a pooled statistic over ``n`` distinct tuples."""
    if params.scheme == "kgw":
        s = round(statistic)
        return binomial_tail(s, n, params.gamma), z_score(s, n, params.gamma)
    return gamma_tail(statistic, n), None


@dataclass(frozen=True)
class DetectionResult:
    """One text's test.

    ``n_tokens``: tokens in the text; ``n_scored``: tuples that entered the test (after
    dropping context-less tokens and, with dedup, repeats). KGW: ``n_green`` green tuples,
    ``statistic`` = green rate ``n_green / n_scored``, ``z`` its null z-score. Gumbel:
    ``score_sum`` = S = sum of ``-log(1 - r)``, ``statistic`` = S. ``p_value``: exact
    probability under H0 of a result at least this extreme.
    """

    scheme: str
    n_tokens: int
    n_scored: int
    statistic: float
    p_value: float
    z: float | None = None
    n_green: int | None = None
    score_sum: float | None = None
    n_duplicates: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def detect_text(
    token_ids: Sequence[int],
    key: WatermarkKey,
    params: WatermarkParams,
    *,
    prompt_ids: Sequence[int] | None = None,
    dedup: bool = True,
) -> DetectionResult:
    """Test one tokenised text for ``params``' watermark under ``key``.

    PotstillError when nothing can be scored (text no longer than k tokens without a
    prompt): a p-value computed on nothing would be meaningless.
    """
    return detect_segments([token_ids], key, params, prompt_ids=prompt_ids, dedup=dedup)


def detect_segments(
    segments: Sequence[Sequence[int]],
    key: WatermarkKey,
    params: WatermarkParams,
    *,
    prompt_ids: Sequence[int] | None = None,
    dedup: bool = True,
) -> DetectionResult:
    """:func:`detect_text` pooled over several token sequences (e.g. a chat's assistant turns)."""
    k = params.context_width
    tuples: list[ScoreTuple] = []
    for seg in segments:
        tuples += text_tuples(seg, k, prompt_ids or ())
    n_tokens = sum(len(s) for s in segments)
    n_all = len(tuples)
    if dedup:
        tuples = dedup_tuples(tuples)
    if not tuples:
        raise PotstillError(
            f"nothing to score: the text has {n_tokens} tokens and the first "
            f"{k} (context width) have no full context; give a longer text or its prompt"
        )
    stat = float(tuple_scores(tuples, key, params).sum())
    n = len(tuples)
    p, z = pooled_pvalue(stat, n, params)
    settings = {
        **params.to_dict(detection=True),
        "dedup": dedup,
        "prompt_prefix": prompt_ids is not None,
        "key_id": key.key_id,
    }
    kgw = params.scheme == "kgw"
    return DetectionResult(
        scheme=params.scheme,
        n_tokens=n_tokens,
        n_scored=n,
        statistic=stat / n if kgw else stat,
        p_value=p,
        z=z,
        n_green=round(stat) if kgw else None,
        score_sum=None if kgw else stat,
        n_duplicates=n_all - n,
        settings=settings,
    )


def detect_kgw(
    token_ids: Sequence[int],
    key: WatermarkKey,
    *,
    gamma: float = 0.25,
    context_width: int = 2,
    prompt_ids: Sequence[int] | None = None,
    dedup: bool = True,
) -> DetectionResult:
    """KGW test: exact binomial tail of the green count, z alongside."""
    params = WatermarkParams("kgw", gamma=gamma, context_width=context_width)
    return detect_text(token_ids, key, params, prompt_ids=prompt_ids, dedup=dedup)


def detect_gumbel(
    token_ids: Sequence[int],
    key: WatermarkKey,
    *,
    context_width: int = 2,
    prompt_ids: Sequence[int] | None = None,
    dedup: bool = True,
) -> DetectionResult:
    """Gumbel test: exact Gamma(n, 1) tail of the summed ``-log(1 - r)``."""
    params = WatermarkParams("gumbel", context_width=context_width)
    return detect_text(token_ids, key, params, prompt_ids=prompt_ids, dedup=dedup)
