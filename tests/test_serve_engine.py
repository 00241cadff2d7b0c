"""Serving internals without HTTP: sampler, stop strings, token text, buckets, batching."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastapi")

from potstill.core.models import load_model  # noqa: E402
from potstill.serve.auth import KeyRing, RateLimiter, key_id  # noqa: E402
from potstill.serve.engine import Engine, Event, RequestGroup, SamplingParams  # noqa: E402
from potstill.serve.protocol import APIError  # noqa: E402
from potstill.serve.sampling import (  # noqa: E402
    TokenText,
    find_stop,
    sample_token,
    stop_holdback,
)


def test_sample_token_greedy_top_p_and_frequencies() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    assert sample_token(logits, temperature=0.0, top_p=1.0, generator=g) == 0
    # top_p=0.5: the first token alone has mass 0.5 -> always token 0.
    assert {sample_token(logits, temperature=1.0, top_p=0.5, generator=g) for _ in range(50)} == {0}
    # top_p=0.8 keeps {0, 1} renormalised to (0.625, 0.375).
    draws = [sample_token(logits, temperature=1.0, top_p=0.8, generator=g) for _ in range(4000)]
    assert set(draws) == {0, 1}
    assert abs(draws.count(0) / 4000 - 0.625) < 0.03
    # Full distribution at T=1: frequencies match p (4000 draws: 3 sigma ~ 0.024).
    draws = [sample_token(logits, temperature=1.0, top_p=1.0, generator=g) for _ in range(4000)]
    for tok, p in enumerate([0.5, 0.3, 0.15, 0.05]):
        assert abs(draws.count(tok) / 4000 - p) < 0.03
    # T=0.5 squares then renormalises p.
    p2 = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    p2 = p2 / p2.sum()
    draws = [sample_token(logits, temperature=0.5, top_p=1.0, generator=g) for _ in range(4000)]
    assert abs(draws.count(0) / 4000 - float(p2[0])) < 0.03


def test_sample_token_same_seed_same_draws() -> None:
    logits = torch.randn(300, generator=torch.Generator().manual_seed(1))
    a = [sample_token(logits, temperature=1, top_p=0.9, generator=torch.Generator().manual_seed(5))]
    b = [sample_token(logits, temperature=1, top_p=0.9, generator=torch.Generator().manual_seed(5))]
    assert a == b


def test_stop_helpers() -> None:
    assert find_stop("abcXYdefXY", ["XY", "def"]) == 3
    assert find_stop("abc", ["z"]) is None
    assert find_stop("XYab XY", ["XY"], start=1) == 5
    assert stop_holdback("hello wor", ["world"]) == 3  # "wor" may become "world"
    assert stop_holdback("hello", ["world"]) == 0
    assert stop_holdback("ab\ufffd\ufffd", []) == 2  # incomplete UTF-8 at the end


def test_token_text_bytes_and_display() -> None:
    _, tok = load_model("tiny:0")
    tt = TokenText(tok)
    assert tt.get(ord("a")) == (b"a", "a")
    assert tt.get(0xE2) == (b"\xe2", "bytes:\\xe2")  # a lone UTF-8 lead byte
    assert tt.get(256) == (b"<|endoftext|>", "<|endoftext|>")


def test_keyring_and_buckets() -> None:
    ring = KeyRing(["k1", "k2"])
    assert (
        ring.check("Bearer k2")
        == key_id("k2")
        == __import__("hashlib").sha256(b"k2").hexdigest()[:8]
    )
    for bad in (None, "", "Bearer", "Bearer k3", "Basic k1", "Bearer k1x"):
        with pytest.raises(APIError) as e:
            ring.check(bad)
        assert e.value.status == 401
    assert KeyRing([]).check(None) == "anonymous"
    now = [0.0]
    rl = RateLimiter(rpm=60, tpm=600, clock=lambda: now[0])
    for _ in range(60):
        rl.acquire("a", 1)
    with pytest.raises(APIError) as e:
        rl.acquire("a", 1)
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "1"
    rl.acquire("b", 100)  # other keys have their own buckets
    now[0] = 1.0  # 1 request/s and 10 tokens/s refill
    rl.acquire("a", 1)
    with pytest.raises(APIError) as e:
        rl.acquire("b", 600)  # 510 tokens in b's bucket: 90 more needed at 10/s
    assert e.value.headers["Retry-After"] == str(math.ceil(90 / 10))
    with pytest.raises(APIError) as e:
        rl.acquire("b", 601)  # more than a minute's worth can never pass
    assert e.value.headers["Retry-After"] == "60"
    rl.refund("b", 100)
    rl.acquire("b", 600)


def _sinks(n: int) -> tuple[list[list[Event]], threading.Semaphore, Any]:
    """(events per request, a semaphore released once per finished choice, sink factory)."""
    events: list[list[Event]] = [[] for _ in range(n)]
    done = threading.Semaphore(0)

    def sink_for(k: int) -> Any:
        def sink(ev: Event) -> None:
            events[k].append(ev)
            if ev.finish_reason or ev.error:
                done.release()

        return sink

    return events, done, sink_for


def _run(
    engine: Engine, prompts: list[list[int]], params: list[SamplingParams]
) -> list[list[Event]]:
    """Submit all at once; wait for every choice; events per prompt."""
    events, done, sink_for = _sinks(len(prompts))
    for k, (p, sp) in enumerate(zip(prompts, params)):
        engine.submit(p, sp, [0], sink_for(k))
    for _ in prompts:
        assert done.acquire(timeout=30)
    return events


def test_batched_greedy_equals_solo_and_reference() -> None:
    """Rows joining a running batch (different lengths, left padding, cache merges and
    trims) decode exactly what the model gives for each prompt alone."""
    model, tok = load_model("tiny:3")
    engine = Engine(model, tok, model_name="tiny:3", max_batch=3)
    engine.start()
    try:
        prompts = [tok(s).input_ids for s in ["a", "hello world", "xyz" * 7, "q", "mid length"]]
        lens = [5, 30, 12, 25, 3]
        params = [SamplingParams(max_tokens=m, temperature=0.0, logprobs=0) for m in lens]
        results = _run(engine, prompts, params)
        assert engine.stats.max_batch_seen == 3
        for p, m, evs in zip(prompts, lens, results):
            assert evs[-1].finish_reason == "length" and evs[-1].completion_tokens == m
            got = [lp.token_id for ev in evs for lp in ev.logprobs]
            ids = list(p)
            with torch.no_grad():
                for _ in range(m):
                    ids.append(
                        int(model(input_ids=torch.tensor([ids])).logits[0, -1, :260].argmax())
                    )
            assert got == ids[len(p) :]
    finally:
        engine.stop()


def test_processor_hook_runs_and_failure_is_isolated() -> None:
    model, tok = load_model("tiny:0")
    engine = Engine(model, tok, model_name="tiny:0", max_batch=4)
    engine.start()
    try:
        seen: list[int] = []

        def force_a(rows: Any, logits: Any) -> Any:
            seen.extend(len(c) for c in rows.contexts)
            out = torch.full_like(logits, -1e9)
            out[:, ord("a")] = 0.0
            return out

        def boom(rows: Any, logits: Any) -> Any:
            raise ValueError("bad processor")

        p = tok("hi").input_ids
        params = [
            SamplingParams(max_tokens=4, temperature=1.0, processors=(force_a,)),
            SamplingParams(max_tokens=4, processors=(boom,)),
            SamplingParams(max_tokens=4, temperature=0.0),
        ]
        ev_a, ev_boom, ev_ok = _run(engine, [p, p, p], params)
        assert "".join(e.text for e in ev_a) == "aaaa"
        assert seen == [2, 3, 4, 5]  # the processor sees prompt + generated ids
        assert ev_boom[-1].error is not None and "bad processor" in ev_boom[-1].error
        assert ev_ok[-1].finish_reason == "length"
        assert engine.health()["worker_alive"]
    finally:
        engine.stop()


def test_a_shared_processor_sees_the_whole_batch_once_per_step() -> None:
    """One processor object shared by three requests is called once per decode step with
    all their rows (stable keys, full contexts); a row it fails on is failed alone."""
    model, tok = load_model("tiny:0")
    engine = Engine(model, tok, model_name="tiny:0", max_batch=4)
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    bad = tok("bad!").input_ids
    ends = sorted(engine.stop_ids)

    def shared(rows: Any, logits: Any) -> Any:
        if any(list(c[: len(bad)]) == bad for c in rows.contexts):
            raise ValueError("this row is bad")
        calls.append((rows.keys, tuple(len(c) for c in rows.contexts)))
        out = logits.clone()
        out[:, ends] = float("-inf")  # all 5 tokens, whatever the random model prefers
        return out

    prompts = [tok("one").input_ids, tok("three").input_ids, bad]
    sp = SamplingParams(max_tokens=5, temperature=0.0, processors=(shared,))
    with torch.inference_mode():
        events, _done, sink_for = _sinks(3)
        groups = [RequestGroup(p, sp, [0], sink_for(j)) for j, p in enumerate(prompts)]
        engine._admit(groups)
        while engine._rows:
            engine._decode_step()
    assert events[2][-1].error and "this row is bad" in events[2][-1].error
    assert [e[-1].finish_reason for e in events[:2]] == ["length", "length"]
    # The first call (at admission) had the bad row in it: it raised, and each row was
    # retried alone; then one call per decode step covers both good rows.
    assert [c[1] for c in calls[:2]] == [(3,), (5,)]
    batched = calls[2:]
    assert [c[1] for c in batched] == [(3 + t, 5 + t) for t in range(1, 5)]  # contexts grow
    assert {c[0] for c in batched} == {(calls[0][0][0], calls[1][0][0])}  # stable row keys


def test_sample_batch_equals_per_row_sampling() -> None:
    from potstill.serve.sampling import sample_batch

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(2)) * 3
    temps, top_ps = [0.0, 1.0, 0.7, 1.3, 0.9], [1.0, 1.0, 1.0, 0.8, 0.5]
    for step in range(20):
        a = sample_batch(
            logits, temps, top_ps, [torch.Generator().manual_seed(step * 10 + i) for i in range(5)]
        )
        b = [
            sample_token(
                logits[i],
                temperature=temps[i],
                top_p=top_ps[i],
                generator=torch.Generator().manual_seed(step * 10 + i),
            )
            for i in range(5)
        ]
        assert a == b


def test_failed_merge_answers_every_row_and_keeps_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while merging new rows into a running batch answers both the running and
    the joining requests with an error (none is left waiting), then the engine serves on."""
    model, tok = load_model("tiny:0")
    engine = Engine(model, tok, model_name="tiny:0", max_batch=4)
    real_merge, calls = Engine._merge, []

    def flaky_merge(self: Engine, *args: Any) -> None:
        calls.append(1)
        if len(calls) == 2:  # the second admission joins a running batch
            raise RuntimeError("merge exploded")
        real_merge(self, *args)

    monkeypatch.setattr(Engine, "_merge", flaky_merge)
    started, release = threading.Event(), threading.Event()

    def gate_first(rows: Any, logits: Any) -> Any:
        # Hold the first request's decode step until the second is queued: the second then
        # joins a running batch at the next step, every time (no timing involved).
        started.set()
        assert release.wait(30)
        return logits

    engine.start()
    try:
        p = tok("hi").input_ids
        events, done, sink_for = _sinks(2)
        engine.submit(p, SamplingParams(max_tokens=400, processors=(gate_first,)), [0], sink_for(0))
        assert started.wait(30)
        engine.submit(p, SamplingParams(max_tokens=4), [0], sink_for(1))
        release.set()
        assert done.acquire(timeout=30) and done.acquire(timeout=30)
        assert all(evs[-1].error and "merge exploded" in evs[-1].error for evs in events)
        (ok,) = _run(engine, [p], [SamplingParams(max_tokens=3, temperature=0.0)])
        assert ok[-1].finish_reason == "length" and engine.health()["worker_alive"]
    finally:
        engine.stop()


