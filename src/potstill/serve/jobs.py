"""One HTTP generation request as a job in the engine, and its answer: a JSON body collected
from the job's events or a stream of server-sent events, with OpenAI's logprob layouts."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from potstill.serve.events import Event, RequestGroup, TokenLogprob
from potstill.serve.protocol import APIError
from potstill.serve.sampling import TokenText

__all__ = ["Job", "Prompt", "chat_logprobs", "collect", "completion_logprobs", "sse"]


@dataclass
class Prompt:
    text: str
    ids: list[int]


class Job:
    """One HTTP generation request: its prompts, groups in the engine and event queue."""

    def __init__(self, prompts: list[Prompt], n: int) -> None:
        self.prompts = prompts
        self.n = n
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.groups: list[RequestGroup] = []
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())

    @property
    def total(self) -> int:
        return self.n * len(self.prompts)

    def prompt_of(self, index: int) -> Prompt:
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


def completion_logprobs(
    tt: TokenText, items: list[TokenLogprob], base: int, *, as_ids: bool = False
) -> dict[str, list[Any]]:
    """The /v1/completions ``logprobs`` object; ``base``: text offset of the first item.
    ``as_ids`` names tokens ``"token_id:N"`` (vLLM's ``return_tokens_as_token_ids``)."""

    def name(token_id: int) -> str:
        return f"token_id:{token_id}" if as_ids else tt.get(token_id)[1]

    return {
        "tokens": [name(x.token_id) for x in items],
        "token_logprobs": [x.logprob for x in items],
        "top_logprobs": [
            None if x.logprob is None else {name(i): lp for i, lp in x.top} for x in items
        ],
        "text_offset": [base + x.offset for x in items],
    }


def chat_logprobs(tt: TokenText, items: list[TokenLogprob]) -> dict[str, list[Any]]:
    """The /v1/chat/completions ``logprobs`` object (token, logprob, bytes, top_logprobs)."""

    def one(token_id: int, lp: float) -> dict[str, Any]:
        raw, shown = tt.get(token_id)
        return {"token": shown, "logprob": lp, "bytes": list(raw)}

    return {
        "content": [
            {**one(x.token_id, x.logprob or 0.0), "top_logprobs": [one(i, lp) for i, lp in x.top]}
            for x in items
        ]
    }


def merge_choice(acc: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
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


async def collect(
    request: Request, job: Job, choice: Callable[[Event, bool], dict[str, Any]]
) -> list[dict[str, Any]]:
    """Run ``job`` to the end; the full choices, each with a private ``_tokens`` count."""
    acc: dict[int, dict[str, Any]] = {}
    tokens: dict[int, int] = {}
    async for ev in job.events(request):
        acc[ev.index] = merge_choice(acc.get(ev.index), choice(ev, ev.index not in acc))
        if ev.finish_reason is not None:
            tokens[ev.index] = ev.completion_tokens
    if len(tokens) < job.total:  # the client went away
        raise APIError(499, "client disconnected", code="client_disconnected")
    out = [acc[i] for i in sorted(acc)]
    for c in out:
        c["_tokens"] = tokens[c["index"]]
    return out


def sse(
    request: Request,
    job: Job,
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
