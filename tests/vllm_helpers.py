"""What the vLLM tests share: a tiny Llama vLLM can load, a free port, a server subprocess
that is waited for (and whose log is shown when it fails), and the potstill CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from potstill.core.watermark.keys import WatermarkKey

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 300.0) -> None:
    """Until ``url`` answers 200; fail with the server's log if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    pytest.fail(f"the server was not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def server(args: list[str], log: Path, port: int) -> Iterator[str]:
    """Run ``python ARGS`` (a server on ``port``) until the block ends: its base URL."""
    env = {**os.environ, **VLLM_ENV}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)  # fmt: skip
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/health", log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def potstill(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    """``python -m potstill.cli ARGS``, asserting its exit code."""
    done = subprocess.run([sys.executable, "-m", "potstill.cli", *args], capture_output=True,
                          text=True, timeout=600, check=False, env={**os.environ, **VLLM_ENV})  # fmt: skip
    assert done.returncode == code, done.stderr[-3000:]
    return done
