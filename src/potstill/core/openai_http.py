"""One synchronous call path to an OpenAI-compatible endpoint, for the audits that query a
suspect (closed-mode radioactivity, provenance) and for the model list: the route URL, the
bearer header, the JSON POST, and errors that name the endpoint and what its answer lacked.

The requests go through the project's one HTTP client, :mod:`potstill.core.http`
(:class:`~potstill.core.http.SyncClient`: its keep-alive connections driven one request at a
time). The harvester drives the same connections concurrently, with retries.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from potstill.core.errors import PotstillError

if TYPE_CHECKING:
    from potstill.core.http import Response

__all__ = ["HTTPClient", "first_model", "open_client", "post_json", "route_url"]


class HTTPClient(Protocol):
    """What the audits send requests through: :class:`~potstill.core.http.SyncClient`, or a
    test's stand-in that answers without a socket."""

    def request(
        self, method: str, url: str, *, body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response: ...  # fmt: skip


def route_url(base_url: str, route: str) -> str:
    """``http://host:8000`` or ``http://host:8000/v1`` plus ``route`` (e.g. ``completions``)."""
    url = base_url.rstrip("/")
    return f"{url}/{route}" if url.endswith("/v1") else f"{url}/v1/{route}"


@contextlib.contextmanager
def open_client(client: HTTPClient | None, timeout: float) -> Iterator[HTTPClient]:
    """``client`` as given (the caller owns it), or a new SyncClient closed on exit."""
    from potstill.core.http import SyncClient

    if client is not None:
        yield client
        return
    with SyncClient(timeout) as own:
        yield own


def _headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


class _Unreachable(Exception):
    """No usable answer: the connection failed, timed out, or the status was an error."""


def _send(http: HTTPClient, method: str, url: str, body: bytes | None, api_key: str | None,
          on_response: Callable[[Response], None] | None = None) -> Response:  # fmt: skip
    """The response with a status below 400, else _Unreachable saying why; ``on_response``
    sees it first (it may raise a PotstillError for a status it understands)."""
    from potstill.core.http import ConnectionLost

    try:
        resp = http.request(method, url, body=body, headers=_headers(api_key))
    except (ConnectionLost, TimeoutError) as e:
        raise _Unreachable(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
    if on_response is not None:
        on_response(resp)
    if resp.status >= 400:
        raise _Unreachable(f"HTTP {resp.status}: {resp.body[:200].decode(errors='replace')}")
    return resp


def post_json(
    http: HTTPClient,
    url: str,
    body: dict[str, Any],
    *,
    api_key: str | None,
    api: str,
    want: str,
    check: Callable[[Any], object],
    who: str = "endpoint",
    on_response: Callable[[Response], None] | None = None,
) -> Any:
    """POST ``body``; the parsed answer once ``check(answer)`` passes.

    ``check`` raises KeyError / IndexError / TypeError / ValueError when the answer lacks
    ``want``; ``on_response`` may raise a PotstillError of its own for a status it
    understands (it runs before the generic status check). ``api`` names the OpenAI API the
    endpoint should serve (``completions``, ``chat``), in the error message.
    """
    try:
        resp = _send(http, "POST", url, json.dumps(body).encode(), api_key, on_response)
        data = json.loads(resp.body)
        check(data)
        return data
    except _Unreachable as e:
        raise PotstillError(
            f"{who} {url} failed: {e}; check the URL and that it serves the OpenAI {api} API"
        ) from None
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise PotstillError(
            f"{who} {url} answered without {want} ({type(e).__name__}); is it OpenAI-compatible?"
        ) from None


def first_model(
    base_url: str, *, api_key: str | None, timeout: float, client: HTTPClient | None = None
) -> str:
    """The id of the first model ``GET /v1/models`` lists (PotstillError naming the endpoint)."""
    url = route_url(base_url, "models")
    try:
        with open_client(client, timeout) as http:
            resp = _send(http, "GET", url, None, api_key)
        return str(json.loads(resp.body)["data"][0]["id"])
    except _Unreachable as e:
        raise PotstillError(
            f"endpoint {url} failed: {e}; check the URL, the key, or name the model explicitly"
        ) from None
    except (KeyError, IndexError, TypeError, ValueError):
        raise PotstillError(f"endpoint {url} lists no models; name the model explicitly") from None
