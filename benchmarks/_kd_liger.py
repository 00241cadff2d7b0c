"""The GPU rival of potstill's fused linear KD loss: Liger-Kernel's ``LigerFusedLinearJSDLoss``.

Both fuse the output projection with the loss in token chunks, so neither materialises the
``[tokens, V]`` logits. Timed here at the loss level (the student's hidden states and head,
the teacher's hidden states and head, forward + backward), at the same shapes and dtype,
forward KL on both sides (Liger's JSD at ``beta = 0``, no hard-label term). Liger needs Triton
and a GPU; ``kd_throughput.py --liger`` runs this only on CUDA.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from _common import sync


def _inputs(vocab: int, tokens: int, hs: int, ht: int, device: str) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hs, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(vocab, hs, generator=g) * 0.02).to(device, torch.bfloat16)
    th = torch.randn(tokens, ht, generator=g).to(device, torch.bfloat16)
    tw = (torch.randn(vocab, ht, generator=g) * 0.02).to(device, torch.bfloat16)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    return h, w, th, tw, labels


def _median_step(fn: Any, h: Any, w: Any, device: str, reps: int) -> tuple[float, float]:
    """Median seconds of ``fn(h, w).backward()`` over ``reps`` (after one warm-up); the loss."""
    times, loss = [], 0.0
    for i in range(reps + 1):
        hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        sync(device)
        t0 = time.perf_counter()
        out = fn(hh, ww)
        out.backward()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        loss = float(out)
    return statistics.median(times), loss


def liger_vs_potstill(
    vocab: int, tokens: int, hs: int, ht: int, device: str, reps: int = 5
) -> dict[str, Any]:
    """Both fused losses at ``tokens`` x ``vocab`` (bf16 inputs), mean forward KL per token:
    median step seconds, their ratio and both loss values (which must agree)."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    from potstill.distill.losses import forward_kl, fused_linear_kd_loss

    h, w, th, tw, labels = _inputs(vocab, tokens, hs, ht, device)
    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0)

    def ours(hh: Any, ww: Any) -> Any:
        total = fused_linear_kd_loss(forward_kl, hh, ww, (th, tw), labels, chunk_tokens=1024,
                                     reduction="sum")  # fmt: skip
        return total / tokens

    def theirs(hh: Any, ww: Any) -> Any:
        return liger(hh, ww, th, tw, labels)

    t_ours, l_ours = _median_step(ours, h, w, device, reps)
    t_liger, l_liger = _median_step(theirs, h, w, device, reps)
    return {"tokens": tokens, "vocab": vocab, "student_width": hs, "teacher_width": ht,
            "dtype": "bfloat16", "potstill_s": t_ours, "liger_s": t_liger,
            "speedup_vs_liger": t_liger / t_ours, "loss_potstill": l_ours,
            "loss_liger": l_liger}  # fmt: skip
