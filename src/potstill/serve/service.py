"""Request handling for one served model, as a small service the routes call.

:class:`Service` holds the engine, the key ring, the rate limiter and the audit log. Its
methods are the steps of a request: authorize (a FastAPI dependency), admit (the defences'
hook), check, start a job in the engine, answer, and write the audit line. The routes in
:mod:`potstill.serve.app` only call them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Header, Request
from fastapi.responses import JSONResponse

from potstill.core import __version__
from potstill.serve.audit import AUDIT_FIELDS, AuditLog, prompt_sha256
from potstill.serve.auth import KeyRing, RateLimiter
from potstill.serve.events import Event, SamplingParams, ServingEngine
from potstill.serve.jobs import Job, Prompt, chat_logprobs, collect, completion_logprobs, sse
from potstill.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from potstill.serve.sampling import LogitsProcessor

__all__ = ["ServeSettings", "Service"]


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


class Service:
    """One model's request handling: auth, admission, limits, jobs, answers, audit."""

    def __init__(self, engine: ServingEngine, settings: ServeSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.keys = KeyRing(settings.api_keys)
        self.admins = KeyRing(settings.monitor_admin_keys)
        self.limiter = RateLimiter(settings.rpm, settings.tpm)
        self.audit = AuditLog(settings.audit_log)

    # ------------------------------------------------------------------ audit, auth, errors

    def write_audit(self, request: Request, status: int, **extra: Any) -> None:
        """The request's one audit line (later calls are no-ops); refunds unused tokens."""
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
        self.limiter.refund(rec["key_id"] or "", rec.get("_charge", 0) - used)
        rec["duration_s"] = round(time.time() - rec["unix_time"], 4)
        self.audit.write(rec)
        text = getattr(request.state, "prompt_text", None)
        if self.settings.observer is not None and text is not None:
            try:
                self.settings.observer({k: rec.get(k) for k in AUDIT_FIELDS}, text)
            except Exception:  # a monitor bug must not fail the request it watches
                logging.getLogger("potstill.serve").exception("the request observer failed")

    def error_response(self, request: Request, err: APIError) -> JSONResponse:
        self.write_audit(request, err.status, error_code=err.code or err.type)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def authorize(self, request: Request, authorization: str | None = Header(None)) -> str:
        """The caller's key id (401 without a valid key); opens the request's audit record."""
        now = time.time()
        request.state.audit = {
            "endpoint": request.url.path,
            "unix_time": now,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "key_id": None,
        }
        kid = self.keys.check(authorization)
        request.state.audit["key_id"] = kid
        return kid

    async def admit(self, request: Request, kid: str, text: str, body: Any) -> None:
        request.state.prompt_text = text
        if self.settings.admit is not None:
            self.settings.admit(kid, request.state.audit, body)

    # ------------------------------------------------------------------ models, monitor

    def check_model(self, name: str) -> None:
        if name != self.engine.model_name:
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server serves {self.engine.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.engine.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "potstill",
        }

    def monitor(self, request: Request) -> Any:
        """GET /v1/monitor: the extraction monitor's view, for an API (or admin) key only."""
        assert self.settings.monitor_view is not None
        if not (self.keys.enabled or self.admins.enabled):
            raise APIError(
                403,
                "the monitor view needs an API key: start the server with --api-key",
                type="permission_error",
            )
        if self.admins.enabled:
            try:
                self.admins.check(request.headers.get("authorization"))
            except APIError:
                raise APIError(
                    403, "the monitor view needs an admin key", type="permission_error"
                ) from None
        self.write_audit(request, 200)
        return self.settings.monitor_view()

    # ------------------------------------------------------------------ checks, jobs, usage

    def check_logprobs(
        self, prompts: list[Prompt], n: int, max_tokens: int, logprobs: int | None, echo: bool,
        defended: bool,
    ) -> None:  # fmt: skip
        """400 for echoed logprobs of a defended model, or a request over the logprob budget."""
        if logprobs is None:
            return
        limit = self.settings.max_logprob_entries
        if echo and defended and self.settings.logprobs_source == "served":
            raise APIError(
                400,
                "echo with logprobs is not available on this server: its outputs are defended "
                "and prompt logprobs would be the undefended model's; drop echo or logprobs",
                param="echo",
            )
        positions = sum((len(p.ids) if echo else 0) + max_tokens for p in prompts)
        entries = n * positions * (logprobs + 1)
        if entries > limit:
            raise APIError(
                400,
                f"this request asks for {entries} logprob entries (choices x positions x "
                f"(top-k + 1)); this server's limit is {limit}: lower "
                "n, max_tokens, the prompt length with echo, or the number of top logprobs",
                param="logprobs",
                code="logprobs_limit",
            )

    def check_context(self, prompts: list[Prompt], max_tokens: int, param: str) -> None:
        """400 when a prompt, or a prompt plus ``max_tokens``, exceeds the model's context."""
        ctx = self.engine.context_length
        for p in prompts:
            if len(p.ids) >= ctx:
                raise APIError(
                    400,
                    f"the prompt has {len(p.ids)} tokens; this model's context is {ctx} tokens",
                    param=param,
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

    def start_job(
        self, request: Request, kid: str, prompts: list[Prompt], body: Any, max_tokens: int,
        logprobs: int | None, echo: bool,
    ) -> Job:  # fmt: skip
        """Check context lengths and rate limits, then submit every prompt."""
        chat = isinstance(body, ChatCompletionRequest)
        self.check_context(prompts, max_tokens, "messages" if chat else "prompt")
        if (body.min_tokens or 0) > max_tokens:
            raise APIError(
                400,
                f"min_tokens {body.min_tokens} is more than max_tokens {max_tokens}: lower it",
                param="min_tokens",
            )
        n = body.n or 1
        rec = request.state.audit
        prompt_tokens = sum(len(p.ids) for p in prompts)
        rec["prompt_tokens"] = prompt_tokens
        charge = prompt_tokens + n * len(prompts) * max_tokens
        make = self.settings.processors
        processors = tuple(make(rec)) if make else ()
        self.check_logprobs(prompts, n, max_tokens, logprobs, echo, bool(processors))
        self.limiter.acquire(kid, charge)
        rec["_charge"] = charge
        params = SamplingParams(
            min_tokens=body.min_tokens or 0,
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=tuple(body.stop_list()),
            logprobs=logprobs,
            echo_logprobs=echo and logprobs is not None,
            processors=processors,
            served_logprobs=self.settings.logprobs_source == "served",
        )
        job = Job(prompts, n)
        loop = asyncio.get_running_loop()

        def sink(ev: Event) -> None:  # called on the engine's thread
            loop.call_soon_threadsafe(job.queue.put_nowait, ev)

        for k, p in enumerate(prompts):
            idx = list(range(k * n, (k + 1) * n))
            job.groups.append(self.engine.submit(p.ids, params, idx, sink))
        return job

    def finish_usage(
        self, request: Request, kid: str, completion_tokens: int, status: int
    ) -> dict[str, int]:
        prompt_tokens = request.state.audit.get("prompt_tokens", 0)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        self.write_audit(request, status, **usage)
        return usage

    def audit_params(self, request: Request, body: Any, **extra: Any) -> None:
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

    # ------------------------------------------------------------------ prompts

    def encode(self, text: str) -> list[int]:
        tok = self.engine.tokenizer
        ids = list(tok(text).input_ids)
        if not ids:  # an empty prompt: start from the bos/eos token, as OpenAI does
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ids = [int(start)] if start is not None else []
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids

    def completion_prompts(self, body: CompletionRequest) -> list[Prompt]:
        p = body.prompt
        if isinstance(p, str):
            return [Prompt(p, self.encode(p))]
        if not p:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        if all(isinstance(x, str) for x in p):
            return [Prompt(s, self.encode(s)) for s in p]  # type: ignore[arg-type]
        lists: list[list[int]] = [p] if all(isinstance(x, int) for x in p) else p  # type: ignore[list-item,assignment]
        vocab, out = self.engine.vocab_size, []
        for ids in lists:
            if not ids or any(not 0 <= t < vocab for t in ids):
                raise APIError(
                    400,
                    f"prompt: token ids must be non-empty and in 0..{vocab - 1}",
                    param="prompt",
                )
            text = self.engine.tokenizer.decode(ids, skip_special_tokens=False)
            out.append(Prompt(text, list(ids)))
        return out

    def chat_prompt(self, messages: list[dict[str, str]]) -> Prompt:
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(
                400,
                f"model {self.engine.model_name!r} has no chat template: use /v1/completions",
                param="messages",
            )
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return Prompt(text, list(tok(text, add_special_tokens=False).input_ids))

    # ------------------------------------------------------------------ the two endpoints

    async def completions(self, body: CompletionRequest, request: Request, kid: str) -> Any:
        echo, top = bool(body.echo), body.logprobs
        as_ids = bool(body.return_tokens_as_token_ids)
        self.audit_params(
            request, body, max_tokens=body.max_tokens, logprobs=top, echo=echo, top_logprobs=top
        )
        self.check_model(body.model)
        prompts = self.completion_prompts(body)
        request.state.audit["prompt_sha256"] = prompt_sha256(body.prompt)
        await self.admit(request, kid, "\n".join(p.text for p in prompts), body)
        job = self.start_job(request, kid, prompts, body, body.max_tokens or 16, top, echo)
        tt = self.engine.token_text

        def choice(ev: Event, first: bool) -> dict[str, Any]:
            p = job.prompt_of(ev.index)
            lps = None
            if top is not None:
                prompt_lps = list(ev.prompt_logprobs or []) if echo else []
                lp = completion_logprobs(tt, prompt_lps, 0, as_ids=as_ids)
                more = completion_logprobs(
                    tt, ev.logprobs, len(p.text) if echo else 0, as_ids=as_ids
                )
                lps = {k: lp[k] + more[k] for k in lp}
            text = (p.text if echo and first else "") + ev.text
            return {"index": ev.index, "text": text, "logprobs": lps,
                    "finish_reason": ev.finish_reason}  # fmt: skip

        head = self._head(f"cmpl-{job.id}", "text_completion", job)
        if body.stream:
            usage_too = bool(body.stream_options and body.stream_options.include_usage)
            return sse(request, job, head, choice, usage_too, self.finish_usage, kid, chat=False)
        choices = await collect(request, job, choice)
        return self._answer(request, kid, head, choices)

    async def chat(self, body: ChatCompletionRequest, request: Request, kid: str) -> Any:
        top = (body.top_logprobs or 0) if body.logprobs else None
        self.audit_params(
            request, body, logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs, echo=False
        )
        self.check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        request.state.audit["prompt_sha256"] = prompt_sha256(messages)
        await self.admit(request, kid, "\n".join(m["content"] for m in messages), body)
        prompt = self.chat_prompt(messages)
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = requested or max(1, self.engine.context_length - len(prompt.ids))
        request.state.audit["max_tokens"] = max_tokens
        job = self.start_job(request, kid, [prompt], body, max_tokens, top, False)
        tt = self.engine.token_text

        def choice(ev: Event, first: bool) -> dict[str, Any]:
            lps = chat_logprobs(tt, ev.logprobs) if top is not None else None
            return {"index": ev.index, "delta": {"content": ev.text}, "logprobs": lps,
                    "finish_reason": ev.finish_reason}  # fmt: skip

        head = self._head(f"chatcmpl-{job.id}", "chat.completion", job)
        if body.stream:
            usage_too = bool(body.stream_options and body.stream_options.include_usage)
            chunk = {**head, "object": "chat.completion.chunk"}
            return sse(request, job, chunk, choice, usage_too, self.finish_usage, kid, chat=True)
        choices = await collect(request, job, choice)
        for c in choices:
            c["message"] = {"role": "assistant", "content": c.pop("delta")["content"]}
        return self._answer(request, kid, head, choices)

    def _head(self, rid: str, obj: str, job: Job) -> dict[str, Any]:
        return {"id": rid, "object": obj, "created": job.created, "model": self.engine.model_name}

    def _answer(
        self, request: Request, kid: str, head: dict[str, Any], choices: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The non-streamed body; writes the audit line with the usage."""
        usage = self.finish_usage(request, kid, sum(c.pop("_tokens") for c in choices), 200)
        fingerprint = f"potstill-{__version__}"
        return {**head, "choices": choices, "usage": usage, "system_fingerprint": fingerprint}
