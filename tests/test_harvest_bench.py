"""The HTTP-stack decision ``benchmarks/harvest_throughput.py`` writes follows its stated rule:
a library replaces potstill's client only if it is within 10% of it and reaches 0.9 of the
bound on its own."""

from __future__ import annotations

import pytest

from .conftest import load_benchmark


@pytest.mark.parametrize(
    ("ratio", "fraction", "verdict"),
    [(1.15, 0.82, "keep"), (1.05, 0.82, "keep"), (1.20, 0.95, "keep"), (1.05, 0.93, "replace")],
)
def test_stack_decision(ratio: float, fraction: float, verdict: str) -> None:
    bench = load_benchmark("harvest_throughput")
    res = {"best_library": "aiohttp", "client_vs_best_library": ratio,
           "library_fraction_of_bound": {"aiohttp": fraction}}  # fmt: skip
    assert bench.stack_decision(res).startswith(verdict)
