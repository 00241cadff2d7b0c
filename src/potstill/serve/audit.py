"""Append-only JSONL audit log of served requests.

One line per request, written and flushed when the request ends (whatever its status).
A line holds the key id (see :func:`potstill.serve.auth.key_id`), times, the prompt's
SHA-256, token counts and the request parameters. It never holds an API key or prompt
text: only the fields in :data:`AUDIT_FIELDS` are written.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

__all__ = ["AUDIT_FIELDS", "AuditLog", "prompt_sha256"]

AUDIT_FIELDS = (
    "time",
    "unix_time",
    "duration_s",
    "key_id",
    "endpoint",
    "status",
    "model",
    "prompt_sha256",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "logprobs",
    "top_logprobs",
    "echo",
    "stream",
    "seed",
    "n_stop",
    "error_code",
)


def prompt_sha256(prompt: Any) -> str:
    """SHA-256 hex of a prompt: UTF-8 of a string, else of its canonical JSON
    (sorted keys, no spaces), e.g. a chat ``messages`` list or token ids."""
    if isinstance(prompt, str):
        blob = prompt.encode("utf-8")
    else:
        blob = json.dumps(
            prompt, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    return hashlib.sha256(blob).hexdigest()


class AuditLog:
    """Thread-safe appender; ``path=None`` makes :meth:`write` a no-op."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append the :data:`AUDIT_FIELDS` of ``record`` as one JSON line and flush."""
        if self._fh is None:
            return
        line = json.dumps({k: record.get(k) for k in AUDIT_FIELDS}, ensure_ascii=False)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
