"""potstill's black-box tools against a real vLLM OpenAI server (the GPU step of ``gpu.sh``).

vLLM's own server (``vllm.entrypoints.openai.api_server``, in its own process) serves the
teacher; then, in one run:

* harvest throughput at ``--concurrency``: potstill's harvester (HTTP, SQLite store,
  exactly-once bookkeeping) against the official ``AsyncOpenAI`` client behind a semaphore
  (what a user would write; it stores nothing), the same requests and ``max_tokens``. Here the
  bound is the server, not the client: ``harvester_vs_openai_sdk`` near 1 means the harvester
  costs the server nothing, well below 1 that it is the bottleneck;
* ``potstill audit provenance`` with the vLLM server as the suspect (it serves the teacher
  itself, so the test must convict it), timed, with its p-value and the number of prompts.

    python benchmarks/vllm_endpoint.py --vllm-python PY [--model smollm2-135m-instruct]

Writes ``benchmarks/results/vllm_endpoint_gpu.json`` (``--out``). On a CPU it runs too, with
vLLM's CPU build, only slowly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_log, write_result
from _provenance import provenance
from _servers import free_port, subprocess_server
from harvest_throughput import run_harvester, run_openai_sdk, timed

RESULTS = Path(__file__).resolve().parent / "results" / "vllm_endpoint_gpu.json"
log = make_log("vllm_endpoint")


def _harvest_rows(url: str, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import functools

    run_harvester(url, 64, a.concurrency, tmp / "warm.sqlite", a.model, a.max_tokens)
    t = time.perf_counter()
    harvester = run_harvester(url, a.requests, a.concurrency, tmp / "h.sqlite", a.model,
                              a.max_tokens)  # fmt: skip
    log(f"harvester: {harvester:.1f} req/s ({time.perf_counter() - t:.0f} s)")
    sdk_runner = functools.partial(_sdk, model=a.model, max_tokens=a.max_tokens)
    sdk = timed(sdk_runner, url, a.requests, a.concurrency)  # type: ignore[arg-type]
    log(f"openai SDK: {sdk:.1f} req/s")
    return {"potstill_harvester_req_per_s": harvester, "openai_sdk_req_per_s": sdk,
            "harvester_vs_openai_sdk": harvester / sdk}  # fmt: skip


async def _sdk(url: str, reqs: list[dict[str, Any]], concurrency: int, *, model: str,
               max_tokens: int) -> int:  # fmt: skip
    """The SDK rival on the served model's name (``timed`` builds bodies for "bench")."""
    reqs = [{**r, "model": model, "max_tokens": max_tokens} for r in reqs]
    return await run_openai_sdk(url, reqs, concurrency)


def _audit(url: str, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out = tmp / "audit.json"
    argv = [sys.executable, "-m", "potstill.cli", "audit", "provenance", "--suspect", url,
            "--api-model", a.model, "--teacher", a.model, "--controls", *a.controls,
            "--n-prompts", str(a.n_prompts), "--out", str(out)]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"failed": proc.returncode, "stderr": proc.stderr[-2000:], "wall_s": wall}
    res = json.loads(out.read_text())
    log(f"audit provenance: {wall:.0f} s")
    return {"wall_s": wall, "seconds_per_prompt": wall / a.n_prompts, "result": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--vllm-python", default=sys.executable)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-prompts", type=int, default=64, help="audit prompts")
    ap.add_argument("--controls", nargs="+", default=[f"tiny:{i}" for i in range(1, 6)])
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    started = time.time()
    from potstill.core.models import resolve_model_dir

    port = free_port()
    argv = [a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
            str(resolve_model_dir(a.model)), "--served-model-name", a.model, "--dtype", a.dtype,
            "--max-num-seqs", str(a.concurrency), "--disable-log-stats", "--port", str(port)]  # fmt: skip
    res: dict[str, Any] = {"settings": {k: v for k, v in vars(a).items() if k != "out"}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with subprocess_server(argv, port, tmp / "vllm.log") as url:
            res["harvest"] = _harvest_rows(url, a, tmp)
            res["audit_provenance"] = _audit(url, a, tmp)
    res["provenance"] = provenance(started)
    write_result(a.out, res)
    print(json.dumps({k: v for k, v in res.items() if k != "provenance"}, indent=2)[:3000])


if __name__ == "__main__":
    main()
