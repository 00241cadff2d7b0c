"""The import contract (pyproject's ``[tool.importlinter]``): the parts sit on the core and
only the entry points wire them together. Run on the real tree, and on copies with one
deliberately bad import each, which must break it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(src: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over the package under ``src`` (first on the path), no cache."""
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "200"}
    return subprocess.run(
        [str(LINT), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tree_keeps_the_import_contract() -> None:
    run = _lint(REPO / "src")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Contracts: 3 kept, 0 broken." in run.stdout


@pytest.mark.parametrize(
    ("module", "bad_import", "broken"),
    [
        # the core reaching up into a part
        ("core/io.py", "from potstill.serve import app", "potstill.core is not allowed to import"),
        # one part importing another instead of going through the core
        (
            "serve/auth.py",
            "import potstill.distill.losses",
            "potstill.serve is not allowed to import",
        ),
        # a lower layer inside distill importing the training loop
        (
            "distill/losses/mix.py",
            "import potstill.distill.train.recipe",
            "potstill.distill.losses",
        ),
    ],
)
def test_an_upward_import_breaks_the_contract(
    tmp_path: Path, module: str, bad_import: str, broken: str
) -> None:
    src = tmp_path / "src"
    shutil.copytree(
        REPO / "src" / "potstill", src / "potstill", ignore=shutil.ignore_patterns("__pycache__")
    )
    target = src / "potstill" / module
    target.write_text(target.read_text() + f"\n{bad_import}\n")
    run = _lint(src)
    assert run.returncode != 0
    assert "0 broken" not in run.stdout
    assert broken in run.stdout, run.stdout
