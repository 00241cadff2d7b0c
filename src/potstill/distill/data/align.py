"""Byte alignment of two tokenizations of one text, for cross-tokenizer distillation.

A student position ``j`` predicts student token ``j + 1``; a teacher position ``i`` predicts
teacher token ``i + 1``. The two predictions are comparable when they are made after the same
text: the student's tokens ``0..j`` and the teacher's tokens ``0..i`` spell the same bytes, and
both next tokens start right there. So every token gets its byte span from
:func:`potstill.core.tokenizers.vocab_bytes` (special tokens are zero-width), and
:func:`aligned_pairs` pairs student and teacher positions whose next tokens start at the same
byte offset. Byte offsets, not characters: a byte-level BPE may split a multi-byte character
across tokens, and a boundary inside a character is simply not a boundary the other side has.

:func:`retokenize` builds the teacher's view of a student sequence: each maximal run of text
tokens is turned back into its bytes and split into valid UTF-8 runs (a packed block may start
or end inside a character, and a sampled completion may be any bytes); each run is tokenized by
the teacher, and the teacher's separator (BOS, else EOS) starts each segment the student
separates with a special token. Bytes that are not valid UTF-8 are skipped by the teacher:
positions after them are still paired by offset, though the teacher did not see those bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from potstill.core.errors import PotstillError

__all__ = ["Retokenized", "aligned_pairs", "next_token_starts", "retokenize", "utf8_runs"]

Table = Sequence[bytes | None]


def next_token_starts(ids: Sequence[int], table: Table) -> list[int | None]:
    """Per position ``p``: the byte offset where token ``p + 1`` starts, or None when token
    ``p + 1`` is special (zero-width) or absent. Offsets count the bytes of tokens ``0..p``."""
    out: list[int | None] = []
    offset = 0
    for p, tid in enumerate(ids):
        piece = table[tid] if 0 <= tid < len(table) else None
        offset += len(piece) if piece is not None else 0
        nxt = ids[p + 1] if p + 1 < len(ids) else None
        text_next = nxt is not None and 0 <= nxt < len(table) and table[nxt] is not None
        out.append(offset if text_next else None)
    return out


def aligned_pairs(
    student_starts: Sequence[int | None], teacher_starts: Sequence[int | None]
) -> list[tuple[int, int]]:
    """``(student position, teacher position)`` pairs whose next tokens start at the same byte
    offset (inputs from :func:`next_token_starts`). Where several teacher positions share an
    offset (zero-width tokens before a text token), the last, the one right before it, is used."""
    at: dict[int, int] = {}
    for i, off in enumerate(teacher_starts):
        if off is not None:
            at[off] = i
    return [(j, at[off]) for j, off in enumerate(student_starts) if off is not None and off in at]


def utf8_runs(data: bytes) -> list[tuple[int, str]]:
    """``(byte offset, text)`` of the maximal valid UTF-8 runs of ``data``; other bytes dropped."""
    runs: list[tuple[int, str]] = []
    start = 0
    while start < len(data):
        try:
            runs.append((start, data[start:].decode("utf-8")))
            break
        except UnicodeDecodeError as e:
            if e.start > 0:
                runs.append((start, data[start : start + e.start].decode("utf-8")))
            start += e.end
    return [(off, text) for off, text in runs if text]


def _segment(
    data: bytes, start: int, teacher_tok: Any, table: Table, sep: int | None
) -> tuple[list[int], list[int]]:
    """Teacher ids of one segment's bytes (separator first) and each one's start offset."""
    ids: list[int] = [int(sep)] if sep is not None else []
    offs: list[int] = [start] if sep is not None else []
    for run_off, text in utf8_runs(data):
        run = list(teacher_tok(text, add_special_tokens=False)["input_ids"])
        if b"".join(table[t] or b"" for t in run) != text.encode("utf-8"):
            raise PotstillError(
                f"the teacher's tokenizer does not spell {text[:40]!r} back byte for byte "
                "(it normalises text), so its tokens cannot be aligned with the student's; "
                "cross-tokenizer KD needs a lossless (byte-level or byte-fallback) tokenizer"
            )
        pos = start + run_off
        for t in run:
            ids.append(t)
            offs.append(pos)
            pos += len(table[t] or b"")
    return ids, offs


@dataclass(frozen=True)
class Retokenized:
    """The teacher's tokens for one student sequence, and the byte offsets both share."""

    teacher_ids: list[int]
    teacher_starts: list[int | None]  # next_token_starts of teacher_ids, in the student's bytes
    pairs: list[tuple[int, int]]  # (student position, teacher position)


def retokenize(
    student_ids: Sequence[int],
    student_table: Table,
    teacher_tok: Any,
    teacher_table: Table,
    *,
    max_len: int,
) -> Retokenized:
    """The teacher's view of ``student_ids`` (module docstring), at most ``max_len`` tokens.

    PotstillError if the teacher's tokens do not spell a run's bytes exactly (a normalising
    tokenizer: byte offsets would not line up, so no pair could be trusted).
    """
    sep = (
        teacher_tok.bos_token_id
        if teacher_tok.bos_token_id is not None
        else teacher_tok.eos_token_id
    )
    t_ids: list[int] = []
    t_off: list[int] = []  # byte offset (in the student's bytes) where each teacher token starts
    offset, seg_start, segment = 0, 0, bytearray()
    for tid in [*student_ids, -1]:  # -1: a sentinel that ends the last segment
        piece = student_table[tid] if 0 <= tid < len(student_table) else None
        if piece is not None:
            segment += piece
            offset += len(piece)
            continue
        if segment:  # a special token (or the end) closes a segment
            ids, offs = _segment(bytes(segment), seg_start, teacher_tok, teacher_table, sep)
            t_ids += ids
            t_off += offs
        seg_start, segment = offset, bytearray()
    t_ids, t_off = t_ids[:max_len], t_off[:max_len]
    starts: list[int | None] = []
    for p in range(len(t_ids)):
        text_next = p + 1 < len(t_ids) and teacher_table[t_ids[p + 1]] is not None
        starts.append(t_off[p + 1] if text_next else None)
    pairs = aligned_pairs(next_token_starts(student_ids, student_table), starts)
    return Retokenized(t_ids, starts, pairs)
