"""Harvested conversations -> training blocks with assistant-only labels and top-k targets.

:func:`load_chat_data` reads ``harvest:STORE.sqlite`` or ``messages:FILE.jsonl|.parquet`` and
builds one right-padded sequence per conversation (truncated at ``seq_len``; truncations are
counted in :attr:`ChatData.stats`):

* **Sequence-level KD (SFT)**: the conversation is rendered with the tokenizer's chat template.
  ``labels[:, t]`` is the token at ``t + 1`` (:func:`potstill.distill.data.make_labels` semantics) and is
  kept only where that target token belongs to an assistant turn, including its end-of-turn
  token; everything else is ``-100``. Assistant turn ``j`` is located by rendering
  ``messages[:j]`` with ``add_generation_prompt=True`` (the prefix) and ``messages[:j+1]``; the
  prefix must be a token prefix of the full rendering (else :class:`PotstillError`). The turn's
  targets are its tokens up to and including the last special token (the end-of-turn marker;
  the template's trailing newline after it is not trained).
* **Top-k logprob KD**: when a record carries the API's per-token logprobs, each generated
  token's top-k list is mapped onto the student's ids and placed at the label position whose
  target is that token. Token mapping (:class:`TokenMapper`): for a byte-level BPE vocabulary the
  token's raw ``bytes`` (else its UTF-8 text) are turned into the byte-level string and looked up
  in the vocabulary; otherwise the text is encoded and accepted only if it is exactly one id.
  Unmapped top-k entries are dropped (slot id ``-1``). The record is *aligned* only if its
  sampled tokens map to exactly the retokenized completion (any tokens after them must be
  special, e.g. an unreported end-of-turn token); otherwise it falls back to SFT only and is
  counted in ``stats["align_failed"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from potstill.core.errors import PotstillError
from potstill.core.specs import ChatSource, DataSource, parse_data_source
from potstill.core.tokenizers import gpt2_byte_table

log = logging.getLogger(__name__)
Messages = list[dict[str, str]]


@dataclass
class ChatData:
    blocks: Tensor  # [N, seq_len] long, right-padded
    mask: Tensor  # [N, seq_len] long, 1 on real tokens
    labels: Tensor  # [N, seq_len] long, next-token targets, -100 outside assistant targets
    targets: HarvestTargets | None  # top-k logprob targets, or None (SFT only)
    stats: dict[str, int] = field(default_factory=dict)


class HarvestTargets:
    """Sparse top-k targets per training row (implements ``potstill.distill.train.data.SparseTargets``).

    Row ``r`` holds ``positions [n] long`` (label positions), ``ids [n, K] long`` (student token
    ids, ``-1`` = empty slot) and ``logprobs [n, K] float32``; rows without targets hold None.
    """

    def __init__(
        self, seq_len: int, k: int, rows: list[tuple[Tensor, Tensor, Tensor] | None]
    ) -> None:
        self.seq_len, self.k, self.rows = seq_len, k, rows

    def lookup(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """rows [b] -> (ids [b, T, K] long, logprobs [b, T, K] float32); -1 ids for empty slots."""
        b = int(rows.shape[0])
        ids = torch.full((b, self.seq_len, self.k), -1, dtype=torch.long)
        lps = torch.zeros((b, self.seq_len, self.k), dtype=torch.float32)
        for j, r in enumerate(rows.tolist()):
            entry = self.rows[r]
            if entry is not None:
                pos, eids, elps = entry
                ids[j, pos] = eids
                lps[j, pos] = elps
        return ids, lps


class TokenMapper:
    """API token (text + optional raw bytes) -> one student token id, or None."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab: dict[str, int] = tokenizer.get_vocab()
        self.b2u = gpt2_byte_table()
        # byte-level BPE iff every byte has its own single-character vocabulary entry
        self.byte_level = all(c in self.vocab for c in self.b2u.values())
        self._cache: dict[tuple[str, bytes | None], int | None] = {}

    def __call__(self, token: str, raw: list[int] | None) -> int | None:
        key = (token, None if raw is None else bytes(raw))
        if key not in self._cache:
            self._cache[key] = self._map(token, key[1])
        return self._cache[key]

    def _map(self, token: str, raw: bytes | None) -> int | None:
        if token in self.vocab and token in self.tokenizer.all_special_tokens:
            return self.vocab[token]  # e.g. "<|im_end|>" reported as the end-of-turn token
        data = raw if raw is not None else token.encode("utf-8")
        if self.byte_level:
            return self.vocab.get("".join(self.b2u[b] for b in data))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None  # a partial character: no whole token of a non-byte vocabulary
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 else None


