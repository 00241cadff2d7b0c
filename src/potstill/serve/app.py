"""The FastAPI app: OpenAI-compatible /v1/completions, /v1/chat/completions, /v1/models.

Order of checks for a generation request: API key (401) -> body validation (400) ->
model name (404) -> ``admit`` hook: API policy (400), extraction monitor (429/403) ->
prompt / context length (400) -> rate limits (429) -> generation
(500 if the worker fails this request). Every error body has OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` and every request to a /v1 endpoint
leaves one audit line.

Logprobs are the log-softmax of the model's raw logits (T=1, before any logits processor,
temperature or top-p), over the real vocabulary; see :mod:`potstill.serve.sampling`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from potstill.core import __version__
from potstill.serve.audit import AUDIT_FIELDS, AuditLog, prompt_sha256
from potstill.serve.auth import KeyRing, RateLimiter
from potstill.serve.engine import Engine, Event, RequestGroup, SamplingParams, TokenLogprob
from potstill.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
)
from potstill.serve.sampling import LogitsProcessor

__all__ = ["ServeSettings", "create_app"]


@dataclass
class ServeSettings:
    """Server policy. ``processors``: called with the request's audit record to build its
    logits-processor chain (None = empty chain): the watermark and antidistillation.

    ``logprobs_source``: ``served`` reports logprobs of the distribution after the processors
    (what the tokens were drawn from); ``raw`` reports the undefended model's, which hands a
    distiller exactly what the defences hide. With ``served`` and a defence on, echoed prompt
    logprobs are refused (400): processors do not run on prompt positions, so they would be
    the raw model's. ``max_logprob_entries``: a request may ask for at most this many logprob
    entries, choices x (echoed prompt tokens + max_tokens) x (top-k + 1); more is a 400.
    """

    api_keys: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    audit_log: str | Path | None = None
    processors: Callable[[dict[str, Any]], list[LogitsProcessor]] | None = None
    # Defense hooks (see potstill.defend): ``observer(audit_record, prompt_text)`` runs after
    # each generation request's audit line (prompt text: completions prompts or chat message
    # contents, joined by newlines); ``admit(key_id, audit_record, request)`` runs before
    # generation and raises APIError to refuse; ``monitor_view()`` answers GET /v1/monitor,
    # which needs an API key (one of ``monitor_admin_keys`` when any are set).
    observer: Callable[[dict[str, Any], str], None] | None = None
    # ``request``: the validated CompletionRequest / ChatCompletionRequest (limits are checked
    # on parsed, typed values, never on the raw JSON)
    admit: Callable[[str, dict[str, Any], Any], None] | None = None
    monitor_view: Callable[[], dict[str, Any]] | None = None
    monitor_admin_keys: tuple[str, ...] = ()
    logprobs_source: Literal["served", "raw"] = "served"
    max_logprob_entries: int = 2**19


@dataclass
class _Prompt:
    text: str
    ids: list[int]


class _Job:
    """One HTTP generation request: its prompts, groups in the engine and event queue."""

    def __init__(self, prompts: list[_Prompt], n: int) -> None:
        self.prompts = prompts
        self.n = n
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.groups: list[RequestGroup] = []
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())

    @property
    def total(self) -> int:
        return self.n * len(self.prompts)

    def prompt_of(self, index: int) -> _Prompt:
        return self.prompts[index // self.n]

    async def events(self, request: Request | None) -> AsyncIterator[Event]:
        """Events until every choice finished; APIError 500 on a worker error. With
        ``request``, a client that disconnects cancels the job. Always cancels its rows."""
        left = self.total
        try:
            while left:
                try:
                    ev = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                if ev.error is not None:
                    raise APIError(500, ev.error, type="server_error", code="internal_error")
                if ev.finish_reason is not None:
                    left -= 1
                yield ev
        finally:
            for g in self.groups:
                g.cancel()


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


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    """The app serving ``engine``; its lifespan starts and stops the engine's worker."""
    settings = settings or ServeSettings()
    keys = KeyRing(settings.api_keys)
    limiter = RateLimiter(settings.rpm, settings.tpm)
    audit = AuditLog(settings.audit_log)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()
        audit.close()

    app = FastAPI(
        title="potstill serve",
        version=__version__,
        description="OpenAI-compatible completions for one model, with continuous batching.",
        lifespan=lifespan,
    )
    app.state.engine = engine

    def write_audit(request: Request, status: int, **extra: Any) -> None:
        rec = getattr(request.state, "audit", None)
        if rec is None or rec.get("_written"):
            return
        rec.update(extra, status=status, _written=True)
        # Give back the tokens charged up front but not generated (all of them on errors).
        used = (
            rec.get("prompt_tokens", 0) + rec.get("completion_tokens", 0)
            if status in (200, 499)
            else 0
        )
        limiter.refund(rec["key_id"] or "", rec.get("_charge", 0) - used)
        rec["duration_s"] = round(time.time() - rec["unix_time"], 4)
        audit.write(rec)
        text = getattr(request.state, "prompt_text", None)
        if settings.observer is not None and text is not None:
            try:
                settings.observer({k: rec.get(k) for k in AUDIT_FIELDS}, text)
            except Exception:  # a monitor bug must not fail the request it watches
                logging.getLogger("potstill.serve").exception("the request observer failed")

    async def admit(request: Request, kid: str, text: str, body: Any) -> None:
        request.state.prompt_text = text
        if settings.admit is not None:
            settings.admit(kid, request.state.audit, body)

    def error_response(request: Request, err: APIError) -> JSONResponse:
        write_audit(request, err.status, error_code=err.code or err.type)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if getattr(request.state, "audit", None) is None:
            # A malformed body is rejected before the auth dependency runs: check the key
            # first so that an unauthenticated client only ever learns "401".
            try:
                await authorize(request, request.headers.get("authorization"))
            except APIError as err:
                return error_response(request, err)
        msg, param = _validation_message(exc)
        return error_response(request, APIError(400, msg, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        err = APIError(exc.status_code, str(exc.detail), code=code)
        return error_response(request, err)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        err = APIError(500, f"internal error: {exc!r}", type="server_error", code="internal_error")
        return error_response(request, err)

    async def authorize(request: Request, authorization: str | None = Header(None)) -> str:
        now = time.time()
        request.state.audit = {
            "endpoint": request.url.path,
            "unix_time": now,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "key_id": None,
        }
        kid = keys.check(authorization)
        request.state.audit["key_id"] = kid
        return kid

    def check_model(name: str) -> None:
        if name != engine.model_name:
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server serves {engine.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def model_card() -> dict[str, Any]:
        return {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "potstill"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_name, **engine.health()}

    if settings.monitor_view is not None:
        view = settings.monitor_view
        admins = KeyRing(settings.monitor_admin_keys)

        @app.get("/v1/monitor")
        async def monitor(request: Request, kid: str = Depends(authorize)) -> Any:
            if not (keys.enabled or admins.enabled):
                raise APIError(
                    403,
                    "the monitor view needs an API key: start the server with --api-key",
                    type="permission_error",
                )
            if admins.enabled:
                try:
                    admins.check(request.headers.get("authorization"))
                except APIError:
                    raise APIError(
                        403, "the monitor view needs an admin key", type="permission_error"
                    ) from None
            write_audit(request, 200)
            return view()

    @app.get("/v1/models")
    async def list_models(kid: str = Depends(authorize)) -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, kid: str = Depends(authorize)) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    def check_logprobs(
        prompts: list[_Prompt], n: int, max_tokens: int, logprobs: int | None, echo: bool,
        defended: bool,
    ) -> None:  # fmt: skip
        """400 for echoed logprobs of a defended model, or a request over the logprob budget."""
        if logprobs is None:
            return
        param = "logprobs"
        if echo and defended and settings.logprobs_source == "served":
            raise APIError(
                400,
                "echo with logprobs is not available on this server: its outputs are defended "
                "and prompt logprobs would be the undefended model's; drop echo or logprobs",
                param="echo",
            )
        positions = sum((len(p.ids) if echo else 0) + max_tokens for p in prompts)
        entries = n * positions * (logprobs + 1)
        if entries > settings.max_logprob_entries:
            raise APIError(
                400,
                f"this request asks for {entries} logprob entries (choices x positions x "
                f"(top-k + 1)); this server's limit is {settings.max_logprob_entries}: lower "
                "n, max_tokens, the prompt length with echo, or the number of top logprobs",
                param=param,
                code="logprobs_limit",
            )

    def start_job(
        request: Request,
        kid: str,
        prompts: list[_Prompt],
        body: Any,
        max_tokens: int,
        logprobs: int | None,
        echo: bool,
    ) -> _Job:
        """Check context lengths and rate limits, then submit every prompt."""
        ctx = engine.context_length
        for p in prompts:
            if len(p.ids) >= ctx:
                raise APIError(
                    400,
                    f"the prompt has {len(p.ids)} tokens; this model's context is {ctx} tokens",
                    param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                    code="context_length_exceeded",
                )
            if len(p.ids) + max_tokens > ctx:
                raise APIError(
                    400,
                    f"max_tokens {max_tokens} + {len(p.ids)} prompt tokens exceed this model's "
                    f"context of {ctx} tokens: lower max_tokens",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
        n = body.n or 1
        rec = request.state.audit
        prompt_tokens = sum(len(p.ids) for p in prompts)
        rec["prompt_tokens"] = prompt_tokens
        charge = prompt_tokens + n * len(prompts) * max_tokens
        processors = tuple(settings.processors(rec)) if settings.processors else ()
        check_logprobs(prompts, n, max_tokens, logprobs, echo, bool(processors))
        limiter.acquire(kid, charge)
        rec["_charge"] = charge
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=tuple(body.stop_list()),
            logprobs=logprobs,
            echo_logprobs=echo and logprobs is not None,
            processors=processors,
            served_logprobs=settings.logprobs_source == "served",
        )
        job = _Job(prompts, n)
        loop = asyncio.get_running_loop()

        def sink(ev: Event) -> None:
            loop.call_soon_threadsafe(job.queue.put_nowait, ev)

        for k, p in enumerate(prompts):
            idx = list(range(k * n, (k + 1) * n))
            job.groups.append(engine.submit(p.ids, params, idx, sink))
        return job

    def finish_usage(
        request: Request, kid: str, completion_tokens: int, status: int
    ) -> dict[str, int]:
        prompt_tokens = request.state.audit.get("prompt_tokens", 0)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        write_audit(request, status, **usage)
        return usage

    def encode(text: str) -> list[int]:
        ids = list(engine.tokenizer(text).input_ids)
        if not ids:  # an empty prompt: start from the bos/eos token, as OpenAI does
            start = engine.tokenizer.bos_token_id
            start = engine.tokenizer.eos_token_id if start is None else start
            ids = [int(start)] if start is not None else []
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids

    def completion_prompts(body: CompletionRequest) -> list[_Prompt]:
        p = body.prompt
        if isinstance(p, str):
            return [_Prompt(p, encode(p))]
        if not p:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        if all(isinstance(x, str) for x in p):
            return [_Prompt(s, encode(s)) for s in p]  # type: ignore[arg-type]
        lists: list[list[int]] = [p] if all(isinstance(x, int) for x in p) else p  # type: ignore[list-item,assignment]
        out = []
        for ids in lists:
            if not ids or any(not 0 <= t < engine.vocab_size for t in ids):
                raise APIError(
                    400,
                    f"prompt: token ids must be non-empty and in 0..{engine.vocab_size - 1}",
                    param="prompt",
                )
            out.append(_Prompt(engine.tokenizer.decode(ids, skip_special_tokens=False), list(ids)))
        return out

    def audit_params(request: Request, body: Any, **extra: Any) -> None:
        request.state.audit.update(
            model=body.model,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            n=body.n or 1,
            stream=bool(body.stream),
            seed=body.seed,
            n_stop=len(body.stop_list()),
            **extra,
        )

    tt = engine.token_text

    def cmpl_logprobs(items: list[TokenLogprob], base: int) -> dict[str, list[Any]]:
        return {
            "tokens": [tt.get(x.token_id)[1] for x in items],
            "token_logprobs": [x.logprob for x in items],
            "top_logprobs": [
                None if x.logprob is None else {tt.get(i)[1]: lp for i, lp in x.top} for x in items
            ],
            "text_offset": [base + x.offset for x in items],
        }

    def chat_logprobs(items: list[TokenLogprob]) -> dict[str, list[Any]]:
        def one(token_id: int, lp: float) -> dict[str, Any]:
            raw, shown = tt.get(token_id)
            return {"token": shown, "logprob": lp, "bytes": list(raw)}

        return {
            "content": [
                {
                    **one(x.token_id, x.logprob or 0.0),
                    "top_logprobs": [one(i, lp) for i, lp in x.top],
                }
                for x in items
            ]
        }

    @app.post("/v1/completions")
    async def completions(
        body: CompletionRequest, request: Request, kid: str = Depends(authorize)
    ) -> Any:
        echo = bool(body.echo)
        audit_params(
            request,
            body,
            max_tokens=body.max_tokens,
            logprobs=body.logprobs,
            echo=echo,
            top_logprobs=body.logprobs,
        )
        check_model(body.model)
        prompts = completion_prompts(body)
        request.state.audit["prompt_sha256"] = prompt_sha256(body.prompt)
        await admit(request, kid, "\n".join(p.text for p in prompts), body)
        max_tokens = body.max_tokens or 16
        job = start_job(request, kid, prompts, body, max_tokens, body.logprobs, echo)
        want_lp = body.logprobs is not None

        def choice(ev: Event, first: bool) -> dict[str, Any]:
            p = job.prompt_of(ev.index)
            text = (p.text if echo and first else "") + ev.text
            lps = None
            if want_lp:
                items = list(ev.prompt_logprobs or []) if echo else []
                lp = cmpl_logprobs(items, 0)
                more = cmpl_logprobs(ev.logprobs, len(p.text) if echo else 0)
                lps = {k: lp[k] + more[k] for k in lp}
            return {
                "index": ev.index,
                "text": text,
                "logprobs": lps,
                "finish_reason": ev.finish_reason,
            }

        head = {
            "id": f"cmpl-{job.id}",
            "object": "text_completion",
            "created": job.created,
            "model": engine.model_name,
        }
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(request, job, head, choice, include_usage, finish_usage, kid, chat=False)
        choices = await _collect(request, job, choice)
        usage = finish_usage(request, kid, sum(c.pop("_tokens") for c in choices), 200)
        return {
            **head,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": f"potstill-{__version__}",
        }

    @app.post("/v1/chat/completions")
    async def chat(
        body: ChatCompletionRequest, request: Request, kid: str = Depends(authorize)
    ) -> Any:
        top = (body.top_logprobs or 0) if body.logprobs else None
        audit_params(
            request, body, logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs, echo=False
        )
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        request.state.audit["prompt_sha256"] = prompt_sha256(messages)
        await admit(request, kid, "\n".join(m["content"] for m in messages), body)
        if not getattr(engine.tokenizer, "chat_template", None):
            raise APIError(
                400,
                f"model {engine.model_name!r} has no chat template: use /v1/completions",
                param="messages",
            )
        text = engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        ids = list(engine.tokenizer(text, add_special_tokens=False).input_ids)
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = requested or max(1, engine.context_length - len(ids))
        request.state.audit["max_tokens"] = max_tokens
        job = start_job(request, kid, [_Prompt(text, ids)], body, max_tokens, top, False)

        def choice(ev: Event, first: bool) -> dict[str, Any]:
            lps = chat_logprobs(ev.logprobs) if top is not None else None
            return {
                "index": ev.index,
                "delta": {"content": ev.text},
                "logprobs": lps,
                "finish_reason": ev.finish_reason,
            }

        head = {
            "id": f"chatcmpl-{job.id}",
            "object": "chat.completion",
            "created": job.created,
            "model": engine.model_name,
        }
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(
                request,
                job,
                {**head, "object": "chat.completion.chunk"},
                choice,
                include_usage,
                finish_usage,
                kid,
                chat=True,
            )
        choices = await _collect(request, job, choice)
        for c in choices:
            c["message"] = {"role": "assistant", "content": c.pop("delta")["content"]}
        usage = finish_usage(request, kid, sum(c.pop("_tokens") for c in choices), 200)
        return {
            **head,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": f"potstill-{__version__}",
        }

    return app


def _merge_choice(acc: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """Fold one streamed choice fragment into the accumulated full choice."""
    if acc is None:
        return part
    if "text" in part:
        acc["text"] += part["text"]
    else:
        acc["delta"]["content"] += part["delta"]["content"]
    if part["logprobs"] is not None:
        for k, v in part["logprobs"].items():
            acc["logprobs"][k] = acc["logprobs"][k] + v
    acc["finish_reason"] = part["finish_reason"]
    return acc


async def _collect(
    request: Request, job: _Job, choice: Callable[[Event, bool], dict[str, Any]]
) -> list[dict[str, Any]]:
    """Run ``job`` to the end; the full choices, each with a private ``_tokens`` count."""
    acc: dict[int, dict[str, Any]] = {}
    tokens: dict[int, int] = {}
    async for ev in job.events(request):
        acc[ev.index] = _merge_choice(acc.get(ev.index), choice(ev, ev.index not in acc))
        if ev.finish_reason is not None:
            tokens[ev.index] = ev.completion_tokens
    if len(tokens) < job.total:  # the client went away
        raise APIError(499, "client disconnected", code="client_disconnected")
    out = [acc[i] for i in sorted(acc)]
    for c in out:
        c["_tokens"] = tokens[c["index"]]
    return out


def _sse(
    request: Request,
    job: _Job,
    head: dict[str, Any],
    choice: Callable[[Event, bool], dict[str, Any]],
    include_usage: bool,
    finish_usage: Callable[..., dict[str, int]],
    kid: str,
    *,
    chat: bool,
) -> StreamingResponse:
    """Server-sent events: one chunk per event, then usage (if asked) and ``[DONE]``."""

    def data(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def gen() -> AsyncIterator[str]:
        seen: set[int] = set()
        completion_tokens, status = 0, 200
        try:
            if chat:
                for i in range(job.total):
                    delta = {"role": "assistant", "content": ""}
                    yield data(
                        {
                            **head,
                            "choices": [
                                {
                                    "index": i,
                                    "delta": delta,
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
            async for ev in job.events(None):
                yield data({**head, "choices": [choice(ev, ev.index not in seen)]})
                seen.add(ev.index)
                completion_tokens += ev.completion_tokens
            usage = finish_usage(request, kid, completion_tokens, status)
            if include_usage:
                yield data({**head, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        except APIError as err:
            status = err.status
            finish_usage(request, kid, completion_tokens, status)
            yield data(err.body())
            yield "data: [DONE]\n\n"
        finally:
            # Reached on normal end, on error, and when the client disconnects (the
            # generator is closed): cancel the rows now, not when job.events is collected.
            for g in job.groups:
                g.cancel()
            finish_usage(request, kid, completion_tokens, 499)

    return StreamingResponse(gen(), media_type="text/event-stream")
