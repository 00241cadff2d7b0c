"""The rival in kd_throughput: TRL's GKDTrainer on the same student, teacher, batch, sequence
length, dtype and constant LR, timed per step."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from _common import sync


def run_trl(a: argparse.Namespace, tmp: Path, tokenizer: Any, blocks: torch.Tensor) -> list[float]:
    """TRL GKDTrainer, lmbda=0 (no on-policy generation), beta=0 (forward KL), same student
    init, teacher, batch, seq len, dtype and constant LR; returns per-step wall times."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from potstill.core.models import load_model
    from potstill.distill.config import StudentConfig
    from potstill.distill.train.student import build_student

    student = build_student(
        StudentConfig(layers=a.student_layers, width=a.student_width, seed=0),
        tokenizer,
        max_len=a.seq_len,
    )
    teacher, _ = load_model(a.teacher)
    ds = Dataset.from_dict(
        {
            "input_ids": blocks.tolist(),
            "attention_mask": torch.ones_like(blocks).tolist(),
            "labels": blocks.tolist(),  # GKD shifts labels itself
        }
    )

    def collate(feats: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            k: torch.tensor([f[k] for f in feats])
            for k in ("input_ids", "attention_mask", "labels")
        }

    times: list[float] = []

    class Timer(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, *args: Any, **kw: Any) -> None:
            sync(a.device)
            Timer.t0 = time.perf_counter()

        def on_step_end(self, *args: Any, **kw: Any) -> None:
            sync(a.device)
            times.append(time.perf_counter() - Timer.t0)

    args = GKDConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        max_length=a.seq_len,
        bf16=a.dtype == "bf16",
        use_cpu=a.device == "cpu",
        save_strategy="no",
        report_to=[],
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        data_collator=collate,
        train_dataset=ds,
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trainer.train()
    return times
