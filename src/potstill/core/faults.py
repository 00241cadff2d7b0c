"""Named fault points: crash a process at a moment a test chooses, not one it polls for.

Crash-safety tests need the crash to land at a known place: "right after the 2nd checkpoint
was written", "inside the 3rd store transaction, before COMMIT". Polling the file system and
then sending SIGKILL races the process (it may finish, or move on, between the poll and the
kill). Instead the code under test calls :func:`fault_point` at each such place, and a test
sets::

    POTSTILL_FAULT="<name>:<n>"     e.g. POTSTILL_FAULT="harvest.after_commit:3"

The ``n``-th time the process passes ``fault_point("<name>")`` it sends itself SIGKILL: no
cleanup, no ``finally``, no atexit, exactly as the OOM killer or a power cut would. Without the
variable a fault point is one dictionary lookup.

Points in the code: ``train.after_checkpoint`` (a checkpoint is fully written),
``store.before_commit`` (a store transaction holds its rows, not yet committed),
``harvest.after_commit`` (a batch of answers is durable).
"""

from __future__ import annotations

import os
import signal
import threading

_ENV = "POTSTILL_FAULT"
_counts: dict[str, int] = {}
_lock = threading.Lock()


def fault_point(name: str) -> None:
    """SIGKILL this process if ``$POTSTILL_FAULT`` names this point and its count is reached."""
    spec = os.environ.get(_ENV)
    if not spec:
        return
    target, _, nth = spec.rpartition(":")
    if target != name:
        return
    with _lock:  # fault points are passed from worker threads too
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] == int(nth)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["fault_point"]
