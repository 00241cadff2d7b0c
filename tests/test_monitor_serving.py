"""The extraction monitor runs off the event loop: a slow embedder does not stall streams.

A deliberately slow embedder (each call sleeps) scores every answered request. Observed on the
event loop, each short request that finishes stalls a concurrent stream for the embedder's
time; observed by :class:`~potstill.defend.background.BackgroundObserver`, the stream keeps
flowing. Both are measured here, so the test also shows that it can fail.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("torch")

from potstill.core.models import load_model  # noqa: E402
from potstill.defend.background import BackgroundObserver  # noqa: E402
from potstill.defend.embed import load_embedder  # noqa: E402
from potstill.defend.monitor import ExtractionMonitor, simulated_calibration  # noqa: E402
from potstill.serve.app import ServeSettings, create_app  # noqa: E402
from potstill.serve.background import serve_in_background  # noqa: E402
from potstill.serve.engine import Engine  # noqa: E402

MODEL = "tiny:0"
SLOW_S = 0.4

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class SlowEmbedder:
    """The hashed embedder, ``SLOW_S`` seconds per call once ``slow`` is set."""

    def __init__(self) -> None:
        self.inner = load_embedder("hash")
        self.name = self.inner.name
        self.slow = False

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.slow:
            time.sleep(SLOW_S)
        return self.inner.encode(texts)


def _max_stream_gap(observer_of: Callable[[ExtractionMonitor], Any]) -> tuple[float, int]:
    """(largest gap between stream chunks while 4 short requests finish, chunks received)."""
    emb = SlowEmbedder()
    cal = simulated_calibration(emb.inner, window=5, fpr=0.05, n_windows=60, n_reference=64)
    monitor = ExtractionMonitor(cal, emb)
    emb.slow = True
    model, tok = load_model(MODEL)
    ends = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]

    def no_end(rows: Any, logits: Any) -> Any:  # a random model would stop early
        logits = logits.clone()
        logits[:, ends] = float("-inf")
        return logits

    settings = ServeSettings(observer=observer_of(monitor), processors=lambda rec: [no_end])
    arrivals: list[float] = []
    started = threading.Event()
    with serve_in_background(create_app(Engine(model, tok, model_name=MODEL), settings)) as url:

        def stream() -> None:
            body = {"model": MODEL, "prompt": "long", "max_tokens": 600, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        arrivals.append(time.perf_counter())
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(30)
        t0 = time.perf_counter()
        for i in range(4):  # each answered request is one observation
            r = httpx.post(url + "/v1/completions", timeout=60,
                           json={"model": MODEL, "prompt": f"q{i}", "max_tokens": 1})  # fmt: skip
            assert r.status_code == 200
        t1 = time.perf_counter()
        t.join(60)
    during = [b - a for a, b in itertools.pairwise(arrivals) if t0 <= b <= t1 + SLOW_S]
    return max(during, default=0.0), len(arrivals)


def test_slow_embedder_stalls_streams_on_the_loop_but_not_in_background() -> None:
    inline_gap, _ = _max_stream_gap(lambda m: m.observe)
    background_gap, n_chunks = _max_stream_gap(lambda m: BackgroundObserver(m.observe))
    assert n_chunks > 50  # the stream was still running while the short requests finished
    assert inline_gap >= SLOW_S * 0.9, inline_gap  # the old wiring: every observation stalls
    assert background_gap < SLOW_S / 2, (background_gap, inline_gap)


def test_background_observer_bounded_queue_counts_drops() -> None:
    gate, taken = threading.Event(), threading.Event()
    seen: list[str] = []

    def blocked(record: dict[str, Any], text: str) -> None:
        taken.set()  # the worker holds this item, off the queue
        gate.wait(10)
        seen.append(text)

    bg = BackgroundObserver(blocked, maxsize=2)
    for i in range(6):  # the worker holds one, the queue two: three are dropped
        bg({"status": 200}, str(i))
        if i == 0:
            assert taken.wait(10)
    gate.set()
    bg.drain()
    assert bg.stats() == {"queued": 0, "processed": 3, "dropped": 3, "errors": 0}
    assert seen == ["0", "1", "2"]  # in arrival order
    bg.close()
