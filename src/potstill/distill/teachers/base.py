"""The Teacher protocol: what the training loop asks of a teacher."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

__all__ = ["Teacher"]


@runtime_checkable
class Teacher(Protocol):
    """A frozen model that scores token sequences for distillation.

    ``vocab_size`` is the width of the returned logits, already cut to the vocab shared
    with the student (see :func:`shared_vocab_size`).
    """

    name: str
    tokenizer: PreTrainedTokenizerBase
    vocab_size: int

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits ``[B, T, vocab_size]`` (model dtype) for ``input_ids [B, T]``.

        No autograd graph is built; position ``t`` scores the token at ``t + 1``.
        """
        ...
