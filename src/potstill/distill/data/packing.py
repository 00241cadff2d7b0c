"""Tokenize documents and cut them into fixed-length training blocks.

Two layouts:

* **packed** (:func:`pack_sequences`): all documents, each already ending in
  ``eos`` (:func:`tokenize_texts` appends it), are concatenated into one token
  stream and cut into ``[N, seq_len]`` blocks. No padding, so every position
  trains; a block may span a document boundary (the ``eos`` marks it). The last
  partial block is dropped (at most ``seq_len - 1`` tokens lost).
* **padded** (:func:`pad_sequences`): every document on its own, split into
  ``seq_len`` chunks, the last chunk right-padded; an ``attention_mask`` marks
  the real tokens.

Labels (:func:`make_labels`) are aligned with logits: ``labels[:, t]`` is the
token the model should predict *at* position ``t`` (i.e. ``input_ids[:, t+1]``),
so a loss compares ``logits[:, t]`` with ``labels[:, t]`` without shifting.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from potstill.core.errors import PotstillError

IGNORE_INDEX = -100


def tokenize_texts(
    texts: Sequence[str], tokenizer: Any, *, add_eos: bool = True
) -> list[list[int]]:
    """Token ids per document, no special tokens except one appended ``eos``.

    ``tokenizer`` is a (fast) Hugging Face tokenizer; the whole list is encoded in
    one batched call. Raises :class:`PotstillError` if ``add_eos`` and the
    tokenizer has no eos token.
    """
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise PotstillError(
            "the tokenizer has no eos token, needed to separate documents; set "
            "tokenizer.eos_token or pass add_eos=False"
        )
    if not texts:
        return []
    # verbose=False: whole plays exceed model_max_length; we cut blocks ourselves.
    enc = tokenizer(
        list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False
    )
    ids: list[list[int]] = [list(x) for x in enc["input_ids"]]
    if add_eos:
        for x in ids:
            x.append(int(eos))
    return ids


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise PotstillError(f"seq_len must be >= 2 (one input and one target), got {seq_len}")


def pack_sequences(token_lists: Sequence[Sequence[int]], seq_len: int) -> torch.Tensor:
    """Concatenate all documents and cut into blocks.

    Returns ``LongTensor[N, seq_len]`` with ``N = total_tokens // seq_len``; the
    trailing partial block is dropped. Documents are joined as given: use
    :func:`tokenize_texts` with ``add_eos=True`` so an ``eos`` separates them.
    Raises :class:`PotstillError` if there is not even one full block.
    """
    _check_seq_len(seq_len)
    total = sum(len(x) for x in token_lists)
    if total < seq_len:
        raise PotstillError(
            f"the data has {total} tokens, fewer than one block of seq_len={seq_len}; "
            "use a smaller --seq-len or more data"
        )
    flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=total)
    n_blocks = total // seq_len
    return torch.from_numpy(flat[: n_blocks * seq_len].reshape(n_blocks, seq_len).copy())


def pad_sequences(
    token_lists: Sequence[Sequence[int]], seq_len: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each document into ``seq_len`` chunks and right-pad the last one.

    Returns ``(input_ids, attention_mask)``, both ``LongTensor[N, seq_len]``;
    ``attention_mask`` is 1 on real tokens, 0 on padding. Chunks never mix
    documents. Chunks of a single token have no next-token target and are
    dropped (as are empty documents). Raises :class:`PotstillError` if nothing is left.
    """
    _check_seq_len(seq_len)
    chunks: list[Sequence[int]] = []
    for doc in token_lists:
        for start in range(0, len(doc), seq_len):
            chunk = doc[start : start + seq_len]
            if len(chunk) >= 2:
                chunks.append(chunk)
    if not chunks:
        raise PotstillError(
            "no document has at least 2 tokens, so there is nothing to train on; add longer documents"
        )
    input_ids = torch.full((len(chunks), seq_len), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(chunks), seq_len), dtype=torch.long)
    for i, chunk in enumerate(chunks):
        input_ids[i, : len(chunk)] = torch.as_tensor(list(chunk), dtype=torch.long)
        attention_mask[i, : len(chunk)] = 1
    return input_ids, attention_mask


