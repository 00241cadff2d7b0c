"""Atomic file and directory writes, and the cache root.

Nothing potstill writes is ever seen half-written: files go to a temporary
sibling and are renamed into place (``os.replace`` is atomic on POSIX within one
filesystem); directories are built under a temporary name and renamed last.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from potstill.core.errors import PotstillError


def cache_root(cache_dir: Path | None = None) -> Path:
    """The potstill cache root: ``cache_dir``, else ``$POTSTILL_CACHE``, else ``~/.cache/potstill``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("POTSTILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "potstill"


def jsonl_records(path: str | Path, text: str, *, hint: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for each non-blank line of ``text`` (the JSONL file
    ``path``); PotstillError ``"{path}:{n}: not valid JSON (...); {hint}"`` on a bad line."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise PotstillError(f"{path}:{lineno}: not valid JSON ({e.msg}); {hint}") from None


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` via a temp file + fsync + rename.

    ``mode`` (e.g. ``0o600`` for secrets) is set before any byte is written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp directory; on success it replaces ``final`` in one rename.

    On an exception the temp directory is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            # Rename the old one aside first so `final` always names a complete dir.
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
