"""On-policy micro-batches (GKD, Agarwal et al. 2024): the student's own samples, scored by the
teacher.

Which micro-batches are on-policy, and what the student samples in them, are pure functions of
``(train.seed, global micro-batch index, rank)`` and the student's weights at that step:

* micro-batch ``g`` is on-policy iff ``u(g) < lmbda``, ``u(g)`` a uniform draw from a generator
  seeded by ``(seed, g)`` (every rank agrees); ``lmbda = 0`` draws nothing, so such a run is
  the off-policy recipe bit for bit, and ``lmbda = 1`` makes every micro-batch on-policy;
* its prompts are micro-batch ``g``'s data rows (``prompts=data``) or the ``g``-th slice of a
  seeded permutation of the prompt set, and its samples come from a generator seeded by
  ``(seed, g, rank)``.

So a resumed run replays the exact rollouts of an uninterrupted one. An on-policy micro-batch
still *consumes* data micro-batch ``g``, which keeps the data position one integer.

No gradient flows through sampling: the completions are token ids, and the loss
(:func:`potstill.distill.train.recipe.micro_loss`) is the usual divergence on the sampled
positions. With ``loss.kind=generalized_jsd`` and ``beta=1`` this is GKD's on-policy reverse KL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from potstill.core.errors import PotstillError
from potstill.core.specs import DataPrompts, DefaultPrompts, HarvestPrompts, PromptSource
from potstill.distill.config import OnPolicyConfig
from potstill.distill.train.rollout import pack_rollouts, sample_completions

__all__ = ["Rollouts", "load_prompts", "make_rollouts"]


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:  # FNV-1a over the parts: distinct tuples give unrelated seeds
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) % 2**63
    return h


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n".join(m["content"] for m in messages)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_prompts(source: PromptSource, tokenizer: Any) -> list[list[int]] | None:
    """Token ids of every rollout prompt; None for ``data`` (prompts come with each batch)."""
    if isinstance(source, DataPrompts):
        return None
    if isinstance(source, HarvestPrompts):
        from potstill.core.messages import store_examples

        convs = [ex["messages"] for ex in store_examples(source.path)]
        chats = [c[: max(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in convs
                 if any(m["role"] == "assistant" for m in c)]  # fmt: skip
    else:
        from potstill.core.prompts import read_prompts

        chats = read_prompts("default" if isinstance(source, DefaultPrompts) else source.path)
    prompts = [ids for ids in (_render(tokenizer, c) for c in chats if c) if ids]
    if not prompts:
        raise PotstillError(f"loss.on_policy.prompts={str(source)!r} holds no prompts")
    return prompts


@dataclass
class Rollouts:
    """Builds on-policy micro-batches (module docstring)."""

    cfg: OnPolicyConfig
    prompts: list[list[int]] | None  # None: cut from each data micro-batch
    seq_len: int
    seed: int
    micro_batch_size: int
    world_size: int
    pad_id: int
    stop_ids: frozenset[int]
    vocab: int
    _order: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def on_policy(self, g: int) -> bool:
        """Whether global micro-batch ``g`` is on-policy (the same on every rank)."""
        lmbda = self.cfg.lmbda
        if lmbda <= 0.0:
            return False
        if lmbda >= 1.0:
            return True
        u = torch.rand((), generator=torch.Generator().manual_seed(_seed(self.seed, g)))
        return bool(u < lmbda)

    def _prompts_for(self, g: int, rank: int, data_batch: dict[str, Tensor]) -> list[list[int]]:
        room = self.seq_len - self.cfg.max_new_tokens
        if self.prompts is None:
            out = []
            for ids, mask, labels in zip(data_batch["input_ids"], data_batch["attention_mask"],
                                         data_batch["labels"], strict=True):  # fmt: skip
                valid = (labels != -100).nonzero().flatten()
                first = int(valid[0]) if len(valid) else int(mask.sum()) - 1
                # Text is scored from its first token: take a fixed prefix as the prompt.
                cut = self.cfg.prompt_tokens if first == 0 else first + 1
                # Too long for the room left: keep the end (the question, the answer header).
                out.append(ids[: max(1, min(cut, int(mask.sum())))][-room:].tolist())
            return out
        per_epoch = max(1, len(self.prompts) // (self.micro_batch_size * self.world_size))
        epoch, i = divmod(g, per_epoch)
        if epoch not in self._order:
            gen = torch.Generator().manual_seed(_seed(self.seed, 7, epoch))
            self._order = {epoch: torch.randperm(len(self.prompts), generator=gen)}
        size = self.micro_batch_size * self.world_size
        # A prompt set smaller than one global micro-batch wraps around.
        order = self._order[epoch].repeat(-(-size // len(self.prompts)) + 1)
        idx = order[i * size : (i + 1) * size][rank :: self.world_size]
        return [self.prompts[int(j)][-room:] for j in idx]  # keep the end: the question

    def batch(
        self, student: Any, g: int, rank: int, data_batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Micro-batch ``g``'s rollouts for ``rank``, sampled from ``student`` (a causal LM),
        packed as the recipe's batch (:func:`~potstill.distill.train.rollout.pack_rollouts`)."""
        prompts = self._prompts_for(g, rank, data_batch)
        gen = torch.Generator().manual_seed(_seed(self.seed, g, rank, 1))
        completions = sample_completions(
            student, prompts, max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature, stop_ids=self.stop_ids, pad_id=self.pad_id,
            generator=gen, vocab=self.vocab,
        )  # fmt: skip
        return pack_rollouts(prompts, completions, pad_id=self.pad_id)  # padded to the batch max


def make_rollouts(
    cfg: OnPolicyConfig, tokenizer: Any, *, seq_len: int, seed: int, micro_batch_size: int,
    world_size: int,
) -> Rollouts:  # fmt: skip
    """The run's :class:`Rollouts`; prompts are read and tokenized once, here."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = {int(t) for t in (tokenizer.eos_token_id,) if t is not None}
    end = (
        tokenizer.convert_tokens_to_ids("<|im_end|>")
        if "<|im_end|>" in tokenizer.get_vocab()
        else None
    )
    if end is not None:
        stops.add(int(end))  # ChatML's end of turn ends an answer
    return Rollouts(
        cfg, load_prompts(cfg.prompts, tokenizer), seq_len, seed, micro_batch_size, world_size,
        int(pad if pad is not None else 0), frozenset(stops), len(tokenizer),
    )  # fmt: skip
