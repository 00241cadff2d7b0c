"""Small units: no file over 600 lines and no function over 80 in ``src/`` or ``benchmarks/``.

``KNOWN`` lists what is still over, with its size today. The test fails on a new offender,
on a known one that grew, and on a known one that has been fixed (then drop it from the list),
so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FILE, MAX_FUNC = 600, 80

KNOWN: dict[str, int] = {}  # every file and function is within bounds


def _oversized() -> dict[str, int]:
    found = {}
    for root in ("src", "benchmarks"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            text = path.read_text()
            if (lines := text.count("\n")) > MAX_FILE:
                found[rel] = lines
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    span = (node.end_lineno or node.lineno) - node.lineno + 1
                    if span > MAX_FUNC:
                        found[f"{rel}::{node.name}"] = span
    return found


def test_no_new_or_growing_oversized_unit() -> None:
    found = _oversized()
    new = {k: v for k, v in found.items() if k not in KNOWN}
    grown = {k: (KNOWN[k], v) for k, v in found.items() if k in KNOWN and v > KNOWN[k]}
    fixed = sorted(set(KNOWN) - set(found))
    assert not new, f"over {MAX_FILE} lines per file / {MAX_FUNC} per function: {new}"
    assert not grown, f"known offenders grew (was, now): {grown}"
    assert not fixed, f"now within bounds, drop from KNOWN: {fixed}"
