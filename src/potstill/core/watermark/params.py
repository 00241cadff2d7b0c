"""Watermark settings shared by the processors, the detectors and the forensics."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from potstill.core.errors import PotstillError

__all__ = ["SCHEMES", "WatermarkParams"]

SCHEMES = ("kgw", "gumbel")
Scheme = Literal["kgw", "gumbel"]


@dataclass(frozen=True)
class WatermarkParams:
    """Which watermark and its knobs.

    ``scheme``: ``"kgw"`` (green/red lists, Kirchenbauer et al. 2023) or ``"gumbel"``
    (Aaronson's keyed Gumbel-max sampling). ``context_width`` (k): how many previous
    tokens seed the keyed hash. KGW only: ``gamma``, the green fraction of the vocab,
    and ``delta``, the logit bias added to green tokens (logit units).
    """

    scheme: Scheme = "kgw"
    gamma: float = 0.25
    delta: float = 2.0
    context_width: int = 2

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise PotstillError(f"unknown watermark {self.scheme!r}: use one of {SCHEMES}")
        if not 0.0 < self.gamma < 1.0:
            raise PotstillError(f"gamma must be in (0, 1), got {self.gamma} (e.g. 0.25)")
        if not math.isfinite(self.delta) or self.delta < 0:
            raise PotstillError(f"delta must be a finite number >= 0, got {self.delta} (e.g. 2)")
        if not 1 <= self.context_width <= 64:
            raise PotstillError(
                f"context width must be in 1..64, got {self.context_width} (e.g. 2)"
            )

    def to_dict(self, *, detection: bool = False) -> dict[str, Any]:
        """The knobs that matter: Gumbel has no gamma/delta; detection never uses delta."""
        d = asdict(self)
        if self.scheme == "gumbel":
            d.pop("gamma")
        if self.scheme == "gumbel" or detection:
            d.pop("delta")
        return d
