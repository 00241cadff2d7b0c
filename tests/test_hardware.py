"""The ``auto`` dtype: bf16 only where the hardware runs it natively."""

from __future__ import annotations

from pathlib import Path

import pytest

from potstill.core import hardware


def test_auto_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_read = Path.read_text

    def cpuinfo(flags: str) -> None:
        def read(self: Path, *a: object, **k: object) -> str:
            if str(self) == "/proc/cpuinfo":
                return f"processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {flags}\n"
            return real_read(self, *a, **k)  # type: ignore[arg-type]

        monkeypatch.setattr(Path, "read_text", read)

    cpuinfo("")
    assert not hardware.bf16_is_native() and hardware.resolve_dtype("auto") == "float32"
    cpuinfo("avx512_bf16")
    assert hardware.resolve_dtype("auto") == "bfloat16"
    cpuinfo("amx_tile amx_bf16")
    assert hardware.resolve_dtype("auto") == "bfloat16"
    cpuinfo("avx512_bf16x")  # a longer flag name is not the flag
    assert hardware.resolve_dtype("auto") == "float32"
    for explicit in ("float32", "bfloat16"):
        assert hardware.resolve_dtype(explicit) == explicit


def test_threads_for_worker_leaves_the_caller_one_thread_and_the_worker_its_count() -> None:
    """The serving engine's worker sets the count ``threads_for_worker`` returned (its events
    are sent from the worker thread, so the sink sees the worker's setting)."""
    import threading

    import torch

    from potstill.core.hardware import threads_for_worker
    from potstill.core.models import load_model
    from potstill.serve.engine import Engine, SamplingParams

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert threads_for_worker() == 3
        assert torch.get_num_threads() == 1
        model, tok = load_model("tiny:0")
        engine = Engine(model, tok, model_name="tiny:0", threads=2)
        seen: list[int] = []
        done = threading.Event()

        def sink(ev: object) -> None:
            seen.append(torch.get_num_threads())
            if getattr(ev, "finish_reason", None) or getattr(ev, "error", None):
                done.set()

        engine.start()
        try:
            engine.submit([5, 6], SamplingParams(max_tokens=2, temperature=0.0), [0], sink)
            assert done.wait(30)
        finally:
            engine.stop()
        assert seen and set(seen) == {2}
    finally:
        torch.set_num_threads(before)
