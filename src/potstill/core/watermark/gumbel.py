"""Aaronson's Gumbel-max sampling watermark, as a logits processor.

For a context of the previous k token ids, ``HMAC-SHA256(key, "gumbel" || ids)`` seeds
keyed uniforms ``r in (0, 1)^V`` (:func:`potstill.core.watermark.prf.uniform53`). The next
token is ``argmax_v r_v^(1/p_v)`` (= ``argmax log(r_v) / p_v``), where ``p`` is the
model's next-token distribution. Over a random key this is an exact sample from ``p``
(the Gumbel-max trick), yet it is a deterministic function of the context, and the
chosen token tends to have a large ``r``: detection sums ``-log(1 - r_token)``, which is
Exp(1) per token on text that does not depend on the key.

How a server must use it: compute the final distribution first (logits / temperature,
then any top-k/top-p masking), pass those logits through :class:`GumbelProcessor`, then
pick greedily (``argmax``). The processor returns ``-inf`` everywhere except the chosen
token (0), so any later greedy pick selects it; do NOT sample again afterwards. Rows with
fewer than k ids are returned unchanged (no full context): sample those as usual, or use
:meth:`GumbelProcessor.sample`, which does both. Because the choice is deterministic, a
repeated context repeats the continuation; the detectors deduplicate such repeats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from potstill.core.watermark.prf import SeedCache, uniform53

if TYPE_CHECKING:
    import torch

    from potstill.core.watermark.keys import WatermarkKey

__all__ = ["GUMBEL_DOMAIN", "GumbelProcessor"]

GUMBEL_DOMAIN = b"potstill/gumbel/v1"


class GumbelProcessor:
    """Keyed Gumbel-max sampler in logits-processor form (see the module doc for use).

    ``processor(input_ids [B, T] int64, scores [B, V] float) -> [B, V]``: ``-inf`` except
    0 at the keyed choice of each row with a full context.
    """

    def __init__(self, key: WatermarkKey, *, context_width: int = 2) -> None:
        from potstill.core.watermark.params import WatermarkParams

        WatermarkParams("gumbel", context_width=context_width)  # validates
        self.key_id = key.key_id
        self.context_width = context_width
        self._seeds = SeedCache(key, GUMBEL_DOMAIN)

    def __repr__(self) -> str:
        return f"GumbelProcessor(key={self.key_id}, context_width={self.context_width})"

    def _uniforms(
        self, contexts: Sequence[tuple[int, ...]], tokens: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        words = self._seeds.words(contexts, device)[:, :4]
        if tokens.dim() == 2:  # [1, V] against [N, 1, 4]
            words = words[:, None, :]
        return uniform53(tokens, words)

    def choose(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """int64 ``[B]``: ``argmax_v log(r_v) / p_v`` with ``p = softmax(scores)`` per row.

        Needs ``input_ids.shape[1] >= context_width``.
        """
        import torch

        k = self.context_width
        contexts = [tuple(row) for row in input_ids[:, -k:].tolist()]
        vocab = torch.arange(scores.shape[-1], dtype=torch.int64, device=scores.device)
        r = self._uniforms(contexts, vocab[None, :], scores.device)  # [B, V] float64
        p = torch.softmax(scores.to(torch.float64), dim=-1)
        # p = 0 gives log(r)/0 = -inf: tokens the model rules out are never chosen.
        return torch.argmax(torch.log(r) / p, dim=-1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        if input_ids.shape[-1] < self.context_width:
            return scores
        choice = self.choose(input_ids, scores)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice[:, None], 0.0)

    def sample(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Next ids ``[B]``: the keyed choice, or an ordinary sample without a full context."""
        import torch

        if input_ids.shape[-1] < self.context_width:
            probs = torch.softmax(scores.float(), dim=-1)
            return torch.multinomial(probs, 1, generator=generator)[:, 0]
        return self.choose(input_ids, scores)

    def uniforms(self, contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """float64 ``[N]``: the keyed ``r`` of ``tokens[i]`` after ``contexts[i]`` (``[N, k]``)."""
        self._check_context(contexts.shape[-1])
        rows = [tuple(r) for r in contexts.tolist()]
        return self._uniforms(rows, tokens.long(), tokens.device)

    def token_scores(self, contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """float64 ``[N]``: ``-log(1 - r)`` per token; Exp(1) under H0 (key-independent text)."""
        import torch

        return -torch.log1p(-self.uniforms(contexts, tokens))

    def score_tuples(self, tuples: Sequence[tuple[tuple[int, ...], int]]) -> torch.Tensor:
        """float64 ``[N]``: ``-log(1 - r)`` of each (context, token) tuple."""
        import torch

        if tuples and len(tuples[0][0]) != self.context_width:
            self._check_context(len(tuples[0][0]))
        tok = torch.tensor([t for _, t in tuples], dtype=torch.int64)
        return -torch.log1p(-self._uniforms([c for c, _ in tuples], tok, torch.device("cpu")))

    def _check_context(self, width: int) -> None:
        if width != self.context_width:
            raise ValueError(
                f"contexts have {width} tokens, the watermark uses {self.context_width}"
            )
