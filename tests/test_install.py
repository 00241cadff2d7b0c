"""A plain install is light and works; each extra adds only its part (slow: builds a venv).

Run with ``pytest -m slow tests/test_install.py``. It installs from ``requirements.lock`` into a
fresh venv made by the base interpreter, so it checks the declared dependencies, not this venv.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow

OPTIONAL = ("fastapi", "uvicorn", "scipy", "httpx", "pyarrow")


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200, **kw)  # type: ignore[call-overload]


def test_plain_install_then_cache_extra(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    assert _run([base, "-m", "venv", str(venv)]).returncode == 0
    py, pip = venv / "bin" / "python", [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    lock = ["-c", str(REPO / "requirements.lock")]
    for args in (["torch==2.13.0"], [str(REPO)]):
        r = _run([*pip, *lock, *args])
        assert r.returncode == 0, r.stderr[-2000:]
    exe = str(venv / "bin" / "potstill")
    assert _run([exe, "--help"]).returncode == 0
    probe = "import importlib.util as u, potstill; print([m for m in %r if u.find_spec(m)])"
    r = _run([str(py), "-c", probe % (OPTIONAL,)])
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)  # stays light

    out = tmp_path / "cache"
    job = [exe, "cache-logits", "--teacher", "tiny:0:1x32", "--data", "synthetic:0:20",
           "--out", str(out), "--top-k", "8", "--seq-len", "32"]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "POTSTILL_CACHE": str(tmp_path / "pc")}
    r = _run(job, env=env)
    assert r.returncode == 2 and "pip install 'potstill[cache]'" in r.stderr, r.stderr
    r = _run([*pip, *lock, f"{REPO}[cache]"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(job, env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").is_file()
