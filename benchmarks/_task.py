"""The addition task's models for the benchmarks: ground-truth traces, and a scratch Llama
trained on (prompt, output) pairs by potstill's own recipe (CE on the assistant tokens)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from potstill.distill.evaluate.tasks import TaskExample, reference_output

TOKENIZER = "tiny:0"  # the byte tokenizer with a ChatML template


def ground_truth(examples: list[TaskExample], seed: int, copies: int = 1) -> list[tuple[str, str]]:
    """``copies`` random reference traces per example, as (prompt, output) pairs."""
    rng = random.Random(seed)
    return [(e.prompt, reference_output(e, rng)) for e in examples for _ in range(copies)]


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """(prompt, output) pairs as a ``messages`` JSONL file (one user and one assistant turn)."""
    with path.open("w") as fh:
        for p, out in pairs:
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": out}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return path


def train_lm(s: dict[str, Any], pairs: list[tuple[str, str]], shape: list[int], steps: int,
             work: Path, name: str) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """A scratch Llama ``shape = [layers, width, seed]`` trained by ``run_distill`` (CE on the
    assistant tokens of the (prompt, output) pairs); returns (model in eval mode, info with
    ``dir``, the saved Hugging Face folder)."""
    from transformers import AutoModelForCausalLM

    from potstill.distill.config import DistillConfig
    from potstill.distill.train.recipe import run_distill

    path = write_pairs(work / f"{name}.jsonl", pairs)
    layers, width, seed = shape
    cfg = DistillConfig.model_validate(
        {
            "out_dir": str(work / f"run_{name}"),
            "teacher": {"spec": "none"},
            "student": {"init": "scratch", "layers": layers, "width": width, "seed": seed,
                        "tokenizer": TOKENIZER},
            "loss": {"ce_weight": 1.0},
            "optim": {"lr": s["lr"], "warmup_steps": 20, "weight_decay": 0.0},
            "data": {"train": f"messages:{path}", "eval": None, "seq_len": s["seq_len"]},
            "train": {"steps": steps, "micro_batch_size": s["batch"], "save_every": 0,
                      "eval_every": 0, "log_every": 10, "seed": 0, "threads": s["threads"]},
        }
    )  # fmt: skip
    t0 = time.perf_counter()
    out = run_distill(cfg, show_progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("split") == "train"][-1]
    model = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    info = {"final_train_ce": last["ce"], "train_s": time.perf_counter() - t0,
            "dir": str(out / "student")}  # fmt: skip
    return model, info
