"""Throughput of `potstill serve` with batching: 8 concurrent clients vs one at a time.

Serves SmolLM2-135M-Instruct (``--model``) in-process under uvicorn, sends the SAME seeded
chat requests twice with the official openai client: first serially (one client, one
request at a time), then from ``--clients`` concurrent clients. Reports generated tokens/s
of both and ``batching_speedup`` = concurrent / serial, into
``benchmarks/results/serve_throughput.json``. A third pass sends the same requests from
``--clients`` clients to the same engine with potstill's KGW watermark on (γ 0.25, δ 2,
context width 2): ``native_watermark_overhead`` = tokens/s without over tokens/s with.

    python benchmarks/serve_throughput.py            # 16 requests x 64 tokens
    python benchmarks/serve_throughput.py --quick    # 8 requests x 16 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result
from _provenance import provenance

TOPICS = [
    "the moon",
    "bread",
    "rivers",
    "a lighthouse",
    "autumn",
    "bicycles",
    "the ocean",
    "coffee",
    "mountains",
    "libraries",
    "rain",
    "chess",
    "trains",
    "gardens",
    "owls",
    "winter",
]


def _requests(count: int, max_tokens: int, model: str) -> list[dict[str, Any]]:
    return [
        {
            "model": model,
            "messages": [
                {"role": "user", "content": f"Write a short paragraph about {TOPICS[i % 16]}."}
            ],
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "seed": i,
        }
        for i in range(count)
    ]


def _run(client: Any, reqs: list[dict[str, Any]], clients: int) -> tuple[float, list[Any]]:
    """Send ``reqs`` from ``clients`` threads; (wall seconds, responses in request order)."""
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(reqs)):
        todo.put(i)
    out: list[Any] = [None] * len(reqs)

    def worker() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            out[i] = client.chat.completions.create(**reqs[i])

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, out


def _watermarked(engine: Any, reqs: list[dict[str, Any]], clients: int) -> tuple[float, list[Any]]:
    """The concurrent pass again, on the same engine, with KGW on (a fixed key)."""
    import openai

    from potstill.core.watermark.keys import WatermarkKey
    from potstill.core.watermark.params import WatermarkParams
    from potstill.serve.app import ServeSettings, create_app
    from potstill.serve.background import serve_in_background
    from potstill.serve.watermarking import watermark_processors

    params = WatermarkParams("kgw", gamma=0.25, delta=2.0, context_width=2)
    settings = ServeSettings(processors=watermark_processors(WatermarkKey(bytes(32)), params))
    with serve_in_background(create_app(engine, settings)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        _run(client, reqs[:1], 1)  # warm-up, as for the passes without it
        return _run(client, reqs, clients)


def main() -> None:
    started = time.time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quick", action="store_true", help="8 requests x 16 tokens")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results/serve_throughput.json"))
    args = ap.parse_args()
    n_req = args.requests or (8 if args.quick else 16)
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import httpx
    import openai
    import torch

    from potstill.serve.app import create_app
    from potstill.serve.background import serve_in_background
    from potstill.serve.engine import Engine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_load = time.perf_counter()
    engine = Engine.from_spec(args.model, max_batch=args.clients, device=device)
    load_s = time.perf_counter() - t_load
    reqs = _requests(n_req, max_tokens, args.model)
    with serve_in_background(create_app(engine)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        _run(client, reqs[:1], 1)  # warm-up (allocator, kernels)
        serial_s, serial = _run(client, reqs, 1)
        print(f"serial: {serial_s:.1f} s", file=sys.stderr, flush=True)
        batched_s, batched = _run(client, reqs, args.clients)
        print(f"{args.clients} clients: {batched_s:.1f} s", file=sys.stderr, flush=True)
        health = httpx.get(url + "/health").json()
    wm_s, wm = _watermarked(engine, reqs, args.clients)
    print(f"{args.clients} clients, watermark on: {wm_s:.1f} s", file=sys.stderr, flush=True)
    wm_tok = sum(r.usage.completion_tokens for r in wm)
    serial_tok = sum(r.usage.completion_tokens for r in serial)
    batched_tok = sum(r.usage.completion_tokens for r in batched)
    same = sum(
        a.choices[0].message.content == b.choices[0].message.content
        for a, b in zip(serial, batched)
    )
    result = {
        "batching_speedup": (batched_tok / batched_s) / (serial_tok / serial_s),
        "serial_tokens_per_s": serial_tok / serial_s,
        "batched_tokens_per_s": batched_tok / batched_s,
        "watermark_batched_tokens_per_s": wm_tok / wm_s,
        "native_watermark_overhead": (batched_tok / batched_s) / (wm_tok / wm_s),
        "serial_wall_s": serial_s,
        "batched_wall_s": batched_s,
        "serial_completion_tokens": serial_tok,
        "batched_completion_tokens": batched_tok,
        "same_text_serial_vs_batched": f"{same}/{n_req}",
        "requests": n_req,
        "max_tokens": max_tokens,
        "clients": args.clients,
        "max_batch": args.clients,
        "max_batch_seen": health["max_batch_seen"],
        "model": args.model,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "model_load_s": load_s,
        "quick": args.quick,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    result["provenance"] = provenance(started)
    out = Path(args.out)
    write_result(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
