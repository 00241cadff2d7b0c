"""Throughput of `potstill serve` with batching: 8 concurrent clients vs one at a time.

Serves SmolLM2-135M-Instruct (``--model``) in-process under uvicorn, sends the SAME seeded
chat requests twice with the official openai client: first serially (one client, one
request at a time), then from ``--clients`` concurrent clients. Reports generated tokens/s
of both and ``batching_speedup`` = concurrent / serial, into
``benchmarks/results/serve_throughput.json``. A third pass sends the same requests from
``--clients`` clients to the same engine with potstill's KGW watermark on (γ 0.25, δ 2,
context width 2): ``native_watermark_overhead`` = tokens/s without over tokens/s with.

Then vLLM, each server in its own process (``--vllm-python``, default ``.venv-vllm/bin/python``
from ``make test-vllm``), the same requests from 1 and from ``--clients`` clients:

* bare vLLM: vLLM's own OpenAI server (``vllm.entrypoints.openai.api_server``);
* ``potstill serve --engine vllm``: potstill's front end over the same engine, defences off;
* the same with the KGW watermark on (the same key and parameters as the native pass).

All three run vLLM's CPU build in the native engine's dtype, eager (``--enforce-eager``: no
compilation, the same for all three), ``max_num_seqs`` = ``--clients``, engine seed 0.
``vllm_gateway_vs_bare_vllm`` = gateway tokens/s over bare vLLM's (8 clients, no defences);
``vllm_watermark_overhead`` = gateway tokens/s without over with the watermark;
``native_vs_vllm_8_clients`` = the native engine's tokens/s over bare vLLM's. Every concurrent
row is the median of ``--repeats`` passes (each pass's seconds are recorded); serial rows run
once.

Plain transformers ``generate`` runs the same requests as static batches of ``--clients``
(``speedup_vs_hf_static_batch`` = the native engine's 8-client tokens/s over it), and
single-stream decode is set against the memory-bandwidth bound (weight bytes read once per
token at the measured copy bandwidth: ``single_stream_fraction_of_bandwidth_bound``).

llama.cpp (llama-cpp-python's OpenAI server, built into its own ``--llamacpp-venv`` on first
use, :mod:`_llamacpp`) serves the same GGUF file as shipped (Q4_1: it reads ~6x fewer weight
bytes per token than fp32, ~3x fewer than bf16) with ``--threads`` threads, sampling the same
distribution. ``speedup_vs_llamacpp_8_clients`` = the native engine's 8-client tokens/s over
llama.cpp's; the ``_top5_logprobs`` rows repeat the native and llama.cpp passes with
``logprobs=True, top_logprobs=5``.

The native engine loads ``--dtype`` (default ``auto``, as ``potstill serve``: bf16 where the
hardware runs it natively, with its linears prepacked for oneDNN); vLLM and transformers run
the same dtype (transformers on its own unpacked copy). In bf16, ``bf16_logprob_error`` scores
the served texts teacher-forced under the bf16 engine and an fp32 copy of the same weights.

    python benchmarks/serve_throughput.py            # 16 requests x 64 tokens
    python benchmarks/serve_throughput.py --quick    # 8 requests x 16 tokens
    python benchmarks/serve_throughput.py --no-vllm --no-llamacpp  # the native engine only
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


def _requests(
    count: int, max_tokens: int, model: str, top_logprobs: int = 0
) -> list[dict[str, Any]]:
    """Seeded chat requests, sampled at temperature 0.7 from the whole distribution (top-p 1);
    with ``top_logprobs`` > 0 each also asks for that many top logprobs per token."""
    lp: dict[str, Any] = {"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}
    return [
        {
            "model": model,
            "messages": [
                {"role": "user", "content": f"Write a short paragraph about {TOPICS[i % 16]}."}
            ],
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "top_p": 1.0,
            "seed": i,
            **lp,
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


def _median_run(
    client: Any, reqs: list[dict[str, Any]], clients: int, repeats: int
) -> tuple[float, list[Any], list[float]]:
    """``_run`` ``repeats`` times (one pass of 8 clients takes ~10 s, and a host's noise is
    of that order): (median wall seconds, the last responses, every pass's seconds)."""
    walls, out = [], []
    for _ in range(repeats if clients > 1 else 1):  # a serial pass is long enough to be stable
        wall, out = _run(client, reqs, clients)
        walls.append(wall)
    return sorted(walls)[len(walls) // 2], out, walls


def _row(client: Any, reqs: list[dict[str, Any]], clients: int, repeats: int) -> dict[str, Any]:
    """One table row: ``_median_run``'s tokens/s (``usage.completion_tokens`` over the median
    wall), its seconds and every pass's seconds."""
    wall, out, walls = _median_run(client, reqs, clients, repeats)
    tokens = sum(r.usage.completion_tokens for r in out)
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "walls_s": walls,
            "completion_tokens": tokens}  # fmt: skip


def _watermarked(
    engine: Any, reqs: list[dict[str, Any]], clients: int, repeats: int
) -> dict[int, Any]:
    """The serial and concurrent passes again, on the same engine, with KGW on (a fixed key):
    ``{clients: (wall seconds, responses)}``."""
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
        return {n: _median_run(client, reqs, n, repeats)[:2] for n in (1, clients)}


def _hf_static_batch(
    model: Any, tok: Any, reqs: list[dict[str, Any]], batch: int
) -> dict[str, Any]:
    """Plain transformers ``generate`` on the same chat requests, ``batch`` at a time, left-
    padded, sampled at the same temperature: tokens counted up to and including each row's
    end of sequence, as ``usage.completion_tokens`` counts them."""
    import torch

    tok.padding_side = "left"
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    texts = [tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False)
             for r in reqs]  # fmt: skip

    def run(chunk: list[str], new: int) -> int:
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new, do_sample=True,
                                 temperature=reqs[0]["temperature"], top_p=1.0, top_k=0,
                                 eos_token_id=sorted(stops), pad_token_id=tok.eos_token_id)  # fmt: skip
        n = 0
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            ends = [i for i, t in enumerate(row) if t in stops]
            n += ends[0] + 1 if ends else len(row)
        return n

    run(texts[:batch], 4)  # warm-up
    t, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), batch):
        tokens += run(texts[i : i + batch], reqs[0]["max_tokens"])
    wall = time.perf_counter() - t
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "completion_tokens": tokens,
            "batch": batch}  # fmt: skip


