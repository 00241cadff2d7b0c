"""Batched forward passes of a local model over many short sequences of different lengths.

The provenance statistics score ~100 prompts on 4-5 models. One sequence per forward pass
leaves a CPU mostly idle (a 4x256 student's batch-1 pass is overhead-bound), and a fixed
batch in the caller's order pads short prompts to the longest one. Here sequences are sorted
by length and grouped under a padded-token budget, so each pass is full and pads little.

Right padding leaves every real token at positions ``0..len-1`` with the same causal context
as alone (it never attends to the padding after it, so no mask is needed, and the model keeps
its plain causal attention path): the results equal the one-at-a-time pass up to float
summation order (``tests/test_provenance.py`` checks both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["length_batches", "next_token_logprobs"]

T = TypeVar("T")


def length_batches(lengths: Sequence[int], *, max_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices into ``lengths``, grouped by similar length (ascending).

    Each group holds at most ``max_rows`` indices, and at most ``max_tokens`` tokens once
    padded to its longest member (a single longer sequence still gets a group of its own).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        # ascending order: the newcomer is the longest, so the group pads to its length
        if g is not None and len(g) < max_rows and (len(g) + 1) * lengths[i] <= max_tokens:
            g.append(i)
        else:
            groups.append([i])
    return groups


def next_token_logprobs(
    model: Any,
    seqs: Sequence[list[int]],
    reduce: Callable[[int, Any], T],
    *,
    width: int,
    max_tokens: int = 2048,
    normalise: bool = True,
) -> list[T]:
    """``[reduce(i, lp_i) for i, seq]`` where ``lp_i [len_i, width]`` (fp32, CPU) is the
    log-softmax of the model's next-token logits over its first ``width`` entries (the ids a
    tokenizer names; padding rows of a head are dropped).

    ``reduce`` sees each sequence's log-probs once, so a caller keeps a number, not a
    ``[T, V]`` tensor per sequence. ``max_tokens`` bounds one pass's padded tokens, so memory
    is ~``max_tokens * width * 8`` bytes whatever the number of sequences. ``normalise=False``
    hands over the raw fp32 logits instead (enough for an argmax, and a pass over ``[T, V]``
    cheaper).
    """
    import torch

    device = next(model.parameters()).device
    out: dict[int, T] = {}
    for group in length_batches([len(s) for s in seqs], max_tokens=max_tokens, max_rows=64):
        longest = max(len(seqs[i]) for i in group)
        ids = torch.zeros((len(group), longest), dtype=torch.int64)
        for row, i in enumerate(group):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.int64)
        with torch.no_grad():  # right padding: causal attention never reaches it (module doc)
            logits = model(input_ids=ids.to(device)).logits
            lp = logits[:, :, :width].float()
            lp = (torch.log_softmax(lp, dim=-1) if normalise else lp).cpu()
        for row, i in enumerate(group):
            out[i] = reduce(i, lp[row, : len(seqs[i])])
    return [out[i] for i in range(len(seqs))]
