"""A tiny, fast, deterministic fake OpenAI endpoint for tests and benchmarks.

A raw asyncio HTTP/1.1 server (keep-alive, Content-Length bodies) that answers
``POST .../chat/completions`` and ``POST .../completions`` after a fixed latency from the
request's arrival (scheduled with ``loop.call_at`` on a loop that waits in microseconds, see
:func:`precise_loop`, so thousands of requests can be in flight on one core).

Answers are a pure function of (prompt text, seed, max_tokens): ``"Answer <h>: <words>"``.
With ``logprobs`` the completion is tokenized one UTF-8 *byte* per token (the tiny test
tokenizer's vocabulary), each token's logprob is ``log 0.5`` and its top-k list is the token
itself (``log 0.5``) followed by ``k-1`` other bytes with ``log(0.4/(k-1))`` each.

Fault injection (deterministic, by request count): ``fail_every=n`` answers every n-th
request with 500, ``rate_limit_every=n`` with 429 + ``Retry-After``, ``drop_every=n`` closes
the connection without answering.

``GET .../models`` lists one model, ``fake``. :class:`StubClient` answers the audits' requests
from a function instead, without a socket.

In a thread: ``with FakeOpenAI(latency_s=0.01) as fake: fake.url``. As a process:
``python tests/fake_openai.py --port 0 --latency 0.02 --port-file F`` (writes the port to F).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import selectors
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from potstill.core.http import Response

WORDS = ("the", "a", "model", "answers", "briefly", "with", "care", "and", "some", "detail")


def precise_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers fire on time: asyncio's default epoll selector rounds every
    wait up to a whole millisecond, which under load (64 requests in flight, timers due at
    scattered instants) made the 20 ms endpoint answer in 21.8-22.2 ms on average in a probe at
    concurrency 64; ``select()`` waits in microseconds (20.7-20.8 ms there, the same as one
    request alone). It handles fds below 1024, which covers every test and benchmark here."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def answer_text(prompt: str, seed: int | None, max_tokens: int) -> str:
    h = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
    words = [WORDS[b % len(WORDS)] for b in h[: 4 + h[0] % 8]]
    return f"Answer {h.hex()[:6]}: {' '.join(words)}."[: max(1, max_tokens)]


def byte_logprobs(text: str, k: int) -> list[dict[str, Any]]:
    """Chat-API ``logprobs.content``: one entry per UTF-8 byte of ``text``."""
    out = []
    lp_main = math.log(0.5)
    lp_other = math.log(0.4 / max(1, k - 1))
    for b in text.encode("utf-8"):
        top = [{"token": bytes([b]).decode("latin-1"), "logprob": lp_main, "bytes": [b]}]
        for j in range(1, k):
            o = (b + 7 * j) % 128  # ASCII alternatives, distinct from b and each other
            top.append({"token": chr(o), "logprob": lp_other, "bytes": [o]})
        out.append(
            {"token": top[0]["token"], "logprob": lp_main, "bytes": [b], "top_logprobs": top}
        )
    return out


class _Proto(asyncio.Protocol):
    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            end = head_end + 4 + length
            if len(self.buf) < end:
                return
            body, self.buf = self.buf[head_end + 4 : end], self.buf[end:]
            self.fake._handle(self, head[0], body)

    def send(self, status: int, payload: bytes, extra: str = "") -> None:
        if self.transport is None or self.transport.is_closing():
            return
        reason = {
            200: "OK",
            429: "Too Many Requests",
            500: "Internal Server Error",
            404: "Not Found",
        }
        self.transport.write(
            (
                f"HTTP/1.1 {status} {reason.get(status, 'X')}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(payload)}\r\n{extra}\r\n"
            ).encode()
            + payload
        )


Handler = Callable[[str, dict[str, Any] | None], tuple[int, Any]]


class StubClient:
    """A :class:`potstill.core.openai_http.HTTPClient` stand-in: ``handler(path, body)``
    (the URL's path, the parsed JSON body or None) returns ``(status, payload)``, a payload
    being JSON-able or raw bytes. ``requests`` records (method, url, headers)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[str, str, dict[str, str]]] = []

    def request(
        self, method: str, url: str, *, body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:  # fmt: skip
        self.requests.append((method, url, dict(headers or {})))
        status, payload = self.handler(
            urlsplit(url).path, None if body is None else json.loads(body)
        )
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return Response(status, {"content-length": str(len(data))}, data)


class FakeOpenAI:
    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        fail_every: int = 0,
        rate_limit_every: int = 0,
        drop_every: int = 0,
        retry_after: str = "0.01",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.latency_s = latency_s
        self.fail_every, self.rate_limit_every, self.drop_every = (
            fail_every,
            rate_limit_every,
            drop_every,
        )
        self.retry_after = retry_after
        self.host, self.port = host, port
        self.n_requests = 0
        self.bodies: list[dict[str, Any]] = []  # kept only when record=True
        self.record = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _handle(self, proto: _Proto, request_line: str, body: bytes) -> None:
        assert self._loop is not None
        due = self._loop.time() + self.latency_s  # the latency runs from the request's arrival
        self.n_requests += 1
        n = self.n_requests
        if self.drop_every and n % self.drop_every == 0:
            assert proto.transport is not None
            proto.transport.close()
            return
        if self.rate_limit_every and n % self.rate_limit_every == 0:
            proto.send(
                429, b'{"error":{"message":"slow down"}}', f"retry-after: {self.retry_after}\r\n"
            )
            return
        if self.fail_every and n % self.fail_every == 0:
            proto.send(500, b'{"error":{"message":"boom"}}')
            return
        if request_line.startswith("GET ") and request_line.split(" ")[1].endswith("/models"):
            proto.send(200, b'{"object":"list","data":[{"id":"fake","object":"model"}]}')
            return
        try:
            req = json.loads(body)
            payload = self._answer(request_line.split(" ")[1], req)
        except (ValueError, KeyError, IndexError) as e:
            proto.send(404, json.dumps({"error": {"message": str(e)}}).encode())
            return
        if self.record:
            self.bodies.append(req)
        data = json.dumps(payload).encode()
        if self.latency_s > 0:
            self._loop.call_at(due, proto.send, 200, data)
        else:
            proto.send(200, data)

    def _answer(self, path: str, req: dict[str, Any]) -> dict[str, Any]:
        chat = path == "/v1/chat/completions"
        if not chat and path != "/v1/completions":
            raise KeyError(f"no route {path}")
        prompt = json.dumps(req["messages"]) if chat else req["prompt"]
        text = answer_text(prompt, req.get("seed"), int(req.get("max_tokens") or 64))
        usage = {
            "prompt_tokens": len(prompt) // 4 + 1,
            "completion_tokens": len(text.encode()),
            "total_tokens": 0,
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            if req.get("logprobs"):
                choice["logprobs"] = {
                    "content": byte_logprobs(text, int(req.get("top_logprobs") or 1))
                }
        else:
            choice["text"] = text
            if req.get("logprobs"):
                content = byte_logprobs(text, int(req["logprobs"]))
                choice["logprobs"] = {
                    "tokens": [c["token"] for c in content],
                    "token_logprobs": [c["logprob"] for c in content],
                    "top_logprobs": [
                        {t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content
                    ],
                }
        kind = "chat.completion" if chat else "text_completion"
        return {
            "id": "fake",
            "object": kind,
            "model": req["model"],
            "choices": [choice],
            "usage": usage,
        }

    async def start_async(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _Proto(self), self.host, self.port, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def __enter__(self) -> FakeOpenAI:
        ready = threading.Event()

        def run() -> None:
            loop = precise_loop()
            loop.run_until_complete(self.start_async())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--port-file", required=True)
    args = ap.parse_args()

    async def serve() -> None:
        fake = FakeOpenAI(latency_s=args.latency, port=args.port)
        await fake.start_async()
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(fake.port))
        os.replace(tmp, args.port_file)
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=precise_loop) as runner:
        runner.run(serve())


if __name__ == "__main__":
    main()
