"""The asyncio harvester: prompts -> an OpenAI-compatible endpoint -> the SQLite store.

``harvest(prompts, store, endpoint=..., model=...)`` sends every (prompt, sample) whose key
(:func:`potstill.core.store.record_key`) is not yet in the store, with at most
``concurrency`` requests in flight (``concurrency`` worker tasks, each with its own keep-alive
connection, :mod:`potstill.core.http`).

Retries: 408/409/425/429/5xx, timeouts and connection errors are retried up to
``max_retries`` times with exponential backoff and full jitter (``uniform(0, min(cap,
base * 2**attempt))``), waiting at least the server's ``Retry-After`` / ``retry-after-ms``.
After the last retry, and at once for other 4xx answers, the (prompt, sample) is written to
the ``failures`` table: never dropped, and requested again by the next run. 401/403/404 stop
the run with a :class:`PotstillError` (bad key, URL or model name: every request would fail).

Exactly once: a writer thread commits finished records (``INSERT OR IGNORE``, batched: one
transaction holds whatever finished since the last commit); a record counts as done only
once committed. SIGKILL at any moment loses at most uncommitted answers, which the next run
requests again. A prompt listed twice is one key and is requested once.

Fail fast: the run holds the store's lock (:func:`~potstill.core.store.lock_store`), so a
second harvester on the same store is refused before it sends anything. If a commit fails
(disk full, a locked or corrupt file) the workers are cancelled at once, not at the end of
the run: every request after that would be paid for and then lost. What was committed stays.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from potstill.core import store as st
from potstill.core.errors import PotstillError
from potstill.core.faults import fault_point
from potstill.core.http import Connection, ConnectionLost, Endpoint, Response

Messages = list[dict[str, str]]
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524})
FATAL_STATUS = {
    401: "the endpoint rejected the API key; pass a valid --api-key",
    403: "the endpoint refused access; check --api-key and its permissions",
    404: "the endpoint has no such route or model; check --endpoint (base URL, e.g. http://host:8000/v1) and --model",
}


@dataclass(frozen=True)
class GenParams:
    """Generation parameters; all of them are part of each record's key."""

    mode: Literal["chat", "completions"] = "chat"
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_logprobs: int | None = None  # k: store the top-k logprobs of every generated token
    seed: int | None = None  # request seed = seed + sample index (reproducible samples)

    def key_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6
    base_s: float = 0.5
    cap_s: float = 30.0
    timeout_s: float = 300.0  # per request

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        jitter = rng.uniform(0.0, min(self.cap_s, self.base_s * 2.0**attempt))
        return max(jitter, retry_after or 0.0)


@dataclass
class HarvestStats:
    total: int = 0  # distinct (prompt, sample) pairs asked for
    duplicates: int = 0  # repeated (prompt, sample) pairs in the input, not requested again
    skipped: int = 0  # already in the store
    done: int = 0  # committed this run
    failed: int = 0  # written to `failures` this run
    errors: int = 0  # failed attempts (retried or not)
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class _Item:
    key: str
    prompt_idx: int
    sample: int
    messages: Messages
    cached: tuple[str, str, str]  # (params JSON, messages JSON, prompt id) for the store
    params: dict[str, Any]  # the key's generation params (one dict shared by all items)


