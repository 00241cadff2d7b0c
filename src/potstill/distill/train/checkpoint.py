"""Crash-safe training checkpoints.

A checkpoint is a directory ``checkpoints/step_000123`` holding accelerate's
state (model weights as safetensors, optimizer, scheduler, every process's RNG
states) plus ``progress.json`` (step, tokens seen, data position, world size,
config). It is written under a temporary name and renamed into place only when
complete, so a kill at any moment leaves either the old set of checkpoints or
the old set plus one complete new one -- never a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from potstill.core.errors import PotstillError
from potstill.core.io import atomic_write_json

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass
class Progress:
    """Where a run stands; enough to resume it exactly."""

    step: int
    tokens: int
    micro_batches: int  # global micro-batches consumed (the data position)
    world_size: int
    config: dict[str, Any]


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first (temp dirs are ignored)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / "progress.json").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def save_checkpoint(accelerator: Any, root: Path, progress: Progress, *, keep: int) -> Path:
    """Save state collectively; the main process renames it into place and prunes old ones."""
    final = step_dir(root, progress.step)
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "progress.json", asdict(progress))
        if final.exists():  # re-saving the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_progress(ckpt: Path) -> Progress:
    data = json.loads((ckpt / "progress.json").read_text())
    return Progress(**data)


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], prefix: str = ""
) -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, prefix=f"{name}.")
        elif a != b:
            diffs.append(f"{name}: checkpoint {a!r} vs now {b!r}")
    return diffs


def find_resume_point(
    root: Path, config: dict[str, Any], world_size: int
) -> tuple[Path, Progress] | None:
    """The newest complete checkpoint, checked against the current config and world size."""
    ckpts = list_checkpoints(root)
    if not ckpts:
        return None
    path = ckpts[-1][1]
    progress = load_progress(path)
    diffs = config_differences(progress.config, config)
    if diffs:
        raise PotstillError(
            f"cannot resume from {path}: the config changed ({'; '.join(diffs)}); "
            "resume with the same config, or start a new out_dir"
        )
    if progress.world_size != world_size:
        raise PotstillError(
            f"cannot resume from {path}: it was written by {progress.world_size} process(es), "
            f"now {world_size}; relaunch with --num_processes {progress.world_size}"
        )
    return path, progress
