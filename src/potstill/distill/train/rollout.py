"""Student rollouts for on-policy distillation: sample completions, then pack them for scoring.

:func:`sample_completions` is a plain KV-cached sampling loop over a left-padded batch. It is
written here rather than borrowed from ``model.generate`` for two reasons:

* **Reproducibility.** Every draw comes from one :class:`torch.Generator` that the caller seeds
  from ``(train.seed, micro-batch index, rank)``, so a resumed run samples exactly the
  completions the uninterrupted run did (``generate`` draws from the global RNG).
* **No gradient, no state.** It runs under ``torch.no_grad`` in eval mode and restores the
  model's training flag; nothing it does reaches the optimiser.

:func:`pack_rollouts` turns prompts and completions into the recipe's batch layout: right-padded
``input_ids``/``attention_mask`` ``[B, T]`` and ``labels`` aligned with logit positions
(``labels[:, t] = input_ids[:, t + 1]`` on completion tokens only, ``-100`` elsewhere), so the
same loss code scores on-policy and off-policy batches. Right padding keeps every sequence's
positions at ``0..len-1``, as the teacher saw such text in training.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from potstill.core.kvcache import cache_kw, cache_of

__all__ = ["pack_rollouts", "sample_completions"]


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _draw(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    """One token per row of ``logits [B, V]``: argmax at temperature 0, else a sample."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    # Inverse-CDF sampling, one uniform per row: torch.multinomial costs ~11 ms per call on a
    # [8, 49152] CPU batch (a third of a decode step), a float64 cumsum + searchsorted ~1 ms.
    cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(dim=-1)
    u = torch.rand((logits.shape[0], 1), generator=generator, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u.to(cdf.device)).squeeze(-1).clamp(max=logits.shape[-1] - 1)


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    stop_ids: frozenset[int],
    pad_id: int,
    generator: torch.Generator,
    vocab: int | None = None,
) -> list[list[int]]:
    """Sample one completion per prompt from ``model`` (a causal LM returning ``.logits``).

    Args:
        prompts: token ids per prompt (non-empty), any lengths.
        max_new_tokens: tokens sampled at most per completion.
        temperature: 0 for greedy, else the softmax temperature.
        stop_ids: a completion ends after one of these (it is kept, as the teacher scores it).
        pad_id: id placed in padding (never attended to).
        generator: the only source of randomness.
        vocab: sample only ids below this (the tokenizer's real size; padded logit rows of a
            padded vocabulary are never drawn). Default: all logits.
    Returns:
        The sampled ids per prompt, ``1..max_new_tokens`` long each.
    """
    was_training = model.training
    model.eval()
    try:
        table = _sample(
            model, prompts, max_new_tokens, temperature, stop_ids, pad_id, generator, vocab
        )
    finally:
        model.train(was_training)
    return [_until_stop(row, stop_ids) for row in table]


def _sample(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
    stop_ids: frozenset[int], pad_id: int, generator: torch.Generator, vocab: int | None,
) -> list[list[int]]:  # fmt: skip
    ids, mask = _left_pad(prompts, pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # Prompts of one length need no mask: transformers then takes its plain causal path instead
    # of building a padded mask on every decode step (the loop is overhead-bound on a CPU).
    padded = bool((mask == 0).any())
    # Only the last position's logits are needed: [B, T, V] would be most of the prefill.
    params = inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    out = model(input_ids=ids, attention_mask=mask if padded else None, position_ids=positions,
                use_cache=True, **keep)  # fmt: skip
    kw, cache = cache_kw(model), cache_of(out)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    last_pos = positions[:, -1:]
    samples: list[Tensor] = []
    logits = out.logits[:, -1, :vocab]
    for _ in range(max_new_tokens):
        tok = _draw(logits, temperature, generator).cpu()
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        samples.append(tok)
        done |= torch.isin(tok, stops)
        if bool(done.all()):
            break
        # A finished row keeps decoding padding; its tokens are dropped, so its mask stays 1.
        if padded:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        last_pos = last_pos + 1
        out = model(input_ids=tok.unsqueeze(-1).to(device), attention_mask=mask if padded else None,
                    position_ids=last_pos, use_cache=True, **{kw: cache})  # fmt: skip
        cache, logits = cache_of(out), out.logits[:, -1, :vocab]
    return torch.stack(samples, dim=1).tolist()


def _until_stop(row: list[int], stop_ids: frozenset[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[: i + 1]
    return row


def pack_rollouts(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    width: int | None = None,
) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ``[B, T]``.

    ``labels[b, t] = input_ids[b, t + 1]`` where token ``t + 1`` is a completion token, else
    ``-100``: the loss scores exactly the sampled tokens. ``width`` (default: the longest
    prompt + completion) pads every batch of a run to one shape.
    """
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths) if width is None else width
    if max(lengths) > width:
        raise ValueError(f"a rollout of {max(lengths)} tokens does not fit width {width}")
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        row = torch.tensor([*p, *c], dtype=torch.long)
        ids[b, : len(row)] = row
        mask[b, : len(row)] = 1
        labels[b, len(p) - 1 : len(row) - 1] = row[len(p) :]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
