"""Does the extraction monitor stall streams? Token gaps of a stream with the monitor off, on the
event loop (the old wiring), and in its worker thread (``BackgroundObserver``).

One server process at a time serves the model (one torch thread); in this process a streaming
client records the arrival time of every chunk while ``--clients`` other clients send short
requests with distinct prompts at ``--rate`` requests/s in all (each one answered is one
observation, embedded with the real all-MiniLM-L6-v2 encoder). The figure of merit is the
p99 gap between stream chunks, as a ratio to the monitor-off run.

    python benchmarks/monitor_latency.py [--model smollm2-135m-instruct] [--tokens 200]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance
from potstill.core.io import atomic_write_json

OUT = Path(__file__).resolve().parent / "results" / "monitor_latency.json"


def serve(mode: str, model: str, port_file: str) -> None:
    """The server process: the engine, the monitor wired as ``mode``, uvicorn on a free port."""
    import socket

    import torch
    import uvicorn

    from potstill.defend.background import BackgroundObserver
    from potstill.defend.embed import load_embedder
    from potstill.defend.monitor import ExtractionMonitor, simulated_calibration
    from potstill.serve.app import ServeSettings, create_app
    from potstill.serve.engine import Engine

    torch.set_num_threads(1)  # the engine and the observer thread each get one core
    observer = None
    if mode != "off":
        emb = load_embedder("minilm")
        cal = simulated_calibration(emb, window=50, fpr=0.01, n_windows=200, seed=0)
        monitor = ExtractionMonitor(cal, emb)
        observer = monitor.observe if mode == "event_loop" else BackgroundObserver(monitor.observe)
    engine = Engine.from_spec(model, max_batch=8)
    app = create_app(engine, ServeSettings(observer=observer))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    Path(port_file).write_text(str(sock.getsockname()[1]))
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def _load(url: str, prompts: list[str], args: argparse.Namespace) -> dict:
    """Stream one chat answer while paced short requests arrive; the stream's chunk gaps."""
    import httpx

    arrivals: list[float] = []
    stop = threading.Event()
    served = [0]

    def short(offset: int) -> None:
        period = args.clients / args.rate
        with httpx.Client(base_url=url, timeout=120) as c:
            i, t_next = offset, time.perf_counter()
            while not stop.is_set():
                body = {"model": args.model, "prompt": prompts[i % len(prompts)], "max_tokens": 1}
                assert c.post("/v1/completions", json=body).status_code == 200
                served[0] += 1
                i += args.clients
                t_next += period
                stop.wait(max(0.0, t_next - time.perf_counter()))

    workers = [threading.Thread(target=short, args=(k,)) for k in range(args.clients)]
    for w in workers:
        w.start()
    story = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
    body = {"model": args.model, "messages": story, "max_tokens": args.tokens,
            "stream": True, "temperature": 0.0}  # fmt: skip
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                arrivals.append(time.perf_counter())
    seconds = time.perf_counter() - t0
    stop.set()
    for w in workers:
        w.join()
    gaps = np.diff(np.array(arrivals[1:]))  # from the 2nd chunk: the 1st includes prefill
    return {
        "chunks": len(arrivals),
        "gap_p50_ms": float(np.percentile(gaps, 50) * 1e3),
        "gap_p99_ms": float(np.percentile(gaps, 99) * 1e3),
        "gap_max_ms": float(gaps.max() * 1e3),
        "stream_seconds": seconds,
        "short_requests_served": served[0],
    }


def _with_server(mode: str, args: argparse.Namespace, prompts: list[str]) -> dict:
    import subprocess
    import tempfile

    import httpx

    port_file = Path(tempfile.mkdtemp()) / "port"
    cmd = [sys.executable, __file__, "--serve", mode, "--model", args.model,
           "--port-file", str(port_file)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not port_file.exists() or not port_file.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {mode} server did not start")
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port_file.read_text()}"
        while time.monotonic() < deadline:  # the port is bound before uvicorn serves
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        return _load(url, prompts, args)
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=200, help="tokens of the measured stream")
    ap.add_argument("--clients", type=int, default=2, help="concurrent short-request clients")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--rate", type=float, default=4.0, help="short requests per second, in all")
    ap.add_argument("--serve", choices=("off", "event_loop", "background"), default=None)
    ap.add_argument("--port-file", default=None)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve, args.model, args.port_file)
        return 0
    started = time.time()
    from potstill.core.prompts import default_prompts

    prompts = default_prompts(4000)  # distinct: the embedder's cache never answers
    runs: dict[str, dict] = {}
    for k, mode in enumerate(("off", "event_loop", "background")):
        runs[mode] = r = _with_server(mode, args, prompts[k * 1300 :])
        print(f"{mode:10s} p50 {r['gap_p50_ms']:6.1f} ms  p99 {r['gap_p99_ms']:7.1f} ms  "
              f"max {r['gap_max_ms']:7.1f} ms  ({r['short_requests_served']} observed)")  # fmt: skip
    ratio = {m: runs[m]["gap_p99_ms"] / runs["off"]["gap_p99_ms"] for m in runs}
    result = {
        "benchmark": "monitor_latency",
        "settings": {
            "model": args.model,
            "stream_tokens": args.tokens,
            "short_clients": args.clients,
            "short_rate_per_s": args.rate,
            "embedder": "all-MiniLM-L6-v2",
            "server_torch_threads": 1,
        },
        "runs": runs,
        "p99_ratio_event_loop_vs_off": ratio["event_loop"],
        "p99_ratio_background_vs_off": ratio["background"],
        "provenance": provenance(started),
    }
    atomic_write_json(args.out, result)
    print(f"p99 gap vs off: event loop {ratio['event_loop']:.2f}x, "
          f"background {ratio['background']:.2f}x -> {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
