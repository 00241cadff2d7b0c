"""`accelerate launch` with 2 CPU processes trains the same job data-parallel (gloo).

accelerate 1.x routes `--cpu --num_processes N` to mpirun (not installed here)
and otherwise runs a single process; the torchrun path (`--multi_gpu`) with
accelerate's own ACCELERATE_USE_CPU=1 switch gives a gloo DDP job on the CPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from potstill.distill.config import DistillConfig, load_config
from potstill.distill.train.recipe import run_distill

from .conftest import REPO, tiny_overrides

TINY = REPO / "configs" / "tiny.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_two_process_cpu_run_matches_single_process(tmp_path: Path) -> None:
    # Same global batch: 2 processes x 2 sequences vs 1 process x 4 sequences.
    steps = {"train.steps": 4, "train.save_every": 2, "train.eval_every": 0}
    two = tmp_path / "ddp"
    exe = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(exe),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "potstill.cli",
        "distill",
        "--config",
        str(TINY),
        "--no-progress",
        *tiny_overrides(two, **steps, **{"train.micro_batch_size": 2}),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((two / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["global_batch_sequences"] == 8

    cfg = load_config(
        DistillConfig,
        TINY,
        tiny_overrides(tmp_path / "one", **steps, **{"train.micro_batch_size": 4}),
    )
    one = run_distill(cfg, show_progress=False)
    # The loss is a global token mean, so both runs log the same numbers...
    for a, b in zip(_train_losses(two), _train_losses(one), strict=True):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b))
    # ...and end at (numerically) the same weights.
    wa = load_file(str(two / "student" / "model.safetensors"))
    wb = load_file(str(one / "student" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)


def test_two_process_on_policy_run(tmp_path: Path) -> None:
    """On-policy rollouts under `accelerate launch`: every rank samples its share of micro-batch
    g's prompts (seeded by rank), the ranks agree on which micro-batches are on-policy, and
    the step's token count is summed across them."""
    run = tmp_path / "ddp-onpolicy"
    over = {"train.steps": 3, "train.save_every": 0, "train.eval_every": 0,
            "train.micro_batch_size": 2, "loss.on_policy.lmbda": 1.0,
            "loss.on_policy.max_new_tokens": 6, "loss.on_policy.prompt_tokens": 4}  # fmt: skip
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m",
           "potstill.cli", "distill", "--config", str(TINY), "--no-progress",
           *tiny_overrides(run, **over)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in rows if r["split"] == "train"]
    # 2 ranks x 2 rows x 2 micro-batches x at most 6 sampled tokens per step
    steps = [b - a for a, b in zip([0, *tokens], tokens)]
    assert len(steps) == 3 and all(8 <= n <= 48 for n in steps), steps
    assert (run / "student" / "model.safetensors").is_file()
