"""`potstill serve` end to end: the official openai client against a real uvicorn server
(tiny:0, in a background thread on a free 127.0.0.1 port)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

from potstill.core.models import load_model  # noqa: E402
from potstill.serve.app import ServeSettings, create_app  # noqa: E402
from potstill.serve.background import serve_in_background  # noqa: E402
from potstill.serve.engine import Engine  # noqa: E402

MODEL = "tiny:0"
KEY, OTHER_KEY = "sk-test-key-1", "sk-test-key-2"
REAL_VOCAB = 260  # tiny tokenizer: 256 bytes + 4 specials (logits are padded to 320)


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return load_model(MODEL)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny: tuple[Any, Any]) -> Iterator[dict]:
    model, tok = tiny
    audit = tmp_path_factory.mktemp("serve") / "audit.jsonl"

    def processors(rec: dict) -> list:
        # The logits-processor hook; seed 666 gets a processor that raises (worker isolation).
        def boom(rows: Any, logits: Any) -> Any:
            raise RuntimeError("processor exploded")

        return [boom] if rec.get("seed") == 666 else []

    engine = Engine(model, tok, model_name=MODEL, max_batch=8)
    settings = ServeSettings(api_keys=(KEY, OTHER_KEY), audit_log=audit, processors=processors)
    with serve_in_background(create_app(engine, settings)) as url:
        yield {"url": url, "audit": audit, "engine": engine}


def client(server: dict, key: str = KEY) -> Any:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0, timeout=30)


def post(server: dict, path: str, body: Any, key: str | None = KEY) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
        return httpx.post(server["url"] + path, content=body, headers=headers, timeout=30)
    return httpx.post(server["url"] + path, json=body, headers=headers, timeout=30)


def assert_error_shape(resp: Any, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


# ------------------------------------------------------------------ basics
def test_models_health_openapi(server: dict) -> None:
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = httpx.get(server["url"] + "/health").json()
    assert health["status"] == "ok" and health["worker_alive"] is True
    schema = httpx.get(server["url"] + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])


def test_the_audits_http_client_against_the_server(server: dict) -> None:
    """potstill's own client (SyncClient, via core.openai_http) against uvicorn: the model
    list over GET with the key, greedy completions over one kept-alive connection, and a
    refused key as an error naming the endpoint."""
    from potstill.core.errors import PotstillError
    from potstill.core.http import SyncClient
    from potstill.core.openai_http import first_model, post_json, route_url

    assert first_model(server["url"], api_key=KEY, timeout=30) == MODEL
    url = route_url(server["url"], "completions")
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 5, "temperature": 0.0}
    kw: dict[str, Any] = {"api": "completions", "want": "text",
                          "check": lambda d: d["choices"][0]["text"]}  # fmt: skip
    with SyncClient(timeout=30) as http:
        texts = [post_json(http, url, body, api_key=KEY, **kw)["choices"][0]["text"]
                 for _ in range(3)]  # fmt: skip
        assert len(http._conns) == 1 and next(iter(http._conns.values())).is_open
        with pytest.raises(PotstillError, match=r"v1/completions failed: HTTP 401"):
            post_json(http, url, body, api_key="sk-wrong", **kw)
    want = client(server).completions.create(**body).choices[0].text
    assert texts == [want] * 3


def test_completions_n_usage(server: dict, tiny: tuple[Any, Any]) -> None:
    _, tok = tiny
    prompts = ["hello there", "ab"]
    r = client(server).completions.create(
        model=MODEL, prompt=prompts, max_tokens=7, n=3, seed=5, temperature=1.0
    )
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert all(c.finish_reason == "length" for c in r.choices)
    # Prompt tokens count each prompt once; completion tokens all choices.
    assert r.usage.prompt_tokens == sum(len(tok(p).input_ids) for p in prompts)
    assert r.usage.completion_tokens == 6 * 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 42
    # n choices of one prompt use seeds seed+index: they are different samples.
    assert len({c.text for c in r.choices[:3]}) > 1


def test_chat_n_usage(server: dict, tiny: tuple[Any, Any]) -> None:
    _, tok = tiny
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client(server).chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=6, n=2, seed=1
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in r.choices)
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(tok(text, add_special_tokens=False).input_ids)
    assert r.usage.completion_tokens == 12


def test_stop_string_truncates(server: dict) -> None:
    c = client(server)
    kw: dict[str, Any] = {"model": MODEL, "prompt": "The ", "max_tokens": 40, "seed": 11}
    full = c.completions.create(**kw).choices[0].text
    windows = [full[i : i + 2] for i in range(4, len(full) - 2) if "\ufffd" not in full[i : i + 2]]
    assert windows, full
    stop = windows[0]
    r = c.completions.create(**kw, stop=[stop, "never-there"]).choices[0]
    assert r.finish_reason == "stop"
    assert r.text == full[: full.index(stop)]


def _stream_texts(chunks: Any, chat: bool) -> tuple[dict[int, str], dict[int, str], Any]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for ch in chunks:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            piece = (c.delta.content or "") if chat else c.text
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


def test_stream_equals_non_stream(server: dict) -> None:
    c = client(server)
    kw: dict[str, Any] = {"model": MODEL, "prompt": "stream me", "max_tokens": 25, "n": 2}
    ref = c.completions.create(**kw, seed=3)
    texts, reasons, usage = _stream_texts(
        c.completions.create(**kw, seed=3, stream=True, stream_options={"include_usage": True}),
        chat=False,
    )
    assert texts == {ch.index: ch.text for ch in ref.choices}
    assert reasons == {ch.index: ch.finish_reason for ch in ref.choices}
    assert usage.completion_tokens == ref.usage.completion_tokens == 50

    msgs = [{"role": "user", "content": "hi"}]
    ref_chat = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, seed=4)
    texts, _, _ = _stream_texts(
        c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, seed=4, stream=True),
        chat=True,
    )
    assert texts == {0: ref_chat.choices[0].message.content}


# ------------------------------------------------------------------ logprobs
def _reference_logprobs(model: Any, ids: list[int]) -> Any:
    """log_softmax of the model's logits over the real vocab, ``[len(ids), 260]``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :, :REAL_VOCAB]
    return torch.log_softmax(logits.double(), dim=-1)