def _bandwidth_bound(model: Any) -> dict[str, float]:
    """Single-stream decode's ceiling: every weight byte read once per token at the measured
    copy bandwidth (the KV cache and activations are left out, so the real ceiling is lower)."""
    from _common import copy_bandwidth

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth()
    return {"copy_bandwidth_bytes_per_s": bandwidth, "weight_bytes": weights,
            "tokens_per_s": bandwidth / weights}  # fmt: skip


def _bf16_logprob_error(
    engine: Any, spec: str, reqs: list[dict[str, Any]], texts: list[str]
) -> dict[str, Any]:
    """How far the bf16 engine's logprobs are from fp32 ones: both models score the served
    texts teacher-forced (chat prompt + completion, re-tokenised); over every completion
    position, |bf16 - fp32| of the next token's logprob and of fp32's top-5 entries, and how
    often the two argmaxes agree."""
    import torch

    from potstill.core.models import load_model

    ref, tok = load_model(spec)
    ref.eval()
    errs, top5, agree, n = [], [], 0, 0
    with torch.inference_mode():
        for r, text in zip(reqs, texts):
            chat = tok.apply_chat_template(
                r["messages"], add_generation_prompt=True, tokenize=False
            )
            prompt = tok(chat, add_special_tokens=False)["input_ids"]
            ids = prompt + tok(text, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids])
            a = torch.log_softmax(engine.model(input_ids=x).logits[0].float(), -1)
            b = torch.log_softmax(ref(input_ids=x).logits[0].float(), -1)
            pos = torch.arange(len(prompt) - 1, len(ids) - 1)
            nxt = torch.tensor(ids[len(prompt) :])
            errs.append((a[pos, nxt] - b[pos, nxt]).abs())
            k = b[pos].topk(5, -1).indices
            top5.append((a[pos].gather(-1, k) - b[pos].gather(-1, k)).abs().flatten())
            agree += int((a[pos].argmax(-1) == b[pos].argmax(-1)).sum())
            n += len(pos)
    e, t = torch.cat(errs), torch.cat(top5)
    return {"positions": n, "token_logprob_abs_err_mean": float(e.mean()),
            "token_logprob_abs_err_max": float(e.max()),
            "top5_logprob_abs_err_mean": float(t.mean()), "top5_logprob_abs_err_max": float(t.max()),
            "argmax_agreement": agree / n}  # fmt: skip


def _in_process_peers(
    args: argparse.Namespace, reqs: list[dict[str, Any]], clients: int, result: dict[str, Any]
) -> dict[str, Any]:
    """The transformers row and the bandwidth bound, on the native engine's weights and dtype
    as transformers loads them (the engine's own copy has its linears prepacked)."""
    import torch

    from potstill.core.models import load_model

    bf16 = args.resolved_dtype == "bfloat16"
    model, tok = load_model(args.model, dtype=torch.bfloat16 if bf16 else None)
    hf = _hf_static_batch(model, tok, reqs, clients)
    print(f"transformers generate, batch {clients}: {hf['wall_s']:.1f} s", file=sys.stderr)
    bound = _bandwidth_bound(model)
    return {
        "hf_static_batch": hf,
        "speedup_vs_hf_static_batch": result["batched_tokens_per_s"] / hf["tokens_per_s"],
        "bandwidth_bound": bound,
        "single_stream_fraction_of_bandwidth_bound": result["serial_tokens_per_s"]
        / bound["tokens_per_s"],
    }


def _vllm_servers(args: argparse.Namespace, key_file: Path) -> dict[str, list[str]]:
    """The argv of each vLLM server (the port is appended)."""
    from potstill.core.models import resolve_model_dir

    py, model_dir = args.vllm_python, str(resolve_model_dir(args.model))
    common = ["--dtype", args.resolved_dtype, "--enforce-eager"]
    gateway = [py, "-m", "potstill.cli", "serve", "--engine", "vllm", "--model", args.model,
               "--max-batch", str(args.clients), *common]  # fmt: skip
    bare = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", args.model, "--max-num-seqs", str(args.clients),
            "--seed", "0", "--disable-log-stats", *common]  # fmt: skip
    watermark = ["--watermark", "kgw", "--watermark-key-file", str(key_file),
                 "--gamma", "0.25", "--delta", "2", "--context-width", "2"]  # fmt: skip
    return {"bare_vllm": bare, "gateway": gateway, "gateway_watermark": [*gateway, *watermark]}


