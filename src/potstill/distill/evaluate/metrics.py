"""Held-out language-model metrics: NLL/perplexity, teacher agreement, KL.

All statistics are token-weighted means over the positions that have a
next-token target (:func:`potstill.distill.data.packing.make_labels`: the last position
of a block and padded positions do not count), computed in fp32 from
``log_softmax`` of the logits, one sequence at a time so the fp32 copies stay at
``T x V`` floats whatever the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from potstill.core.errors import PotstillError
from potstill.distill.data.packing import IGNORE_INDEX, check_blocks, make_labels


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _safe_exp(x: float) -> float:
    # exp overflows a float above ~709.78; an inf perplexity is the honest answer.
    return math.exp(x) if x < 709.0 else math.inf


def _check_inputs(
    blocks: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int
) -> None:
    check_blocks(blocks, attention_mask, "blocks")
    if batch_size < 1:
        raise PotstillError(f"batch_size must be >= 1, got {batch_size}")


def _width(logits: Sequence[torch.Tensor], vocab_size: int | None, compare: bool) -> int:
    widths = sorted({int(x.shape[-1]) for x in logits})
    if vocab_size is not None:
        if vocab_size < 1 or vocab_size > widths[0]:
            raise PotstillError(
                f"vocab_size={vocab_size} is outside 1..{widths[0]} (smallest logit width); "
                "pass the shared tokenizer's vocabulary size"
            )
        return vocab_size
    if compare and len(widths) > 1:
        raise PotstillError(
            f"models have different logit widths {widths}; pass vocab_size=<shared tokenizer "
            "vocabulary size> to compare them on the shared part"
        )
    return widths[0]


def _forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    dev = _device_of(model)
    out = model(input_ids=ids.to(dev), attention_mask=None if mask is None else mask.to(dev))
    return out.logits if hasattr(out, "logits") else out


def _run(
    models: Sequence[torch.nn.Module],
    blocks: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    reference_index: int | None,
    batch_size: int,
    vocab_size: int | None,
) -> list[dict[str, Any]]:
    """One pass over ``blocks`` with every model; stats per model.

    Returns per model ``{"nll", "ppl", "n_tokens"}`` and, for models other than
    ``models[reference_index]``, ``"top1_agreement"`` and ``"kl_ref"``
    (KL(reference‖model), nats/token).
    """
    _check_inputs(blocks, attention_mask, batch_size)
    k_models = len(models)
    nll_sum = [0.0] * k_models
    kl_sum = [0.0] * k_models
    agree = [0] * k_models
    n_tokens = 0
    for lo in range(0, blocks.shape[0], batch_size):
        ids = blocks[lo : lo + batch_size]
        mask = None if attention_mask is None else attention_mask[lo : lo + batch_size]
        labels = make_labels(ids, mask)
        logits = [_forward(m, ids, mask) for m in models]
        width = _width(logits, vocab_size, reference_index is not None)
        if labels.numel() and int(labels.max()) >= width:
            raise PotstillError(
                f"token id {int(labels.max())} >= vocabulary width {width}; tokenize the data "
                "with the models' tokenizer"
            )
        for b in range(ids.shape[0]):
            valid = labels[b] != IGNORE_INDEX
            n = int(valid.sum())
            if n == 0:
                continue
            n_tokens += n
            ref_lp = None
            if reference_index is not None:
                r = logits[reference_index]
                ref_lp = F.log_softmax(r[b, valid.to(r.device), :width].float(), dim=-1)
            for k, lg in enumerate(logits):
                lp = F.log_softmax(lg[b, valid.to(lg.device), :width].float(), dim=-1)
                tgt = labels[b, valid].to(lp.device)
                nll_sum[k] -= float(lp.gather(-1, tgt[:, None]).sum(dtype=torch.float64))
                if ref_lp is None or k == reference_index:
                    continue
                lp = lp.to(ref_lp.device)
                agree[k] += int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
                p = ref_lp.exp()
                # 0 * log 0 = 0: where the reference puts no mass the term vanishes.
                terms = torch.where(p > 0, p * (ref_lp - lp), torch.zeros_like(p))
                kl_sum[k] += float(terms.sum(dtype=torch.float64))
    if n_tokens == 0:
        raise PotstillError(
            "no evaluation positions (every block is shorter than 2 real tokens); use longer blocks"
        )
    stats: list[dict[str, Any]] = []
    for k in range(k_models):
        nll = nll_sum[k] / n_tokens
        s: dict[str, Any] = {"nll": nll, "ppl": _safe_exp(nll), "n_tokens": n_tokens}
        if reference_index is not None and k != reference_index:
            s["top1_agreement"] = agree[k] / n_tokens
            s["kl_ref"] = kl_sum[k] / n_tokens
        stats.append(s)
    return stats


class _EvalMode:
    """Put models in eval mode for the block, then restore each one's mode."""

    def __init__(self, models: Sequence[torch.nn.Module]) -> None:
        self.models = models
        self.modes = [m.training for m in models]

    def __enter__(self) -> None:
        for m in self.models:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in zip(self.models, self.modes):
            m.train(mode)


