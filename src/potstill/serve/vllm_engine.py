"""vLLM's async engine behind potstill's front end: ``potstill serve --engine vllm``.

Why in-process, not a vLLM server next to potstill: :class:`~potstill.serve.service.Service`
must see every request as typed, tokenized data to enforce what vLLM lacks (per-key auth,
policy caps and the logprob budget on the validated request, token rate limits charged from
the real prompt length, the audit log, the extraction monitor). Driving vLLM's ``AsyncLLM``
in the same event loop gives it exactly that (prompt token ids in, token ids, text and
logprobs out) with no second HTTP hop and no second tokenization, and it is how vLLM's own
OpenAI server uses its engine: the engine core (scheduler, paged KV cache, workers, tensor
parallelism) runs in its own process(es); this process keeps HTTP, detokenization and the
defences' bookkeeping.

The defences run inside vLLM's engine as one logits processor
(:class:`potstill.defend.vllm_processors.PotstillDefences`), configured once for the whole
server from ``additional_config`` (:func:`~potstill.serve.vllm_processors.vllm_config_for`).
vLLM builds processors per engine, not per request, so :meth:`VLLMEngine.request_processors`
is what the front end puts in ``ServeSettings.processors``: markers (:class:`EngineSide`) for
the defences the engine applies to that request (Gumbel skips greedy requests, as in
potstill's engine). :meth:`VLLMEngine.submit` refuses any other processor: a defence that
this engine would not run must not be dropped silently.

Logprobs: ``served`` maps to vLLM's ``logprobs_mode="processed_logprobs"``. vLLM takes these
after its logits processors *and* after temperature and top-p, so at T != 1 or top-p < 1
they are of the tempered distribution, while potstill's engine reports them before the
client's temperature; at T = 1, top-p = 1 both are the defended distribution. ``raw`` maps
to ``raw_logprobs``, the model's log-softmax. Non-finite logprobs (tokens a defence or top-p
excluded) are reported at :data:`~potstill.serve.engine.LOGPROB_FLOOR`, as by potstill's
engine. Text comes from vLLM's incremental detokenizer.

This module imports ``vllm`` when the engine starts; install it with ``potstill[vllm]``.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from potstill.serve.events import (
    EngineStats,
    Event,
    RequestGroup,
    SamplingParams,
    TokenLogprob,
    check_prompt_ids,
)
from potstill.serve.sampling import TokenText

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from potstill.core.watermark.params import WatermarkParams
    from potstill.serve.sampling import DecodeRows, LogitsProcessor

__all__ = [
    "CONFIG_KEY",
    "EngineSide",
    "VLLMEngine",
    "VLLMSettings",
    "settings_of",
    "vllm_config_for",
]

#: As :data:`potstill.serve.engine.LOGPROB_FLOOR` (not imported: that module pulls in torch).
LOGPROB_FLOOR = -9999.0
#: The module path of the engine-side processor vLLM is told to load.
DEFENCES_PROCESSOR = "potstill.defend.vllm_processors:PotstillDefences"
#: Where potstill's settings sit in vLLM's ``additional_config``.
CONFIG_KEY = "potstill"


def vllm_config_for(
    key_file: str | None,
    params: WatermarkParams | None,
    *,
    antidistill: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``additional_config`` for vLLM (``LLM(...)`` or ``--additional-config``): where the key
    is and how to watermark (``key_file`` None: the key in ``$POTSTILL_WATERMARK_KEY`` of the
    engine's process), and antidistillation's ``{"proxy_dir", "lambda", "eps"}`` for
    :class:`potstill.defend.vllm_processors.PotstillDefences`. The key stays in its file (mode
    0600) or the environment: vLLM logs its configuration."""
    cfg: dict[str, Any] = {}
    if params is not None:
        cfg["watermark"] = {"key_file": None if key_file is None else str(key_file),
                            **params.to_dict()}  # fmt: skip
    if antidistill is not None:
        cfg["antidistill"] = dict(antidistill)
    return {CONFIG_KEY: cfg}


def settings_of(vllm_config: Any) -> dict[str, Any]:
    """The ``additional_config["potstill"]`` dict of a vLLM config ({} when absent)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    return dict(extra.get(CONFIG_KEY) or {}) if isinstance(extra, dict) else {}


@dataclass(frozen=True)
class EngineSide:
    """A defence that vLLM's engine applies to this request; a marker, never called here."""

    name: str

    def __call__(self, rows: DecodeRows, scores: Any) -> Any:
        raise RuntimeError(f"the {self.name} defence runs inside vLLM's engine, not here")


