"""KGW green/red-list watermark (Kirchenbauer et al. 2023) as a logits processor.

For a context of the previous k token ids, ``HMAC-SHA256(key, "kgw" || ids)`` seeds a
keyed hash of every token id (:mod:`potstill.core.watermark.prf`); token ``v`` is *green*
iff ``hash(seed, v) < gamma * 2^32``. So each token is green with probability gamma
independently of the others (a Bernoulli list rather than an exact-size permutation:
this is what makes the detector's binomial null exact under a random key), and the
list for a whole vocab is ~12 vectorised int64 ops. Generation adds ``delta`` to the
logits of green tokens.

A row whose ``input_ids`` are shorter than k tokens has no full context: it is left
unwatermarked, and the detectors never score such positions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from potstill.core.watermark.prf import SeedCache, hash32, hash32_below

if TYPE_CHECKING:
    import torch

    from potstill.core.watermark.keys import WatermarkKey

__all__ = ["KGW_DOMAIN", "KGWProcessor"]

KGW_DOMAIN = b"potstill/kgw/v1"
# Green lists kept per processor (bool, one byte per vocabulary entry): 64 MiB holds ~1,300
# lists of SmolLM2's 49,152 tokens, ~250 of Gemma's 262,144.
GREEN_CACHE_BYTES = 64 * 2**20


class KGWProcessor:
    """Adds ``delta`` to green-token logits; also the green-list oracle for scoring.

    Same call interface as transformers' ``LogitsProcessor``:
    ``processor(input_ids [B, T] int64, scores [B, V] float) -> [B, V]`` (a new tensor).
    The green list depends on the last ``context_width`` ids of each row and the key.
    """

    def __init__(
        self, key: WatermarkKey, *, gamma: float = 0.25, delta: float = 2.0, context_width: int = 2
    ) -> None:
        from potstill.core.watermark.params import WatermarkParams

        # Validates the knobs (PotstillError on bad values).
        WatermarkParams("kgw", gamma=gamma, delta=delta, context_width=context_width)
        self.key_id = key.key_id
        self.gamma = gamma
        self.delta = delta
        self.context_width = context_width
        self._threshold = round(gamma * 2**32)  # green iff hash < threshold: P = gamma ± 2^-32
        self._seeds = SeedCache(key, KGW_DOMAIN)
        self._lists: OrderedDict[tuple[tuple[int, ...], int, str], torch.Tensor] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"KGWProcessor(key={self.key_id}, gamma={self.gamma}, delta={self.delta}, "
            f"context_width={self.context_width})"
        )

    def _green(
        self, contexts: Sequence[tuple[int, ...]], tokens: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """Bool: ``tokens`` ([N] or [1, V]) green under each of the N ``contexts``."""
        words = self._seeds.words(contexts, device)
        w0, w1 = words[:, 0], words[:, 1]
        if tokens.dim() == 2:  # whole lists: [1, V] against [N, 1]
            return hash32_below(tokens, w0[:, None], w1[:, None], self._threshold)
        return hash32(tokens, w0, w1) < self._threshold

    def vocab_mask(self, context: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
        """Bool ``[B, vocab_size]``: the green lists of B contexts (each k token ids)."""
        import torch

        ctx = [tuple(int(t) for t in c) for c in context]
        return self._green(
            ctx, torch.arange(vocab_size, dtype=torch.int64)[None, :], torch.device("cpu")
        )

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Logits ``scores [B, V]`` plus ``delta`` on each row's green tokens."""
        if input_ids.shape[-1] < self.context_width:  # no full context: left unwatermarked
            return scores
        return self.bias_(input_ids, scores.clone())

    def bias_(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """:meth:`__call__` in place on ``scores [B, V]`` (returned): the same bits, with no
        ``[B, V]`` temporaries (an engine's decode step pays for every full-batch copy)."""
        k = self.context_width
        if input_ids.shape[-1] < k:
            return scores
        contexts = [tuple(row) for row in input_ids[:, -k:].tolist()]
        for row, green in zip(scores, self._green_rows(contexts, scores.shape[-1], scores.device)):
            row.add_(green, alpha=self.delta)  # + delta * 1.0 on green, + 0.0 elsewhere
        return scores

    def is_green(self, context_ids: tuple[int, ...], token: int) -> bool:
        """Whether ``token`` is green after the k token ids ``context_ids``."""
        import torch

        self._check_context(len(context_ids))
        return bool(self._green([tuple(context_ids)], torch.tensor([token]), torch.device("cpu")))

    def green_mask(self, contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Bool ``[N]``: ``tokens[i]`` green after ``contexts[i]`` (``contexts``: int ``[N, k]``)."""
        self._check_context(contexts.shape[-1])
        rows = [tuple(r) for r in contexts.tolist()]
        return self._green(rows, tokens.long(), tokens.device)

    def score_tuples(self, tuples: Sequence[tuple[tuple[int, ...], int]]) -> torch.Tensor:
        """float64 ``[N]``: 1.0 where the (context, token) tuple is green, else 0.0."""
        import torch

        if tuples and len(tuples[0][0]) != self.context_width:
            self._check_context(len(tuples[0][0]))
        tok = torch.tensor([t for _, t in tuples], dtype=torch.int64)
        green = self._green([c for c, _ in tuples], tok, torch.device("cpu"))
        return green.to(torch.float64)

    def _check_context(self, width: int) -> None:
        if width != self.context_width:
            raise ValueError(
                f"contexts have {width} tokens, the watermark uses {self.context_width}"
            )

    def _green_rows(
        self, contexts: list[tuple[int, ...]], vocab_size: int, device: torch.device
    ) -> list[torch.Tensor]:
        """Bool ``[vocab_size]`` green lists, one per context; each distinct context's is
        computed once and kept (least recently used first out, within ``GREEN_CACHE_BYTES``).

        A list is a pure function of (key, context), so a kept one is exact. It pays because
        contexts repeat: with width 1 the context is the previous token, shared across the rows
        and steps of a batch; hashing the vocabulary for every row took ~30 ms of each 48-row
        decoding step in a profiled demo harvest.
        """
        import torch

        tag = str(device)
        new = [c for c in dict.fromkeys(contexts) if (c, vocab_size, tag) not in self._lists]
        if new:
            vocab = torch.arange(vocab_size, dtype=torch.int64, device=device)[None, :]
            for c, row in zip(new, self._green(new, vocab, device)):
                self._lists[(c, vocab_size, tag)] = row.clone()
        out = [self._lists[(c, vocab_size, tag)] for c in contexts]
        for c in contexts:
            self._lists.move_to_end((c, vocab_size, tag))
        while len(self._lists) > max(1, GREEN_CACHE_BYTES // vocab_size):
            self._lists.popitem(last=False)
        return out
