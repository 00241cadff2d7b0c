"""What the engine takes and gives: per-request sampling settings, the events it sends back
(text, logprobs, finish), the handle of a submitted prompt and the state of one generating
row. Plain data; :mod:`potstill.serve.engine` does the work."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from potstill.serve.sampling import LogitsProcessor

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from potstill.serve.sampling import TokenText

__all__ = [
    "EngineStats",
    "Event",
    "RequestGroup",
    "SamplingParams",
    "ServingEngine",
    "TokenLogprob",
    "check_prompt_ids",
]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (validated by the HTTP layer).

    ``logprobs``: None = no logprobs; k >= 0 = report the chosen token's logprob and the
    top ``k``. ``echo_logprobs``: also report logprobs of the prompt tokens (of the model:
    processors do not run on prompt positions). ``served_logprobs``: report logprobs after the
    processors (the defended distribution) rather than the raw model's. ``min_tokens``
    (vLLM's parameter): end-of-sequence tokens get no probability before that many tokens, as
    part of the processed distribution (raw logprobs are the model's); stop strings still
    apply.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    echo_logprobs: bool = False
    processors: tuple[LogitsProcessor, ...] = ()
    served_logprobs: bool = True
    min_tokens: int = 0  # end-of-sequence tokens are ruled out until this many were sampled


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token, its logprob (None for the first prompt token), top-k."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]
    offset: int = 0  # char offset of the token in its text (completion, or prompt)


@dataclass
class Event:
    """What the worker tells a request about one choice: new text, newly released
    logprobs, and at the end ``finish_reason`` (or ``error``) with the token count."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class EngineStats:
    """Counters shown on /health. ``max_batch_seen``: most rows in one decode step."""

    requests: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    max_batch_seen: int = 0
    failures: int = 0


class RequestGroup:
    """Handle of one submitted prompt (``n`` choices); :meth:`cancel` drops its rows."""

    def __init__(
        self, prompt_ids: list[int], params: SamplingParams, indices: Sequence[int], sink: Any
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.indices = list(indices)
        self.sink: Callable[[Event], None] = sink
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def check_prompt_ids(prompt_ids: Sequence[int], vocab_size: int) -> list[int]:
    """``prompt_ids`` as a list, or ValueError unless it is non-empty ids in ``[0, vocab)``.
    Engines call it in ``submit``, in the caller's thread: inside an engine a bad prompt would
    fail a whole batch, and the caller would learn why only from an error event."""
    ids = list(prompt_ids)
    if not ids or not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
        raise ValueError(
            f"prompt_ids must be a non-empty list of token ids in [0, {vocab_size}), "
            f"got {str(ids[:8])[:120]}"
        )
    return ids


class ServingEngine(Protocol):
    """What :class:`~potstill.serve.service.Service` needs of an engine: potstill's own
    (:class:`potstill.serve.engine.Engine`) or vLLM's (:class:`potstill.serve.vllm_engine.VLLMEngine`).

    ``submit`` is called on the server's event loop; ``sink`` gets the choice's events (it is
    thread-safe, so the engine may call it from a worker thread). ``vocab_size``: the real
    vocabulary; ``context_length``: prompt + completion tokens at most.
    """

    model_name: str
    tokenizer: PreTrainedTokenizerBase
    token_text: TokenText
    vocab_size: int
    context_length: int

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        indices: Sequence[int],
        sink: Callable[[Event], None],
    ) -> RequestGroup: ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def health(self) -> dict[str, Any]: ...


@dataclass
class _Row:
    """State of one generating sequence (one choice)."""

    group: RequestGroup
    index: int
    generator: torch.Generator
    key: int = 0  # unique for the engine's life: what batched processors key their state on
    ids: list[int] = field(default_factory=list)  # generated, stop token excluded
    n_sampled: int = 0  # tokens sampled, stop token included
    text: str = ""
    emitted: int = 0  # chars of text already sent
    offsets: list[int] = field(default_factory=list)  # char offset of each token in text
    lps: list[TokenLogprob] = field(default_factory=list)
    released: int = 0  # tokens whose logprobs were sent
    done: bool = False