def _render(tokenizer: Any, messages: Messages, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def assistant_spans(
    tokenizer: Any, messages: Messages, where: str = ""
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole conversation and the ``[start, end)`` target span of each assistant turn."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise PotstillError(
            "the student tokenizer has no chat template, needed for harvested conversations; "
            "use a chat model's tokenizer (student.tokenizer=...)"
        )
    full = _render(tokenizer, messages, False)
    special = set(tokenizer.all_special_ids)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:j], True) if j else []
        upto = _render(tokenizer, messages[: j + 1], False)
        if (
            full[: len(prefix)] != prefix
            or full[: len(upto)] != upto
            or upto[: len(prefix)] != prefix
        ):
            raise PotstillError(
                f"{where}: the chat template renders assistant turn {j} so that its prompt is not a "
                "token prefix of the conversation; use a tokenizer whose template renders turns "
                "independently (e.g. ChatML)"
            )
        seg = upto[len(prefix) :]
        last_special = max((i for i, t in enumerate(seg) if t in special), default=len(seg) - 1)
        spans.append((len(prefix), len(prefix) + last_special + 1))
    return full, spans


def _align(
    mapper: TokenMapper, full: list[int], span: tuple[int, int], logprobs: list[dict[str, Any]],
    special: set[int],
) -> list[int] | None:  # fmt: skip
    """The sampled tokens' student ids if they equal the retokenized completion, else None."""
    start, end = span
    sampled = [mapper(t["token"], t.get("bytes")) for t in logprobs]
    n = len(sampled)
    if None in sampled or start + n > end or full[start : start + n] != sampled:
        return None
    if any(t not in special for t in full[start + n : end]):
        return None  # the API reported fewer tokens than the completion has
    return sampled  # type: ignore[return-value]


def _topk_rows(
    mapper: TokenMapper, logprobs: list[dict[str, Any]], start: int, labels_row: Tensor,
    stats: dict[str, int],
) -> tuple[list[int], list[list[tuple[int, float]]]]:  # fmt: skip
    """Label positions and mapped (id, logprob) lists for one aligned record."""
    positions, entries = [], []
    seq_len = labels_row.shape[0]
    for i, tok in enumerate(logprobs):
        p = start + i - 1  # the label at p predicts generated token i (at start + i)
        if p < 0 or p >= seq_len or int(labels_row[p]) == -100:
            continue
        seen: dict[int, float] = {}
        for t, lp, raw in tok.get("top") or []:
            tid = mapper(t, raw)
            if tid is None or tid in seen:  # unmappable, or a second string for the same id
                stats["topk_dropped"] += 1
                continue
            seen[tid] = float(lp)
        positions.append(p)
        entries.append(list(seen.items()))
    return positions, entries


def _examples(source: str | DataSource) -> list[dict[str, Any]]:
    from potstill.core.messages import read_examples, store_examples

    parsed = parse_data_source(source)
    if not isinstance(parsed, ChatSource):
        raise PotstillError(
            f"bad chat data source {str(parsed)!r}; use harvest:STORE.sqlite or "
            "messages:FILE.jsonl|.parquet"
        )
    if parsed.kind == "harvest":
        return list(store_examples(parsed.path))
    return read_examples(parsed.path)


