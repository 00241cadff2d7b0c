"""``benchmarks/gpu.sh`` cannot be run here (no GPU), so it is checked the two ways it can be:
bash parses it, and its dry run prints the prepared commands and compiles their scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


def test_gpu_script_parses_and_its_dry_run_names_the_benchmarks() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "QUICK": "1"}
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout  # fmt: skip
    lines = out.splitlines()
    assert any("kd_throughput.py" in x and "--quick" in x for x in lines), out
    assert any("serve_throughput.py" in x and "--vllm-python" in x for x in lines), out
    assert any("vllm_endpoint.py" in x and "--n-prompts" in x for x in lines), out
