"""The FastAPI app: OpenAI-compatible /v1/completions, /v1/chat/completions, /v1/models.

Order of checks for a generation request: API key (401) -> body validation (400) ->
model name (404) -> ``admit`` hook: API policy (400), extraction monitor (429/403) ->
prompt / context length (400) -> rate limits (429) -> generation
(500 if the worker fails this request). Every error body has OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` and every request to a /v1 endpoint
leaves one audit line.

Logprobs are the log-softmax of the model's raw logits (T=1, before any logits processor,
temperature or top-p), over the real vocabulary; see :mod:`potstill.serve.sampling`.

The routes are thin: each calls one :class:`~potstill.serve.service.Service` method.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from potstill.core import __version__
from potstill.serve.events import ServingEngine
from potstill.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from potstill.serve.service import ServeSettings, Service

__all__ = ["ServeSettings", "create_app"]


def create_app(engine: ServingEngine, settings: ServeSettings | None = None) -> FastAPI:
    """The app serving ``engine``; its lifespan starts and stops the engine's worker."""
    svc = Service(engine, settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()
        svc.audit.close()

    app = FastAPI(
        title="potstill serve",
        version=__version__,
        description="OpenAI-compatible completions for one model, with continuous batching.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    _error_handlers(app, svc)
    auth = Depends(svc.authorize)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_name, **engine.health()}

    if svc.settings.monitor_view is not None:

        @app.get("/v1/monitor")
        async def monitor(request: Request, kid: str = auth) -> Any:
            return svc.monitor(request)

    @app.get("/v1/models")
    async def list_models(kid: str = auth) -> dict[str, Any]:
        return {"object": "list", "data": [svc.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, kid: str = auth) -> dict[str, Any]:
        svc.check_model(model_id)
        return svc.model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, kid: str = auth) -> Any:
        return await svc.completions(body, request, kid)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request, kid: str = auth) -> Any:
        return await svc.chat(body, request, kid)

    return app


def _error_handlers(app: FastAPI, svc: Service) -> None:
    """Every error leaves as an OpenAI-style body, and leaves an audit line."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return svc.error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if getattr(request.state, "audit", None) is None:
            # A malformed body is rejected before the auth dependency runs: check the key
            # first so that an unauthenticated client only ever learns "401".
            try:
                await svc.authorize(request, request.headers.get("authorization"))
            except APIError as err:
                return svc.error_response(request, err)
        msg, param = _validation_message(exc)
        return svc.error_response(request, APIError(400, msg, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return svc.error_response(request, APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        err = APIError(500, f"internal error: {exc!r}", type="server_error", code="internal_error")
        return svc.error_response(request, err)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    err = errors[0]
    if err.get("type") == "json_invalid":
        return f"malformed JSON body: {err.get('msg', '')}", None
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return f"{param or 'body'}: {err.get('msg', 'invalid value')}", param
