"""``potstill eval``: load the models, block the held-out text, compare."""

from __future__ import annotations

from typing import Any

import torch

from potstill.core.errors import PotstillError


def heldout_blocks(source: str, tokenizer: Any, *, seq_len: int, max_blocks: int) -> torch.Tensor:
    """The first ``max_blocks`` packed sequences of a text source: deterministic."""
    from potstill.distill.data import load_texts, pack_sequences, tokenize_texts

    if seq_len < 2 or max_blocks < 1:
        raise PotstillError(
            f"--seq-len must be >= 2 and --max-blocks >= 1 (got {seq_len}, {max_blocks})"
        )
    blocks = pack_sequences(tokenize_texts(load_texts(source), tokenizer), seq_len)[:max_blocks]
    if blocks.shape[0] == 0:
        raise PotstillError(
            f"data {source!r} gives no sequence of {seq_len} tokens; add text or lower --seq-len"
        )
    return blocks


def run_eval(
    *,
    teacher: str,
    student: str,
    baseline: str | None,
    data: str,
    seq_len: int = 256,
    max_blocks: int = 64,
    batch_size: int = 8,
) -> tuple[dict[str, Any], str]:
    """Evaluate teacher, student (and baseline) on the same held-out blocks."""
    from potstill.core.models import load_model
    from potstill.core.tokenizers import check_tokenizers_agree
    from potstill.distill.evaluate import compare, to_markdown

    t_model, t_tok = load_model(teacher)
    s_model, s_tok = load_model(student)
    check_tokenizers_agree(t_tok, s_tok, teacher_name=teacher, student_name=student)
    b_model = None
    if baseline:
        b_model, b_tok = load_model(baseline)
        check_tokenizers_agree(t_tok, b_tok, teacher_name=teacher, student_name=baseline)
    blocks = heldout_blocks(data, t_tok, seq_len=seq_len, max_blocks=max_blocks)
    widths = [
        m.get_output_embeddings().weight.shape[0]
        for m in (t_model, s_model, b_model)
        if m is not None
    ]
    vocab = min(widths)
    if len(t_tok) > vocab:
        raise PotstillError(
            f"a model's vocabulary ({vocab}) is smaller than the tokenizer's ({len(t_tok)})"
        )
    result = compare(
        t_model, s_model, blocks, baseline=b_model, batch_size=batch_size, vocab_size=vocab
    )
    result["settings"] = {
        "teacher": teacher,
        "student": student,
        "baseline": baseline,
        "data": data,
        "seq_len": seq_len,
        "blocks": int(blocks.shape[0]),
        "vocab_size": vocab,
    }
    return result, to_markdown(result)