def test_completion_logprobs_echo_match_forward_pass(server: dict, tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    engine = server["engine"]
    prompt = "hello"
    r = client(server).completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=5, echo=True
    )
    ch = r.choices[0]
    lp = ch.logprobs
    p_ids = tok(prompt).input_ids
    # Greedy reference continuation from a direct forward pass (real vocab only).
    ids = list(p_ids)
    for _ in range(6):
        ids.append(int(_reference_logprobs(model, ids)[-1].argmax()))
    ref = _reference_logprobs(model, ids)
    shown = [engine.token_text.get(t)[1] for t in ids]
    assert lp.tokens == shown
    assert ch.text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    diffs = [abs(lp.token_logprobs[t] - float(ref[t - 1, ids[t]])) for t in range(1, len(ids))]
    assert max(diffs) < 1e-4, diffs
    for t in range(1, len(ids)):
        top = lp.top_logprobs[t]
        vals, idx = torch.topk(ref[t - 1], 5)
        assert list(top) == [engine.token_text.get(int(i))[1] for i in idx]
        assert max(abs(a - float(b)) for a, b in zip(top.values(), vals)) < 1e-4
    assert lp.text_offset == list(range(len(ids)))  # one byte = one char here


def test_chat_logprobs_match_forward_pass(server: dict, tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    msgs = [{"role": "user", "content": "say something"}]
    r = client(server).chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=8, seed=9, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    p_ids = tok(text, add_special_tokens=False).input_ids
    # Tiny tokens are single bytes (no specials were sampled here: finish is "length").
    gen = [e.bytes[0] for e in content]
    assert all(len(e.bytes) == 1 for e in content)
    ref = _reference_logprobs(model, p_ids + gen)
    for k, e in enumerate(content):
        pos = len(p_ids) - 1 + k
        assert abs(e.logprob - float(ref[pos, gen[k]])) < 1e-4
        assert len(e.top_logprobs) == 3
        vals, idx = torch.topk(ref[pos], 3)
        assert [t.bytes[0] for t in e.top_logprobs] == idx.tolist()
        assert max(abs(t.logprob - float(v)) for t, v in zip(e.top_logprobs, vals)) < 1e-4


# ------------------------------------------------------------------ batching and seeds
def test_seed_reproducible_under_concurrent_load(server: dict) -> None:
    c = client(server)
    kw: dict[str, Any] = {"model": MODEL, "prompt": "seeded", "max_tokens": 40, "seed": 77}
    alone = c.completions.create(**kw).choices[0].text
    results: dict[int, str] = {}

    def work(k: int) -> None:
        if k == 3:
            results[k] = c.completions.create(**kw).choices[0].text
        else:
            prompt = "other prompt " * (k + 1)
            r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=60, seed=k, n=1)
            results[k] = r.choices[0].text

    threads = [threading.Thread(target=work, args=(k,)) for k in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[3] == alone
    health = httpx.get(server["url"] + "/health").json()
    assert health["max_batch_seen"] > 1  # the concurrent requests were decoded together


def test_worker_error_fails_only_that_request(server: dict) -> None:
    c = client(server)
    out: dict[str, Any] = {}

    def good() -> None:
        out["good"] = c.completions.create(model=MODEL, prompt="fine", max_tokens=30, seed=1)

    t = threading.Thread(target=good)
    t.start()
    resp = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "seed": 666})
    t.join()
    err = assert_error_shape(resp, 500)
    assert "processor exploded" in err["message"]
    assert out["good"].choices[0].finish_reason == "length"
    assert c.completions.create(model=MODEL, prompt="still up", max_tokens=3).choices