def build_chat_data(
    examples: Iterable[dict[str, Any]],
    tokenizer: Any,
    *,
    seq_len: int,
    with_logprobs: bool,
    where: str = "",
) -> ChatData:
    """Blocks, assistant-only labels and (optionally) top-k targets from ``messages`` examples."""
    from potstill.distill.data import make_labels

    if seq_len < 2:
        raise PotstillError(f"seq_len must be >= 2, got {seq_len}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mapper = TokenMapper(tokenizer)
    special = set(tokenizer.all_special_ids)
    stats = dict.fromkeys(
        (
            "records",
            "truncated",
            "dropped",
            "with_logprobs",
            "aligned",
            "align_failed",
            "topk_dropped",
        ),
        0,
    )
    seqs: list[list[int]] = []
    target_masks: list[list[bool]] = []
    pending: list[tuple[int, int, list[dict[str, Any]]]] = []  # (row, span start, logprobs)
    for n, ex in enumerate(examples):
        stats["records"] += 1
        full, spans = assistant_spans(tokenizer, ex["messages"], where=f"{where} example {n}")
        is_target = [False] * len(full)
        for s, e in spans:
            is_target[s:e] = [True] * (e - s)
        aligned = None
        lp = ex.get("logprobs")
        if with_logprobs and lp and spans:
            stats["with_logprobs"] += 1
            aligned = _align(mapper, full, spans[-1], lp, special)
            stats["aligned" if aligned is not None else "align_failed"] += 1
        if len(full) > seq_len:
            stats["truncated"] += 1
            full, is_target = full[:seq_len], is_target[:seq_len]
        if not any(is_target[1:]):  # no assistant token left to predict
            stats["dropped"] += 1
            continue
        if aligned is not None and lp:
            pending.append((len(seqs), spans[-1][0], lp))
        seqs.append(full)
        target_masks.append(is_target)
    if not seqs:
        raise PotstillError(
            f"{where}: no example has an assistant token within data.seq_len={seq_len}; "
            "raise data.seq_len or check that the data has assistant turns"
        )
    blocks = torch.full((len(seqs), seq_len), int(pad), dtype=torch.long)
    mask = torch.zeros((len(seqs), seq_len), dtype=torch.long)
    tmask = torch.zeros((len(seqs), seq_len), dtype=torch.bool)
    for i, (ids, tm) in enumerate(zip(seqs, target_masks)):
        blocks[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
        tmask[i, : len(tm)] = torch.tensor(tm, dtype=torch.bool)
    labels = make_labels(blocks, mask)
    labels[:, :-1] = labels[:, :-1].masked_fill(~tmask[:, 1:], -100)  # target must be assistant
    targets = _targets(mapper, pending, labels, stats) if with_logprobs else None
    return ChatData(blocks, mask, labels, targets, stats)


def _targets(
    mapper: TokenMapper, pending: list[tuple[int, int, list[dict[str, Any]]]], labels: Tensor,
    stats: dict[str, int],
) -> HarvestTargets | None:  # fmt: skip
    per_row: list[tuple[list[int], list[list[tuple[int, float]]]] | None] = [None] * labels.shape[0]
    k = 0
    for row, start, lp in pending:
        pos, entries = _topk_rows(mapper, lp, start, labels[row], stats)
        per_row[row] = (pos, entries)
        k = max([k, *(len(e) for e in entries)])
    if k == 0:
        return None
    rows: list[tuple[Tensor, Tensor, Tensor] | None] = []
    for entry in per_row:
        if entry is None or not entry[0]:
            rows.append(None)
            continue
        pos, entries = entry
        ids = torch.full((len(pos), k), -1, dtype=torch.long)
        lps = torch.zeros((len(pos), k), dtype=torch.float32)
        for i, e in enumerate(entries):
            if e:
                ids[i, : len(e)] = torch.tensor([t for t, _ in e], dtype=torch.long)
                lps[i, : len(e)] = torch.tensor([v for _, v in e], dtype=torch.float32)
        rows.append((torch.tensor(pos, dtype=torch.long), ids, lps))
    return HarvestTargets(labels.shape[1], k, rows)


def load_chat_data(
    source: str | DataSource, tokenizer: Any, *, seq_len: int, with_logprobs: bool
) -> ChatData:
    """``harvest:STORE.sqlite`` or ``messages:FILE.jsonl|.parquet`` -> :class:`ChatData`.

    ``with_logprobs``: attach top-k targets from the records' logprobs (None if there are none).
    Truncations and alignment failures are logged as one warning line.
    """
    data = build_chat_data(
        _examples(source),
        tokenizer,
        seq_len=seq_len,
        with_logprobs=with_logprobs,
        where=str(source),
    )
    s = data.stats
    if s["truncated"] or s["dropped"] or s["align_failed"]:
        log.warning(
            "%s: %d records, %d truncated to seq_len=%d, %d dropped (no assistant token within "
            "seq_len), top-k logprobs aligned for %d of %d (the rest train SFT only)",
            source, s["records"], s["truncated"], seq_len, s["dropped"], s["aligned"], s["with_logprobs"],
        )  # fmt: skip
    return data


__all__ = [
    "ChatData",
    "HarvestTargets",
    "TokenMapper",
    "assistant_spans",
    "build_chat_data",
    "load_chat_data",
]
