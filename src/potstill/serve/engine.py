"""The generation engine: one model, one worker thread, continuous batching over a KV cache.

Design (continuous batching, left-padded):

* Requests arrive from the asyncio side through :meth:`Engine.submit` into a FIFO. One
  worker thread owns the model and the batch; nothing else touches torch.
* Between decode steps the worker admits waiting requests while the batch has room
  (``max_batch`` rows; a request with ``n`` choices takes ``n`` rows and is admitted whole;
  a request larger than ``max_batch`` runs when the batch is empty). New prompts are
  prefilled together (left-padded, ``attention_mask`` + ``position_ids``), the prefill cache
  rows are repeated ``n`` times, and the result is merged into the running batch by
  left-padding whichever side is shorter (keys/values of padded slots are zero and masked).
* Each decode step feeds every row's last token ``[B, 1]`` with per-row ``position_ids``
  (the row's count of real tokens), so RoPE positions are those the sequence would have alone.
* Finished or cancelled rows are dropped (``index_select`` on the cache), and leading
  columns that are padding in every remaining row are trimmed.
* Every row has its own sampler state: params, processors, and a ``torch.Generator`` seeded
  with ``seed + choice index``, consuming one uniform per step; so a seeded request gives
  the same text alone or in any batch (up to float rounding of batched matmuls).

CPU speed (every logit unchanged): an in-place KV cache (:mod:`potstill.serve.kv_slack`) and
prepacked bf16 linears (:mod:`potstill.serve.packed`); the worker owns torch's threads.

Logprobs: ``SamplingParams.served_logprobs`` (the default) reports the log-softmax of the
logits *after* the request's processors (watermark, antidistillation): the distribution the
token was drawn from, before the client's own temperature and top-p. Raw logprobs, of the
undefended model, are reported only when a request asks for them (``--logprobs-source raw``).
A token the processors made impossible is reported at :data:`LOGPROB_FLOOR` (-9999, as OpenAI
does), never as -inf, which JSON cannot carry.

Memory: a prefill keeps the logits of the last position only. Echoed prompt logprobs are
computed by a chunked prefill whose chunks hold at most :data:`ECHO_LOGITS_BYTES` of fp32
logits, so a long echo request costs a bounded amount of memory, not ``B x T x V`` floats.

Failures: an exception while handling one row (processors, sampling, detokenising) fails
only that row; a failing forward pass fails the rows of that pass, the batch is reset and
the worker keeps serving.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from potstill.core.kvcache import cache_kw
from potstill.core.tokenizers import real_vocab_size
from potstill.serve.events import (
    EngineStats,
    Event,
    RequestGroup,
    SamplingParams,
    TokenLogprob,
    _Row,
    check_prompt_ids,
)
from potstill.serve.sampling import (
    DecodeRows,
    TokenText,
    apply_processors,
    find_stop,
    sample_batch,
    stop_holdback,
    stop_token_ids,
    top_logprobs,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ECHO_LOGITS_BYTES",
    "LOGPROB_FLOOR",
    "Engine",
    "EngineStats",
    "Event",
    "RequestGroup",
    "SamplingParams",
    "TokenLogprob",
]

#: Reported instead of -inf for tokens a processor excluded (OpenAI's value for "impossible").
LOGPROB_FLOOR = -9999.0
#: At most this many bytes of fp32 logits live at once while echoed prompt logprobs are
#: computed (one prefill chunk: rows x chunk positions x vocabulary x 4 bytes).
ECHO_LOGITS_BYTES = 64 * 2**20


class Engine:
    """A causal LM served with continuous batching by one worker thread."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_name: str,
        max_batch: int = 8,
        context_length: int | None = None,
        threads: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer  # for the HTTP side (encoding prompts)
        self._tok = copy.deepcopy(tokenizer)  # the worker's own: fast tokenizers are not re-entrant
        self.model_name = model_name
        self.max_batch = max_batch
        self.threads = threads  # the worker's torch threads (core.hardware.threads_for_worker)
        self.vocab_size = real_vocab_size(model, tokenizer)
        self.stop_ids = stop_token_ids(model, tokenizer)
        max_pos = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 2048
        self.context_length = min(context_length or max_pos, max_pos)
        self.token_text = TokenText(self._tok)
        self._cache_kw = cache_kw(model)
        self._row_keys = itertools.count()
        self.stats = EngineStats()
        self._pending: collections.deque[RequestGroup] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Tensor | None = None  # [B, L] 1 = real token, 0 = left padding

    @classmethod
    def from_spec(
        cls, spec: str, *, max_batch: int = 8, device: str = "cpu", dtype: str = "float32",
        pack: bool = True, threads: int | None = None,
    ) -> Engine:  # fmt: skip
        """Load ``spec`` (any :func:`~potstill.core.models.load_model` form) onto ``device``,
        in ``dtype`` ``"float32" | "bfloat16" | "auto"`` (:mod:`potstill.core.hardware`; bf16
        halves the bytes a decode step reads, and rounds logprobs). ``pack``: prepack bf16
        linears on the CPU (:mod:`potstill.serve.packed`: the same logits, faster)."""
        import torch

        from potstill.core.hardware import resolve_dtype
        from potstill.core.models import load_model

        bf16 = resolve_dtype(dtype, device) == "bfloat16"
        model, tok = load_model(spec, dtype=torch.bfloat16 if bf16 else None)
        model = model.to(device).eval()
        if pack:
            from potstill.serve.packed import can_pack, pack_linears

            if can_pack(model):
                pack_linears(model, rows_hint=max_batch)
        return cls(model, tok, model_name=spec, max_batch=max_batch, threads=threads)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="potstill-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still running get an error event."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        indices: Sequence[int],
        sink: Callable[[Event], None],
    ) -> RequestGroup:
        """Queue one prompt with ``len(indices)`` choices; events go to ``sink`` (called
        from the worker thread: it must be thread-safe, e.g. ``loop.call_soon_threadsafe``)."""
        ids = check_prompt_ids(prompt_ids, self.vocab_size)
        group = RequestGroup(ids, params, indices, sink)
        with self._cv:
            if self._stopping or self._thread is None:
                raise RuntimeError("the engine is not running: call start() first")
            self._pending.append(group)
            self.stats.requests += 1
            self._cv.notify_all()
        return group

    # ----------------------------------------------------------------- worker
    def _run(self) -> None:
        import torch

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                groups = self._take_pending()
                if groups is None:
                    break
                try:
                    if groups:
                        self._admit(groups)
                    if self._rows:
                        self._decode_step()
                except Exception as exc:  # a batch-level failure: fail its rows, keep serving
                    self._fail_rows(self._rows, f"generation failed: {exc!r}")
                    self._reset_batch()
        self._fail_rows(self._rows, "server shutting down")
        for g in self._pending:
            for i in g.indices:
                g.sink(Event(index=i, error="server shutting down"))

    def _take_pending(self) -> list[RequestGroup] | None:
        """Waiting groups that fit into the batch now (blocks while idle); None = stop."""
        with self._cv:
            while not self._pending and not self._rows and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            space = self.max_batch - len(self._rows)
            taken: list[RequestGroup] = []
            while self._pending:
                g = self._pending[0]
                if g.cancelled:
                    self._pending.popleft()
                    continue
                fits = len(g.indices) <= space or (not self._rows and not taken)
                if not fits:
                    break
                taken.append(self._pending.popleft())
                space -= len(g.indices)
            return taken

    def _forward(self, ids: Tensor, mask: Tensor, pos: Tensor, cache: Any, keep: int) -> Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=keep,
            **{self._cache_kw: cache},
        )
        return out.logits[..., : self.vocab_size].float()

    def _admit(self, groups: list[RequestGroup]) -> None:
        """Prefill ``groups`` together, sample each choice's first token, merge into the batch."""
        import torch

        from potstill.serve.kv_slack import slack_cache

        dev = self.device
        echo_rows = [r for r, g in enumerate(groups) if g.params.echo_logprobs]
        prompt_lps: dict[int, list[TokenLogprob]] = {}
        try:  # until the rows exist, any failure must answer every choice of every group
            width = max(len(g.prompt_ids) for g in groups)
            ids = torch.full((len(groups), width), 0, dtype=torch.long)
            mask = torch.zeros((len(groups), width), dtype=torch.long)
            for r, g in enumerate(groups):
                ids[r, width - len(g.prompt_ids) :] = torch.tensor(g.prompt_ids)
                mask[r, width - len(g.prompt_ids) :] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = slack_cache(self.model.config)
            if echo_rows:
                last = self._echo_prefill(groups, echo_rows, ids, mask, pos, cache, prompt_lps)
            else:
                last = self._forward(ids.to(dev), mask.to(dev), pos.to(dev), cache, 1)[:, -1]
        except Exception as exc:
            for g in groups:
                for i in g.indices:
                    self._send_error(g, i, f"prefill failed: {exc!r}")
            return
        last = last.cpu()
        new_rows: list[_Row] = []
        row_src: list[int] = []
        for r, g in enumerate(groups):
            for i in g.indices:
                row = self._new_row(g, i)
                if r in prompt_lps:
                    g.sink(Event(index=i, prompt_logprobs=prompt_lps[r]))
                new_rows.append(row)
                row_src.append(r)
        self._advance_all(new_rows, last[row_src])
        row_src = [r for r, row in zip(row_src, new_rows) if not row.done]
        new_rows = [row for row in new_rows if not row.done]
        if new_rows:
            try:
                self._merge(cache, mask.to(dev), torch.tensor(row_src, device=dev), new_rows)
            except Exception as exc:
                # The new rows are not in the batch yet, so the caller's failure path would
                # never answer them; the running batch may be half-merged: the caller resets it.
                self._fail_rows(new_rows, f"generation failed: {exc!r}")
                raise

    def _new_row(self, group: RequestGroup, index: int) -> _Row:
        import torch

        gen = torch.Generator(device="cpu")
        seed = group.params.seed
        gen.manual_seed(seed + index if seed is not None else secrets.randbits(63))
        return _Row(group=group, index=index, generator=gen, key=next(self._row_keys))

    def _echo_prefill(
        self, groups: list[RequestGroup], echo_rows: list[int], ids: Tensor, mask: Tensor,
        pos: Tensor, cache: Any, out: dict[int, list[TokenLogprob]],
    ) -> Tensor:  # fmt: skip
        """Prefill in column chunks, filling ``out[row]`` with each echo row's prompt logprobs.

        A chunk keeps ``[B, C, V]`` fp32 logits with ``B * C * V * 4 <= ECHO_LOGITS_BYTES``
        (at least one column), so memory does not grow with the prompt length. Returns the
        last position's logits ``[B, V]``.
        """
        dev, width = self.device, ids.shape[1]
        chunk = max(1, ECHO_LOGITS_BYTES // (4 * self.vocab_size * ids.shape[0]))
        for r in echo_rows:
            out[r] = [TokenLogprob(groups[r].prompt_ids[0], None, [], offset=0)]
        offsets = {r: self._prompt_offsets(groups[r].prompt_ids) for r in echo_rows}
        last: Tensor | None = None
        for start in range(0, width, chunk):
            end = min(width, start + chunk)
            logits = self._forward(
                ids[:, start:end].to(dev), mask[:, :end].to(dev), pos[:, start:end].to(dev),
                cache, 0,
            )  # fmt: skip
            last = logits[:, -1]
            for r in echo_rows:
                self._chunk_prompt_logprobs(groups[r], logits[r], start, width, offsets[r], out[r])
        assert last is not None
        return last

    def _prompt_offsets(self, p: list[int]) -> list[int]:
        """Char offset of each prompt token, from single-token texts (exact for whole
        characters in byte-level BPE)."""
        offsets = [0]
        for t in p[:-1]:
            offsets.append(offsets[-1] + len(self._tok.decode([t], skip_special_tokens=False)))
        return offsets

    def _chunk_prompt_logprobs(
        self, group: RequestGroup, logits: Tensor, start: int, width: int, offsets: list[int],
        out: list[TokenLogprob],
    ) -> None:  # fmt: skip
        """Append the prompt logprobs that columns ``start..`` of one left-padded row predict.

        ``logits [C, V]``: column ``c`` predicts prompt token ``t = c - pad + 1``, where
        ``pad = width - len(prompt)``.
        """
        import torch

        p, k = group.prompt_ids, group.params.logprobs or 0
        pad = width - len(p)
        first = max(start, pad)  # skip padding columns
        stop = min(start + logits.shape[0], width - 1)  # the last column predicts no prompt token
        if first >= stop:
            return
        lsm = torch.log_softmax(logits[first - start : stop - start], dim=-1).cpu()
        for c in range(first, stop):
            t = c - pad + 1
            row = lsm[c - first]
            lp = max(float(row[p[t]]), LOGPROB_FLOOR)
            out.append(TokenLogprob(p[t], lp, top_logprobs(row, k), offset=offsets[t]))

    def _merge(self, cache: Any, mask: Tensor, src: Tensor, rows: list[_Row]) -> None:
        """Append prefilled rows (``cache`` rows ``src``) to the running batch, left-padding
        whichever side is shorter so that every row ends at the last column."""
        import torch
        import torch.nn.functional as F

        new_mask = mask.index_select(0, src)
        new_layers = [
            (ly.keys.index_select(0, src), ly.values.index_select(0, src)) for ly in cache.layers
        ]
        if self._cache is None or self._mask is None:
            for ly, (k, v) in zip(cache.layers, new_layers):
                ly.keys, ly.values = k, v
            self._cache, self._mask, self._rows = cache, new_mask, rows
            return
        old_len, new_len = self._mask.shape[1], new_mask.shape[1]
        width = max(old_len, new_len)
        pad_old, pad_new = width - old_len, width - new_len
        self._mask = torch.cat([F.pad(self._mask, (pad_old, 0)), F.pad(new_mask, (pad_new, 0))])
        for ly, (k, v) in zip(self._cache.layers, new_layers):
            ly.keys = torch.cat([F.pad(ly.keys, (0, 0, pad_old, 0)), F.pad(k, (0, 0, pad_new, 0))])
            ly.values = torch.cat(
                [F.pad(ly.values, (0, 0, pad_old, 0)), F.pad(v, (0, 0, pad_new, 0))]
            )
        self._rows = self._rows + rows

    def _decode_step(self) -> None:
        """Drop cancelled rows, feed each row's last token, sample the next ones."""
        import torch

        self._keep([r for r, row in enumerate(self._rows) if not row.group.cancelled])
        if not self._rows or self._mask is None:
            return
        dev = self.device
        ids = torch.tensor([[row.ids[-1]] for row in self._rows], device=dev)
        pos = self._mask.sum(-1, keepdim=True)
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        logits = self._forward(ids, self._mask, pos, self._cache, 1)[:, -1].cpu()
        self.stats.decode_steps += 1
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self._rows))
        self._advance_all(self._rows, logits)
        self._keep([r for r, row in enumerate(self._rows) if not row.done])

    def _keep(self, keep: list[int]) -> None:
        """Keep only batch rows ``keep``; trim columns that are padding in every row."""
        import torch

        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset_batch()
            return
        assert self._mask is not None
        idx = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, idx)
        lead = int((mask.cumsum(-1) == 0).sum(-1).min())
        self._mask = mask[:, lead:]
        for ly in self._cache.layers:
            ly.keys = ly.keys.index_select(0, idx)[:, :, lead:]
            ly.values = ly.values.index_select(0, idx)[:, :, lead:]
        self._rows = [self._rows[r] for r in keep]

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask = [], None, None

    # ----------------------------------------------------------------- per-row sampling
    def _advance_all(self, rows: list[_Row], logits: Tensor) -> None:
        """Sample the next token of every row from ``logits [B, V]`` (fp32, CPU), then
        update each row and send its event. Each distinct processor chain runs once, over all
        rows that use it (:meth:`_process`); a row whose processors or bookkeeping fail is
        failed alone."""
        import torch

        live = list(range(len(rows)))
        raw = logits
        early = [i for i, row in enumerate(rows) if row.n_sampled < row.group.params.min_tokens]
        owned = bool(early and self.stop_ids)
        if owned:  # min_tokens: no end of sequence yet (before the defences)
            logits = logits.clone()
            stops = torch.tensor(sorted(self.stop_ids), device=logits.device)
            logits[torch.tensor(early, device=logits.device)[:, None], stops] = float("-inf")
        processed = logits
        if any(row.group.params.processors for row in rows):
            # each chain reads its rows (a gathered copy) before writing them back, so a tensor
            # that is already ours (the masked copy) can take the results; raw stays untouched
            processed = logits if owned else logits.clone()
            chains: dict[tuple[int, ...], list[int]] = {}
            for i, row in enumerate(rows):
                if row.group.params.processors:
                    chains.setdefault(tuple(map(id, row.group.params.processors)), []).append(i)
            for idx in chains.values():
                for i in self._process([rows[i] for i in idx], idx, logits, processed):
                    live.remove(i)
        if not live:
            return
        params = [rows[i].group.params for i in live]
        tids = sample_batch(
            processed[live],
            [p.temperature for p in params],
            [p.top_p for p in params],
            [rows[i].generator for i in live],
        )
        want = [j for j, p in enumerate(params) if p.logprobs is not None]
        lps: dict[int, tuple[float, list[tuple[int, float]]]] = {}
        if want:
            # served: the processed logits the token was drawn from (the defended model)
            src = torch.stack(
                [(processed if params[j].served_logprobs else raw)[live[j]] for j in want]
            )
            lsm = torch.log_softmax(src, dim=-1).clamp_min(LOGPROB_FLOOR)
            for r, j in enumerate(want):
                lps[j] = (float(lsm[r, tids[j]]), top_logprobs(lsm[r], params[j].logprobs or 0))
        for j, i in enumerate(live):
            try:
                self._advance(rows[i], tids[j], lps.get(j))
            except Exception as exc:
                self._send_error(rows[i].group, rows[i].index, f"sampling failed: {exc!r}")
                rows[i].done = True

    def _process(
        self, rows: list[_Row], idx: list[int], logits: Tensor, processed: Tensor
    ) -> list[int]:
        """Run the chain that ``rows`` (batch rows ``idx``) share over them at once, writing
        ``processed[idx]``; returns the batch rows that failed. When the batched call raises,
        each row is retried alone, so one bad row cannot fail the others."""
        chain = rows[0].group.params.processors

        def view(rs: list[_Row]) -> DecodeRows:
            return DecodeRows(
                tuple(r.key for r in rs),
                tuple(r.group.prompt_ids + r.ids for r in rs),
                tuple(r.group.params.temperature for r in rs),
            )

        try:
            processed[idx] = apply_processors(chain, view(rows), logits[idx])
            return []
        except Exception:
            failed = []
            for row, i in zip(rows, idx):
                try:
                    processed[i] = apply_processors(chain, view([row]), logits[i : i + 1])[0]
                except Exception as exc:
                    self._send_error(row.group, row.index, f"logits processor failed: {exc!r}")
                    row.done = True
                    failed.append(i)
            return failed

    def _advance(
        self, row: _Row, tid: int, logprob: tuple[float, list[tuple[int, float]]] | None
    ) -> None:
        """Append sampled token ``tid`` to ``row``: stop checks, detokenising, events."""
        p = row.group.params
        lp = None
        if logprob is not None:
            lp = TokenLogprob(tid, logprob[0], logprob[1], offset=len(row.text))
        row.n_sampled += 1
        self.stats.generated_tokens += 1
        if tid in self.stop_ids:
            return self._finish(row, "stop", truncated=False)
        row.offsets.append(len(row.text))
        row.ids.append(tid)
        if lp is not None:
            row.lps.append(lp)
        text = self._tok.decode(row.ids, skip_special_tokens=False)
        if p.stop:
            longest = max(len(s) for s in p.stop)
            cut = find_stop(text, p.stop, max(0, row.emitted - longest))
            if cut is not None:
                row.text = text[:cut]
                return self._finish(row, "stop", truncated=True)
        row.text = text
        if row.n_sampled >= p.max_tokens:
            return self._finish(row, "length", truncated=False)
        safe = max(row.emitted, len(text) - stop_holdback(text, p.stop))
        delta = text[row.emitted : safe]
        row.emitted = safe
        released = self._release(row, lambda off: off < safe)
        if delta or released:
            row.group.sink(Event(index=row.index, text=delta, logprobs=released))
        return None

    def _release(self, row: _Row, ok: Callable[[int], bool]) -> list[TokenLogprob]:
        """Logprobs of tokens not sent yet whose text start offset passes ``ok``."""
        out = []
        while row.released < len(row.lps) and ok(row.offsets[row.released]):
            out.append(row.lps[row.released])
            row.released += 1
        return out

    def _finish(self, row: _Row, reason: str, *, truncated: bool) -> None:
        """Send the rest of the text and logprobs with ``reason``; mark the row done.

        After a stop-string cut only tokens that start before the cut are kept.
        """
        end = len(row.text)
        released = self._release(row, (lambda off: off < end) if truncated else (lambda off: True))
        row.group.sink(
            Event(
                index=row.index,
                text=row.text[row.emitted :],
                logprobs=released,
                finish_reason=reason,
                completion_tokens=row.n_sampled,
            )
        )
        row.emitted = end
        row.done = True

    def _send_error(self, group: RequestGroup, index: int, message: str) -> None:
        self.stats.failures += 1
        with contextlib.suppress(Exception):  # a broken sink must not take the worker down
            group.sink(Event(index=index, error=message))

    def _fail_rows(self, rows: list[_Row], message: str) -> None:
        for row in rows:
            if not row.done:
                self._send_error(row.group, row.index, message)
                row.done = True

    def health(self) -> dict[str, Any]:
        """Stats for /health (worker liveness, queue, batch sizes)."""
        alive = self._thread is not None and self._thread.is_alive()
        return {"worker_alive": alive, "queued": len(self._pending), "running": len(self._rows),
                "max_batch": self.max_batch, "context_length": self.context_length,
                **self.stats.__dict__, "time": time.time()}  # fmt: skip