@dataclass(frozen=True)
class VLLMSettings:
    """How vLLM's engine is built (``potstill serve --engine vllm`` flags).

    ``defences``: the ``additional_config["potstill"]`` dict (``vllm_config_for``); empty
    means no processor is loaded. ``logprobs_source``: as ``ServeSettings.logprobs_source``.
    """

    model_dir: Path
    max_batch: int = 8  # vLLM's max_num_seqs
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool = False  # skip torch.compile / CUDA graphs: loads in ~19 s, not ~80
    logprobs_source: Literal["served", "raw"] = "served"
    defences: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments of ``vllm.AsyncEngineArgs``."""
        args: dict[str, Any] = {
            "model": str(self.model_dir),
            "tokenizer": str(self.model_dir),
            "dtype": self.dtype,
            "max_num_seqs": self.max_batch,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enforce_eager": self.enforce_eager,
            "seed": self.seed,
            "logprobs_mode": "processed_logprobs"
            if self.logprobs_source == "served"
            else "raw_logprobs",
            "max_logprobs": 20,  # protocol.MAX_TOP_LOGPROBS
            "disable_log_stats": True,
        }
        if self.defences:
            args["logits_processors"] = [DEFENCES_PROCESSOR]
            args["additional_config"] = {CONFIG_KEY: self.defences}
        return args


class _Group(RequestGroup):
    """A submitted prompt whose ``cancel`` also aborts its vLLM request."""

    task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        super().cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # vLLM's generate() aborts the request when cancelled


@dataclass
class _Choice:
    """What one choice has sent so far."""

    text_len: int = 0  # characters of text sent
    tokens: int = 0  # tokens sampled, end-of-sequence included
    ids: list[int] = field(default_factory=list)  # token ids whose logprobs were built
    pending: list[TokenLogprob] = field(default_factory=list)  # built, not sent yet
    started: bool = False  # its first event is out (the one with the prompt logprobs)
    done: bool = False  # finished or failed


class VLLMEngine:
    """The serving-engine seam of :class:`~potstill.serve.service.Service` over vLLM's
    ``AsyncLLM``: ``submit`` must be called from the event loop that runs the server."""

    def __init__(
        self, settings: VLLMSettings, tokenizer: PreTrainedTokenizerBase, *, model_name: str
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch = settings.max_batch
        self.vocab_size, width, max_pos = _sizes(settings.model_dir, tokenizer)
        self.context_length = min(settings.max_model_len or max_pos, max_pos)
        self._tok = copy.deepcopy(tokenizer)  # for offsets; fast tokenizers are not re-entrant
        self.token_text = TokenText(self._tok)
        self.stats = EngineStats()
        self._engine: Any = None
        self._running: set[_Group] = set()
        self._ids = itertools.count()
        self._markers = self._make_markers(settings.defences)
        self.stop_ids = _stop_ids(settings.model_dir, tokenizer)
        self._allowed: list[int] | None = None
        if width > self.vocab_size:
            # logits past the tokenizer can never be decoded; potstill's engine never samples
            # them either (sampling.py: padded vocabularies)
            self._allowed = list(range(self.vocab_size))

    @staticmethod
    def vocab_size_of(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> int:
        """The real vocabulary of the model in ``model_dir`` (``real_vocab_size``)."""
        return _sizes(model_dir, tokenizer)[0]

    @staticmethod
    def _make_markers(defences: dict[str, Any]) -> dict[str, EngineSide]:
        out = {}
        if "antidistill" in defences:
            out["antidistill"] = EngineSide("antidistill")
        if "watermark" in defences:
            out["watermark"] = EngineSide(str(defences["watermark"]["scheme"]))
        return out

    def request_processors(self, rec: dict[str, Any]) -> list[LogitsProcessor]:
        """``ServeSettings.processors`` for this engine: markers of what vLLM applies to the
        request (antidistillation first, then the watermark; Gumbel leaves greedy alone)."""
        chain: list[Any] = []
        if "antidistill" in self._markers:
            chain.append(self._markers["antidistill"])
        wm = self._markers.get("watermark")
        greedy = not float(rec.get("temperature") or 0.0) > 0
        if wm is not None and not (wm.name == "gumbel" and greedy):
            chain.append(wm)
        return chain

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Build vLLM's engine (loads the model; call from the server's event loop)."""
        if self._engine is not None:
            return
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.settings.engine_args()))
        # what vLLM derived (and will enforce), so that Service answers a too long request 400
        self.context_length = int(self._engine.model_config.max_model_len)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel running requests and shut vLLM's engine down."""
        for g in list(self._running):
            g.cancel()
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def health(self) -> dict[str, Any]:
        errored = bool(getattr(self._engine, "errored", False))
        return {
            "engine": "vllm",
            "worker_alive": self._engine is not None and not errored,
            "running": sum(len(g.indices) for g in self._running),
            "max_batch": self.max_batch,
            "context_length": self.context_length,
            **self.stats.__dict__,
            "time": time.time(),
        }

    # ----------------------------------------------------------------- requests
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        indices: Sequence[int],
        sink: Callable[[Event], None],
    ) -> RequestGroup:
        """Start one prompt with ``len(indices)`` choices as one vLLM request (``n``)."""
        ids = check_prompt_ids(prompt_ids, self.vocab_size)
        foreign = [p for p in params.processors if p not in self._markers.values()]
        if foreign:
            raise ValueError(
                f"processors {foreign!r} are not applied by vLLM's engine: configure the "
                "defences through VLLMSettings.defences (additional_config)"
            )
        if params.served_logprobs != (self.settings.logprobs_source == "served"):
            raise ValueError(
                "this vLLM engine was built for "
                f"{self.settings.logprobs_source} logprobs: its logprobs_mode is per engine"
            )
        if self._engine is None:
            raise RuntimeError("the engine is not running: call start() first")
        group = _Group(ids, params, indices, sink)
        self._running.add(group)
        self.stats.requests += 1
        group.task = asyncio.get_running_loop().create_task(self._run(group))
        group.task.add_done_callback(lambda _: self._running.discard(group))
        return group

    def _vllm_params(self, p: SamplingParams, n: int) -> Any:
        from vllm import SamplingParams as VParams
        from vllm.sampling_params import RequestOutputKind

        return VParams(
            n=n,
            max_tokens=p.max_tokens,
            min_tokens=p.min_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            seed=p.seed,
            stop=list(p.stop) or None,
            logprobs=p.logprobs,
            prompt_logprobs=p.logprobs if p.echo_logprobs else None,
            allowed_token_ids=self._allowed,
            stop_token_ids=sorted(self.stop_ids),  # <|im_end|> too, as potstill's engine
            skip_special_tokens=False,  # the text potstill's engine sends
            output_kind=RequestOutputKind.DELTA,
        )

    async def _run(self, group: _Group) -> None:
        """Stream vLLM's outputs for ``group`` into events; errors, and choices the stream left
        open, answer with an error event."""
        from vllm.inputs import TokensPrompt

        p, n = group.params, len(group.indices)
        choices = [_Choice() for _ in range(n)]
        rid = f"potstill-{next(self._ids)}"
        prompt_lps: list[TokenLogprob] | None = None
        failure = "vLLM ended the request before every choice finished"
        try:
            stream = self._engine.generate(
                TokensPrompt(prompt_token_ids=group.prompt_ids), self._vllm_params(p, n), rid
            )
            async for out in stream:
                # each of the n samples is a child request: its first output may come later
                prompt_lps = prompt_lps or self._prompt_logprobs(group, out)
                for c in out.outputs:
                    ev = self._event(group, c, choices[c.index], prompt_lps)
                    if ev.error is not None or ev.finish_reason is not None:
                        choices[c.index].done = True
                    group.sink(ev)
        except asyncio.CancelledError:
            return  # the client went away or the server stops; vLLM has aborted the request
        except Exception as exc:  # any engine failure answers the request
            failure = f"generation failed: {exc!r}"
        for i, state in enumerate(choices):
            if not state.done:
                self.stats.failures += 1
                group.sink(Event(index=group.indices[i], error=failure))

    def _event(
        self, group: _Group, c: Any, state: _Choice, prompt_lps: list[TokenLogprob] | None
    ) -> Event:
        """One vLLM ``CompletionOutput`` delta as an :class:`Event` for choice ``c.index``.

        As potstill's engine: a token's offset is the length of the decoded text before it,
        the end-of-sequence token's logprob is not reported, and after a stop-string cut only
        tokens that start before the cut keep theirs. vLLM's "abort" and "error" are errors."""
        index = group.indices[c.index]
        if c.finish_reason not in (None, "stop", "length"):
            return Event(index=index, error=f"vLLM ended the choice: {c.finish_reason}")
        token_ids = list(c.token_ids)
        state.tokens += len(token_ids)
        self.stats.generated_tokens += len(token_ids)
        eos = (
            c.finish_reason == "stop"
            and not isinstance(c.stop_reason, str)
            and bool(token_ids)
            and token_ids[-1] in self.stop_ids
        )
        if eos:
            token_ids.pop()
        if group.params.logprobs is not None and c.logprobs:
            for tid, entry in zip(token_ids, c.logprobs, strict=False):
                offset = len(self._tok.decode(state.ids, skip_special_tokens=False))
                state.pending.append(self._token_logprob(tid, entry, group.params.logprobs, offset))
                state.ids.append(tid)
        state.text_len += len(c.text)
        # a token's logprob leaves with the text it starts in: vLLM holds text back while it
        # could still be a stop string, and after a cut the tokens past it are dropped
        cut = c.finish_reason is None or isinstance(c.stop_reason, str)
        lps = [x for x in state.pending if x.offset < state.text_len] if cut else state.pending
        state.pending = state.pending[len(lps) :] if c.finish_reason is None else []
        first, state.started = not state.started, True
        return Event(
            index=index,
            text=c.text,
            logprobs=lps,
            prompt_logprobs=prompt_lps if first else None,
            finish_reason=c.finish_reason,
            completion_tokens=state.tokens if c.finish_reason is not None else 0,
        )

    def _token_logprob(self, token_id: int, entry: dict[int, Any], k: int, offset: int) -> Any:
        # raw logprobs span the padded logits too: ids past the tokenizer are not reported
        real = {t: lp for t, lp in entry.items() if t < self.vocab_size}
        return _token_logprob(token_id, real, k, offset)

    def _prompt_logprobs(self, group: _Group, out: Any) -> list[TokenLogprob] | None:
        """Echoed prompt logprobs (the model's: vLLM runs processors on sampled positions)."""
        entries = getattr(out, "prompt_logprobs", None)
        if not group.params.echo_logprobs or not entries:
            return None
        ids, k = group.prompt_ids, int(group.params.logprobs or 0)
        result = [TokenLogprob(ids[0], None, [], offset=0)]
        offset = 0
        for j in range(1, len(ids)):
            offset += len(self._tok.decode([ids[j - 1]], skip_special_tokens=False))
            result.append(self._token_logprob(ids[j], entries[j], k, offset))
        return result


