"""The distillation recipe: one training loop, read top to bottom.

``run_distill(cfg)`` does, in order:

1. validate every input (texts, tokenizer, teacher, tokenizer agreement) before
   anything is written, so bad input leaves no half-made run folder;
2. build the student, AdamW and a warm-up + cosine schedule, and hand them to
   accelerate (one process, or DDP under ``accelerate launch``);
3. loop over optimizer steps; each step consumes ``grad_accum`` micro-batches
   per process, and the loss is normalised by the unmasked-token count of the
   *whole* step across all processes and micro-batches, so neither gradient
   accumulation nor the number of processes changes the gradient;
4. log both loss terms (KD is often 100-1000x smaller than CE), evaluate, and
   checkpoint atomically; a non-finite loss stops the run and keeps the last
   good checkpoint;
5. save the student as a plain Hugging Face directory and plot the curves.

The data order is a pure function of ``(train.seed, epoch)``, and the data
position is the number of micro-batches consumed, so ``resume=True`` replays
exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potstill.core.errors import PotstillError, TrainingDiverged
from potstill.core.faults import fault_point
from potstill.core.io import atomic_dir, atomic_write_text
from potstill.distill.config import DistillConfig, dump_config
from potstill.distill.losses import TopKTargets, fused_linear_kd_loss
from potstill.distill.teachers.crosstok import CrossTokenizerTeacher
from potstill.distill.train.checkpoint import (
    Progress,
    find_resume_point,
    list_checkpoints,
    save_checkpoint,
)
from potstill.distill.train.data import TrainData, prepare_data
from potstill.distill.train.models import (
    check_teacher_signal,
    load_student,
    load_teacher,
    tokenizer_spec,
)
from potstill.distill.train.objective import LossTerms, cross_tokenizer_terms, kd_objective
from potstill.distill.train.onpolicy import Rollouts, make_rollouts
from potstill.distill.train.student import count_params


class HiddenLM(nn.Module):
    """Wraps a causal LM so its forward returns final hidden states [B,T,H].

    The projection to the vocabulary is done by the loss (possibly in token
    chunks), so the full [B,T,V] logits never have to exist at once. Wrapping,
    rather than calling ``model.model`` directly, keeps DDP's gradient hooks
    in the forward path.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out = self.lm.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state

    @property
    def head_weight(self) -> Tensor:
        return self.lm.get_output_embeddings().weight


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    # Decay matrices only: norms and biases are not decayed (standard for LMs).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    o = cfg.optim
    # The fused kernel: one pass per tensor instead of a dozen ops per parameter. On the 4x256
    # student (38 tensors, 15.8M values) a step took 10 ms against 48 ms for the default loop.
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + other)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=fused,
    )


def weight_of(model: Any) -> Tensor:
    """The student's output head ``[V, H]`` (through a DDP wrapper if there is one)."""
    return model.module.head_weight if hasattr(model, "module") else model.head_weight


# The fp32 head's chunk with CE or top-k targets: 128 MiB of logits (682 rows at V = 49,152).
# Measured at 2048 rows: the three head GEMMs took 1.10 s in 512-row chunks, 1.08 s in 1024-row
# ones, 1.29 s in 128-row ones (the chunk's GEMMs grow thin).
_HEAD_CHUNK_BYTES = 128 << 20


