"""A minimal sampling loop with a logits processor (tests, demos, benchmarks).

The server has its own decoding; this loop exists so watermarked text can be made
in-process from any causal LM without transformers' ``generate`` configuration.
Order per step: logits / temperature, then ``allowed_ids`` masking, then the
processor, then a multinomial draw (a :class:`~potstill.core.watermark.GumbelProcessor`
leaves one finite logit, so the draw is its keyed choice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["generate_ids"]


def generate_ids(
    model: Any,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    allowed_ids: Sequence[int] | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """New token ids ``[B, max_new_tokens]`` after ``prompt_ids [B, T]`` (no padding, T >= 1).

    ``model``: a causal LM returning ``.logits [B, t, V]`` and its KV cache (``.cache``
    in transformers 5, ``.past_key_values`` before; without one, each step re-reads all ids). ``allowed_ids``: if given,
    every other id gets probability 0 (e.g. printable bytes, so text round-trips).
    """
    import torch

    from potstill.core.kvcache import cache_kw, cache_of

    kw = cache_kw(model)
    ids = prompt_ids.long()
    past: Any = None
    keep: torch.Tensor | None = None
    new: list[torch.Tensor] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if past is None:
                out = model(input_ids=ids, use_cache=True)
            else:
                out = model(input_ids=ids[:, -1:], use_cache=True, **{kw: past})
            past = cache_of(out)
            logits = out.logits[:, -1, :].float() / temperature
            if allowed_ids is not None:
                if keep is None:
                    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                    keep[torch.as_tensor(list(allowed_ids), device=logits.device)] = True
                logits = logits.masked_fill(~keep, float("-inf"))
            if processor is not None:
                logits = processor(ids, logits)
            if greedy:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            new.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return torch.stack(new, dim=1) if new else ids[:, :0]
