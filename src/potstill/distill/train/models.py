"""The models of a run: the tokenizer's source, the student (scratch or checkpoint, with
its lower layers frozen on request), the teacher (live, or none when the data or a cache
carries its targets), and the checks that tie them to the loss settings."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from potstill.core.errors import PotstillError
from potstill.core.specs import (
    CachedTeacher,
    EndpointTeacherSpec,
    ModelSpec,
    NoTeacher,
    parse_model_spec,
)
from potstill.distill.config import DistillConfig
from potstill.distill.train.student import build_student


def load_teacher(cfg: DistillConfig, tokenizer: Any, student_vocab: int) -> Any:
    spec = cfg.teacher.spec
    if cfg.loss.cross_tokenizer is not None and isinstance(spec, NoTeacher | CachedTeacher):
        raise PotstillError(
            f"loss.cross_tokenizer needs a teacher model that reads text, but teacher.spec="
            f"{str(spec)!r} has no text to align; use a model spec (e.g. a .gguf or HF folder)"
        )
    if cfg.loss.ce_weight >= 1.0 or isinstance(spec, NoTeacher | CachedTeacher):
        return None  # CE alone, or the data carries the teacher's targets
    if isinstance(spec, EndpointTeacherSpec):
        if cfg.loss.cross_tokenizer is not None:
            raise PotstillError(
                "loss.cross_tokenizer needs a teacher model that reads text (it tokenizes the "
                "student's text itself); an endpoint teacher must share the student's tokenizer"
            )
        return load_endpoint_teacher(cfg, spec, tokenizer, student_vocab)
    from potstill.core.hardware import resolve_dtype
    from potstill.distill.teachers import HFTeacher

    bf16 = resolve_dtype(cfg.teacher.dtype) == "bfloat16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    if cfg.loss.cross_tokenizer is not None:
        from potstill.distill.teachers.crosstok import CrossTokenizerTeacher

        return CrossTokenizerTeacher(_autocast(cfg, HFTeacher.from_spec(spec, dtype=dtype)),
                                     tokenizer)  # fmt: skip
    return _autocast(cfg, HFTeacher.from_spec(
        spec, student_tokenizer=tokenizer, student_vocab_size=student_vocab, dtype=dtype
    ))  # fmt: skip


def _autocast(cfg: DistillConfig, teacher: Any) -> Any:
    """An fp32 teacher under ``train.bf16`` holds its linear weights in bf16 once (the same
    numbers autocast computes, without re-casting the frozen weights every step)."""
    if cfg.train.bf16 and next(teacher.model.parameters()).dtype == torch.float32:
        teacher.cast_for_autocast(torch.bfloat16)
    return teacher


def load_endpoint_teacher(
    cfg: DistillConfig, spec: EndpointTeacherSpec, tokenizer: Any, student_vocab: int
) -> Any:
    """An :class:`~potstill.distill.teachers.endpoint.EndpointTeacher`, checked against the
    student's tokenizer (PotstillError if the endpoint lacks a capability or disagrees)."""
    import os

    from potstill.core.openai_http import first_model
    from potstill.distill.teachers.endpoint import EndpointTeacher

    tc = cfg.teacher
    key = None
    if tc.api_key_env is not None:
        key = os.environ.get(tc.api_key_env)
        if not key:
            raise PotstillError(
                f"teacher.api_key_env={tc.api_key_env!r} but that environment variable is "
                "unset or empty; export it, or unset teacher.api_key_env"
            )
    model = tc.model or first_model(spec.url, api_key=key, timeout=tc.timeout_s)
    teacher = EndpointTeacher(
        spec.url, model=model, api_key=key, top_logprobs=tc.top_logprobs,
        concurrency=tc.concurrency, timeout_s=tc.timeout_s, vocab_size=student_vocab,
    )  # fmt: skip
    try:
        teacher.check(tokenizer)
    except BaseException:
        teacher.close()
        raise
    return teacher


