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