class _Failed(Exception):
    def __init__(self, status: int | None, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


def parse_retry_after(headers: dict[str, str]) -> float | None:
    """Seconds from ``retry-after-ms``, or ``Retry-After`` (seconds or an HTTP date)."""
    if "retry-after-ms" in headers:
        try:
            return max(0.0, float(headers["retry-after-ms"]) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def build_request(
    model: str, params: GenParams, messages: Messages, sample: int
) -> tuple[str, dict[str, Any]]:
    """(path under the base URL, JSON body) for one (prompt, sample)."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "n": 1,
    }
    if params.top_p != 1.0:
        body["top_p"] = params.top_p
    if params.seed is not None:
        body["seed"] = params.seed + sample
    if params.mode == "chat":
        body["messages"] = messages
        if params.top_logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = params.top_logprobs
        return "/chat/completions", body
    body["prompt"] = completion_prompt(messages)
    if params.top_logprobs is not None:
        body["logprobs"] = params.top_logprobs
    return "/completions", body


def completion_prompt(messages: Messages) -> str:
    """The raw prompt of completions mode: the single user message's text."""
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise PotstillError(
            "--completions mode takes single-turn prompts (one user message); use --chat for "
            "conversations with several messages"
        )
    return messages[0]["content"]


def _chat_logprobs(lp: Any) -> list[dict[str, Any]] | None:
    if not isinstance(lp, dict) or not isinstance(lp.get("content"), list):
        return None
    out = []
    for t in lp["content"]:
        top = [
            [x["token"], float(x["logprob"]), x.get("bytes")] for x in t.get("top_logprobs") or []
        ]
        out.append(
            {
                "token": t["token"],
                "logprob": float(t["logprob"]),
                "bytes": t.get("bytes"),
                "top": top,
            }
        )
    return out


def _completion_logprobs(lp: Any) -> list[dict[str, Any]] | None:
    if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list):
        return None
    tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
    out = []
    for tok, tlp, top in zip(lp["tokens"], lp["token_logprobs"], tops):
        pairs = sorted((top or {}).items(), key=lambda kv: -kv[1])
        out.append(
            {
                "token": tok,
                "logprob": float(tlp) if tlp is not None else float("nan"),
                "bytes": None,
                "top": [[t, float(v), None] for t, v in pairs],
            }
        )
    return out


def parse_response(
    mode: str, payload: Any
) -> tuple[str, str | None, Any, list[dict[str, Any]] | None]:
    """(completion, finish_reason, usage, normalised logprobs) from a response body."""
    choice = payload["choices"][0]
    if mode == "chat":
        text = choice["message"]["content"]
        logprobs = _chat_logprobs(choice.get("logprobs"))
    else:
        text = choice["text"]
        logprobs = _completion_logprobs(choice.get("logprobs"))
    if not isinstance(text, str):
        raise TypeError(f"completion is {type(text).__name__}, not a string")
    return text, choice.get("finish_reason"), payload.get("usage"), logprobs


class _Writer:
    """A thread that commits records/failures, one transaction per batch.

    The event loop appends to ``pending`` and :meth:`flush` hands the list to the thread every
    few milliseconds: one thread wake-up per batch rather than per record (waking the writer
    for every record costs the event loop the GIL hundreds of times a second). A failed
    commit sets ``failed`` (an event of the harvest's loop) so the workers stop at once.
    """

    def __init__(self, path: Path, stats: HarvestStats, synchronous: str) -> None:
        self.conn = st.connect(path, synchronous=synchronous)
        self.stats = stats
        self.pending: list[st.Record | st.Failure] = []
        self.q: queue.SimpleQueue[list[st.Record | st.Failure] | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.loop = asyncio.get_running_loop()
        self.failed = asyncio.Event()
        self.thread = threading.Thread(
            target=self._run, name="potstill-harvest-writer", daemon=True
        )
        self.thread.start()

    def flush(self) -> None:
        if self.pending:
            self.q.put(self.pending)
            self.pending = []

    async def flush_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self.flush()

    def _run(self) -> None:
        try:
            while (batch := self.q.get()) is not None:
                recs = [x for x in batch if isinstance(x, st.Record)]
                fails = [x for x in batch if isinstance(x, st.Failure)]
                st.write_batch(self.conn, recs, fails)
                fault_point("harvest.after_commit")
                # counted only after COMMIT returned: "done" means durable
                self.stats.done += len(recs)
                self.stats.failed += len(fails)
                for r in recs:
                    u = r.usage if isinstance(r.usage, dict) else {}
                    self.stats.prompt_tokens += int(u.get("prompt_tokens") or 0)
                    self.stats.completion_tokens += int(u.get("completion_tokens") or 0)
        except BaseException as e:
            self.error = e
            self.loop.call_soon_threadsafe(self.failed.set)
        finally:
            self.conn.close()

    def close(self) -> BaseException | None:
        """Commit what is pending, stop the thread; returns the commit error, if any."""
        self.flush()
        self.q.put(None)
        self.thread.join()
        return self.error


async def _request(
    conn: Connection, item: _Item, model: str, params: GenParams, policy: RetryPolicy,
    stats: HarvestStats, rng: random.Random,
) -> st.Record:  # fmt: skip
    path, body = build_request(model, params, item.messages, item.sample)
    data = json.dumps(body).encode("utf-8")
    last = ""
    status: int | None = None
    for attempt in range(policy.max_retries + 1):
        retry_after: float | None = None
        t0 = time.perf_counter()
        try:
            resp: Response = await conn.post(path, data, policy.timeout_s)
            status = resp.status
            if resp.status == 200:
                text, finish, usage, logprobs = parse_response(params.mode, json.loads(resp.body))
                return st.Record(
                    item.key, item.prompt_idx, item.sample, model, item.params, item.messages,
                    text, finish, usage, time.perf_counter() - t0, logprobs, item.cached,
                )  # fmt: skip
            last = f"HTTP {resp.status}: {resp.body[:300].decode('utf-8', 'replace')}"
            if resp.status in FATAL_STATUS:
                raise PotstillError(
                    f"HTTP {resp.status} from {conn.endpoint.host}: {FATAL_STATUS[resp.status]} ({last})"
                )
            if resp.status not in RETRY_STATUS and not 500 <= resp.status < 600:
                stats.errors += 1
                raise _Failed(resp.status, last)  # e.g. 400: retrying the same request won't help
            retry_after = parse_retry_after(resp.headers)
        except (ConnectionLost, TimeoutError, asyncio.TimeoutError) as e:
            status, last = None, f"{type(e).__name__}: {e}"
        except (ValueError, KeyError, IndexError, TypeError) as e:  # malformed 200 body
            status, last = 200, f"malformed response: {type(e).__name__}: {e}"
        stats.errors += 1
        if attempt < policy.max_retries:
            stats.retries += 1
            await asyncio.sleep(policy.delay(attempt, retry_after, rng))
    raise _Failed(status, f"gave up after {policy.max_retries + 1} attempts; last: {last}")


async def _worker(
    items: Any, endpoint: Endpoint, headers: dict[str, str], model: str, params: GenParams,
    policy: RetryPolicy, stats: HarvestStats, writer: _Writer, seed: int,
) -> None:  # fmt: skip
    conn = Connection(endpoint, headers)
    rng = random.Random(seed)
    try:
        for item in items:  # a shared iterator: each item goes to exactly one worker
            try:
                rec = await _request(conn, item, model, params, policy, stats, rng)
                writer.pending.append(rec)
            except _Failed as f:
                writer.pending.append(
                    st.Failure(
                        item.key, item.prompt_idx, item.sample, item.messages, f.status, f.error
                    )
                )
    finally:
        conn.close()


def plan_items(
    prompts: Sequence[Messages], model: str, params: GenParams, samples: int
) -> list[_Item]:
    """One item per distinct (prompt, sample) key, in prompt order.

    A prompt listed again has the same keys as its first occurrence: it is planned once (its
    ``prompt_idx`` is the first position), so it is requested and paid for once.
    """
    items = []
    seen: set[str] = set()
    key_params = params.key_dict()
    params_json = st.canonical_json(key_params)
    for i, msgs in enumerate(prompts):
        if params.mode == "completions":
            completion_prompt(msgs)  # validate before sending anything
        cached = (params_json, st.canonical_json(msgs), st.prompt_id(msgs))
        for s in range(samples):
            key = st.record_key(model, key_params, msgs, s)
            if key not in seen:
                seen.add(key)
                items.append(_Item(key, i, s, msgs, cached, key_params))
    return items


async def harvest_async(
    prompts: Sequence[Messages],
    store_path: str | Path,
    *,
    endpoint: str,
    model: str,
    params: GenParams | None = None,
    samples: int = 1,
    concurrency: int = 16,
    api_key: str | None = None,
    policy: RetryPolicy | None = None,
    progress: bool = False,
    synchronous: str = "NORMAL",
) -> HarvestStats:
    """Harvest every missing (prompt, sample) into ``store_path``; returns this run's stats."""
    params = params or GenParams()
    policy = policy or RetryPolicy()
    if concurrency < 1 or samples < 1:
        raise PotstillError(
            f"--concurrency and --samples must be >= 1, got {concurrency} and {samples}"
        )
    ep = Endpoint.parse(endpoint)
    items = plan_items(prompts, model, params, samples)
    with st.lock_store(store_path):
        stats = await _harvest_locked(
            items, Path(store_path), ep, model, params, concurrency, api_key, policy,
            progress, synchronous,
        )  # fmt: skip
    stats.duplicates = len(prompts) * samples - len(items)
    return stats


async def _harvest_locked(
    items: list[_Item], store_path: Path, ep: Endpoint, model: str, params: GenParams,
    concurrency: int, api_key: str | None, policy: RetryPolicy, progress: bool,
    synchronous: str,
) -> HarvestStats:  # fmt: skip
    """The run itself, with the store's lock held: workers, the writer, progress."""
    stats = HarvestStats(total=len(items))
    conn = st.connect(store_path, synchronous=synchronous)
    try:
        done = st.done_keys(conn)
    finally:
        conn.close()
    todo = [it for it in items if it.key not in done]
    stats.skipped = len(items) - len(todo)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    writer = _Writer(store_path, stats, synchronous)
    t0 = time.perf_counter()
    shared = iter(todo)
    tasks = [
        asyncio.ensure_future(_worker(shared, ep, headers, model, params, policy, stats, writer, w))
        for w in range(min(concurrency, max(1, len(todo))))
    ]
    bar = asyncio.ensure_future(_show_progress(stats, t0, len(todo))) if progress else None
    flusher = asyncio.ensure_future(writer.flush_every(0.01))
    writer_failed = asyncio.ensure_future(writer.failed.wait())
    work = asyncio.gather(*tasks)
    try:
        await asyncio.wait({work, writer_failed}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            work.result()  # a worker's error (e.g. a fatal HTTP status) propagates
    finally:
        for fut in (flusher, writer_failed, *tasks):
            fut.cancel()
        await asyncio.gather(work, flusher, writer_failed, return_exceptions=True)
        error = await asyncio.get_running_loop().run_in_executor(None, writer.close)
        stats.elapsed_s = time.perf_counter() - t0
        if bar is not None:
            bar.cancel()
            await asyncio.gather(bar, return_exceptions=True)
    if error is not None:
        raise PotstillError(
            f"writing to harvest store {store_path} failed ({type(error).__name__}: {error}); "
            f"stopped the workers. {stats.done} answers committed are intact: fix the cause "
            "(disk space, a lock or a damaged file) and rerun to resume"
        )
    return stats


async def _show_progress(stats: HarvestStats, t0: float, todo: int) -> None:
    """A rich progress line: committed/total, req/s, completion tokens, errors, ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("harvest"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} req/s  {task.fields[tok]} tok  {task.fields[err]} err  {task.fields[failed]} failed"),
        TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, refresh_per_second=4, transient=False) as bar:
        task = bar.add_task("harvest", total=todo, rate=0.0, tok=0, err=0, failed=0)
        try:
            while True:
                dt = max(1e-9, time.perf_counter() - t0)
                bar.update(
                    task, completed=stats.done + stats.failed, rate=stats.done / dt,
                    tok=stats.completion_tokens, err=stats.errors, failed=stats.failed,
                )  # fmt: skip
                await asyncio.sleep(0.25)
        except asyncio.CancelledError:
            bar.update(
                task, completed=stats.done + stats.failed, tok=stats.completion_tokens,
                err=stats.errors, failed=stats.failed,
            )  # fmt: skip
            raise


def harvest(prompts: Sequence[Messages], store_path: str | Path, **kwargs: Any) -> HarvestStats:
    """Synchronous wrapper of :func:`harvest_async` (same arguments)."""
    return asyncio.run(harvest_async(prompts, store_path, **kwargs))


__all__ = [
    "GenParams",
    "HarvestStats",
    "RetryPolicy",
    "build_request",
    "harvest",
    "harvest_async",
    "parse_response",
    "parse_retry_after",
]
