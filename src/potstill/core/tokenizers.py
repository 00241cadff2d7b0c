"""Tokenizer and vocab checks: the ones logit distillation and detection both need.

Logit KD compares teacher and student distributions position by position and token by
token, so both must use the SAME tokenizer (same token -> id map). Their logits may
still differ in width: checkpoints pad the vocab (e.g. Qwen2.5-7B has 152,064 logits,
Qwen2.5-0.5B 151,936, over one 151,665-token tokenizer). Both are cut to the shared
width ``min(teacher V, student V)``, which must still cover every real token.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

from potstill.core.errors import PotstillError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "check_tokenizers_agree",
    "gpt2_byte_table",
    "logit_width",
    "real_vocab_size",
    "shared_vocab_size",
    "token_bytes",
    "tokenizer_fingerprint",
    "vocab_bytes",
]

_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# Special tokens that change what a model is trained to emit. pad is left out on purpose:
# training code often sets pad := eos on one side only, and padded positions are masked.
_FINGERPRINT_SPECIALS = ("bos_token_id", "eos_token_id", "unk_token_id")


@functools.cache
def gpt2_byte_table() -> dict[int, str]:
    """The GPT-2 byte -> printable character map of byte-level BPE vocabularies (read-only).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to code points from
    U+0100 upward, in byte order (what the ``tokenizers`` ByteLevel steps use).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _specials(tok: PreTrainedTokenizerBase) -> dict[str, Any]:
    return {k: getattr(tok, k, None) for k in _FINGERPRINT_SPECIALS}


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """SHA-256 hex of the tokenizer's token -> id map (added tokens included) + bos/eos/unk ids.

    Two tokenizers with equal fingerprints split any text into the same ids. The pad id
    is not part of it (see ``_FINGERPRINT_SPECIALS``).
    """
    payload = {"vocab": sorted(tok.get_vocab().items()), "specials": _specials(tok)}
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _first_difference(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> str:
    """Human-readable first point where two tokenizers disagree (lowest id first)."""
    inv_a = {i: t for t, i in a.get_vocab().items()}
    inv_b = {i: t for t, i in b.get_vocab().items()}
    for i in range(max([*inv_a, *inv_b], default=-1) + 1):
        ta, tb = inv_a.get(i), inv_b.get(i)
        if ta != tb:
            ra = repr(ta) if ta is not None else "(none)"
            rb = repr(tb) if tb is not None else "(none)"
            return f"first differing token: id {i} {ra} vs {rb}"
    sa, sb = _specials(a), _specials(b)
    diffs = [f"{k} {sa[k]} vs {sb[k]}" for k in _FINGERPRINT_SPECIALS if sa[k] != sb[k]]
    return "special token ids differ: " + ", ".join(diffs)


def check_tokenizers_agree(
    teacher_tok: PreTrainedTokenizerBase,
    student_tok: PreTrainedTokenizerBase,
    *,
    teacher_name: str = "teacher",
    student_name: str = "student",
) -> None:
    """Raise PotstillError unless both tokenizers have the same fingerprint.

    The message names both models, their vocab sizes and fingerprints, the first
    differing token, and the fix.
    """
    fp_t, fp_s = tokenizer_fingerprint(teacher_tok), tokenizer_fingerprint(student_tok)
    if fp_t == fp_s:
        return
    raise PotstillError(
        f"tokenizers differ: teacher {teacher_name!r} (vocab {len(teacher_tok)}, "
        f"fingerprint {fp_t[:12]}…) vs student {student_name!r} (vocab {len(student_tok)}, "
        f"fingerprint {fp_s[:12]}…); {_first_difference(teacher_tok, student_tok)}. "
        "Logit KD needs the same tokenizer: build the student with the teacher's tokenizer "
        "(student from_scratch uses it) or pick a teacher of the same family."
    )


def logit_width(model: PreTrainedModel) -> int:
    """The number of logits ``model`` outputs: its output head's rows (config.vocab_size if
    it has none). Checkpoints pad it past ``len(tokenizer)``."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def real_vocab_size(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Number of logits that name real tokens: ``min(len(tokenizer), logit width)``."""
    return min(len(tokenizer), logit_width(model))


def shared_vocab_size(
    teacher_vocab: int, student_vocab: int, tokenizer: PreTrainedTokenizerBase
) -> int:
    """Logit width both models are cut to: ``min(teacher_vocab, student_vocab)``.

    ``teacher_vocab`` / ``student_vocab`` are padded logit widths; raises PotstillError
    if the shared width would drop real tokens (``len(tokenizer)`` > shared width).
    """
    shared = min(teacher_vocab, student_vocab)
    n_tokens = len(tokenizer)
    if n_tokens > shared:
        raise PotstillError(
            f"vocab too small: the tokenizer has {n_tokens} tokens but the shared logit width "
            f"is {shared} (teacher {teacher_vocab}, student {student_vocab}); the model with "
            f"{shared} logits cannot score every token: resize its embeddings to at least "
            f"{n_tokens} (e.g. model.resize_token_embeddings(len(tokenizer), "
            "pad_to_multiple_of=64)) or use a matching checkpoint."
        )
    return shared


class _Pieces:
    """What turning one token's vocabulary piece into bytes needs to know of its tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None) if backend is not None else None
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        # SentencePiece-style (Metaspace, or Replace("\u2581", " ")): pieces spell spaces as U+2581
        self.metaspace = not self.byte_level and "\u2581" in repr(decoder)
        self.byte_decoder = {c: b for b, c in gpt2_byte_table().items()}
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])


def token_bytes(
    tokenizer: PreTrainedTokenizerBase, token_id: int, _p: _Pieces | None = None
) -> bytes:
    """The raw bytes token ``token_id`` stands for.

    Byte-level BPE pieces map through :func:`gpt2_byte_table`; SentencePiece pieces turn
    ``"▁"`` into a space and ``<0xNN>`` byte-fallback pieces into that byte; special tokens
    and anything else are decoded as text.
    """
    p = _p or _Pieces(tokenizer)
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if token_id not in p.special and isinstance(piece, str):
        if p.byte_level and all(c in p.byte_decoder for c in piece):
            return bytes(p.byte_decoder[c] for c in piece)
        m = _HEX_BYTE.fullmatch(piece)
        if m is not None:
            return bytes([int(m.group(1), 16)])
        if p.metaspace:
            return piece.replace("\u2581", " ").encode("utf-8")
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


def vocab_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """:func:`token_bytes` of every id below ``len(tokenizer)``; None for special and added
    control tokens (``<bos>``, ``<|im_end|>``...), which stand for no text."""
    p = _Pieces(tokenizer)
    added = {
        i
        for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if getattr(t, "special", False)
    }
    return [
        None if (i in p.special or i in added) else token_bytes(tokenizer, i, p)
        for i in range(len(tokenizer))
    ]
