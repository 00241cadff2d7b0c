"""A teacher with its own tokenizer: it reads the student's sequences as text and scores the
byte-aligned positions (:mod:`potstill.distill.data.align`).

:meth:`CrossTokenizerTeacher.score` turns each student sequence back into bytes, tokenizes them
with the teacher's tokenizer, runs the teacher, and returns its final hidden states at the
positions that pair with a scored student position, plus the output head; the loss projects
them to teacher logits chunk by chunk, so ``[B, T, V_t]`` (262,144 wide for Gemma 3) never
exists at once. :func:`shared_vocab` is the token map the loss's exact part uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from potstill.core.errors import PotstillError
from potstill.core.tokenizers import vocab_bytes
from potstill.distill.data.align import retokenize

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["CrossScored", "CrossTokenizerTeacher", "shared_vocab"]


def _canonical(tok: Any, table: list[bytes | None]) -> dict[bytes, int]:
    """bytes -> the one id that spells them; among ids with equal bytes (a byte-fallback piece
    and a normal piece, say) the one the tokenizer itself produces for those bytes."""
    groups: dict[bytes, list[int]] = {}
    for i, b in enumerate(table):
        if b:
            groups.setdefault(b, []).append(i)
    out: dict[bytes, int] = {}
    for b, ids in groups.items():
        if len(ids) > 1:
            try:
                enc = list(tok(b.decode("utf-8"), add_special_tokens=False)["input_ids"])
            except UnicodeDecodeError:
                enc = []
            ids = [enc[0]] if len(enc) == 1 and enc[0] in ids else ids
        out[b] = ids[0]
    return out


def shared_vocab(teacher_tok: Any, student_tok: Any) -> tuple[list[int], list[int]]:
    """``(teacher ids, student ids)`` of the tokens both vocabularies hold, one to one: equal
    bytes for text tokens, an equal name for special tokens. Identical tokenizers give every id."""
    t_table, s_table = vocab_bytes(teacher_tok), vocab_bytes(student_tok)
    t_map, s_map = _canonical(teacher_tok, t_table), _canonical(student_tok, s_table)
    pairs = [(t_map[b], s_map[b]) for b in t_map if b in s_map]
    t_special = {
        teacher_tok.convert_ids_to_tokens(i): i for i, b in enumerate(t_table) if b is None
    }
    for i, b in enumerate(s_table):
        name = student_tok.convert_ids_to_tokens(i)
        if b is None and name in t_special:
            pairs.append((t_special[name], i))
    pairs.sort(key=lambda p: p[1])
    return [t for t, _ in pairs], [s for _, s in pairs]


@dataclass
class CrossScored:
    """The teacher's view of one student batch: ``rows [N]`` flat indices (``b * T + j``) of the
    aligned student positions, ``hidden [N, H]`` the teacher's final hidden states there, and
    ``head [V_t, H]`` its output projection (real tokens only)."""

    rows: Tensor
    hidden: Tensor
    head: Tensor


class CrossTokenizerTeacher:
    """Wraps an :class:`~potstill.distill.teachers.HFTeacher` whose tokenizer is not the
    student's. ``vocab_map`` holds :func:`shared_vocab` as int64 tensors."""

    def __init__(self, teacher: Any, student_tokenizer: Any) -> None:
        import torch

        self.teacher = teacher
        self.name = teacher.name
        self.tokenizer = teacher.tokenizer
        self.student_tokenizer = student_tokenizer
        self.student_vocab = len(student_tokenizer)
        self.teacher_vocab = len(teacher.tokenizer)
        self.vocab_size = self.teacher_vocab  # the teacher's logit width (its own tokens)
        self._s_table = vocab_bytes(student_tokenizer)
        self._t_table = vocab_bytes(teacher.tokenizer)
        t_ids, s_ids = shared_vocab(teacher.tokenizer, student_tokenizer)
        if not t_ids:
            raise PotstillError(
                f"teacher {self.name!r} and the student's tokenizer share no token: nothing "
                "to align; pick a teacher whose vocabulary shares pieces with the student's"
            )
        self.vocab_map = (torch.tensor(t_ids), torch.tensor(s_ids))

    def to(self, device: torch.device | str) -> CrossTokenizerTeacher:
        self.teacher.to(device)
        self.vocab_map = tuple(x.to(device) for x in self.vocab_map)  # type: ignore[assignment]
        return self

    def score(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> CrossScored:
        """The teacher's hidden states at the student positions ``labels != -100`` that align
        (``input_ids``, ``attention_mask``, ``labels``: ``[B, T]``)."""
        import torch

        rows, seqs, picks = [], [], []
        width = input_ids.shape[1]
        for b in range(input_ids.shape[0]):
            n = int(attention_mask[b].sum())
            view = retokenize(input_ids[b, :n].tolist(), self._s_table, self.tokenizer,
                              self._t_table, max_len=2 * width)  # fmt: skip
            scored = labels[b] != -100
            for j, i in view.pairs:
                if bool(scored[j]):
                    rows.append(b * width + j)
                    picks.append((b, i))
            seqs.append(view.teacher_ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        t_len = max(1, *(len(s) for s in seqs))
        ids = torch.full((len(seqs), t_len), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[b, : len(s)] = 1
        hidden, head = self.teacher.hidden_and_head(ids, mask)
        bi = torch.tensor([p[0] for p in picks], dtype=torch.long, device=hidden.device)
        ti = torch.tensor([p[1] for p in picks], dtype=torch.long, device=hidden.device)
        return CrossScored(
            torch.tensor(rows, dtype=torch.long), hidden[bi, ti], head[: self.teacher_vocab]
        )
