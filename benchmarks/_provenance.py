"""Where a benchmark result came from: commit, dirty flag, command, times, machine, versions.

Every results JSON carries ``"provenance": provenance(start)`` so a figure quoted in the README
can be traced to the code and the machine that produced it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "accelerate", "numpy", "scipy", "fastapi", "uvicorn", "trl")


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def provenance(started: float, **extra: Any) -> dict[str, Any]:
    """The provenance object; ``started`` is the run's ``time.time()`` at its start."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    threads = None
    if "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    return {
        "commit": _git("rev-parse", "HEAD"),
        # results files are outputs, not code: a run that rewrites its own tracked results
        # (or another benchmark's) before this call is not running modified code
        "dirty": bool(
            _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
        ),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": utc(started),
        "ended": utc(time.time()),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": threads,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "versions": versions,
        **extra,
    }
