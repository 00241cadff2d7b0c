"""The harvest store: one SQLite file in WAL mode, one row per (prompt, sample), exactly once.

Schema (``schema_version`` 1)::

    records(key TEXT PRIMARY KEY,   -- record_key(model, params, messages, sample), sha256 hex
            prompt_id TEXT,         -- sha256 of the prompt messages (canonical JSON)
            prompt_idx INTEGER,     -- position of the prompt in the run's prompt list (ordering)
            sample INTEGER,         -- sample index 0..n-1 for this prompt
            model TEXT, params TEXT,            -- endpoint model name; generation params JSON
            messages TEXT,                       -- prompt messages JSON [{role, content}, ...]
            completion TEXT, finish_reason TEXT,
            usage TEXT,                          -- the API's usage object, JSON (or NULL)
            latency_s REAL,                      -- wall time of the successful request
            logprobs TEXT,                       -- per generated token, JSON, or NULL (below)
            created REAL)                        -- unix time of the commit
    failures(key TEXT PRIMARY KEY, prompt_idx, sample, messages, attempts INTEGER,
             status INTEGER, error TEXT, updated REAL)
    meta(k TEXT PRIMARY KEY, v TEXT)

``logprobs`` is a list with one entry per generated token::

    {"token": str, "logprob": float, "bytes": [int] | null,
     "top": [[token: str, logprob: float, bytes: [int] | null], ...]}

Exactly once: the key is the primary key and rows are written with ``INSERT OR IGNORE``
inside a transaction that also deletes the key from ``failures``; a transaction is atomic
and a committed one survives SIGKILL of the writer (WAL, ``synchronous=NORMAL``; use
``synchronous="FULL"`` to also survive power loss). So a key is either absent (it will be
requested again) or present exactly once, whenever the harvester dies.

One harvester per store: :func:`lock_store` takes an exclusive ``flock`` on ``<store>.lock``
(POSIX only). A second harvester on the same store is refused at once instead of paying for
every answer twice. The kernel drops the lock when its holder dies, so a lock file left by a
SIGKILLed run never blocks the rerun.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potstill.core.errors import PotstillError
from potstill.core.faults import fault_point

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY, prompt_id TEXT NOT NULL, prompt_idx INTEGER NOT NULL,
    sample INTEGER NOT NULL, model TEXT NOT NULL, params TEXT NOT NULL, messages TEXT NOT NULL,
    completion TEXT NOT NULL, finish_reason TEXT, usage TEXT, latency_s REAL, logprobs TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
    key TEXT PRIMARY KEY, prompt_idx INTEGER NOT NULL, sample INTEGER NOT NULL,
    messages TEXT NOT NULL, attempts INTEGER NOT NULL, status INTEGER, error TEXT,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON: the same object always gives the same string."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def prompt_id(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(canonical_json(messages).encode("utf-8")).hexdigest()


def record_key(
    model: str, params: dict[str, Any], messages: list[dict[str, str]], sample: int
) -> str:
    """sha256 hex of the canonical JSON of ``(model, params, messages, sample)``.

    The endpoint URL, API key and concurrency are not part of the key: the same model
    served elsewhere gives the same records, and a rerun with other settings resumes.
    """
    payload = {"model": model, "params": params, "messages": messages, "sample": int(sample)}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


@dataclass
class Record:
    """One answered (prompt, sample); the columns of ``records``."""

    key: str
    prompt_idx: int
    sample: int
    model: str
    params: dict[str, Any]
    messages: list[dict[str, str]]
    completion: str
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    latency_s: float | None = None
    logprobs: list[dict[str, Any]] | None = None
    # canonical JSON of params/messages and the prompt id, when the caller has them already
    # (the harvester computes them once per prompt, not once per record)
    cached: tuple[str, str, str] | None = None

    def row(self) -> tuple[Any, ...]:
        params_json, messages_json, pid = self.cached or (
            canonical_json(self.params),
            canonical_json(self.messages),
            prompt_id(self.messages),
        )
        return (
            self.key,
            pid,
            self.prompt_idx,
            self.sample,
            self.model,
            params_json,
            messages_json,
            self.completion,
            self.finish_reason,
            None if self.usage is None else canonical_json(self.usage),
            self.latency_s,
            None if self.logprobs is None else json.dumps(self.logprobs, separators=(",", ":")),
            time.time(),
        )


@dataclass
class Failure:
    key: str
    prompt_idx: int
    sample: int
    messages: list[dict[str, str]]
    status: int | None
    error: str


def connect(
    path: str | Path, *, synchronous: str = "NORMAL", readonly: bool = False
) -> sqlite3.Connection:
    """Open (creating if needed) a store; WAL mode; autocommit (we BEGIN ourselves)."""
    path = Path(path).expanduser()
    if readonly:
        if not path.is_file():
            raise PotstillError(f"harvest store {path} not found; run `potstill harvest` first")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        _check_schema(conn, path)
        return conn
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.executescript(_SCHEMA)
        conn.execute(
            "INSERT OR IGNORE INTO meta(k, v) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
        )
    except sqlite3.DatabaseError as e:
        conn.close()
        raise PotstillError(
            f"{path} is not a potstill harvest store ({e}); pick another --store path"
        ) from e
    _check_schema(conn, path)
    return conn


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
    try:
        row = conn.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        raise PotstillError(f"{path} is not a potstill harvest store ({e}); check the path") from e
    if row is None or row[0] != SCHEMA_VERSION:
        raise PotstillError(
            f"{path} has harvest store schema {row[0] if row else None!r}, this potstill reads "
            f"{SCHEMA_VERSION!r}; harvest into a new store"
        )


@contextlib.contextmanager
def lock_store(path: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on the store at ``path`` for the ``with`` block.

    Raises :class:`PotstillError` naming the holder's pid when another process has it. The
    lock is ``flock`` on ``<path>.lock``, which holds the holder's pid as text; the file stays
    after the run (deleting it would race a process that has just opened it).
    """
    import fcntl

    lock_path = Path(str(Path(path).expanduser()) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise PotstillError(
                f"harvest store {path} in use by pid {holder}; wait for that harvest to finish "
                "or stop it, or pick another --store"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield lock_path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def done_keys(conn: sqlite3.Connection) -> set[str]:
    return {k for (k,) in conn.execute("SELECT key FROM records")}


def write_batch(
    conn: sqlite3.Connection, records: Iterable[Record], failures: Iterable[Failure] = ()
) -> int:
    """Commit records (INSERT OR IGNORE) and failures in ONE transaction; returns rows inserted.

    A record also clears its key from ``failures``. A failure never overwrites a record
    (it is skipped when the key is already done) and counts attempts across runs.
    """
    inserted = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for r in records:
            cur = conn.execute(
                "INSERT OR IGNORE INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", r.row()
            )
            inserted += cur.rowcount
            conn.execute("DELETE FROM failures WHERE key=?", (r.key,))
        for f in failures:
            # Never a failure row for a key that is already done: a record is final.
            conn.execute(
                "INSERT INTO failures SELECT ?,?,?,?,1,?,?,? "
                "WHERE NOT EXISTS (SELECT 1 FROM records WHERE key=?) "
                "ON CONFLICT(key) DO UPDATE SET attempts=attempts+1, status=excluded.status, "
                "error=excluded.error, updated=excluded.updated",
                (
                    f.key,
                    f.prompt_idx,
                    f.sample,
                    canonical_json(f.messages),
                    f.status,
                    f.error[:2000],
                    time.time(),
                    f.key,
                ),
            )
        fault_point("store.before_commit")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return inserted


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    n_rec = conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    n_fail = conn.execute(
        "SELECT COUNT(*) FROM failures WHERE key NOT IN (SELECT key FROM records)"
    ).fetchone()[0]
    return {"records": int(n_rec), "failed": int(n_fail)}


def iter_records(conn: sqlite3.Connection) -> Iterator[dict[str, Any]]:
    """All records as dicts (JSON columns decoded), in a deterministic order:
    ``(prompt_idx, sample, key)``, independent of the order they were committed in."""
    cur = conn.execute(
        "SELECT key, prompt_id, prompt_idx, sample, model, params, messages, completion, "
        "finish_reason, usage, latency_s, logprobs, created FROM records "
        "ORDER BY prompt_idx, sample, key"
    )
    for row in cur:
        yield {
            "key": row[0],
            "prompt_id": row[1],
            "prompt_idx": row[2],
            "sample": row[3],
            "model": row[4],
            "params": json.loads(row[5]),
            "messages": json.loads(row[6]),
            "completion": row[7],
            "finish_reason": row[8],
            "usage": None if row[9] is None else json.loads(row[9]),
            "latency_s": row[10],
            "logprobs": None if row[11] is None else json.loads(row[11]),
            "created": row[12],
        }


__all__ = [
    "Failure",
    "Record",
    "canonical_json",
    "connect",
    "counts",
    "done_keys",
    "iter_records",
    "lock_store",
    "prompt_id",
    "record_key",
    "write_batch",
]
