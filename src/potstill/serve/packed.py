"""Prepacked bf16 linear layers for serving on a CPU.

A bf16 ``F.linear`` on the CPU goes through oneDNN, which reorders the weight into its blocked
(AMX/AVX512-BF16) layout on every call. At decoding sizes (one to a few rows per step) that
reorder is most of the call: measured on the project's 2-core Xeon (AMX), a ``[576, 576]``
weight took 37 us plain and 20 us prepacked, ``[1536, 576]`` 58 vs 26 us, and SmolLM2's
``[49152, 576]`` head 1.89 vs 1.17 ms, at 1 and at 8 rows alike. Packing once at load time
is what ``torch.compile``'s CPU freezing pass does; here it is done without a compiler, so the
engine keeps its dynamic shapes (a growing KV cache, a changing batch).

The results are bit-identical to the plain bf16 ``F.linear`` (the same oneDNN kernel after the
same reorder); ``tests/test_serve_packed.py`` checks that on a whole model. fp32 is left alone:
MKL's fp32 GEMV at one row is faster than a packed oneDNN call there.

This module imports torch: the engine imports it only when it loads a model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PackedLinear", "can_pack", "pack_linears"]


def can_pack(model: nn.Module) -> bool:
    """Whether :func:`pack_linears` applies: bf16 weights on the CPU, and a torch with oneDNN
    and its linear-packing ops."""
    p = next(model.parameters(), None)
    return (
        p is not None
        and p.device.type == "cpu"
        and p.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight is held in oneDNN's packed layout.

    ``weight`` is that packed tensor (``[out, in]``, layout ``torch._mkldnn``): its shape is
    the linear's, but it supports no arithmetic, so any code that used it as a dense matrix
    fails loudly instead of computing with the wrong layout.
    """

    def __init__(self, linear: nn.Linear, rows_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            w = linear.weight.detach().contiguous()
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linears(model: torch.nn.Module, *, rows_hint: int = 8) -> int:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`PackedLinear`; returns
    how many. ``rows_hint``: the row count oneDNN tunes the layout for (any count works).

    The model is then for inference only, on the CPU it was packed on. A tied output head gets
    a packed copy; the input embedding keeps the dense weight it looks rows up in.
    """
    if not can_pack(model):
        raise ValueError("pack_linears needs a bf16 model on the CPU and a torch with oneDNN")
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child, rows_hint))
    return len(targets)