def tokenizer_spec(cfg: DistillConfig) -> ModelSpec:
    """Where the run's tokenizer comes from: student.tokenizer, else the teacher model
    (for ``cache:DIR``, the teacher recorded in the cache's manifest)."""
    if cfg.student.tokenizer is not None:
        return cfg.student.tokenizer
    spec = cfg.teacher.spec
    checkpoint = cfg.student.checkpoint if cfg.student.init == "checkpoint" else None
    if isinstance(spec, CachedTeacher) and checkpoint is None:
        # A logit cache records the teacher it was made with: its tokenizer is the run's.
        from potstill.distill.teachers.cache import read_manifest

        return parse_model_spec(str(read_manifest(spec.path)["teacher"]))
    if isinstance(spec, NoTeacher | CachedTeacher | EndpointTeacherSpec):
        if checkpoint is not None:
            return checkpoint
        raise PotstillError(
            f"teacher.spec={str(spec)!r} has no tokenizer to build the student with; "
            "set student.tokenizer=<model spec> (e.g. the teacher's model)"
        )
    return spec


def load_student(cfg: DistillConfig, tokenizer: Any) -> nn.Module:
    if cfg.student.init == "scratch":
        model = build_student(cfg.student, tokenizer, max_len=cfg.data.seq_len)
    else:
        from potstill.core.models import load_model
        from potstill.core.tokenizers import check_tokenizers_agree

        assert cfg.student.checkpoint is not None
        model, tok = load_model(cfg.student.checkpoint)
        check_tokenizers_agree(
            tokenizer,
            tok,
            teacher_name=str(cfg.teacher.spec),
            student_name=str(cfg.student.checkpoint),
        )
    if cfg.student.train_top_layers is not None:
        freeze_below(model, cfg.student.train_top_layers)
    return model


def freeze_below(model: nn.Module, top: int) -> None:
    """Leave only the top ``top`` decoder layers and the final norm trainable."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise PotstillError(
            "student.train_top_layers needs a decoder with model.layers (Llama-like); "
            "unset it to train every parameter"
        )
    if top > len(layers):
        raise PotstillError(
            f"student.train_top_layers={top} but the student has {len(layers)} layers; "
            f"use at most {len(layers)}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[len(layers) - top :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    norm = getattr(inner, "norm", None)
    if norm is not None:
        for p in norm.parameters():
            p.requires_grad_(True)


def check_sparse_temperature(cfg: DistillConfig, *, sparse: bool) -> None:
    """Refuse ``loss.temperature != 1`` when the teacher is known only by top-k logprobs.

    Top-k targets (a logit cache, an API's logprobs) are recorded at temperature 1. Tempering
    the K known tokens is exact (``softmax(l_i / T)`` over them, up to normalisation), but the
    tail bucket's tempered mass is ``sum_j exp(l_j / T)`` over tokens whose logprobs were never
    recorded: any value from ``m**(1/T)``-like to 0 fits the same record. Dividing only the
    student's logits by T, as a dense loss does, would compare a tempered student with an
    untempered teacher: a silently wrong objective. So T != 1 is an error here.
    """
    if sparse and cfg.loss.ce_weight < 1.0 and cfg.loss.temperature != 1.0:
        raise PotstillError(
            f"loss.temperature={cfg.loss.temperature} cannot be applied to sparse top-k teacher "
            "targets: they were recorded at temperature 1 and the tempered mass of the tokens "
            "outside the top-k is unknown; set loss.temperature=1.0 (or use an online teacher)"
        )


def check_teacher_signal(cfg: DistillConfig, *, live: bool, sparse: bool) -> None:
    """A KD term needs a teacher signal (a live teacher, or top-k targets in the data or a
    cache), and sparse targets need the temperature they were taken at."""
    if not live and not sparse and cfg.loss.ce_weight < 1.0:
        raise PotstillError(
            f"loss.ce_weight={cfg.loss.ce_weight} asks for a KD term but "
            f"teacher.spec={str(cfg.teacher.spec)!r} gives no teacher signal; use a teacher "
            "model or cache:DIR, data with top-k logprobs, or loss.ce_weight=1.0 for plain SFT"
        )
    check_sparse_temperature(cfg, sparse=sparse)
    if sparse and cfg.loss.ce_weight < 1.0 and cfg.loss.kind != "forward_kl":
        raise PotstillError(
            f"loss.kind={cfg.loss.kind} needs the teacher's full distribution, but the teacher "
            f"is known only by top-k logprobs (teacher.spec={str(cfg.teacher.spec)!r}, or the "
            "data's); use loss.kind=forward_kl (top-k plus a tail bucket), or a live teacher"
        )