def _stop_ids(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """:func:`~potstill.serve.sampling.stop_token_ids` from the model directory's files."""
    import json
    from types import SimpleNamespace

    from potstill.serve.sampling import stop_token_ids

    path = model_dir / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))
    return stop_token_ids(model, tokenizer)  # type: ignore[arg-type]


def _sizes(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> tuple[int, int, int]:
    """(real vocabulary, logit width, max positions) from ``model_dir/config.json``."""
    import json

    config = json.loads((model_dir / "config.json").read_text())
    text_config = config.get("text_config") or {}
    width = int(config.get("vocab_size") or text_config.get("vocab_size") or len(tokenizer))
    max_pos = config.get("max_position_embeddings") or text_config.get("max_position_embeddings")
    return min(len(tokenizer), width), width, int(max_pos or 2048)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


def _token_logprob(token_id: int, entry: dict[int, Any], k: int, offset: int) -> TokenLogprob:
    """vLLM's ``{token_id: Logprob(logprob, rank)}`` (the chosen token and the top ``k``)."""
    top = sorted(((t, lp) for t, lp in entry.items() if lp.rank <= k), key=lambda x: x[1].rank)
    chosen = entry.get(token_id)
    value = _finite(chosen.logprob) if chosen is not None else LOGPROB_FLOOR
    return TokenLogprob(token_id, value, [(t, _finite(lp.logprob)) for t, lp in top], offset)
