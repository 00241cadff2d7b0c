"""A minimal asyncio HTTP/1.1 client: one keep-alive connection per harvester worker, and
:class:`SyncClient`, the same connections driven one request at a time (the audits' path).

Why not httpx: its async connection pool costs milliseconds of CPU per request under high
concurrency (measured ~150-350 req/s on this project's 2-core CI machine against a local
endpoint), far below the ~3,200 req/s that 64 concurrent requests at 20 ms latency allow.
One connection per worker has no pool to contend for and keeps the harvester I/O-bound.

Scope: ``POST`` of a JSON body, or a bodiless ``GET``, to ``http://`` or ``https://`` (TLS via
:mod:`ssl`'s default context); responses with ``Content-Length``, ``Transfer-Encoding:
chunked``, or read-to-close; ``Accept-Encoding: identity`` (no compression). That is what
OpenAI-compatible endpoints (vLLM, hosted APIs, potstill serve) need for non-streaming
completions and the model list. It is the project's one HTTP client stack.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from potstill.core.errors import PotstillError

_timeout = getattr(asyncio, "timeout", None)
_T = TypeVar("_T")


class ConnectionLost(Exception):
    """The connection failed or closed before a complete response (retryable).

    ``unanswered``: it failed while the request went out or before any byte of an answer
    came back, as on a kept-alive connection the server had closed while it was idle.
    """

    def __init__(self, message: str, *, unanswered: bool = False) -> None:
        super().__init__(message)
        self.unanswered = unanswered


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    base_path: str  # without a trailing slash, e.g. "/v1"

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PotstillError(
                f"bad endpoint URL {url!r}; use http(s)://host[:port][/v1], e.g. http://127.0.0.1:8000/v1"
            )
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = parts.path.rstrip("/") or "/v1"  # OpenAI base URLs end in /v1
        return cls(parts.scheme, parts.hostname, port, path)

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        return host if self.port == default else f"{host}:{self.port}"


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes


class Connection:
    """One keep-alive HTTP/1.1 connection, (re)opened on demand; not shared between tasks."""

    def __init__(self, endpoint: Endpoint, headers: dict[str, str]) -> None:
        self.endpoint = endpoint
        self._static = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        ctx = ssl.create_default_context() if self.endpoint.scheme == "https" else None
        self._reader, self._writer = await asyncio.open_connection(
            self.endpoint.host, self.endpoint.port, ssl=ctx, limit=2**24
        )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    @property
    def is_open(self) -> bool:
        return self._writer is not None

    async def post(self, path: str, body: bytes, timeout: float) -> Response:
        """POST ``body`` (JSON) to ``base_path + path``; raises ConnectionLost or TimeoutError."""
        return await self.request("POST", path, body, timeout)

    async def request(
        self, method: str, path: str, body: bytes | None, timeout: float, headers: str = ""
    ) -> Response:
        """``method`` to ``base_path + path`` with a JSON ``body`` (None: none) and extra
        header lines ``headers`` (``"name: value\r\n"`` each); raises ConnectionLost or
        TimeoutError."""
        try:
            if _timeout is not None:  # 3.11+: no extra task per request, unlike wait_for
                async with _timeout(timeout):
                    return await self._send(method, path, body, headers)
            return await asyncio.wait_for(self._send(method, path, body, headers), timeout)
        except (TimeoutError, ConnectionLost):  # TimeoutError is an OSError since 3.11
            self.close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            self.close()
            raise ConnectionLost(f"{type(e).__name__}: {e}") from e
        except BaseException:  # timeout or cancellation mid-response: the stream is unusable
            self.close()
            raise

    async def _send(self, method: str, path: str, body: bytes | None, headers: str) -> Response:
        if self._writer is None:
            await self._open()
        assert self._reader is not None and self._writer is not None
        length = "" if body is None else (
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        )  # fmt: skip
        head = (
            f"{method} {self.endpoint.base_path}{path} HTTP/1.1\r\nhost: {self.endpoint.host_header}\r\n"
            f"accept-encoding: identity\r\n{self._static}{headers}{length}\r\n"
        )
        try:
            self._writer.write(head.encode("latin-1") + (body or b""))  # one write: no Nagle stall
            await self._writer.drain()
            first = await self._reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise
            raise ConnectionLost("closed before answering", unanswered=True) from e
        except (ConnectionResetError, BrokenPipeError) as e:
            raise ConnectionLost(f"{type(e).__name__}: {e}", unanswered=True) from e
        resp = await _read_response(self._reader, first)
        if resp.headers.get("connection", "").lower() == "close":
            self.close()
        return resp


async def _read_response(reader: asyncio.StreamReader, raw: bytes) -> Response:
    """The response whose head ``raw`` (through its blank line) was read already."""
    while True:
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if status != 100:  # skip "100 Continue" interim responses
            break
        raw = await reader.readuntil(b"\r\n\r\n")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()  # delimited by close
        headers["connection"] = "close"
    return Response(status, headers, body)


class SyncClient:
    """Blocking requests over :class:`Connection`, one keep-alive connection per host, on a
    private event loop. For callers that send one request at a time (the audits that query a
    suspect); the harvester drives :class:`Connection` itself. Not thread-safe; close it (or
    use it as a context manager) to close its connections.
    """

    def __init__(self, timeout: float = 120.0) -> None:
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._conns: dict[tuple[str, str, int], Connection] = {}

    def request(
        self, method: str, url: str, *, body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:  # fmt: skip
        """``method`` ``url`` (a full ``http(s)://`` URL) with a JSON ``body``; raises
        ConnectionLost, TimeoutError, or PotstillError for a URL it cannot use."""
        ep = Endpoint.parse(url)  # the scheme, host and port, checked as for the harvester
        key = (ep.scheme, ep.host, ep.port)
        conn = self._conns.get(key)
        if conn is None:
            conn = self._conns[key] = Connection(Endpoint(*key, base_path=""), {})
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        try:
            extra.encode("latin-1")
        except UnicodeEncodeError:
            raise PotstillError(
                "an HTTP header (the API key?) holds a non-Latin-1 character"
            ) from None
        reused = conn.is_open
        try:
            return self._run(conn.request(method, path, body, self.timeout, extra))
        except ConnectionLost as e:
            if not (reused and e.unanswered):
                raise  # a fresh connection failed, or an answer had begun: not sent twice
        # A kept-alive connection the server had closed while idle: once more, on a new one.
        return self._run(conn.request(method, path, body, self.timeout, extra))

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the usual case: no loop runs in this thread
            return self._loop.run_until_complete(coro)
        # Called from a coroutine (a notebook, an async app): this thread's loop is busy, so the
        # private one runs in a worker thread (the call still blocks, as a sync client does).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(self._loop.run_until_complete, coro).result()

    def close(self) -> None:
        """Close the connections and the loop (again: a no-op)."""
        if self._loop.is_closed():
            return
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        # Let the transports finish closing before the loop goes.
        self._run(asyncio.sleep(0))
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Connection", "ConnectionLost", "Endpoint", "Response", "SyncClient"]
