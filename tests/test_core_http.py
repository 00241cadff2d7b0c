"""The project's one HTTP client driven one request at a time (SyncClient), over real sockets,
and the audits' call path on top of it (core.openai_http)."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from potstill.core.errors import PotstillError
from potstill.core.http import ConnectionLost, SyncClient
from potstill.core.openai_http import first_model, post_json, route_url
from potstill.detect.radioactivity import collect_generations

from .fake_openai import FakeOpenAI, StubClient, answer_text


def _completion(client: SyncClient, url: str, prompt: str) -> dict[str, Any]:
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 16}).encode()
    resp = client.request("POST", f"{url}/completions", body=body)
    assert resp.status == 200
    return json.loads(resp.body)  # type: ignore[no-any-return]


def test_one_keep_alive_connection_and_a_retry_when_the_server_closed_it() -> None:
    """The fake drops every 2nd request without answering: request 2 goes out on the kept-alive
    connection, is lost, and goes again on a new one (request 3), answered."""
    with FakeOpenAI(drop_every=2) as fake, SyncClient(timeout=5) as client:
        first = _completion(client, fake.url, "one")
        conn = next(iter(client._conns.values()))
        assert conn.is_open and len(client._conns) == 1
        second = _completion(client, fake.url, "two")
        assert fake.n_requests == 3
        assert first["choices"][0]["text"] == answer_text("one", None, 16)
        assert second["choices"][0]["text"] == answer_text("two", None, 16)


def test_a_new_connection_that_is_lost_is_not_retried() -> None:
    with FakeOpenAI(drop_every=1) as fake, SyncClient(timeout=5) as client:
        with pytest.raises(ConnectionLost):
            _completion(client, fake.url, "one")
        assert fake.n_requests == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_first_model_lists_over_get_and_names_a_dead_endpoint() -> None:
    with FakeOpenAI() as fake:
        assert first_model(fake.url, api_key="k", timeout=5) == "fake"
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    with pytest.raises(PotstillError, match=r"endpoint http://127\.0\.0\.1:\d+/v1/models failed"):
        first_model(dead, api_key=None, timeout=5)
    stub = StubClient(lambda path, body: (200, {"data": []}))
    with pytest.raises(PotstillError, match="lists no models"):
        first_model("http://x", api_key="sk-1", timeout=5, client=stub)
    assert stub.requests == [("GET", "http://x/v1/models", {"authorization": "Bearer sk-1"})]


def test_post_json_errors_name_the_endpoint_and_what_is_missing() -> None:
    url = route_url("http://suspect", "completions")
    kw: dict[str, Any] = {"api_key": None, "api": "completions", "want": "choices[0].text",
                          "check": lambda d: d["choices"][0]["text"]}  # fmt: skip
    with pytest.raises(PotstillError, match=r"http://suspect/v1/completions failed: HTTP 503"):
        post_json(StubClient(lambda p, b: (503, b"busy")), url, {}, **kw)
    with pytest.raises(PotstillError, match=r"without choices\[0\]\.text \(JSONDecodeError\)"):
        post_json(StubClient(lambda p, b: (200, b"<html>")), url, {}, **kw)
    with pytest.raises(PotstillError, match=r"without choices\[0\]\.text \(KeyError\)"):
        post_json(StubClient(lambda p, b: (200, {"id": "x"})), url, {}, **kw)


def test_collect_generations_through_a_real_socket() -> None:
    with FakeOpenAI() as fake:
        out = collect_generations(fake.url, ["hi", "yo"], max_tokens=12)
    want = [
        answer_text(json.dumps([{"role": "user", "content": p}]), None, 12) for p in ("hi", "yo")
    ]
    assert out == want


def test_a_timeout_is_raised_not_retried() -> None:
    """The answer to request 2 comes after the client's timeout on a kept-alive connection:
    TimeoutError, and the server saw that request once (a retry would send it again)."""
    with FakeOpenAI() as fake, SyncClient(timeout=5) as client:
        _completion(client, fake.url, "one")
        fake.latency_s, client.timeout = 1.0, 0.2
        with pytest.raises(TimeoutError):
            _completion(client, fake.url, "two")
        assert fake.n_requests == 2


def test_sync_client_works_from_inside_a_running_loop() -> None:
    """A notebook or an async app calls the audits from a coroutine: the private loop then
    runs in a worker thread instead of failing on the busy one."""
    import asyncio

    async def main(url: str) -> dict[str, Any]:
        with SyncClient(timeout=5) as client:
            return _completion(client, url, "one")

    with FakeOpenAI() as fake:
        out = asyncio.run(main(fake.url))
    assert out["choices"][0]["text"] == answer_text("one", None, 16)


def test_host_header_brackets_an_ipv6_literal_and_keys_must_be_latin1() -> None:
    from potstill.core.http import Endpoint

    assert Endpoint.parse("http://[::1]:8000/v1").host_header == "[::1]:8000"
    assert Endpoint.parse("https://[::1]/v1").host_header == "[::1]"
    assert Endpoint.parse("http://example.com:80/v1").host_header == "example.com"
    with SyncClient(timeout=5) as client, pytest.raises(PotstillError, match="Latin-1"):
        client.request(
            "GET", "http://127.0.0.1:9/v1/models", headers={"authorization": "Bearer ключ"}
        )
