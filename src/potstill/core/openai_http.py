"""One synchronous call path to an OpenAI-compatible endpoint, for the audits that query a
suspect (closed-mode radioactivity, provenance): the route URL, the bearer header, the JSON
POST, and errors that name the endpoint and what its answer lacked.

The harvester has its own asyncio client (:mod:`potstill.core.http`): it is built for
thousands of concurrent requests with retries, which an audit of a few hundred prompts does
not need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from potstill.core.errors import PotstillError

if TYPE_CHECKING:
    import httpx

__all__ = ["first_model", "open_client", "post_json", "route_url"]


def route_url(base_url: str, route: str) -> str:
    """``http://host:8000`` or ``http://host:8000/v1`` plus ``route`` (e.g. ``completions``)."""
    url = base_url.rstrip("/")
    return f"{url}/{route}" if url.endswith("/v1") else f"{url}/v1/{route}"


@contextlib.contextmanager
def open_client(client: httpx.Client | None, timeout: float) -> Iterator[httpx.Client]:
    """``client`` as given (the caller owns it; tests pass a mock transport), or a new one
    closed on exit."""
    import httpx

    if client is not None:
        yield client
        return
    own = httpx.Client(timeout=timeout)
    try:
        yield own
    finally:
        own.close()


def post_json(
    http: httpx.Client,
    url: str,
    body: dict[str, Any],
    *,
    api_key: str | None,
    api: str,
    want: str,
    check: Callable[[Any], object],
    who: str = "endpoint",
    on_response: Callable[[httpx.Response], None] | None = None,
) -> Any:
    """POST ``body``; the parsed answer once ``check(answer)`` passes.

    ``check`` raises KeyError / IndexError / TypeError / ValueError when the answer lacks
    ``want``; ``on_response`` may raise a PotstillError of its own for a status it
    understands (it runs before the generic status check). ``api`` names the OpenAI API the
    endpoint should serve (``completions``, ``chat``), in the error message.
    """
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = http.post(url, json=body, headers=headers)
        if on_response is not None:
            on_response(resp)
        resp.raise_for_status()
        data = resp.json()
        check(data)
        return data
    except httpx.HTTPError as e:
        raise PotstillError(
            f"{who} {url} failed: {e}; check the URL and that it serves the OpenAI {api} API"
        ) from None
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise PotstillError(
            f"{who} {url} answered without {want} ({type(e).__name__}); is it OpenAI-compatible?"
        ) from None


def first_model(base_url: str, *, api_key: str | None, timeout: float) -> str:
    """The id of the first model ``GET /v1/models`` lists (PotstillError naming the endpoint)."""
    import httpx

    url = route_url(base_url, "models")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(url, headers=headers, timeout=timeout)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except httpx.HTTPError as e:
        raise PotstillError(
            f"endpoint {url} failed: {e}; check the URL, the key, or name the model explicitly"
        ) from None
    except (KeyError, IndexError, TypeError, ValueError):
        raise PotstillError(f"endpoint {url} lists no models; name the model explicitly") from None
