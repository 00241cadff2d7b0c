"""A teacher behind an OpenAI-compatible endpoint: it scores token sequences by echoed logprobs.

For each sequence the student is trained on (teacher text off-policy, the student's own samples
on-policy) one ``POST /v1/completions`` asks the endpoint to score it::

    {"prompt": [token ids], "echo": true, "logprobs": K, "max_tokens": 1, "temperature": 0,
     "return_tokens_as_token_ids": true}

``echo`` with ``logprobs`` returns, for every prompt token after the first, its log-probability
and the teacher's top-``K`` alternatives at that position (vLLM's and potstill serve's *prompt
logprobs*). The prompt is sent as token ids, so the endpoint scores exactly the student's tokens,
and ``return_tokens_as_token_ids`` (a vLLM extension potstill serve implements) names the top-K
tokens as ``"token_id:N"``, so no token string has to be mapped back to an id (two ids can print
the same). The one generated token is ignored.

Estimator: forward KL on the teacher's top-K plus the sampled token, with one tail bucket for the
rest (:func:`~potstill.distill.losses.sparse_topk_kl`). Bucketing is a coarsening of both
distributions, so by the data-processing inequality the loss is a *lower bound* of the full
forward KL: the student is not penalised for how it spreads mass *inside* the teacher's tail.
The gap shrinks as the teacher's top-K mass grows (it is 0 when the tail is empty); the sampled
token's logprob is included because on-policy samples often fall outside the teacher's top-K,
which is exactly where the student most needs correcting.

Concurrency: the requests of a micro-batch go out at once over ``concurrency`` keep-alive
connections (:mod:`potstill.core.http`, the harvester's client) from an event loop on a
background thread; :meth:`EndpointTeacher.submit` returns a future at once, so the recipe runs
the student's forward pass while the teacher scores.

Token agreement: :meth:`EndpointTeacher.check` sends a probe text (multi-byte characters,
spaces, digits, newlines) as a string and compares the endpoint's token ids with the student
tokenizer's. A server that lacks echo, prompt logprobs or token ids gets a PotstillError naming
the missing capability.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from potstill.core.errors import PotstillError
from potstill.core.http import Connection, ConnectionLost, Endpoint

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

__all__ = ["PROBE_TEXT", "EndpointTeacher", "parse_scored"]

PROBE_TEXT = "Distil thé tea, 12 345 times!\n  naïve café → 東京 ok"
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
HINTS = {
    401: "the endpoint rejected the API key; set teacher.api_key_env to a variable holding it",
    403: "the endpoint refused access; check the API key's permissions",
    404: "no such route or model; check teacher.spec (base URL, e.g. http://host:8000/v1) "
    "and teacher.model",
}


def _token_id(name: str, where: str) -> int:
    if not (isinstance(name, str) and name.startswith("token_id:")):
        raise PotstillError(
            f"{where} names tokens as strings ({name!r}), not token ids: the endpoint must "
            "support return_tokens_as_token_ids (vLLM and potstill serve do), since a token "
            "string cannot be mapped back to one id safely"
        )
    return int(name.removeprefix("token_id:"))


def parse_scored(answer: Any, n_tokens: int, where: str) -> list[list[tuple[int, float]]]:
    """Per prompt position ``1..n_tokens-1``: the (id, logprob) pairs known there, the sampled
    token's first, then the top-K (deduplicated). Raises PotstillError naming what is missing."""
    try:
        lp = answer["choices"][0]["logprobs"]
    except (KeyError, IndexError, TypeError):
        raise PotstillError(f"{where} answered without choices[0].logprobs") from None
    if not lp or not isinstance(lp.get("token_logprobs"), list):
        raise PotstillError(
            f"{where} returned no prompt logprobs: the endpoint must support echo=true with "
            "logprobs (prompt logprobs) to score the student's tokens"
        )
    tokens, token_lps, tops = lp.get("tokens") or [], lp["token_logprobs"], lp.get("top_logprobs")
    if len(token_lps) < n_tokens or not isinstance(tops, list) or len(tops) < n_tokens:
        raise PotstillError(
            f"{where} returned logprobs for {len(token_lps)} tokens of a {n_tokens}-token echoed "
            "prompt: the endpoint must return prompt logprobs (echo=true) with top logprobs"
        )
    rows: list[list[tuple[int, float]]] = []
    for i in range(1, n_tokens):
        own = (_token_id(tokens[i], where), float(token_lps[i]))
        seen, row = {own[0]}, [own]
        for name, value in (tops[i] or {}).items():
            tid = _token_id(name, where)
            if tid not in seen:
                seen.add(tid)
                row.append((tid, float(value)))
        rows.append(row)
    return rows


