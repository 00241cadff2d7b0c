"""On-policy throughput at lambda = 1: potstill's recipe against TRL's GKDTrainer, in one run.

Same student (a scratch Llama of ``tp_student`` shape with SmolLM2's tokenizer, seed 0), same
teacher (``tp_teacher`` in fp32), same prompts (default instruction prompts of at most 64
tokens, chat-templated), same generation (temperature 1, no top-k/top-p, ``tp_max_new`` tokens,
stopping at the end-of-turn token), same loss (generalized JSD, ``beta``), same batch and
optimizer steps. Both sample from the student on every step, score the completions with the
teacher and take one AdamW step. Training tokens = completion tokens scored (sampled tokens,
what both losses are summed over); the first step (warm-up, allocations) is left out of both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def short_prompts(tok: Any, n: int, max_tokens: int = 64) -> list[str]:
    from potstill.core.prompts import default_prompts

    out = []
    for p in default_prompts(4 * n):
        text = tok.apply_chat_template([{"role": "user", "content": p}],
                                       add_generation_prompt=True, tokenize=False)  # fmt: skip
        if len(tok(text, add_special_tokens=False)["input_ids"]) <= max_tokens:
            out.append(p)
        if len(out) == n:
            break
    return out


def fresh_accelerate() -> None:
    """Forget accelerate's process state: TRL's Trainer sets it up its own way (cpu=True), and
    potstill's recipe then refuses to re-initialise it with other settings."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def run_potstill(s: dict[str, Any], work: Path, prompts: list[str], tag: str) -> dict[str, float]:
    from potstill.distill.config import DistillConfig
    from potstill.distill.train.recipe import run_distill

    data = work / f"tp_prompts_{tag}.jsonl"
    with data.open("w") as fh:
        for p in prompts:  # the answer is never trained on at lambda = 1: rollouts replace it
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": "ok"}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    layers, width = s["tp_student"]
    cfg = DistillConfig.model_validate({
        "out_dir": str(work / f"tp_potstill_{tag}"),
        "teacher": {"spec": s["tp_teacher"], "dtype": "float32"},
        "student": {"layers": layers, "width": width, "seed": 0, "tokenizer": s["tp_tokenizer"]},
        "loss": {"kind": "generalized_jsd", "beta": s["beta"],
                 "on_policy": {"lmbda": 1.0, "max_new_tokens": s["tp_max_new"], "temperature": 1.0,
                               "prompts": "data"}},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": 0.1},
        "data": {"train": f"messages:{data}", "eval": None, "seq_len": s["tp_seq_len"]},
        "train": {"steps": s["tp_steps"], "micro_batch_size": s["tp_batch"], "save_every": 0,
                  "eval_every": 0, "log_every": 1, "seed": 0, "threads": s["tp_threads"]},
    })  # fmt: skip
    fresh_accelerate()
    out = run_distill(cfg, show_progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    # tok_per_s is cumulative since the loop started: elapsed_k = tokens_k / tok_per_s_k
    elapsed = [r["tokens"] / r["tok_per_s"] for r in rows]
    tokens = rows[-1]["tokens"] - rows[0]["tokens"]
    return {
        "tokens": tokens,
        "seconds": elapsed[-1] - elapsed[0],
        "tok_per_s": tokens / (elapsed[-1] - elapsed[0]),
    }


def run_trl(
    s: dict[str, Any], work: Path, prompts: list[str], tok: Any, tag: str
) -> dict[str, float]:
    """TRL's DistillationTrainer (on-policy on every step: GKD at lambda = 1, the trainer TRL
    maintains; its GKDTrainer warns that this configuration is covered by it)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from potstill.core.models import load_model
    from potstill.distill.config import StudentConfig
    from potstill.distill.train.student import build_student

    layers, width = s["tp_student"]
    student = build_student(StudentConfig(layers=layers, width=width, seed=0), tok,
                            max_len=s["tp_seq_len"])  # fmt: skip
    end = tok.convert_tokens_to_ids("<|im_end|>")
    student.generation_config.eos_token_id = [end, tok.eos_token_id]  # stop as potstill does
    teacher, _ = load_model(s["tp_teacher"])
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    times: list[float] = []

    class Timer(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            Timer.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - Timer.t0)

    args = DistillationConfig(
        output_dir=str(work / f"tp_trl_{tag}"), per_device_train_batch_size=s["tp_batch"],
        max_steps=s["tp_steps"], learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, beta=s["beta"], temperature=1.0,
        top_k=0, top_p=1.0, max_completion_length=s["tp_max_new"], use_cpu=True,
        save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    fresh_accelerate()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=ds, processing_class=tok, callbacks=[Timer()])  # fmt: skip
    trainer.train()
    # completion tokens per step: TRL logs their mean length per step (logging_steps=1)
    lens = [h["completions/mean_length"] for h in trainer.state.log_history
            if "completions/mean_length" in h]  # fmt: skip
    tokens = [round(n * s["tp_batch"]) for n in lens]
    return {"tokens": sum(tokens[1:]), "seconds": sum(times[1:]),
            "tok_per_s": sum(tokens[1:]) / sum(times[1:]), "tokens_per_step": tokens}  # fmt: skip


def throughput(s: dict[str, Any], work: Path, log: Callable[[str], None], tag: str,
               prompts: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Both trainers on one configuration (``s``'s ``tp_*`` settings); ``prompts`` default to
    short default instruction prompts."""
    from potstill.core.models import load_tokenizer

    tok = load_tokenizer(s["tp_tokenizer"])
    need = s["tp_batch"] * (s["tp_steps"] + 1)
    prompts = short_prompts(tok, need) if prompts is None else prompts[:need]
    ours = run_potstill(s, work, prompts, tag)
    log(f"[{tag}] potstill on-policy: {ours['tok_per_s']:.1f} training tok/s")
    trl = run_trl(s, work, prompts, tok, tag)
    log(f"[{tag}] TRL DistillationTrainer (GKD, lambda 1): {trl['tok_per_s']:.1f} training tok/s")
    settings = {k: s[k] for k in s if k.startswith("tp_")}
    return {"potstill": ours, "trl": trl, "speedup_vs_trl": ours["tok_per_s"] / trl["tok_per_s"],
            "n_prompts": len(prompts), "settings": settings}  # fmt: skip
