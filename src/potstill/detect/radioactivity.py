"""Radioactivity: did a suspect model learn from our watermarked outputs?

After Sander et al. 2024 ("Watermarking Makes Language Models Radioactive"). A model
fine-tuned on KGW-watermarked text learns to prefer the green tokens of the contexts it
saw; a clean model's choices do not depend on our key. Both modes reduce a corpus to
(context window, token) tuples and pool them into ONE exact test (binomial tail of the
green count for KGW, Gamma tail of ``sum -log(1 - r)`` for Gumbel; see
:mod:`potstill.core.watermark.detect`):

- open mode (:func:`radioactivity_open`): we can run the suspect. Teacher-force our
  watermarked texts through it; at each position the tuple is (the k previous *actual*
  text tokens, the suspect's top-1 prediction).
- closed mode (:func:`radioactivity_closed`): we only see the suspect's generations
  (e.g. from its API, :func:`collect_generations`); tuples are (k previous generated
  tokens, generated token), as in single-text detection.

What keeps the null honest (each step is counted in the result):

1. dedup: a repeated (window, token) tuple is the same key draw, not new evidence;
   pooled over a corpus, repeats are everywhere. Only distinct tuples are scored.
2. prompt-window exclusion: if the prompts themselves are watermarked, a clean suspect
   that continues or copies them reproduces green tokens. Tuples whose window occurs
   anywhere in the prompts are dropped.
3. copy exclusion (open mode): a clean model that can copy in context (induction)
   predicts, at a repeated window, the token that followed it earlier in the same
   text: a green token if the text is watermarked. A tuple whose (window, prediction)
   already occurred in that text as (window, actual next token) is dropped.
4. optional filter: keep only windows that occur in the owner's watermarked data (the
   contexts the suspect could have learned from), which raises power.

A p-value is never computed on nothing: zero tuples left is a PotstillError.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from potstill.core.errors import PotstillError
from potstill.core.watermark.detect import ScoreTuple, pooled_pvalue, text_tuples, tuple_scores
from potstill.core.watermark.params import WatermarkParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from potstill.core.openai_http import HTTPClient
    from potstill.core.watermark.keys import WatermarkKey

__all__ = [
    "RadioactivityResult",
    "collect_closed_tuples",
    "collect_generations",
    "collect_open_tuples",
    "radioactivity_closed",
    "radioactivity_open",
    "radioactivity_open_keys",
    "score_corpus",
    "windows_of",
]


class Verdicts:
    """Verdict and serialisation shared by the corpus-level results (``p_value`` field)."""

    p_value: float

    def flagged(self, alpha: float) -> bool:
        return self.p_value < alpha

    def verdict(self, alpha: float) -> str:
        """``"flagged: p=… < α=…"`` or ``"not flagged: p=… ≥ α=…"``."""
        if self.flagged(alpha):
            return f"flagged: p={self.p_value:.3g} < α={alpha:g}"
        return f"not flagged: p={self.p_value:.3g} ≥ α={alpha:g}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


@dataclass(frozen=True)
class CorpusTest(Verdicts):
    """What every corpus-level test reports: how its candidates became the scored set,
    its statistic and its p-value (the soft and the tuple tests add their own fields)."""

    mode: str
    scheme: str
    n_texts: int
    n_tokens: int
    n_candidates: int
    n_excluded_prompt: int
    n_excluded_copies: int
    n_filtered_out: int
    n_duplicates: int
    n_scored: int
    statistic: float
    p_value: float


@dataclass(frozen=True)
class RadioactivityResult(CorpusTest):
    """A corpus-level test. Counts trace every tuple from candidate to scored.

    ``n_candidates``: tuples with a full context; minus ``n_excluded_copies`` (open mode:
    the prediction copies an earlier continuation of the window), ``n_excluded_prompt``
    (window in the prompts), ``n_filtered_out`` (window not in the filter texts) and
    ``n_duplicates`` leaves ``n_scored``. KGW: ``n_green`` and ``statistic`` = green rate
    (``gamma`` under H0); Gumbel: ``score_sum`` and ``statistic`` = that sum (mean
    ``1`` per tuple under H0). ``settings`` holds every knob and the key id, never the key.
    """

    z: float | None = None
    n_green: int | None = None
    score_sum: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def windows_of(token_seqs: Iterable[Sequence[int]], k: int) -> set[tuple[int, ...]]:
    """Every contiguous k-gram of every sequence."""
    out: set[tuple[int, ...]] = set()
    for ids in token_seqs:
        seq = [int(t) for t in ids]
        out.update(tuple(seq[j : j + k]) for j in range(len(seq) - k + 1))
    return out


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def collect_closed_tuples(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, context_width: int
) -> tuple[list[ScoreTuple], int]:
    """(tuples, n_tokens) of the suspect's generated ``texts`` (first k tokens unscored)."""
    ids = _encode(tokenizer, texts)
    tuples = [t for seq in ids for t in text_tuples(seq, context_width)]
    return tuples, sum(len(s) for s in ids)


def collect_open_tuples(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    context_width: int,
    *,
    batch_size: int = 8,
    max_tokens: int = 512,
    exclude_copies: bool = True,
) -> tuple[list[ScoreTuple], int, int]:
    """(tuples, n_tokens, n_copies): teacher-force ``texts``, keep the model's top-1 guesses.

    For text ids ``x`` and position ``j >= k - 1``, the tuple is
    ``(x[j-k+1 .. j], argmax model(x[..j]))``; the prediction after the last token counts
    too (it needs no actual next token). Each text is cut to ``max_tokens`` tokens;
    ``batch_size`` texts run per forward pass (right padding + attention mask).
    ``model(input_ids [B, T], attention_mask [B, T]).logits`` is ``[B, T, V]``.
    ``exclude_copies``: drop (and count) a tuple that equals an earlier (window, actual
    next token) pair of the same text (see the module doc).
    """
    import torch

    k = context_width
    ids = [seq[:max_tokens] for seq in _encode(tokenizer, texts)]
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    device = params[0].device if params else torch.device("cpu")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tuples: list[ScoreTuple] = []
    n_copies = 0
    for start in range(0, len(ids), batch_size):
        chunk = [s for s in ids[start : start + batch_size] if s]
        if not chunk:
            continue
        width = max(len(s) for s in chunk)
        inp = torch.full((len(chunk), width), pad, dtype=torch.int64)
        mask = torch.zeros((len(chunk), width), dtype=torch.int64)
        for i, s in enumerate(chunk):
            inp[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        with torch.no_grad():
            logits = model(input_ids=inp.to(device), attention_mask=mask.to(device)).logits
        preds = logits.argmax(-1).cpu().tolist()  # [B, T]: guess for position t + 1
        for s, pred in zip(chunk, preds):
            seen: set[ScoreTuple] = set()  # (window, actual next token) so far in this text
            for j in range(k - 1, len(s)):
                window = tuple(s[j - k + 1 : j + 1])
                tup = (window, int(pred[j]))
                if exclude_copies and tup in seen:
                    n_copies += 1
                else:
                    tuples.append(tup)
                if j + 1 < len(s):
                    seen.add((window, s[j + 1]))
    return tuples, sum(len(s) for s in ids), n_copies


def score_corpus(
    tuples: Sequence[ScoreTuple],
    key: WatermarkKey,
    params: WatermarkParams,
    *,
    mode: str,
    n_texts: int,
    n_tokens: int,
    prompt_windows: set[tuple[int, ...]] | None = None,
    filter_windows: set[tuple[int, ...]] | None = None,
    dedup: bool = True,
    n_excluded_copies: int = 0,
    extra_settings: dict[str, Any] | None = None,
) -> RadioactivityResult:
    """Exclude, filter, dedup, then one exact pooled test over what is left.

    ``prompt_windows``: windows to exclude (None: no exclusion); ``filter_windows``:
    windows to keep (None: no filter); ``n_excluded_copies``: tuples the collector already
    dropped as copies (counted as candidates). PotstillError if no tuple is left.
    """
    n_cand = len(tuples) + n_excluded_copies
    kept = list(tuples)
    if prompt_windows is not None:
        kept = [t for t in kept if t[0] not in prompt_windows]
    n_excl = len(tuples) - len(kept)
    if filter_windows is not None:
        before = len(kept)
        kept = [t for t in kept if t[0] in filter_windows]
        n_filt = before - len(kept)
    else:
        n_filt = 0
    before = len(kept)
    if dedup:
        kept = list(dict.fromkeys(kept))
    n_dup = before - len(kept)
    if not kept:
        raise PotstillError(
            f"nothing to score in {mode} mode: {n_cand} candidate tuples from {n_texts} texts, "
            f"{n_excluded_copies} excluded as copies, {n_excl} as prompt windows, {n_filt} filtered out, {n_dup} duplicates; "
            "give more or longer texts (or drop --filter / --no-prompt-exclusion if you must)"
        )
    stat = float(tuple_scores(kept, key, params).sum())
    n = len(kept)
    p, z = pooled_pvalue(stat, n, params)
    kgw = params.scheme == "kgw"
    settings = {
        "mode": mode,
        **params.to_dict(detection=True),
        "dedup": dedup,
        "exclude_prompt_windows": prompt_windows is not None,
        "filter": filter_windows is not None,
        "key_id": key.key_id,
        **(extra_settings or {}),
    }
    return RadioactivityResult(
        mode=mode,
        scheme=params.scheme,
        n_texts=n_texts,
        n_tokens=n_tokens,
        n_candidates=n_cand,
        n_excluded_prompt=n_excl,
        n_excluded_copies=n_excluded_copies,
        n_filtered_out=n_filt,
        n_duplicates=n_dup,
        n_scored=n,
        statistic=stat / n if kgw else stat,
        p_value=p,
        z=z,
        n_green=round(stat) if kgw else None,
        score_sum=None if kgw else stat,
        settings=settings,
    )


def window_sets(
    tokenizer: PreTrainedTokenizerBase,
    k: int,
    prompts: Sequence[str] | None,
    filter_texts: Sequence[str] | None,
    exclude_prompt_windows: bool,
) -> tuple[set[tuple[int, ...]] | None, set[tuple[int, ...]] | None]:
    excl = None
    if prompts is not None and exclude_prompt_windows:
        excl = windows_of(_encode(tokenizer, prompts), k)
    filt = None
    if filter_texts is not None:
        filt = windows_of(_encode(tokenizer, filter_texts), k)
        if not filt:
            raise PotstillError(
                f"the filter texts hold no window of {k} tokens: give the watermarked data"
            )
    return excl, filt


def _check_texts(texts: Sequence[str], what: str) -> None:
    if not texts or not any(t.strip() for t in texts):
        raise PotstillError(f"{what} is empty: give at least one non-empty text")


def radioactivity_open(
    suspect_model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    key: WatermarkKey,
    params: WatermarkParams,
    *,
    prompts: Sequence[str] | None = None,
    filter_texts: Sequence[str] | None = None,
    dedup: bool = True,
    exclude_prompt_windows: bool = True,
    batch_size: int = 8,
    max_tokens: int = 512,
    exclude_copies: bool = True,
) -> RadioactivityResult:
    """Open-mode test: our watermarked ``texts`` teacher-forced through the suspect.

    ``tokenizer`` must be the suspect's AND the watermarking model's (same ids); check
    with :func:`potstill.core.tokenizers.check_tokenizers_agree` or compare fingerprints.
    """
    return radioactivity_open_keys(
        suspect_model,
        tokenizer,
        texts,
        [key],
        params,
        prompts=prompts,
        filter_texts=filter_texts,
        dedup=dedup,
        exclude_prompt_windows=exclude_prompt_windows,
        batch_size=batch_size,
        max_tokens=max_tokens,
        exclude_copies=exclude_copies,
    )[0]


def radioactivity_open_keys(
    suspect_model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    keys: Sequence[WatermarkKey],
    params: WatermarkParams,
    *,
    prompts: Sequence[str] | None = None,
    filter_texts: Sequence[str] | None = None,
    dedup: bool = True,
    exclude_prompt_windows: bool = True,
    batch_size: int = 8,
    max_tokens: int = 512,
    exclude_copies: bool = True,
) -> list[RadioactivityResult]:
    """:func:`radioactivity_open` under several keys, running the suspect only once."""
    _check_texts(texts, "the watermarked corpus")
    k = params.context_width
    excl, filt = window_sets(tokenizer, k, prompts, filter_texts, exclude_prompt_windows)
    tuples, n_tokens, n_copies = collect_open_tuples(
        suspect_model,
        tokenizer,
        texts,
        k,
        batch_size=batch_size,
        max_tokens=max_tokens,
        exclude_copies=exclude_copies,
    )
    extra = {
        "prompts_given": prompts is not None,
        "max_tokens": max_tokens,
        "exclude_copies": exclude_copies,
    }
    return [
        score_corpus(
            tuples,
            key,
            params,
            mode="open",
            n_texts=len(texts),
            n_tokens=n_tokens,
            prompt_windows=excl,
            filter_windows=filt,
            dedup=dedup,
            n_excluded_copies=n_copies,
            extra_settings=extra,
        )
        for key in keys
    ]


def radioactivity_closed(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    key: WatermarkKey,
    params: WatermarkParams,
    *,
    prompts: Sequence[str] | None = None,
    filter_texts: Sequence[str] | None = None,
    dedup: bool = True,
    exclude_prompt_windows: bool = True,
) -> RadioactivityResult:
    """Closed-mode test on the suspect's generations ``texts`` (answers to ``prompts``)."""
    _check_texts(texts, "the suspect's corpus")
    k = params.context_width
    excl, filt = window_sets(tokenizer, k, prompts, filter_texts, exclude_prompt_windows)
    tuples, n_tokens = collect_closed_tuples(texts, tokenizer, k)
    return score_corpus(
        tuples,
        key,
        params,
        mode="closed",
        n_texts=len(texts),
        n_tokens=n_tokens,
        prompt_windows=excl,
        filter_windows=filt,
        dedup=dedup,
        extra_settings={"prompts_given": prompts is not None},
    )


def collect_generations(
    base_url: str,
    prompts: Sequence[str],
    *,
    model: str = "default",
    max_tokens: int = 256,
    temperature: float = 1.0,
    api_key: str | None = None,
    timeout: float = 120.0,
    client: HTTPClient | None = None,
) -> list[str]:
    """The suspect's answers to ``prompts`` from an OpenAI-compatible chat endpoint.

    ``base_url``: e.g. ``http://host:8000`` or ``http://host:8000/v1``; one POST to
    ``/v1/chat/completions`` per prompt (a single user turn). ``client``: the
    :class:`~potstill.core.openai_http.HTTPClient` to use (default: a new
    :class:`~potstill.core.http.SyncClient`; tests pass a stand-in).
    """
    from potstill.core.openai_http import open_client, post_json, route_url

    url = route_url(base_url, "chat/completions")
    with open_client(client, timeout) as http:
        answers = [
            post_json(http, url, {"model": model, "max_tokens": max_tokens,
                                  "temperature": temperature,
                                  "messages": [{"role": "user", "content": prompt}]},
                      api_key=api_key, api="chat", who="suspect endpoint",
                      want="choices[0].message.content",
                      check=lambda d: str(d["choices"][0]["message"]["content"]))
            for prompt in prompts
        ]  # fmt: skip
    return [str(a["choices"][0]["message"]["content"]) for a in answers]