class EndpointTeacher:
    """Scores ``[B, T]`` token batches through ``url``'s ``/v1/completions`` (module docstring).

    ``vocab_size`` is the student's logit width (ids the endpoint returns at or above it are
    an error). :meth:`close` stops the background loop.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str,
        api_key: str | None,
        top_logprobs: int,
        concurrency: int,
        timeout_s: float,
        vocab_size: int,
        max_retries: int = 4,
    ) -> None:
        self.endpoint = Endpoint.parse(url)
        self.name = url
        self.model = model
        self.top_logprobs = top_logprobs
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._pool: asyncio.Queue[Connection] = asyncio.Queue()
        for _ in range(concurrency):
            self._pool.put_nowait(Connection(self.endpoint, headers))
        self._rng = random.Random(0)  # backoff jitter only

    # ---------------------------------------------------------------- requests

    def _body(self, prompt: str | list[int], k: int) -> bytes:
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                "echo": True, "logprobs": k, "return_tokens_as_token_ids": True}  # fmt: skip
        return json.dumps(body).encode("utf-8")

    async def _post(self, body: bytes) -> Any:
        conn = await self._pool.get()
        try:
            last = ""
            for attempt in range(self.max_retries + 1):
                try:
                    resp = await conn.post("/completions", body, self.timeout_s)
                except (ConnectionLost, TimeoutError, asyncio.TimeoutError) as e:
                    last = f"{type(e).__name__}: {e}"
                else:
                    text = resp.body[:300].decode("utf-8", "replace")
                    if resp.status == 200:
                        return json.loads(resp.body)
                    last = f"HTTP {resp.status}: {text}"
                    if resp.status not in RETRY_STATUS:
                        hint = HINTS.get(resp.status, "the request was refused")
                        raise PotstillError(f"teacher endpoint {self.name}: {hint} ({last})")
                if attempt < self.max_retries:
                    await asyncio.sleep(self._rng.uniform(0, min(8.0, 0.25 * 2**attempt)))
            raise PotstillError(
                f"teacher endpoint {self.name}: gave up after {self.max_retries + 1} attempts "
                f"({last}); check that it is up"
            )
        finally:
            self._pool.put_nowait(conn)

    def _run(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # ---------------------------------------------------------------- public

    def check(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Refuse an endpoint that cannot score token ids, or whose tokenizer is not the
        student's (PotstillError naming the missing capability or the first differing token)."""
        answer = self._run(self._post(self._body(PROBE_TEXT, 1))).result()
        where = f"teacher endpoint {self.name}"
        try:
            names = answer["choices"][0]["logprobs"]["tokens"]
        except (KeyError, IndexError, TypeError):
            raise PotstillError(
                f"{where} returned no echoed tokens with logprobs: the endpoint must support "
                "echo=true with logprobs on /v1/completions"
            ) from None
        ids = [_token_id(n, where) for n in names]
        mine = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
        bos = tokenizer.bos_token_id
        added = int(bool(ids) and ids[0] == bos and (not mine or mine[0] != bos))
        ids = ids[added:]  # the server may add its BOS to a string prompt
        # After the echoed prompt comes the one generated token, unless it was a stop token
        # (servers do not return those): one extra id at most.
        if ids[: len(mine)] != mine or len(ids) - len(mine) not in (0, 1):
            at = next(
                (i for i, (a, b) in enumerate(zip(ids, mine)) if a != b), min(len(ids), len(mine))
            )
            raise PotstillError(
                f"{where} tokenizes a probe text differently from the student's tokenizer "
                f"(first difference at token {at}: endpoint {ids[at : at + 3]}, student "
                f"{mine[at : at + 3]}): token ids would mean different things on the two sides; "
                "set student.tokenizer to the served model's tokenizer"
            )
        parse_scored(answer, len(mine) + added, where)

    def submit(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Future[Any]:
        """Score every sequence of the batch; the future gives sparse targets ``(ids, logprobs)``,
        each ``[B, T, K + 1]`` (slots with id -1 empty), at the positions ``labels != -100``."""
        rows = [
            (ids[: int(m.sum())].tolist(), lab)
            for ids, m, lab in zip(input_ids, attention_mask, labels, strict=True)
        ]
        return self._run(self._score(rows, tuple(labels.shape)))

    async def _score(self, rows: Sequence[tuple[list[int], Tensor]], shape: tuple[int, int]) -> Any:
        import torch

        k = self.top_logprobs
        out_ids = torch.full((*shape, k + 1), -1, dtype=torch.long)
        out_lps = torch.zeros((*shape, k + 1), dtype=torch.float32)
        answers = await asyncio.gather(*(self._post(self._body(ids, k)) for ids, _ in rows))
        for b, ((ids, lab), answer) in enumerate(zip(rows, answers, strict=True)):
            scored = parse_scored(answer, len(ids), f"teacher endpoint {self.name}")
            for t in (lab != -100).nonzero().flatten().tolist():
                pairs = scored[t][: k + 1]  # position t predicts token t + 1: row t
                if pairs[0][0] != ids[t + 1] or max(p[0] for p in pairs) >= self.vocab_size:
                    raise PotstillError(
                        f"teacher endpoint {self.name} scored token {pairs[0][0]} where the "
                        f"student's is {ids[t + 1]}, or an id beyond the student's vocab "
                        f"({self.vocab_size}): is it serving the same tokenizer?"
                    )
                out_ids[b, t, : len(pairs)] = torch.tensor([p[0] for p in pairs])
                out_lps[b, t, : len(pairs)] = torch.tensor([p[1] for p in pairs])
        return out_ids, out_lps

    def close(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
