"""The kd_throughput benchmark's probes: the matmul peak (the MFU denominator), the peak
memory of one KD loss step, each variant in a fresh process (``kd_throughput.py --rss-probe``),
and where an online KD step's time goes (its GEMM floor)."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _common import sync

# ----------------------------------------------------------------------------- peak FLOP/s


def matmul_peak(device: str, dtype: torch.dtype, n: int, seconds: float = 2.0) -> float:
    """Best FLOP/s of ``n x n @ n x n`` matmuls over ~``seconds`` (after one warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------- peak memory


def _proc_status_mb(field: str) -> float:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of this process in MB. Unlike ``ru_maxrss``, the
    high-water mark belongs to the process image, so it does not inherit the parent's peak
    across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_probe(
    variant: str, vocab: int, tokens: int, hs: int, ht: int, device: str
) -> dict[str, float]:
    """One KD loss step (student head, forward KL vs the teacher's head, backward); runs in a
    fresh process. Returns peak memory (MB) and the baseline before the step."""
    from potstill.distill.losses import forward_kl, fused_linear_kd_loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hs, generator=g).to(device).requires_grad_(True)
    w = (torch.randn(vocab, hs, generator=g) * 0.02).to(device).requires_grad_(True)
    th = torch.randn(tokens, ht, generator=g).to(device)
    tw = (torch.randn(vocab, ht, generator=g) * 0.02).to(device)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _proc_status_mb("VmRSS")
    if variant == "plain":
        with torch.no_grad():
            t_logits = F.linear(th, tw)
        loss = forward_kl(F.linear(h, w), t_logits, labels, reduction="sum")
    else:
        loss = fused_linear_kd_loss(
            forward_kl, h, w, (th, tw), labels, chunk_tokens=512, reduction="sum"
        )
    loss.backward()
    sync(device)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _proc_status_mb("VmHWM")
    return {"peak_mb": peak, "baseline_mb": base, "loss": float(loss)}


def measure_peak(variant: str, a: argparse.Namespace, ht: int) -> dict[str, float]:
    cmd = [
        sys.executable, str(Path(__file__).with_name("kd_throughput.py")), "--rss-probe", variant, "--device", a.device,
        "--student-width", str(a.student_width), "--probe-teacher-width", str(ht),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"rss probe {variant} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- online step


#: Profiler op names counted as matrix multiplies (the linear layers and the heads) and as
#: attention (the fused SDPA kernels, forward and backward).
_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
_ATTENTION_PREFIX = "aten::_scaled_dot_product"


def online_step_profile(cfg: Any, tokenizer: Any, device: str, steps: int = 3) -> dict[str, Any]:
    """Where one online KD step's time goes: the real recipe's step (teacher forward, student
    forward, the fused KD loss, backward, AdamW) under ``torch.profiler``, ``steps`` times
    after two warm-up steps. Returns the median wall time and, per category, the median of the
    ops' self time (seconds): GEMMs (:data:`_GEMM_OPS`), attention, and everything else
    (elementwise ops, norms, casts, the loss's softmaxes, the optimizer). The GEMM time is the
    step's floor with these kernels: what is left if every other op took no time at all."""
    import contextlib
    import statistics

    from torch.profiler import ProfilerActivity, profile

    from potstill.distill.train.data import prepare_data
    from potstill.distill.train.models import load_teacher
    from potstill.distill.train.recipe import HiddenLM, make_optimizer, micro_loss
    from potstill.distill.train.student import build_student

    student = build_student(cfg.student, tokenizer, max_len=cfg.data.seq_len).to(device)
    model = HiddenLM(student)
    teacher = load_teacher(cfg, tokenizer, int(student.get_output_embeddings().weight.shape[0]))
    teacher.to(device)
    opt = make_optimizer(model, cfg)
    td = prepare_data(cfg, tokenizer, world_size=1)
    ctx = torch.autocast(device, torch.bfloat16) if cfg.train.bf16 else contextlib.nullcontext()

    def step(i: int) -> None:
        batch = {k: v.to(device) for k, v in td.micro_batch(i % td.batches_per_epoch, 0).items()}
        with ctx:
            loss = micro_loss(model, teacher, batch, cfg).total / batch["labels"].numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)

    step(0)
    step(1)
    # On CUDA an op's self time on the host is its launch; the kernels' time is on the device.
    cuda = device == "cuda"
    acts = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    field = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows: dict[str, list[float]] = {"wall": [], "gemm": [], "attention": [], "other": []}
    for i in range(steps):
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            step(2 + i)
            wall = time.perf_counter() - t0
        self_s = {e.key: getattr(e, field) / 1e6 for e in prof.key_averages()}
        gemm = sum(v for k, v in self_s.items() if k in _GEMM_OPS)
        attn = sum(v for k, v in self_s.items() if k.startswith(_ATTENTION_PREFIX))
        rows["wall"].append(wall)
        rows["gemm"].append(gemm)
        rows["attention"].append(attn)
        rows["other"].append(sum(self_s.values()) - gemm - attn)
    return {f"{k}_s": statistics.median(v) for k, v in rows.items()} | {"steps": steps}
