"""Pure pieces of the serving sampler: next-token choice, logprobs, stop strings, token text.

The sampler for a batch is ``logits [B, V] -> processors(rows, logits) -> temperature /
top-p -> sample``. A processor (:class:`LogitsProcessor`) is built once, at server start, and
called once per decode step with every row that uses it: ``rows`` (:class:`DecodeRows`: each
row's stable key, its context ids and temperature) and ``scores [B, V]`` fp32, returning new
``[B, V]`` scores. Seeing the whole batch lets a processor batch its own work (the
antidistillation proxies run one forward pass per step for all rows, not one per row).
Which logprobs are reported (raw or after the processors) is the engine's choice.

Padded vocabularies: checkpoints often have more logits than tokens (tiny models: 320
logits, 260 tokens). Rows past ``len(tokenizer)`` can never be decoded, so both sampling
and logprobs use only the first ``vocab_size`` logits (see :func:`potstill.core.tokenizers.real_vocab_size`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DecodeRows",
    "LogitsProcessor",
    "TokenText",
    "apply_processors",
    "find_stop",
    "sample_batch",
    "sample_token",
    "stop_holdback",
    "stop_token_ids",
    "top_logprobs",
]


@dataclass(frozen=True)
class DecodeRows:
    """The rows one processor call covers, in the order of the ``scores`` rows.

    ``keys``: a per-row id, stable for the row's whole life and never reused by the engine
    (processors that keep per-row state, like KV caches, key it on this). ``contexts``: the
    row's prompt + generated token ids. ``temperatures``: the row's sampling temperature.
    """

    keys: tuple[int, ...]
    contexts: tuple[Sequence[int], ...]
    temperatures: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, index: Sequence[int]) -> DecodeRows:
        """The rows ``index`` (in that order)."""
        return DecodeRows(
            tuple(self.keys[i] for i in index),
            tuple(self.contexts[i] for i in index),
            tuple(self.temperatures[i] for i in index),
        )

    def tails(self, k: int, rows: Sequence[int] | None = None) -> tuple[Tensor, list[int]]:
        """``(last k ids [b, k] int64, their row indices)`` over ``rows`` (default: all) that
        have at least ``k`` tokens of context."""
        import torch

        idx = [
            i for i in (range(len(self)) if rows is None else rows) if len(self.contexts[i]) >= k
        ]
        tails = [list(self.contexts[i][len(self.contexts[i]) - k :]) for i in idx]
        return torch.tensor(tails, dtype=torch.long).reshape(len(idx), k), idx

    @classmethod
    def one(cls, context: Sequence[int], temperature: float = 1.0, key: int = 0) -> DecodeRows:
        """A single row (tools and tests)."""
        return cls((key,), (list(context),), (float(temperature),))


class LogitsProcessor(Protocol):
    """Called once per decode step: ``(rows, scores [B, V] fp32) -> scores [B, V]``.

    Must not change ``scores`` in place (the engine may keep the unprocessed logits).
    """

    def __call__(self, rows: DecodeRows, scores: Tensor) -> Tensor: ...


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Token ids that end a sequence with finish_reason "stop": eos (tokenizer and
    generation config) and ``<|im_end|>`` when the vocab has it (ChatML models end turns
    with it)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    im_end = tokenizer.get_vocab().get("<|im_end|>")
    if im_end is not None:
        ids.add(int(im_end))
    return frozenset(ids)


def apply_processors(
    processors: Sequence[LogitsProcessor], rows: DecodeRows, scores: Tensor
) -> Tensor:
    """Run a processor chain in order; ``scores [B, V]`` fp32 in, ``[B, V]`` out."""
    for proc in processors:
        scores = proc(rows, scores)
    return scores


def sample_token(
    logits: Tensor, *, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """Draw one token id from ``logits [V]`` (fp32, CPU).

    Temperature 0 is greedy (argmax, the generator is not touched). Otherwise
    ``p = softmax(logits / T)``, cut to the smallest most-likely set with mass >= top_p,
    and sampled by inverting the CDF at ONE uniform draw from ``generator``: each step
    consumes exactly one number, so a seeded sequence's draws do not depend on anything
    else in the batch.
    """
    import torch

    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p >= 1.0:  # no nucleus cut: invert the CDF in vocab order, no sort needed
        cdf = torch.cumsum(probs, dim=-1)
        u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
        return int(torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[0] - 1))
    sorted_p, order = torch.sort(probs, descending=True, stable=True)
    cdf = torch.cumsum(sorted_p, dim=-1)
    # Keep token j while the mass BEFORE it is < top_p: the first token is always kept.
    keep = int(((cdf - sorted_p) < top_p).sum().clamp(min=1))
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[keep - 1]
    j = int(torch.searchsorted(cdf[:keep], u, right=True).clamp(max=keep - 1))
    return int(order[j])


def sample_batch(
    logits: Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    generators: Sequence[torch.Generator],
) -> list[int]:
    """One token per row of ``logits [B, V]`` (fp32, CPU); row ``i`` is drawn exactly as
    :func:`sample_token` would draw it with ``temperatures[i]``, ``top_ps[i]``,
    ``generators[i]``, but the common cases run as a few batched ops instead of ``B``
    separate ones (per-op overhead dominates on a busy CPU)."""
    import torch

    out = [0] * logits.shape[0]
    greedy = [i for i, t in enumerate(temperatures) if t == 0.0]
    plain = [i for i, t in enumerate(temperatures) if t > 0.0 and top_ps[i] >= 1.0]
    if greedy:
        for i, tok in zip(greedy, torch.argmax(logits[greedy], dim=-1).tolist()):
            out[i] = int(tok)
    if plain:
        temps = torch.tensor([temperatures[i] for i in plain], dtype=torch.float64)
        probs = torch.softmax(logits[plain].double() / temps[:, None], dim=-1)
        cdf = torch.cumsum(probs, dim=-1)
        u = torch.stack(
            [torch.rand((), generator=generators[i], dtype=torch.float64) for i in plain]
        )
        u = (u * cdf[:, -1])[:, None]
        idx = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[1] - 1)
        for i, tok in zip(plain, idx[:, 0].tolist()):
            out[i] = int(tok)
    for i in set(range(len(out))) - set(greedy) - set(plain):
        out[i] = sample_token(
            logits[i], temperature=temperatures[i], top_p=top_ps[i], generator=generators[i]
        )
    return out


def top_logprobs(logprobs: Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely (token id, logprob) of ``logprobs [V]``, best first."""
    import torch

    if k <= 0:
        return []
    vals, ids = torch.topk(logprobs, k=min(k, logprobs.shape[-1]))
    return [(int(i), float(v)) for i, v in zip(ids.tolist(), vals.tolist())]


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest occurrence of any stop string in ``text[start:]`` (absolute
    index into ``text``), or None."""
    best: int | None = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing chars of ``text`` must not be streamed yet.

    Two reasons to wait: a suffix that could be the start of a stop string (it may be cut),
    and trailing U+FFFD (an incomplete UTF-8 character that the next token may complete,
    which would change the decoded text).
    """
    hold = 0
    for s in stops:
        for m in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:m]):
                hold = max(hold, m)
                break
    n_bad = len(text) - len(text.rstrip("\ufffd"))
    return max(hold, n_bad)


class TokenText:
    """Bytes and OpenAI-style display strings of single tokens (cached per id).

    Display string: the token's UTF-8 text, or ``"bytes:\\xNN..."`` when its bytes are not
    valid UTF-8 on their own (part of a multi-byte character), as OpenAI writes them; that
    also keeps ``top_logprobs`` dict keys distinct.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        from potstill.core.tokenizers import _Pieces

        self._tok = tokenizer
        self._pieces = _Pieces(tokenizer)
        self._cache: dict[int, tuple[bytes, str]] = {}

    def _bytes(self, token_id: int) -> bytes:
        from potstill.core.tokenizers import token_bytes

        return token_bytes(self._tok, token_id, self._pieces)

    def get(self, token_id: int) -> tuple[bytes, str]:
        """(raw bytes, display string) of ``token_id``."""
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            try:
                shown = raw.decode("utf-8")
            except UnicodeDecodeError:
                shown = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = (raw, shown)
            self._cache[token_id] = hit
        return hit
