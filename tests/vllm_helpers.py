"""What the vLLM tests share: a tiny Llama vLLM can load, a free port, a server subprocess
that is waited for (``benchmarks/_servers.py``; its log is shown when it fails), and the
potstill CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from potstill.core.watermark.keys import WatermarkKey

from .conftest import load_benchmark

KEY = WatermarkKey(bytes(range(32)))
OTHER_KEY = WatermarkKey(bytes(range(1, 33)))
V = 320  # the tiny models' logits; their tokenizer has 260 tokens
#: vLLM's CPU build: both cores to the worker, a small KV cache, a private compile cache.
VLLM_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def tiny_dir(tmp_path: Path) -> Path:
    """A tiny Llama and its tokenizer saved for vLLM to load."""
    import torch
    from transformers import LlamaForCausalLM

    from potstill.core.tiny import build_tiny_tokenizer, tiny_config

    # vLLM's CPU attention has kernels for head sizes 32 and up, not the tiny models' 16.
    config = tiny_config(2, 128, V)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 64
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    build_tiny_tokenizer().save_pretrained(model_dir)
    return model_dir


_servers = load_benchmark("_servers")
free_port = _servers.free_port


@contextmanager
def server(args: list[str], log: Path, port: int) -> Iterator[str]:
    """Run ``python ARGS`` (a server on ``port``) until the block ends: its base URL."""
    try:
        with _servers.subprocess_server([sys.executable, *args], port, log, env=VLLM_ENV,
                                        timeout=300) as url:  # fmt: skip
            yield url
    except _servers.ServerFailed as err:
        pytest.fail(str(err))


def potstill(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    """``python -m potstill.cli ARGS``, asserting its exit code."""
    done = subprocess.run([sys.executable, "-m", "potstill.cli", *args], capture_output=True,
                          text=True, timeout=600, check=False, env={**os.environ, **VLLM_ENV})  # fmt: skip
    assert done.returncode == code, done.stderr[-3000:]
    return done