def test_bad_prompt_ids_are_refused_at_submit_not_lost() -> None:
    """A prompt that is not token ids (e.g. a tokenizer's BatchEncoding passed by mistake)
    used to fail inside the worker before any row existed, and its caller waited forever."""
    model, tok = load_model("tiny:0")
    engine = Engine(model, tok, model_name="tiny:0")
    engine.start()
    try:
        for bad in (["input_ids", "attention_mask"], [], [1, 10**6], [1.5]):
            with pytest.raises(ValueError, match="token ids"):
                engine.submit(bad, SamplingParams(max_tokens=2), [0], lambda ev: None)
        (ok,) = _run(engine, [tok("hi").input_ids], [SamplingParams(max_tokens=2)])
        assert ok[-1].finish_reason == "length"
    finally:
        engine.stop()


def test_min_tokens_holds_back_the_end_of_sequence_before_the_defences() -> None:
    """A processor that pushes every row to end at once: without min_tokens each row stops
    after one token; with it the end tokens are ruled out (-inf, which no later bias lifts)
    until min_tokens tokens, then the row stops. Raw logprobs stay the model's own."""
    model, tok = load_model("tiny:0")
    engine = Engine(model, tok, model_name="tiny:0", max_batch=4)
    ends = sorted(engine.stop_ids)

    def end_now(rows: Any, logits: Any) -> Any:
        out = logits.clone()
        out[:, ends] += 100.0
        return out

    prompt = tok("hello").input_ids
    engine.start()
    try:
        plain, held, raw = _run(engine, [prompt] * 3, [
            SamplingParams(max_tokens=8, temperature=0.0, processors=(end_now,)),
            SamplingParams(max_tokens=8, temperature=0.0, processors=(end_now,), min_tokens=3,
                           logprobs=0),
            SamplingParams(max_tokens=8, temperature=0.0, processors=(end_now,), min_tokens=3,
                           logprobs=0, served_logprobs=False),
        ])  # fmt: skip
    finally:
        engine.stop()
    assert (plain[-1].finish_reason, plain[-1].completion_tokens) == ("stop", 1)
    assert (held[-1].finish_reason, held[-1].completion_tokens) == ("stop", 4)
    assert all(x.logprob > -50 for e in held for x in e.logprobs)  # no -inf draws
    with torch.no_grad():
        z = model(input_ids=torch.tensor([prompt])).logits[0, -1, : engine.vocab_size]
    first = next(x for e in raw for x in e.logprobs)
    want = float(torch.log_softmax(z.float(), -1)[first.token_id])
    assert abs(first.logprob - want) < 1e-5  # raw: before min_tokens and the processor
