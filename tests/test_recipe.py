"""The distillation recipe on tiny models: outputs, resume, accumulation, divergence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from potstill.core.errors import PotstillError, TrainingDiverged
from potstill.distill.config import DistillConfig, load_config
from potstill.distill.train import recipe
from potstill.distill.train.models import freeze_below
from potstill.distill.train.recipe import (
    HiddenLM,
    micro_loss,
    run_distill,
)

from .conftest import REPO, tiny_overrides

TINY = REPO / "configs" / "tiny.yaml"


def tiny_cfg(out: Path, **extra: object) -> DistillConfig:
    return load_config(DistillConfig, TINY, tiny_overrides(out, **extra))


def student_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student" / "model.safetensors"))


def test_tiny_run_writes_every_output(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = run_distill(tiny_cfg(tmp_path / "run"), show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(run / "student")  # plain transformers
    tok = AutoTokenizer.from_pretrained(run / "student")
    assert model.config.num_hidden_layers == 1 and len(tok) > 256
    assert (run / "student" / "model.safetensors").is_file()
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "config.yaml").is_file() and (run / "run_info.json").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["step"] for r in evals] == [4, 8]
    # Both loss terms are logged (KD is often orders of magnitude below CE).
    assert all(r["kd"] is not None and r["ce"] > 0 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000004", "step_000008"]


def test_resume_gives_identical_weights(tmp_path: Path) -> None:
    full = run_distill(tiny_cfg(tmp_path / "full", **{"train.save_every": 3}), show_progress=False)
    cfg = tiny_cfg(tmp_path / "cut", **{"train.save_every": 3})
    run_distill(cfg, stop_after=5, show_progress=False)  # an interruption after step 5
    assert not (tmp_path / "cut" / "student").exists()
    with pytest.raises(PotstillError, match="--resume"):
        run_distill(cfg, show_progress=False)  # refuses to overwrite without --resume
    run_distill(cfg, resume=True, show_progress=False)
    a, b = student_weights(full), student_weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["split"] == "train"
    ]
    assert steps == list(range(1, 9))  # no step logged twice


def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    run_distill(tiny_cfg(tmp_path / "r"), stop_after=4, show_progress=False)
    with pytest.raises(PotstillError, match=r"loss\.kind"):
        run_distill(
            tiny_cfg(tmp_path / "r", **{"loss.kind": "reverse_kl"}),
            resume=True,
            show_progress=False,
        )


def _grads(cfg: DistillConfig, split: int) -> dict[str, torch.Tensor]:
    """Gradient of one optimizer step computed from `split` micro-batches, as the loop does it."""
    from potstill.core.models import load_tokenizer
    from potstill.distill.train.data import prepare_data
    from potstill.distill.train.models import load_student, load_teacher

    cfg = cfg.model_copy(deep=True)
    cfg.train.micro_batch_size = 8 // split
    tok = load_tokenizer(cfg.teacher.spec)
    data = prepare_data(cfg, tok, world_size=1)
    student = load_student(cfg, tok)
    teacher = load_teacher(cfg, tok, student.get_output_embeddings().weight.shape[0])
    model = HiddenLM(student)
    batches = [data.micro_batch(i, 0) for i in range(split)]
    n_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    for b in batches:
        (micro_loss(model, teacher, b, cfg).total / n_tokens).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [None, 7])
def test_gradient_accumulation_equals_whole_batch(tmp_path: Path, chunk: int | None) -> None:
    # Unpacked (padded) data: micro-batches hold different numbers of real tokens,
    # the case where per-micro-batch means would be wrong.
    cfg = tiny_cfg(
        tmp_path / "g",
        **{
            "data.packing": False,
            "loss.ce_weight": 0.3,
            "loss.chunk_tokens": chunk if chunk else "null",
        },
    )
    whole, halves = _grads(cfg, 1), _grads(cfg, 2)
    for k in whole:
        torch.testing.assert_close(halves[k], whole[k], rtol=1e-5, atol=1e-7)


def test_padded_micro_batches_drop_unused_columns_and_keep_the_loss(tmp_path: Path) -> None:
    """Right-padded rows are cut to the micro-batch's longest: the KD + CE loss and its
    gradient equal those of the full ``seq_len`` batch (teacher included)."""
    from potstill.core.models import load_tokenizer
    from potstill.distill.train.data import prepare_data
    from potstill.distill.train.models import load_student, load_teacher

    cfg = tiny_cfg(tmp_path / "p", **{"data.packing": False, "loss.ce_weight": 0.5,
                                     "data.seq_len": 640})  # fmt: skip
    tok = load_tokenizer(cfg.teacher.spec)
    data = prepare_data(cfg, tok, world_size=1)
    batch = data.micro_batch(0, 0)
    width = batch["input_ids"].shape[1]
    assert width < 640 and bool(batch["attention_mask"][:, -1].any())
    rows = batch["rows"]
    full = {"input_ids": data.blocks[rows], "attention_mask": data.mask[rows],
            "labels": data.labels[rows], "rows": rows}  # fmt: skip
    assert not full["attention_mask"][:, width:].any()
    student = load_student(cfg, tok)
    teacher = load_teacher(cfg, tok, student.get_output_embeddings().weight.shape[0])
    params = list(student.parameters())
    losses, grads = [], []
    for b in (batch, full):
        t = micro_loss(HiddenLM(student), teacher, b, cfg).total
        losses.append(t.detach())
        grads.append(torch.autograd.grad(t, params, allow_unused=True))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ce_loss_runs_the_head_only_on_counted_positions_and_equals_full_ce(
    tmp_path: Path,
) -> None:
    """Without an online teacher the head sees only labelled rows (a speed-up for big
    vocabularies); the loss and its gradient equal torch's CE over the full logits."""
    import torch.nn.functional as F

    from potstill.core.models import load_tokenizer
    from potstill.distill.train.data import prepare_data
    from potstill.distill.train.models import load_student

    cfg = tiny_cfg(tmp_path / "h", **{"data.packing": False, "loss.ce_weight": 1.0})
    tok = load_tokenizer(cfg.teacher.spec)
    batch = prepare_data(cfg, tok, world_size=1).micro_batch(0, 0)
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    student = load_student(cfg, tok)
    got = micro_loss(HiddenLM(student), None, batch, cfg).total
    g_got = torch.autograd.grad(got, list(student.parameters()), allow_unused=True)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                           batch["labels"].reshape(-1), ignore_index=-100, reduction="sum")  # fmt: skip
    g_want = torch.autograd.grad(want, list(student.parameters()), allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for a, b in zip(g_got, g_want):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = recipe.micro_loss
    calls = {"n": 0}

    def poisoned(*args: object, **kw: object) -> recipe.LossTerms:
        calls["n"] += 1
        terms = real(*args, **kw)
        if calls["n"] <= 10:  # step 6 (2 micro-batches a step)
            return terms
        return terms._replace(total=terms.total * float("nan"))  # the logged terms stay finite

    monkeypatch.setattr(recipe, "micro_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="step 6") as exc:
        run_distill(tiny_cfg(out), show_progress=False)
    assert "step_000004" in str(exc.value)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000004"]
    assert not (out / "student").exists()


def test_ce_only_baseline_loads_no_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("teacher loaded for a CE-only run")

    monkeypatch.setattr("potstill.distill.teachers.HFTeacher.from_spec", boom)
    run = run_distill(tiny_cfg(tmp_path / "ce", **{"loss.ce_weight": 1.0}), show_progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("kd") is None for r in rows if r["split"] == "train")


def test_train_top_layers_freezes_everything_below(tmp_path: Path) -> None:
    """Only the top decoder layer and the final norm move; embeddings and the rest do not."""
    base = tmp_path / "base"
    first = run_distill(tiny_cfg(base, **{"student.layers": 2}), show_progress=False)
    cfg = tiny_cfg(tmp_path / "top", **{"student.init": "checkpoint",
                   "student.checkpoint": str(first / "student"), "student.train_top_layers": 1})  # fmt: skip
    run = run_distill(cfg, show_progress=False)
    before, after = student_weights(first), student_weights(run)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("model.layers.1.", "model.norm.")) for k in moved)
    assert "model.embed_tokens.weight" not in moved
    with pytest.raises(PotstillError, match="at most 2"):
        freeze_below(_two_layer(first), 3)


def _two_layer(run: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run / "student")
