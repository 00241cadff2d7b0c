"""Harvest throughput against a local endpoint with a fixed 20 ms latency, at concurrency 64.

The bound is ``concurrency / latency = 3200 req/s``; the harvester (HTTP, JSON, SQLite commits
in its writer thread) should reach at least 80% of it. The fake endpoint
(``tests/fake_openai.py``, a raw asyncio server in its own process) is measured too, at zero
latency, so a low result can be attributed to the endpoint or to the harvester.

    python benchmarks/harvest_throughput.py [--requests 6000]

Merges ``harvest_fraction_of_bound`` (and details) into
``benchmarks/results/serve_throughput.json`` (read-modify-write under a lock, written
atomically, so keys written by other benchmarks survive).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from potstill.core.io import atomic_write_json
from potstill.core.prompts import default_prompts
from potstill.harvest.client import GenParams, RetryPolicy, harvest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve_throughput.json"


def start_fake(latency: float, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = tmp / f"port-{latency}"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "fake_openai.py"),
            "--latency",
            str(latency),
            "--port-file",
            str(port_file),
        ]
    )
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the fake endpoint did not start")
        time.sleep(0.02)
    return proc, f"http://127.0.0.1:{port_file.read_text()}/v1"


def run_once(url: str, n: int, concurrency: int, store: Path) -> float:
    prompts = [[{"role": "user", "content": p}] for p in default_prompts(n, seed=7)]
    stats = harvest(
        prompts, store, endpoint=url, model="bench", params=GenParams(max_tokens=64),
        concurrency=concurrency, policy=RetryPolicy(timeout_s=30),
    )  # fmt: skip
    assert stats.done == n and stats.failed == 0, stats
    return stats.rate


def merge_results(update: dict[str, object]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        atomic_write_json(RESULTS, {**old, **update})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    bound = args.concurrency / args.latency
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        fake0, url0 = start_fake(0.0, tmp)
        try:
            capacity = run_once(url0, args.requests, args.concurrency, tmp / "cap.sqlite")
        finally:
            fake0.kill()
        fake, url = start_fake(args.latency, tmp)
        try:
            run_once(
                url, 500, args.concurrency, tmp / "warm.sqlite"
            )  # warm-up: connections, imports
            rate = run_once(url, args.requests, args.concurrency, tmp / "h.sqlite")
        finally:
            fake.kill()
    result = {
        "harvest_fraction_of_bound": round(rate / bound, 4),
        "harvest_req_per_s": round(rate, 1),
        "harvest_bound_req_per_s": bound,
        "harvest_zero_latency_req_per_s": round(capacity, 1),
        "harvest_setup": f"{args.requests} requests, concurrency {args.concurrency}, latency {args.latency * 1000:.0f} ms, {os.cpu_count()} CPUs",
    }
    print(json.dumps(result, indent=2))
    if not args.no_write:
        merge_results(result)


if __name__ == "__main__":
    main()
