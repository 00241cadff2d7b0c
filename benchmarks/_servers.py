"""OpenAI-compatible servers in their own processes, for benchmarks that compare engines
(and the vLLM tests): potstill's gateway and vLLM's own server each get a fresh process, so
one engine's threads, caches and allocator never slow another's."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ServerFailed", "free_port", "subprocess_server"]


class ServerFailed(RuntimeError):
    """The server exited or never answered; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerFailed(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise ServerFailed(
        f"the server was not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}"
    )


@contextmanager
def subprocess_server(
    argv: Sequence[str], port: int, log: Path, *, env: dict[str, str] | None = None,
    timeout: float = 600.0, ready_path: str = "/health",
) -> Iterator[str]:  # fmt: skip
    """Run ``argv`` (a server listening on ``port``; output to ``log``) until ``ready_path``
    answers 200, yield its ``/v1`` base URL, and stop it when the block ends."""
    with log.open("w") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})  # fmt: skip
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}{ready_path}", log, timeout)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
