"""What the machine accelerates: the ``auto`` weight dtype.

bf16 halves the bytes a memory-bound step reads, but a CPU without bf16 instructions
(AVX512-BF16 or AMX) emulates bf16 matmuls: measured on a 2-core AVX-512 Xeon without them,
2048^2 bf16 matmuls ran at 62 GFLOP/s against 296 in fp32, and the demo's bf16 teacher made
KD training 2.6x slower (150 vs 393 tokens/s). ``auto`` therefore means bf16 only where the
hardware runs it natively.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["bf16_is_native", "resolve_dtype", "threads_for_worker"]

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def bf16_is_native(device: str = "cpu") -> bool:
    """Whether ``device`` runs bf16 matmuls natively (CUDA: the GPU's bf16 support; CPU: the
    AVX512-BF16 or AMX-BF16 flags in ``/proc/cpuinfo``; elsewhere False)."""
    if device.startswith("cuda"):
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in _BF16_FLAGS)


def resolve_dtype(name: str, device: str = "cpu") -> str:
    """``"float32"`` or ``"bfloat16"`` for a configured ``"auto" | "float32" | "bfloat16"``."""
    if name == "auto":
        return "bfloat16" if bf16_is_native(device) else "float32"
    return name


def threads_for_worker() -> int:
    """Keep the calling thread's torch work single-threaded, and return the torch thread
    count a worker thread (the serving engine's) should set for itself.

    Why: libgomp, torch's OpenMP, keeps one thread team per thread that has run a parallel
    region, and once it manages more threads than there are CPUs it stops spinning between
    regions, so every region starts with a futex wake. On the project's 2-core VM that made
    each parallel op of the engine's worker ~60 us slower (a 256x256 add: 6 -> 69 us; a
    [1536, 576] bf16 linear at one row: 57 -> 124 us), as soon as the main thread (which loads
    the model) had its own team. Call this before the first torch op of the process.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads
