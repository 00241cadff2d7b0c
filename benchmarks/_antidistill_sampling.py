"""Sampling for the antidistillation benchmark: batched KV-cached generation from the
teacher with (or without) the antidistillation perturbation, and its cost, batched and on
potstill's serving engine (``antidistill.py`` runs the experiment)."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from _common import cache_kw, cache_of, encode_prompts
from potstill.defend.antidistill import AntidistillPerturbation

REAL_VOCAB = 260  # tiny tokenizer: 256 bytes + 4 specials (the heads are padded to 320)


def _next_logits(
    logits: torch.Tensor, delta: torch.Tensor | None, lam: float, temperature: float
) -> torch.Tensor:
    """The sampled-from logits [B, REAL_VOCAB]: ``(z + lam * delta) / tau``."""
    z = logits[:, :REAL_VOCAB].float()
    if delta is not None:
        z = z + lam * delta[:, :REAL_VOCAB]
    return z / temperature if temperature > 0 else z


def sample_batch(model: Any, tok: Any, prompts: list[str], max_new: int, *, seed: int,
                 temperature: float = 1.0, pert: AntidistillPerturbation | None = None,
                 lam: float = 0.0) -> tuple[list[list[int]], int]:  # fmt: skip
    """One left-padded KV-cached batch; per row the ids up to (not incl.) the first stop token.

    ``temperature == 0`` is greedy. With ``pert`` (and ``lam``), every step also runs the two
    shifted proxies incrementally on the same ids and mask, and samples from
    ``softmax((z + lam * delta) / tau)``. Stops when every row has stopped or at ``max_new``.
    Returns (rows, n_generated) with n_generated = tokens sampled for live rows (stop incl.).
    """
    ids, am = encode_prompts(tok, prompts)
    stops = torch.tensor([tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
    gen = torch.Generator().manual_seed(seed)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    alive = torch.ones(len(prompts), dtype=torch.bool)
    rows: list[list[int]] = [[] for _ in prompts]
    n_gen, past, kw = 0, None, cache_kw(model)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True)
        delta = None
        if pert is not None and lam != 0:
            delta, past = pert(ids, am)
        for step in range(max_new):
            z = _next_logits(out.logits[:, -1], delta, lam, temperature)
            if temperature == 0:
                nxt = z.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(z, -1), 1, generator=gen)
            n_gen += int(alive.sum())
            for i in torch.nonzero(alive & ~torch.isin(nxt[:, 0], stops)).flatten().tolist():
                rows[i].append(int(nxt[i]))
            alive &= ~torch.isin(nxt[:, 0], stops)
            if not bool(alive.any()) or step == max_new - 1:
                break
            am = torch.cat([am, torch.ones_like(nxt)], 1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=nxt, attention_mask=am, position_ids=pos, use_cache=True,
                        **{kw: cache_of(out)})  # fmt: skip
            if past is not None:
                delta, past = pert(nxt, am, past)  # type: ignore[misc]
    return rows, n_gen


def sample_all(
    s: dict[str, Any], model: Any, tok: Any, prompts: list[str], *, seed: int, **kw: Any
) -> tuple[list[str], int, float]:
    """:func:`sample_batch` over chunks of ``gen_batch`` prompts -> (texts, tokens, seconds)."""
    texts: list[str] = []
    n_tok, t0 = 0, time.perf_counter()
    for c in range(0, len(prompts), s["gen_batch"]):
        rows, n = sample_batch(model, tok, prompts[c : c + s["gen_batch"]], s["max_new"],
                               seed=seed + c, **kw)  # fmt: skip
        texts += [tok.decode(r, skip_special_tokens=True) for r in rows]
        n_tok += n
    return texts, n_tok, time.perf_counter() - t0


def cost_batched(
    s: dict[str, Any], env: dict[str, Any], pert: AntidistillPerturbation, lam: float
) -> dict[str, Any]:
    """Seconds per generated token, plain vs antidistill, in :func:`sample_batch` (one batch
    of ``cost_prompts`` prompts; 3 interleaved repeats each, median)."""
    prompts = [e.prompt for e in env["examples"]["test"][: s["cost_prompts"]]]
    runs: dict[str, list[float]] = {"plain": [], "antidistill": []}
    for rep in range(3):
        for name, kw in (("plain", {}), ("antidistill", {"pert": pert, "lam": lam})):
            t0 = time.perf_counter()
            _, n = sample_batch(env["teacher"], env["tok"], prompts, s["max_new"], seed=rep, **kw)
            runs[name].append((time.perf_counter() - t0) / n)
    med = {k: sorted(v)[1] for k, v in runs.items()}
    return {"batch": len(prompts), "s_per_token_plain": med["plain"],
            "s_per_token_antidistill": med["antidistill"],
            "ratio": med["antidistill"] / med["plain"]}  # fmt: skip


def _engine_run(engine: Any, prompts: list[list[int]], params: list[Any]) -> tuple[float, int]:
    """Submit every prompt at once; (wall seconds until all finished, completion tokens)."""
    from potstill.serve.engine import Event

    done = threading.Semaphore(0)
    tokens = [0] * len(prompts)
    errors: list[str] = []

    def sink_for(k: int) -> Any:
        def sink(ev: Event) -> None:
            if ev.error:
                errors.append(ev.error)
            if ev.finish_reason or ev.error:
                tokens[k] = ev.completion_tokens
                done.release()

        return sink

    t0 = time.perf_counter()
    for k, (p, sp) in enumerate(zip(prompts, params)):
        engine.submit(p, sp, [0], sink_for(k))
    for _ in prompts:
        if not done.acquire(timeout=600):
            raise RuntimeError("the engine did not finish within 600 s")
    if errors:
        raise RuntimeError(f"engine errors: {errors[:3]}")
    return time.perf_counter() - t0, sum(tokens)


def cost_engine(
    s: dict[str, Any], env: dict[str, Any], pert: AntidistillPerturbation, lam: float
) -> dict[str, Any]:
    """Seconds per generated token through ``Engine`` in-process: no processors vs the
    batched :class:`AntidistillProcessor` (one proxy pass per step for all rows), same prompts
    and seeds; 2 interleaved repeats each (a fresh processor per repeat)."""
    from potstill.defend.antidistill_serve import AntidistillProcessor
    from potstill.serve.engine import Engine, SamplingParams

    tok = env["tok"]
    ids, am = encode_prompts(tok, [e.prompt for e in env["examples"]["test"]])
    ids, am = ids[: s["cost_engine_prompts"]], am[: s["cost_engine_prompts"]]
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, am)]
    engine = Engine(env["teacher"], tok, model_name="teacher", max_batch=s["cost_max_batch"])
    engine.start()
    runs: dict[str, list[float]] = {"plain": [], "antidistill": []}
    try:
        for _ in range(2):
            for name in runs:
                procs: tuple[Any, ...] = ()
                if name == "antidistill":
                    procs = (AntidistillProcessor(pert, lam),)
                params = [SamplingParams(max_tokens=s["max_new"], temperature=1.0, seed=i,
                                         processors=procs) for i in range(len(prompts))]  # fmt: skip
                sec, n = _engine_run(engine, prompts, params)
                runs[name].append(sec / n)
    finally:
        engine.stop()
    best = {k: min(v) for k, v in runs.items()}
    return {"requests": len(prompts), "max_batch": s["cost_max_batch"],
            "s_per_token_plain": best["plain"], "s_per_token_antidistill": best["antidistill"],
            "ratio": best["antidistill"] / best["plain"]}  # fmt: skip