def make_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Next-token targets aligned with logit positions.

    ``input_ids``: ``LongTensor[N, T]``. Returns ``labels[N, T]`` with
    ``labels[:, t] = input_ids[:, t+1]`` and ``labels[:, T-1] = ignore_index``.
    With an ``attention_mask``, position ``t`` is also ignored when its input or
    its target is padding (``mask[:, t] == 0`` or ``mask[:, t+1] == 0``), which
    covers both right and left padding.
    """
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        valid = torch.zeros_like(input_ids, dtype=torch.bool)
        valid[:, :-1] = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
        labels = labels.masked_fill(~valid, ignore_index)
    return labels


def _epoch_seed(seed: int, epoch: int) -> int:
    # Hash (seed, epoch) so neighbouring seeds/epochs give unrelated permutations.
    digest = hashlib.sha256(f"potstill-batches:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_blocks(ids: torch.Tensor, attention_mask: torch.Tensor | None, name: str) -> None:
    """ValueError unless ``ids`` is a 2-D LongTensor and the mask (if any) has its shape."""
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError(f"{name} must be a 2-D LongTensor, got {ids.dtype} {tuple(ids.shape)}")
    if attention_mask is not None and attention_mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != {name} shape {tuple(ids.shape)}"
        )


class BlockDataset:
    """Fixed-length blocks with seeded, resumable batching.

    ``input_ids``: ``LongTensor[N, T]``; ``attention_mask``: optional
    ``LongTensor[N, T]`` (1 = real token). Kept on CPU; batches are CPU tensors.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        check_blocks(input_ids, attention_mask, "input_ids")
        self.input_ids = input_ids.cpu().contiguous()
        self.attention_mask = (
            attention_mask.to(device="cpu", dtype=torch.long).contiguous()
            if attention_mask is not None
            else None
        )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def num_batches(self, batch_size: int) -> int:
        """Full batches per epoch: ``len(self) // batch_size`` (the remainder is dropped,
        so every step sees the same number of sequences; a different remainder is
        dropped each epoch because the order is reshuffled)."""
        if batch_size < 1:
            raise PotstillError(f"batch_size must be >= 1, got {batch_size}")
        return len(self) // batch_size

    def order(self, *, seed: int, epoch: int) -> torch.Tensor:
        """The block permutation of one epoch: ``LongTensor[N]``, a pure function of (seed, epoch)."""
        gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        return torch.randperm(len(self), generator=gen)

    def batches(
        self, *, batch_size: int, seed: int, epoch: int, start: int = 0
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield ``(batch_index, batch)`` for batch indices ``start .. num_batches-1``.

        ``batch`` has ``input_ids``, ``attention_mask`` (all ones when the dataset
        has none) and ``labels`` (:func:`make_labels`), each ``LongTensor[B, T]``.
        The order is a seeded shuffle per epoch, so resuming with ``start=k``
        yields exactly the batches ``k, k+1, ...`` of an uninterrupted run.
        """
        n = self.num_batches(batch_size)
        if n == 0:
            raise PotstillError(
                f"the dataset has {len(self)} blocks, fewer than batch_size={batch_size}; "
                "use a smaller --batch-size or more data"
            )
        if not 0 <= start <= n:
            raise ValueError(f"start must be in [0, {n}], got {start}")
        perm = self.order(seed=seed, epoch=epoch)
        for b in range(start, n):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            ids = self.input_ids[idx]
            mask = (
                self.attention_mask[idx]
                if self.attention_mask is not None
                else torch.ones_like(ids)
            )
            yield b, {"input_ids": ids, "attention_mask": mask, "labels": make_labels(ids, mask)}

    def fingerprint(self) -> str:
        """sha256 (hex) over the shape and int64 bytes of ``input_ids`` and of the
        mask if present: identical blocks in identical order <=> same fingerprint."""
        h = hashlib.sha256()
        h.update(f"blocks:{tuple(self.input_ids.shape)}".encode())
        h.update(self.input_ids.numpy().astype("<i8", copy=False).tobytes())
        if self.attention_mask is not None:
            h.update(b"mask")
            h.update(self.attention_mask.numpy().astype("<i8", copy=False).tobytes())
        return h.hexdigest()
