"""Training data for the recipe: token blocks and a resumable, rank-aware order.

The order is a pure function of ``(seed, epoch)``; micro-batch ``g`` (counted
globally from the start of the run) is rows ``[i*G, (i+1)*G)`` of epoch
``g // batches_per_epoch``'s permutation, where ``G = micro_batch * world`` and
``i = g % batches_per_epoch``; process ``r`` takes every ``world``-th of them.
So the data position is one integer, and a resumed run sees exactly the
batches the uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from potstill.core.errors import PotstillError
from potstill.core.specs import CachedTeacher, ChatSource
from potstill.distill.config import DistillConfig


class SparseTargets(Protocol):
    """Per-sequence top-k teacher targets (a logit cache, harvested logprobs)."""

    def lookup(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """rows [b] (indices into the training blocks) -> (ids [b,T,K] long, logprobs [b,T,K] float).

        Slots with id -1 are empty (fewer than K entries known at that position).
        """
        ...


@dataclass
class TrainData:
    blocks: Tensor  # [N, T] long
    mask: Tensor  # [N, T] long (all ones when packed)
    labels: Tensor  # [N, T] long, next-token targets aligned with logits, -100 = ignore
    micro_batch_size: int
    world_size: int
    seed: int
    eval_blocks: Tensor | None = None
    eval_mask: Tensor | None = None
    fingerprint: str = ""
    targets: SparseTargets | None = None
    _perm_cache: dict[int, Tensor] = field(default_factory=dict, repr=False)

    @property
    def n_train(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def batches_per_epoch(self) -> int:
        return self.n_train // (self.micro_batch_size * self.world_size)

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(self.n_train, generator=g)}
        return self._perm_cache[epoch]

    def micro_batch(self, g: int, rank: int) -> dict[str, Tensor]:
        """Global micro-batch ``g``'s share for process ``rank``."""
        epoch, i = divmod(g, self.batches_per_epoch)
        size = self.micro_batch_size * self.world_size
        rows = self._perm(epoch)[i * size : (i + 1) * size][rank :: self.world_size]
        batch = {
            "input_ids": self.blocks[rows],
            "attention_mask": self.mask[rows],
            "labels": self.labels[rows],
            "rows": rows,
        }
        if self.targets is not None:
            batch["topk_ids"], batch["topk_logprobs"] = self.targets.lookup(rows)
        return _trim_padding(batch)


def _trim_padding(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the trailing columns no row of the micro-batch uses (right-padded conversations).

    Exact: a causal model never attends to later positions, and the dropped columns carry
    only ``-100`` labels. A conversation batch then costs its longest row, not ``seq_len``
    (the demo's thief: ~176 of 256 columns for rows of 122 tokens on average). Packed blocks
    have no padding and keep their shape.
    """
    used = batch["attention_mask"].any(dim=0)
    width = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    if width == used.shape[0]:
        return batch
    return {k: v if k == "rows" else v[:, :width] for k, v in batch.items()}


def _blocks(texts: list[str], tokenizer: Any, seq_len: int, packing: bool) -> tuple[Tensor, Tensor]:
    from potstill.distill.data import pack_sequences, pad_sequences, tokenize_texts

    tokens = tokenize_texts(texts, tokenizer)
    if packing:
        blocks = pack_sequences(tokens, seq_len)
        return blocks, torch.ones_like(blocks)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    return pad_sequences(tokens, seq_len, pad_id)


def prepare_data(cfg: DistillConfig, tokenizer: Any, *, world_size: int) -> TrainData:
    """Load, tokenize and block the train and eval data; check there is enough.

    ``data.train`` is a text source (potstill.distill.data.load_texts), or harvested
    conversations (``harvest:STORE.sqlite`` or ``messages:FILE.jsonl|.parquet``),
    whose labels are masked to assistant tokens and which may carry the API's
    top-k logprobs as sparse targets. ``teacher.spec=cache:DIR`` attaches a
    logit cache's top-k targets instead.
    """
    from potstill.distill.data import BlockDataset, load_texts, make_labels

    dc = cfg.data
    targets: SparseTargets | None = None
    if isinstance(dc.train, ChatSource):
        from potstill.distill.data.chat import load_chat_data

        chat = load_chat_data(
            dc.train, tokenizer, seq_len=dc.seq_len, with_logprobs=cfg.loss.ce_weight < 1.0
        )
        blocks, mask, labels, targets = chat.blocks, chat.mask, chat.labels, chat.targets
    else:
        blocks, mask = _blocks(load_texts(dc.train), tokenizer, dc.seq_len, dc.packing)
        labels = make_labels(blocks, mask)
    need = cfg.train.micro_batch_size * world_size
    if blocks.shape[0] < need:
        raise PotstillError(
            f"data.train {str(dc.train)!r} gives {blocks.shape[0]} sequences of {dc.seq_len} tokens, fewer than "
            f"one global micro-batch ({need}); add text, or lower data.seq_len / train.micro_batch_size"
        )
    fp = BlockDataset(blocks, mask).fingerprint()
    data = TrainData(
        blocks,
        mask,
        labels,
        cfg.train.micro_batch_size,
        world_size,
        cfg.train.seed,
        fingerprint=fp,
        targets=targets,
    )
    if isinstance(cfg.teacher.spec, CachedTeacher):
        from potstill.distill.teachers.cache import open_cache_targets

        data.targets = open_cache_targets(
            cfg.teacher.spec.path,
            fingerprint=fp,
            tokenizer=tokenizer,
            seq_len=dc.seq_len,
        )
    if dc.eval is not None:
        eblocks, emask = _blocks(load_texts(dc.eval), tokenizer, dc.seq_len, dc.packing)
        data.eval_blocks, data.eval_mask = eblocks[: dc.eval_blocks], emask[: dc.eval_blocks]
    return data