@torch.inference_mode()
def evaluate_lm(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    reference: torch.nn.Module | None = None,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Next-token statistics of ``model`` on held-out ``blocks`` (``LongTensor[N, T]``).

    Returns ``nll`` (mean token negative log-likelihood, nats), ``ppl`` =
    ``exp(nll)``, ``n_tokens`` (positions scored). With ``reference`` (e.g. the
    teacher) also ``top1_agreement`` (fraction of positions where both argmaxes
    agree) and ``kl_ref`` = mean over positions of KL(reference‖model), nats.
    ``vocab_size`` truncates every model's logits to their first ``vocab_size``
    columns (then renormalised) so padded vocabularies compare; without it,
    models of different logit widths are refused when a reference is given.
    Models are called as ``model(input_ids=, attention_mask=)`` and must return
    ``.logits`` of shape ``[B, T, V]``.
    """
    models = [model] if reference is None else [model, reference]
    with _EvalMode(models):
        stats = _run(
            models,
            blocks,
            attention_mask=attention_mask,
            reference_index=None if reference is None else 1,
            batch_size=batch_size,
            vocab_size=vocab_size,
        )
    return stats[0]


def gap_recovered(ppl_baseline: float, ppl_student: float, ppl_teacher: float) -> float | None:
    """Fraction of the baseline-to-teacher perplexity gap the student closes.

    ``(ppl_baseline - ppl_student) / (ppl_baseline - ppl_teacher)``: 1.0 = student
    matches the teacher, 0.0 = no better than the baseline; may fall outside
    [0, 1]. ``None`` when the denominator is <= 0 (baseline already at least as
    good as the teacher) or any input is not finite.
    """
    values = (ppl_baseline, ppl_student, ppl_teacher)
    if not all(math.isfinite(v) for v in values):
        return None
    denom = ppl_baseline - ppl_teacher
    if denom <= 0:
        return None
    return (ppl_baseline - ppl_student) / denom


@torch.inference_mode()
def compare(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    baseline: torch.nn.Module | None = None,
    batch_size: int = 8,
    vocab_size: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Teacher vs distilled student (vs a non-distilled baseline) on held-out blocks.

    One pass, teacher run once per batch. Returns::

        {"teacher":  {"nll", "ppl", "n_tokens"},
         "student":  {"nll", "ppl", "n_tokens", "top1_agreement", "kl_teacher_student"},
         "baseline": {... same keys as student ...},         # only with baseline
         "gap_recovered": float | None,                      # None without baseline
         "gap_recovered_warning": str,                       # only when it is undefined
         "n_tokens": int}

    ``kl_teacher_student`` is KL(teacher‖row model) in nats/token; the baseline
    row uses the same key so rows stay uniform. ``gap_recovered`` is measured
    in **perplexity**, as the spec defines it:
    ``(ppl_baseline - ppl_student) / (ppl_baseline - ppl_teacher)``
    (see :func:`gap_recovered`).
    """
    models = [teacher, student] + ([baseline] if baseline is not None else [])
    with _EvalMode(models):
        stats = _run(
            models,
            blocks,
            attention_mask=attention_mask,
            reference_index=0,
            batch_size=batch_size,
            vocab_size=vocab_size,
        )
    for s in stats[1:]:
        s["kl_teacher_student"] = s.pop("kl_ref")
    result: dict[str, Any] = {"teacher": stats[0], "student": stats[1]}
    result["gap_recovered"] = None
    if baseline is not None:
        result["baseline"] = stats[2]
        gap = gap_recovered(stats[2]["ppl"], stats[1]["ppl"], stats[0]["ppl"])
        result["gap_recovered"] = gap
        if gap is None:
            result["gap_recovered_warning"] = (
                f"undefined: baseline perplexity {stats[2]['ppl']:.4g} is not above the "
                f"teacher's {stats[0]['ppl']:.4g}, so there is no gap to recover"
            )
    result["n_tokens"] = stats[0]["n_tokens"]
    return result


def _fmt(x: Any, spec: str) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


def to_markdown(result: dict[str, Any]) -> str:
    """A markdown table of a :func:`compare` (or single :func:`evaluate_lm`) result.

    Rows teacher / student / baseline; columns NLL (nats/token), PPL, top-1
    agreement with the teacher, KL(teacher‖row) (nats/token); then the
    perplexity gap recovered as a percentage and the token count.
    """
    if "nll" in result:  # a single evaluate_lm() result
        rows = [("model", result)]
    else:
        rows = [(k, result[k]) for k in ("teacher", "student", "baseline") if k in result]
    lines = [
        "| model | NLL (nats/tok) | PPL | top-1 agr. | KL(T‖·) (nats/tok) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in rows:
        agr = s.get("top1_agreement")
        kl = s.get("kl_teacher_student", s.get("kl_ref"))
        lines.append(
            f"| {name} | {_fmt(s['nll'], '.4f')} | {_fmt(s['ppl'], '.3f')} | "
            f"{_fmt(None if agr is None else 100 * agr, '.1f')}{'' if agr is None else '%'} | "
            f"{_fmt(kl, '.4f')} |"
        )
    lines.append("")
    if "baseline" in result:
        gap = result.get("gap_recovered")
        if gap is None:
            why = result.get("gap_recovered_warning", "undefined")
            lines.append(f"Gap recovered (perplexity): n/a ({why})")
        else:
            lines.append(f"Gap recovered (perplexity): {100 * gap:.1f}%")
    n = result.get("n_tokens")
    if n is not None:
        lines.append(f"Evaluated on {n:,} held-out token positions.")
    return "\n".join(lines) + "\n"