def micro_loss(
    model: HiddenLM, teacher: Any, batch: dict[str, Tensor], cfg: DistillConfig
) -> LossTerms:
    """:func:`kd_objective` summed over one micro-batch's unmasked tokens.

    The teacher signal comes from, in order: sparse top-k targets in the batch
    (``topk_ids``/``topk_logprobs`` [B,T,K], from a logit cache or harvested API
    logprobs, or ``pending``: a future of them from an endpoint teacher), the online
    teacher (full logits, chunked when ``loss.chunk_tokens`` is set), or nothing (CE alone).
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    hidden = model(ids, mask)
    if isinstance(teacher, CrossTokenizerTeacher):  # its own tokenizer: byte-aligned positions
        with torch.no_grad():
            scored = teacher.score(ids, mask, labels)
        return cross_tokenizer_terms(hidden, weight_of(model), labels, scored, teacher.vocab_map,
                                     loss=cfg.loss, student_vocab=teacher.student_vocab)  # fmt: skip
    if "pending" in batch:  # an endpoint teacher scored (is scoring) while the student ran
        k_ids, k_lps = batch["pending"].result()
        batch = {**batch, "topk_ids": k_ids.to(ids.device), "topk_logprobs": k_lps.to(ids.device)}
    weight = weight_of(model)
    if cfg.loss.chunk_tokens is not None and teacher is not None and "topk_ids" not in batch:
        with torch.no_grad():
            t_hidden, t_weight = teacher.hidden_and_head(ids, mask)
        h = hidden.reshape(-1, hidden.shape[-1])
        th = t_hidden.reshape(-1, t_hidden.shape[-1])
        vocab = teacher.vocab_size
        return LossTerms(
            *fused_linear_kd_loss(
                functools.partial(kd_objective, loss=cfg.loss),
                h,
                weight[:vocab],
                (th, t_weight[:vocab]),
                labels.reshape(-1),
                chunk_tokens=cfg.loss.chunk_tokens,
                reduction="sum",
            )
        )
    if teacher is None or "topk_ids" in batch:
        # The head only on positions that count: a prompt or padding position's logits would
        # be computed and then masked. With a 262k-token vocabulary the head is most of a step.
        keep = labels.reshape(-1) != -100
        h, y = hidden.reshape(-1, hidden.shape[-1])[keep], labels.reshape(-1)[keep]
        sparse = None
        if "topk_ids" in batch:  # sparse teacher targets carried by the data (cache, harvest)
            k = batch["topk_ids"].shape[-1]
            sparse = TopKTargets(batch["topk_ids"].reshape(-1, k)[keep],
                                 batch["topk_logprobs"].reshape(-1, k)[keep])  # fmt: skip
        objective = functools.partial(kd_objective, loss=cfg.loss, overwrite=True)
        if torch.is_autocast_enabled(h.device.type):  # the head whole, in the autocast dtype
            return objective(F.linear(h, weight), sparse, y)  # type: ignore[no-any-return]
        # fp32: the head and the objective in chunks over one reused [chunk, V] buffer. A whole
        # [N, V] logits tensor is page-faulted afresh every step: measured at 2048 x 49,152 on
        # the 2-core VM, the head's three GEMMs took 1.42 s that way and 1.10 s in chunks.
        return LossTerms(*fused_linear_kd_loss(
            objective, h, weight, sparse, y, reduction="sum",
            chunk_tokens=cfg.loss.chunk_tokens or max(1, _HEAD_CHUNK_BYTES // (4 * weight.shape[0])),
        ))  # fmt: skip
    vocab = teacher.vocab_size
    keep = labels.reshape(-1) != -100
    if bool(keep.all()):  # packed text: every position counts
        logits = F.linear(hidden, weight)
        with torch.no_grad():
            t_logits = teacher.logits(ids, mask)
        return kd_objective(
            logits[..., :vocab], t_logits[..., :vocab], labels, loss=cfg.loss, overwrite=True
        )
    # Rollouts and chat data score a fraction of the positions: project only those, on both
    # sides (the teacher through its head, where the head is a plain linear map).
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1])[keep], weight)
    with torch.no_grad():
        t_logits = _teacher_rows(teacher, ids, mask, keep)
    return kd_objective(
        logits[:, :vocab],
        t_logits[:, :vocab],
        labels.reshape(-1)[keep],
        loss=cfg.loss,
        overwrite=True,
    )


def _teacher_rows(teacher: Any, ids: Tensor, mask: Tensor, keep: Tensor) -> Tensor:
    """The teacher's logits ``[n, V]`` at the flat positions ``keep`` ``[B*T]`` only."""
    try:
        t_hidden, t_head = teacher.hidden_and_head(ids, mask)
    except (PotstillError, AttributeError):  # a soft-capped or biased head: full logits, then rows
        full = teacher.logits(ids, mask)
        return full.reshape(-1, full.shape[-1])[keep.to(full.device)]
    rows = t_hidden.reshape(-1, t_hidden.shape[-1])[keep.to(t_hidden.device)]
    return F.linear(rows, t_head)