def test_stream_disconnect_cancels_sequence(server: dict) -> None:
    body = {"model": MODEL, "prompt": "long", "max_tokens": 1500, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", server["url"] + "/v1/completions", json=body, headers=headers
    ) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while httpx.get(server["url"] + "/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server["url"] + "/health").json()["running"] == 0


# ------------------------------------------------------------------ auth, limits, validation
def test_auth_401(server: dict) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(server, key="sk-wrong").models.list()
    for key in (None, "sk-wrong", KEY + "x"):
        err = assert_error_shape(
            post(server, "/v1/completions", {"model": MODEL, "prompt": "a"}, key), 401
        )
        assert err["code"] == "invalid_api_key"
    # Malformed JSON without a key is still a 401, not a 400.
    assert_error_shape(post(server, "/v1/completions", b"{oops", key=None), 401)
    assert client(server, key=OTHER_KEY).models.list().data


def test_rate_limit_429(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    engine = Engine(model, tok, model_name=MODEL, max_batch=4)
    with serve_in_background(create_app(engine, ServeSettings(api_keys=(KEY,), rpm=2))) as url:
        srv = {"url": url}
        c = client(srv)
        for _ in range(2):
            c.completions.create(model=MODEL, prompt="a", max_tokens=2)
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model=MODEL, prompt="a", max_tokens=2)
        resp = post(srv, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2})
        err = assert_error_shape(resp, 429)
        assert err["code"] == "rate_limit_exceeded"
        assert 1 <= int(resp.headers["Retry-After"]) <= 30  # 2/min refills one per 30 s
    engine = Engine(model, tok, model_name=MODEL, max_batch=4)
    with serve_in_background(create_app(engine, ServeSettings(tpm=100))) as url:
        srv = {"url": url}
        ok = post(srv, "/v1/completions", {"model": MODEL, "prompt": "abcd", "max_tokens": 50})
        assert ok.status_code == 200
        # 54 charged (unused tokens are refunded only if generation stops early): 46 left. The
        # bucket refills at 100/min, so the next request needs 99 - 46 = 53 tokens of refill,
        # 32 s: no machine is that slow between the two calls (asking 54 raced a 5 s refill).
        resp = post(srv, "/v1/completions", {"model": MODEL, "prompt": "abcd", "max_tokens": 95})
        assert_error_shape(resp, 429)
        assert int(resp.headers["Retry-After"]) >= 1


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "prompt": "a"}, 404, "model"),
        ({"model": MODEL, "prompt": "a", "temperature": 3}, 400, "temperature"),
        ({"model": MODEL, "prompt": "a", "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "prompt": "a", "n": 17}, 400, "n"),
        ({"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "a", "max_tokens": 5000}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "a", "logprobs": 21}, 400, "logprobs"),
        ({"model": MODEL, "prompt": "x" * 3000}, 400, "prompt"),
        ({"model": MODEL, "prompt": [1, 2, 999]}, 400, "prompt"),
        ({"model": MODEL}, 400, "prompt"),
        ({"model": MODEL, "prompt": "a", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
        ({"model": MODEL, "prompt": "a", "min_tokens": -1}, 400, "min_tokens"),
    ],
)
def test_bad_completion_requests(server: dict, body: dict, status: int, param: str) -> None:
    err = assert_error_shape(post(server, "/v1/completions", body), status)
    assert err["param"] == param


def test_bad_chat_and_json(server: dict) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    err = assert_error_shape(
        post(
            server,
            "/v1/chat/completions",
            {"model": MODEL, "messages": msgs, "logprobs": True, "top_logprobs": 21},
        ),
        400,
    )
    assert err["param"] == "top_logprobs"
    err = assert_error_shape(post(server, "/v1/chat/completions", b'{"model": "tiny:0", '), 400)
    assert err["type"] == "invalid_request_error"
    long_msgs = [{"role": "user", "content": "y" * 3000}]
    err = assert_error_shape(
        post(server, "/v1/chat/completions", {"model": MODEL, "messages": long_msgs}), 400
    )
    assert err["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-4", messages=msgs)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model=MODEL, messages=msgs, temperature=3)  # type: ignore[arg-type]
    assert httpx.get(server["url"] + "/health").json()["worker_alive"] is True


def test_audit_log_has_no_secrets(server: dict) -> None:
    secret_prompt = "SECRET-PROMPT-d41d8cd9"
    client(server, key=OTHER_KEY).completions.create(
        model=MODEL, prompt=secret_prompt, max_tokens=3, seed=2
    )
    post(server, "/v1/completions", {"model": MODEL, "prompt": secret_prompt}, key="sk-bad")
    raw = Path(server["audit"]).read_text()
    assert KEY not in raw and OTHER_KEY not in raw and "sk-bad" not in raw
    assert secret_prompt not in raw
    lines = [json.loads(x) for x in raw.splitlines()]
    assert len(lines) >= 10
    want = hashlib.sha256(secret_prompt.encode()).hexdigest()
    mine = [x for x in lines if x["prompt_sha256"] == want and x["status"] == 200]
    assert mine, "the request's line is missing"
    rec = mine[-1]
    assert rec["key_id"] == hashlib.sha256(OTHER_KEY.encode()).hexdigest()[:8]
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"]) == (22, 3, 25)
    assert rec["endpoint"] == "/v1/completions" and rec["max_tokens"] == 3 and rec["seed"] == 2
    assert {x["status"] for x in lines} >= {200, 401}


def test_cli_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from potstill.cli import main

    assert main(["serve", "--model", "tiny:0", "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err
    assert main(["serve", "--model", "no/such/model-dir"]) == 2
    assert "bad model spec" in capsys.readouterr().err
