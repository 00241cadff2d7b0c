"""Run the request observer (the extraction monitor) in a worker thread, off the event loop.

The server calls its observer once per answered request. Embedding a prompt with MiniLM takes
milliseconds to tens of milliseconds of CPU; on the asyncio event loop that time stalls every
stream the server is sending. :class:`BackgroundObserver` makes the call a queue put: one
worker thread embeds and scores, in arrival order, so per-key windows stay in request order.

The queue is bounded (``maxsize`` observations) so a burst cannot grow memory without limit.
When it is full an observation is dropped and counted (``dropped``, shown on ``/v1/monitor``):
an operator sees that the monitor fell behind rather than the server slowing down for everyone.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["BackgroundObserver"]

Observer = Callable[[dict[str, Any], str], Any]


class BackgroundObserver:
    """``observer(record, text)`` run by one daemon thread; calls return at once."""

    def __init__(self, observer: Observer, *, maxsize: int = 4096) -> None:
        self._observer = observer
        self._q: queue.Queue[tuple[dict[str, Any], str] | None] = queue.Queue(maxsize=maxsize)
        self._lock = threading.Lock()
        self.processed = self.dropped = self.errors = 0
        self._thread = threading.Thread(target=self._run, name="potstill-observer", daemon=True)
        self._thread.start()

    def __call__(self, record: dict[str, Any], text: str) -> None:
        try:
            self._q.put_nowait((dict(record), text))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            try:
                self._observer(*item)
                with self._lock:
                    self.processed += 1
            except Exception:  # a monitor bug must not stop the monitor
                with self._lock:
                    self.errors += 1
                logging.getLogger("potstill.serve").exception("the request observer failed")
            finally:
                self._q.task_done()
        self._q.task_done()

    def drain(self) -> None:
        """Block until every observation queued so far has been processed."""
        self._q.join()

    def close(self, timeout: float = 10.0) -> None:
        self._q.put(None)
        self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "queued": self._q.qsize(),
                "processed": self.processed,
                "dropped": self.dropped,
                "errors": self.errors,
            }