def _check_out_dir(out: Path, resume: bool) -> None:
    if out.exists() and any(out.iterdir()) and not resume:
        raise PotstillError(
            f"out_dir {out} already holds a run; pass --resume to continue it, "
            "or set out_dir=<new folder>"
        )


def run_distill(
    cfg: DistillConfig,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    show_progress: bool = True,
) -> Path:
    """Train a student by distillation; returns the run folder.

    ``stop_after`` ends the loop after that many optimizer steps (as a crash
    would, but cleanly, right after a checkpoint); tests use it to check that
    resuming reproduces an uninterrupted run bit for bit.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from potstill.core.models import load_tokenizer

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    acc = Accelerator(mixed_precision="bf16" if cfg.train.bf16 else "no")
    out = Path(cfg.out_dir)
    _check_out_dir(out, resume)

    # 1. Validate every input before writing anything.
    tokenizer = load_tokenizer(tokenizer_spec(cfg))
    data = prepare_data(cfg, tokenizer, world_size=acc.num_processes)
    set_seed(cfg.train.seed)
    student = load_student(cfg, tokenizer)
    vocab = student.get_output_embeddings().weight.shape[0]
    teacher = load_teacher(cfg, tokenizer, vocab)
    try:
        _run(cfg, acc, out, resume, tokenizer, data, student, teacher, stop_after, show_progress)
    finally:
        if hasattr(teacher, "close"):
            teacher.close()  # an endpoint teacher's connections and event loop
    return out


def _run(
    cfg: DistillConfig, acc: Any, out: Path, resume: bool, tokenizer: Any, data: TrainData,
    student: nn.Module, teacher: Any, stop_after: int | None, show_progress: bool,
) -> None:  # fmt: skip
    """Steps 1 (the rest) to 4 of :func:`run_distill`."""
    from potstill.distill.teachers.endpoint import EndpointTeacher

    endpoint = isinstance(teacher, EndpointTeacher)
    if teacher is not None and not endpoint:
        teacher.to(acc.device)
    check_teacher_signal(
        cfg, live=teacher is not None and not endpoint, sparse=data.targets is not None or endpoint
    )
    if isinstance(teacher, CrossTokenizerTeacher):
        _check_alignment(teacher, data)
    rollouts = _rollouts(cfg, tokenizer, acc.num_processes)
    if rollouts is not None and teacher is None:
        raise PotstillError(
            f"loss.on_policy.lmbda={cfg.loss.on_policy.lmbda} needs a teacher that scores the "  # type: ignore[union-attr]
            f"student's samples, but teacher.spec={str(cfg.teacher.spec)!r} (with "
            f"loss.ce_weight={cfg.loss.ce_weight}) gives none: use a model or an endpoint URL"
        )
    config_dict = json.loads(json.dumps(cfg.model_dump(mode="json")))
    config_dict.pop("out_dir")
    resume_from = (
        find_resume_point(out / "checkpoints", config_dict, acc.num_processes) if resume else None
    )

    # 2. Model, optimizer, schedule.
    model, optimizer, sched = _prepare(acc, cfg, student)
    progress = Progress(
        step=0, tokens=0, micro_batches=0, world_size=acc.num_processes, config=config_dict
    )
    if resume_from is not None:
        acc.load_state(str(resume_from[0]))
        progress = resume_from[1]
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
        _write_run_info(out, cfg, acc, count_params(student), data, teacher)
        _truncate_metrics(out / "metrics.jsonl", progress.step)
    acc.wait_for_everyone()

    # 3. The loop.
    _train_loop(cfg, acc, model, optimizer, sched, teacher, data, rollouts, progress, out,
                stop_after=stop_after, show_progress=show_progress)  # fmt: skip
    if stop_after is not None and progress.step < cfg.train.steps:
        return

    # 4. Outputs.
    acc.wait_for_everyone()
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model).lm
        with atomic_dir(out / "student") as tmp:
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        _plot(out)
    acc.wait_for_everyone()


def _check_alignment(teacher: CrossTokenizerTeacher, data: TrainData) -> None:
    """Refuse data on which no scored student position aligns with a teacher position."""
    first = data.micro_batch(0, 0)
    scored = teacher.score(first["input_ids"], first["attention_mask"], first["labels"])
    if len(scored.rows) == 0:
        raise PotstillError(
            "loss.cross_tokenizer: no scored position of the first micro-batch aligns with the "
            "teacher's tokens (no text to align: the sequences hold only special tokens, or the "
            "scored positions are all before special tokens); give data.train real text"
        )


def _rollouts(cfg: DistillConfig, tokenizer: Any, world_size: int) -> Rollouts | None:
    op = cfg.loss.on_policy
    if op is None or op.lmbda == 0.0:
        return None  # lmbda = 0 is the off-policy recipe exactly: nothing is sampled
    return make_rollouts(
        op, tokenizer, seq_len=cfg.data.seq_len, seed=cfg.train.seed,
        micro_batch_size=cfg.train.micro_batch_size, world_size=world_size,
    )  # fmt: skip


def _micro_batches(
    cfg: DistillConfig, acc: Any, model: Any, data: TrainData, rollouts: Rollouts | None,
    teacher: Any, progress: Progress,
) -> list[dict[str, Any]]:  # fmt: skip
    """The step's micro-batches: data, or the student's rollouts where on-policy; an
    endpoint teacher is asked to score them all at once (each gets a ``pending`` future)."""
    from potstill.distill.teachers.endpoint import EndpointTeacher

    out: list[dict[str, Any]] = []
    for i in range(cfg.train.grad_accum):
        g = progress.micro_batches + i
        batch: dict[str, Any] = data.micro_batch(g, acc.process_index)
        if rollouts is not None and rollouts.on_policy(g):
            batch = rollouts.batch(acc.unwrap_model(model).lm, g, acc.process_index, batch)
        if isinstance(teacher, EndpointTeacher):
            batch["pending"] = teacher.submit(
                batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
        out.append(batch)
    return out


def _prepare(acc: Any, cfg: DistillConfig, student: nn.Module) -> tuple[Any, Any, Any]:
    """(model, optimizer, scheduler), the first two prepared by accelerate."""
    model = HiddenLM(student)
    optimizer = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)
    )
    # The scheduler is NOT passed through accelerate.prepare: accelerate steps a
    # prepared scheduler once per process per step (it assumes sharded epochs),
    # which would make the LR schedule depend on the number of processes.
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(sched)
    return model, optimizer, sched


def _train_loop(
    cfg: DistillConfig,
    acc: Any,
    model: Any,
    optimizer: Any,
    sched: Any,
    teacher: Any,
    data: TrainData,
    rollouts: Rollouts | None,
    progress: Progress,
    out: Path,
    *,
    stop_after: int | None,
    show_progress: bool,
) -> None:
    tc = cfg.train
    metrics_path = out / "metrics.jsonl"
    t0, tokens0 = time.perf_counter(), progress.tokens
    bar = _progress_bar(acc.is_main_process and show_progress, cfg.train.steps, progress.step)
    model.train()
    while progress.step < tc.steps:
        batches = _micro_batches(cfg, acc, model, data, rollouts, teacher, progress)
        # Unmasked tokens of the whole step, summed over processes: the one normaliser.
        local_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        n_tokens = int(acc.reduce(torch.tensor(local_tokens, device=acc.device), "sum").item())
        # DDP averages gradients over processes; multiply back so the result is a global token mean.
        scale = acc.num_processes / max(1, n_tokens)
        # total, ce, kd (token sums) and what backward actually saw, to catch NaNs the terms miss
        step_sums = torch.zeros(4)
        for i, batch in enumerate(batches):
            batch = {k: v.to(acc.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            sync = i == len(batches) - 1
            ctx = acc.no_sync(model) if not sync else _null()
            with ctx, acc.autocast():
                terms = micro_loss(model, teacher, batch, cfg)
                loss = terms.total * scale
            acc.backward(loss)
            step_sums += torch.stack([t.detach().float().cpu() for t in (*terms, loss)])
        sums = acc.reduce(step_sums.to(acc.device), "sum")
        total, ce, kd = (float(x) / max(1, n_tokens) for x in sums[:3].cpu())
        if not (math.isfinite(total) and math.isfinite(float(sums[3]))):
            optimizer.zero_grad(set_to_none=True)
            _diverged(total if not math.isfinite(total) else float(sums[3]), progress, out)
        grad_norm = (
            acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            if cfg.optim.grad_clip
            else None
        )
        lr = sched.get_last_lr()[0]
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.micro_batches += tc.grad_accum
        progress.tokens += n_tokens
        elapsed = time.perf_counter() - t0
        if acc.is_main_process and (progress.step % tc.log_every == 0 or progress.step == tc.steps):
            has_kd = teacher is not None or data.targets is not None
            row = {"split": "train", "step": progress.step, "tokens": progress.tokens,
                   "loss": total, "ce": ce, "kd": kd if has_kd else None, "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "tok_per_s": (progress.tokens - tokens0) / max(elapsed, 1e-9)}  # fmt: skip
            _append_metrics(metrics_path, row)
        if bar is not None:
            bar.update(progress.step, loss=total)
        last_step = progress.step == tc.steps or progress.step == stop_after
        if (tc.eval_every and progress.step % tc.eval_every == 0) or last_step:
            _evaluate(acc, model, data, progress, metrics_path)
        if (tc.save_every and progress.step % tc.save_every == 0) or last_step:
            save_checkpoint(acc, out / "checkpoints", progress, keep=tc.keep_checkpoints)
            fault_point("train.after_checkpoint")
        if progress.step == stop_after:
            break
    if bar is not None:
        bar.close()


def _diverged(value: float, progress: Progress, out: Path) -> None:
    last = list_checkpoints(out / "checkpoints")
    where = f"last good checkpoint: {last[-1][1]}" if last else "no checkpoint was written yet"
    raise TrainingDiverged(
        f"loss became non-finite ({value}) at step {progress.step + 1}; the update was not "
        f"applied; {where}. Lower optim.lr, keep optim.grad_clip on, or disable train.bf16"
    )


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _evaluate(acc: Any, model: Any, data: TrainData, progress: Progress, path: Path) -> None:
    if data.eval_blocks is None:
        return
    if acc.is_main_process:
        from potstill.distill.evaluate import evaluate_lm

        lm = acc.unwrap_model(model).lm
        lm.eval()
        res = evaluate_lm(lm, data.eval_blocks, attention_mask=data.eval_mask, batch_size=8)
        lm.train()
        _append_metrics(
            path,
            {
                "split": "eval",
                "step": progress.step,
                "tokens": progress.tokens,
                "eval_nll": res["nll"],
                "eval_ppl": res["ppl"],
            },
        )
    acc.wait_for_everyone()


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint so no step appears twice.

    A kill can leave a torn last line; it is dropped too.
    """
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _write_run_info(
    out: Path, cfg: DistillConfig, acc: Any, n_params: int, data: TrainData, teacher: Any
) -> None:
    import platform

    import transformers

    info = {
        "potstill_config": cfg.model_dump(mode="json"),
        "world_size": acc.num_processes,
        "global_batch_sequences": cfg.train.micro_batch_size
        * cfg.train.grad_accum
        * acc.num_processes,
        "student_params": n_params,
        "teacher": None
        if teacher is None
        else {"name": teacher.name, "vocab_size": teacher.vocab_size},
        "train_sequences": data.n_train,
        "train_fingerprint": data.fingerprint,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "threads": torch.get_num_threads(),
    }
    atomic_write_text(out / "run_info.json", json.dumps(info, indent=2) + "\n")


def _plot(out: Path) -> None:
    from potstill.distill.train.curves import plot_loss_curves

    plot_loss_curves(out / "metrics.jsonl", out / "loss_curve.png", title=out.name)


class _Bar:
    def __init__(self, total: int, start: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.p = Progress(
            TextColumn("distill"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.p.add_task("distill", total=total, completed=start, loss="-")
        self.p.start()

    def update(self, step: int, *, loss: float) -> None:
        self.p.update(self.task, completed=step, loss=f"{loss:.4f}")

    def close(self) -> None:
        self.p.stop()


def _progress_bar(enabled: bool, total: int, start: int) -> _Bar | None:
    return _Bar(total, start) if enabled else None


def remove_run(out: Path) -> None:
    """Used by callers that created ``out`` and must not leave it half-written."""
    shutil.rmtree(out, ignore_errors=True)