def _vllm_rows(args: argparse.Namespace, reqs: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s of each vLLM server at 1 and ``--clients`` clients (after a warm-up)."""
    import tempfile

    import openai

    from _servers import free_port, subprocess_server
    from potstill.core.watermark.keys import WatermarkKey, write_key

    # vLLM's CPU build: both cores to the worker, a 2 GiB KV cache (ignored on a GPU)
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env.setdefault("VLLM_CACHE_ROOT", os.environ.get("VLLM_CACHE_ROOT", f"{tmp}/vllm-cache"))
        key_file = write_key(Path(tmp) / "wm.key", WatermarkKey(bytes(32)))
        for name, argv in _vllm_servers(args, key_file).items():
            port, t0 = free_port(), time.perf_counter()
            with subprocess_server([*argv, "--port", str(port)], port, Path(tmp) / f"{name}.log",
                                   env=env) as url:  # fmt: skip
                load_s = time.perf_counter() - t0
                client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
                _run(client, reqs[:1], 1)  # warm-up
                row: dict[str, Any] = {"load_s": load_s}
                for clients in (1, args.clients):
                    row[f"{clients}_clients"] = _row(client, reqs, clients, args.repeats)
                    print(f"{name}, {clients} clients: {row[f'{clients}_clients']['wall_s']:.1f} s",
                          file=sys.stderr, flush=True)  # fmt: skip
            rows[name] = row
    return rows


def _llamacpp_rows(
    args: argparse.Namespace, reqs: list[dict[str, Any]], reqs_lp: list[dict[str, Any]]
) -> dict[str, Any]:
    """llama-cpp-python's server on the same GGUF file: 1 and ``--clients`` clients, with top-5
    logprobs off and on. Its sampler is set to the same distribution as the native engine's
    (``top_k`` 0 and ``min_p`` 0 turn off llama.cpp's default truncation)."""
    import tempfile

    import openai

    from _llamacpp import LLAMACPP_VERSION, defaults_crash, ensure_llamacpp, llamacpp_server_argv
    from _servers import free_port, subprocess_server
    from potstill.core.models import alias_gguf_path

    python = ensure_llamacpp(Path(args.llamacpp_venv))
    gguf = alias_gguf_path(args.model)
    crash = defaults_crash(python, gguf)
    argv = llamacpp_server_argv(python, gguf, args.model, args.threads, extra_bufts=not crash)
    same = {"extra_body": {"top_k": 0, "min_p": 0.0}}
    res: dict[str, Any] = {"version": LLAMACPP_VERSION, "gguf": gguf.name,
                           "gguf_bytes": gguf.stat().st_size, "threads": args.threads,
                           "extra_buffer_types": not crash,
                           "defaults_crashed": crash}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        port, t0 = free_port(), time.perf_counter()
        with subprocess_server([*argv, "--port", str(port)], port, Path(tmp) / "llamacpp.log",
                               ready_path="/v1/models") as url:  # fmt: skip
            res["load_s"] = time.perf_counter() - t0
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
            _run(client, [{**reqs[0], **same}], 1)  # warm-up
            for label, rs in (("", reqs), ("_top5_logprobs", reqs_lp)):
                for clients in (1, args.clients):
                    row = _row(client, [{**r, **same} for r in rs], clients, args.repeats)
                    res[f"{clients}_clients{label}"] = row
                    print(f"llama.cpp, {clients} clients{label}: {row['wall_s']:.1f} s",
                          file=sys.stderr, flush=True)  # fmt: skip
    return res


def _llamacpp_ratios(res: dict[str, Any], clients: int) -> dict[str, float]:
    lc = res["llamacpp"]

    def tps(key: str) -> float:
        return float(lc[key]["tokens_per_s"])

    return {
        f"speedup_vs_llamacpp_{clients}_clients": res["batched_tokens_per_s"]
        / tps(f"{clients}_clients"),
        "speedup_vs_llamacpp_1_client": res["serial_tokens_per_s"] / tps("1_clients"),
        f"speedup_vs_llamacpp_{clients}_clients_top5_logprobs": res["top5_logprobs"][
            f"{clients}_clients"
        ]["tokens_per_s"]
        / tps(f"{clients}_clients_top5_logprobs"),
        "speedup_vs_llamacpp_1_client_top5_logprobs": res["top5_logprobs"]["1_clients"][
            "tokens_per_s"
        ]
        / tps("1_clients_top5_logprobs"),
    }


def _vllm_ratios(res: dict[str, Any], clients: int) -> dict[str, float]:
    v = res["vllm"]

    def tps(name: str, n: int) -> float:
        return float(v[name][f"{n}_clients"]["tokens_per_s"])

    return {
        "vllm_gateway_vs_bare_vllm": tps("gateway", clients) / tps("bare_vllm", clients),
        "vllm_gateway_vs_bare_vllm_1_client": tps("gateway", 1) / tps("bare_vllm", 1),
        "vllm_watermark_overhead": tps("gateway", clients) / tps("gateway_watermark", clients),
        "vllm_watermark_overhead_1_client": tps("gateway", 1) / tps("gateway_watermark", 1),
        f"native_vs_vllm_{clients}_clients": res["batched_tokens_per_s"]
        / tps("bare_vllm", clients),
        "native_vs_vllm_1_client": res["serial_tokens_per_s"] / tps("bare_vllm", 1),
    }


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quick", action="store_true", help="8 requests x 16 tokens")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="passes per concurrent row (median)")
    ap.add_argument(
        "--vllm-python", default=str(Path(__file__).resolve().parents[1] / ".venv-vllm/bin/python")
    )
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM servers")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="weights of the native engine and vLLM (potstill serve's default)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the native engine, llama.cpp's threads")  # fmt: skip
    ap.add_argument(
        "--llamacpp-venv",
        default=str(Path(__file__).resolve().parents[1] / ".venv-llamacpp"),
        help="llama-cpp-python's own environment (built there on first use, ~15 min)",
    )
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results/serve_throughput.json"))
    args = ap.parse_args()
    if not args.no_vllm and not Path(args.vllm_python).is_file():
        ap.error(f"--vllm-python {args.vllm_python} does not exist: run `make test-vllm` once, "
                 "or pass --no-vllm")  # fmt: skip
    return args


def _native_rows(
    args: argparse.Namespace, engine: Any, reqs: list[dict[str, Any]],
    reqs_lp: list[dict[str, Any]],
) -> tuple[dict[str, Any], list[Any]]:  # fmt: skip
    """The native engine's passes (serial, concurrent, top-5 logprobs, watermark on): the
    result fields, and the concurrent pass's responses."""
    import httpx
    import openai

    from potstill.serve.app import create_app
    from potstill.serve.background import serve_in_background

    with serve_in_background(create_app(engine)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        _run(client, reqs[:1], 1)  # warm-up (allocator, kernels)
        serial_s, serial = _run(client, reqs, 1)
        print(f"serial: {serial_s:.1f} s", file=sys.stderr, flush=True)
        batched_s, batched, batched_walls = _median_run(client, reqs, args.clients, args.repeats)
        print(f"{args.clients} clients: {batched_s:.1f} s", file=sys.stderr, flush=True)
        top5 = {f"{n}_clients": _row(client, reqs_lp, n, args.repeats) for n in (1, args.clients)}
        print(f"top-5 logprobs: {top5['1_clients']['wall_s']:.1f} s serial, "
              f"{top5[f'{args.clients}_clients']['wall_s']:.1f} s batched", file=sys.stderr)  # fmt: skip
        health = httpx.get(url + "/health").json()
    wm_runs = _watermarked(engine, reqs, args.clients, args.repeats)
    (wm1_s, wm1), (wm_s, wm) = wm_runs[1], wm_runs[args.clients]
    print(f"watermark on: {wm1_s:.1f} s serial, {wm_s:.1f} s batched", file=sys.stderr, flush=True)

    def tokens(rs: list[Any]) -> int:
        return sum(r.usage.completion_tokens for r in rs)

    serial_tps, batched_tps = tokens(serial) / serial_s, tokens(batched) / batched_s
    same = sum(a.choices[0].message.content == b.choices[0].message.content
               for a, b in zip(serial, batched))  # fmt: skip
    return {
        "batching_speedup": batched_tps / serial_tps,
        "serial_tokens_per_s": serial_tps,
        "batched_tokens_per_s": batched_tps,
        "watermark_batched_tokens_per_s": tokens(wm) / wm_s,
        "native_watermark_overhead": batched_tps / (tokens(wm) / wm_s),
        "watermark_serial_tokens_per_s": tokens(wm1) / wm1_s,
        "native_watermark_overhead_1_client": serial_tps / (tokens(wm1) / wm1_s),
        "serial_wall_s": serial_s,
        "batched_wall_s": batched_s,
        "batched_walls_s": batched_walls,
        "repeats": args.repeats,
        "serial_completion_tokens": tokens(serial),
        "batched_completion_tokens": tokens(batched),
        "same_text_serial_vs_batched": f"{same}/{len(reqs)}",
        "max_batch_seen": health["max_batch_seen"],
        "top5_logprobs": top5,
        "native_top5_logprobs_overhead": batched_tps
        / top5[f"{args.clients}_clients"]["tokens_per_s"],
    }, batched


def main() -> None:
    started = time.time()
    args = _args()
    n_req = args.requests or (8 if args.quick else 16)
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import torch

    from potstill.core.hardware import resolve_dtype
    from potstill.serve.engine import Engine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)  # as `potstill serve` (core.hardware.threads_for_worker)
    args.resolved_dtype = resolve_dtype(args.dtype, device)
    t_load = time.perf_counter()
    engine = Engine.from_spec(args.model, max_batch=args.clients, device=device, dtype=args.dtype,
                              threads=args.threads)  # fmt: skip
    load_s = time.perf_counter() - t_load
    reqs = _requests(n_req, max_tokens, args.model)
    reqs_lp = _requests(n_req, max_tokens, args.model, top_logprobs=5)
    result, batched = _native_rows(args, engine, reqs, reqs_lp)
    engine.stop()
    torch.set_num_threads(args.threads)  # the in-process peers run on this thread
    result.update({
        "requests": n_req, "max_tokens": max_tokens, "clients": args.clients,
        "max_batch": args.clients, "model": args.model, "dtype": args.resolved_dtype,
        "packed_linears": any(type(m).__name__ == "PackedLinear" for m in engine.model.modules()),
        "device": device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "model_load_s": load_s, "quick": args.quick, "python": platform.python_version(),
        "torch": torch.__version__,
    })  # fmt: skip
    result.update(_in_process_peers(args, reqs, args.clients, result))
    if args.resolved_dtype == "bfloat16":
        texts = [r.choices[0].message.content or "" for r in batched]
        result["bf16_logprob_error"] = _bf16_logprob_error(engine, args.model, reqs, texts)
    if not args.no_llamacpp:
        result["llamacpp"] = _llamacpp_rows(args, reqs, reqs_lp)
        result.update(_llamacpp_ratios(result, args.clients))
    if not args.no_vllm:
        del engine  # free the native engine's memory for vLLM's processes
        result["vllm"] = _vllm_rows(args, reqs)
        result.update(_vllm_ratios(result, args.clients))
    result["provenance"] = provenance(started)
    out = Path(args.out)
    write_result(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
