"""Shared fixtures: a tiny distillation config and a hermetic cache directory."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# Never reach a model hub from tests; keep library chatter down.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# The vLLM tests need vLLM, which only `make test-vllm`'s venv has (marker `vllm`, deselected by
# default): elsewhere they are not collected, rather than counted as a skip in every CI run.
collect_ignore = (
    [] if importlib.util.find_spec("vllm") else ["test_vllm.py", "test_vllm_gateway.py"]
)


@pytest.fixture(autouse=True)
def _hermetic_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A per-session cache so tests never depend on (or pollute) ~/.cache/potstill.
    if "POTSTILL_TEST_REAL_CACHE" not in os.environ:
        monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path_factory.getbasetemp() / "potstill-cache"))


def tiny_overrides(out_dir: Path, **extra: object) -> list[str]:
    """Overrides that make configs/tiny.yaml fast and self-contained for one test."""
    items = {"out_dir": str(out_dir), "train.threads": 1, **extra}
    return [f"{k}={v}" for k, v in items.items()]


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/NAME.py`` as a module (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_bench", REPO / "benchmarks" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """One torch thread for a module: tiny models are latency-bound, so one thread is faster
    and leaves the other core free (use with ``pytestmark = usefixtures(...)``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_endpoint_targets(ids: Any, lps: Any, full: Any, labels: Any, k: int) -> int:
    """An endpoint teacher's targets against the white-box teacher; returns the scored count.

    ``ids``, ``lps``: ``[B, T, S]`` (slot 0 the label, then the endpoint's top-``k``; -1 where
    unknown or unscored); ``full``: the white-box log-softmax ``[B, T, V]``; ``labels``
    ``[B, T]`` (-100 unscored). Every known id's logprob matches to 1e-4, and the top-``k`` ids
    are the white-box top-``k`` as a set.
    """
    keep = labels != -100
    assert bool((ids[keep][:, 0] == labels[keep]).all())
    assert bool((ids[~keep] == -1).all())
    known = ids[keep] >= 0
    white = full[keep].gather(-1, ids[keep].clamp(min=0))
    assert (lps[keep][known] - white[known]).abs().max().item() < 1e-4
    top = full[keep].topk(k, dim=-1).indices
    for row_ids, row_top in zip(ids[keep], top, strict=True):
        assert set(row_top.tolist()) <= set(row_ids.tolist())
    return int(keep.sum())
