"""API policy switches against extraction, and the monitor's admission gate.

Distillation through an API learns most from full next-token distributions: many
``top_logprobs``, many samples per prompt (``n``), and ``logit_bias`` probing, which can
recover hidden logits one token at a time (Carlini et al., 2024; Finlayson et al., 2024).
:class:`KeyPolicy` caps these per key:

* ``max_top_logprobs`` (default 20): chat ``top_logprobs`` and completions ``logprobs``;
* ``max_n`` (default 16): ``n`` per prompt;
* ``logit_bias``: ``"ignore"`` (default) accepts the field and drops it (the server never
  applies it, so clients that always send ``{}`` keep working), ``"reject"`` answers 400
  when a non-empty ``logit_bias`` is sent.

A violation is a 400 with OpenAI's error shape naming the limit, code ``policy_limit``.
Caps are checked on the *validated* request (:mod:`potstill.serve.protocol`), after pydantic
has coerced ``"5"`` or ``5.0`` to ``5``: a check on the raw JSON would let such values past.

:func:`make_admission` builds the ``ServeSettings.admit`` hook: policy checks, then the
monitor's gate for flagged keys: ``flag`` (serve; the key shows on ``/v1/monitor``),
``throttle`` (429 with ``Retry-After``) or ``block`` (403).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from potstill.core.errors import PotstillError
from potstill.serve.protocol import (
    MAX_N,
    MAX_TOP_LOGPROBS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
)

if TYPE_CHECKING:
    from potstill.defend.monitor import ExtractionMonitor

GenerationRequest = CompletionRequest | ChatCompletionRequest

__all__ = ["MONITOR_ACTIONS", "APIPolicy", "KeyPolicy", "make_admission", "parse_key_policy"]

MONITOR_ACTIONS = ("flag", "throttle", "block")


@dataclass(frozen=True)
class KeyPolicy:
    max_top_logprobs: int = MAX_TOP_LOGPROBS
    max_n: int = MAX_N
    logit_bias: str = "ignore"

    def __post_init__(self) -> None:
        if not 0 <= self.max_top_logprobs <= MAX_TOP_LOGPROBS:
            raise PotstillError(
                f"max_top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.max_top_logprobs}"
            )
        if not 1 <= self.max_n <= MAX_N:
            raise PotstillError(f"max_n must be in 1..{MAX_N}, got {self.max_n}")
        if self.logit_bias not in ("ignore", "reject"):
            raise PotstillError(f"logit_bias must be ignore or reject, got {self.logit_bias!r}")


def parse_key_policy(
    spec: str, default: KeyPolicy, api_keys: Iterable[str] = ()
) -> tuple[str, KeyPolicy]:
    """``KEY:field=value,...`` -> (key id, policy). KEY is a key id (as in the audit log)
    or one of ``api_keys`` itself (turned into its id); unset fields come from ``default``."""
    from potstill.serve.auth import key_id

    key, sep, body = spec.partition(":")
    if not sep or not key or not body:
        raise PotstillError(
            f"bad --key-policy {spec!r}: use KEYID:max_top_logprobs=5,max_n=1,logit_bias=reject"
        )
    kid = key_id(key) if key in set(api_keys) else key
    names = {f.name: f.type for f in fields(KeyPolicy)}
    changes: dict[str, Any] = {}
    for item in body.split(","):
        name, eq, value = item.strip().partition("=")
        if not eq or name not in names:
            raise PotstillError(f"bad --key-policy item {item!r}: known fields {', '.join(names)}")
        try:
            changes[name] = value if name == "logit_bias" else int(value)
        except ValueError as exc:
            raise PotstillError(f"bad --key-policy value {item!r}: expected an integer") from exc
    return kid, replace(default, **changes)


def _limit(param: str, got: int, name: str, cap: int) -> APIError:
    return APIError(
        400,
        f"{param}={got} is over this API key's limit {name}={cap}",
        param=param,
        code="policy_limit",
    )


@dataclass
class APIPolicy:
    default: KeyPolicy
    per_key: dict[str, KeyPolicy]

    def for_key(self, kid: str) -> KeyPolicy:
        return self.per_key.get(kid, self.default)

    def check(self, kid: str, request: GenerationRequest) -> None:
        """Raise APIError 400 when the validated ``request`` breaks ``kid``'s policy."""
        pol = self.for_key(kid)
        top = request.top_logprobs_asked()
        if top is not None and top > pol.max_top_logprobs:
            name = "top_logprobs" if isinstance(request, ChatCompletionRequest) else "logprobs"
            raise _limit(name, top, "max_top_logprobs", pol.max_top_logprobs)
        n = request.n or 1
        if n > pol.max_n:
            raise _limit("n", n, "max_n", pol.max_n)
        if pol.logit_bias == "reject" and request.logit_bias:
            raise APIError(
                400,
                "logit_bias is not allowed for this API key (policy logit_bias=reject)",
                param="logit_bias",
                code="policy_limit",
            )


def make_admission(
    policy: APIPolicy | None,
    monitor: ExtractionMonitor | None = None,
    action: str = "flag",
) -> Callable[[str, dict[str, Any], GenerationRequest], None]:
    """The ``ServeSettings.admit(key_id, audit_record, request)`` hook."""
    if action not in MONITOR_ACTIONS:
        raise PotstillError(f"--monitor-action must be one of {', '.join(MONITOR_ACTIONS)}")

    def admit(kid: str, record: dict[str, Any], request: GenerationRequest) -> None:
        if policy is not None:
            policy.check(kid, request)
        if monitor is None or action == "flag" or not monitor.is_flagged(kid):
            return
        msg = "this API key's recent requests look like systematic model extraction"
        if action == "throttle":
            retry = monitor.retry_after(kid)
            raise APIError(
                429,
                f"{msg}; requests are throttled, retry after {retry} s",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )
        raise APIError(
            403, f"{msg}; the key is blocked: contact the operator", type="permission_error",
            code="key_blocked",
        )  # fmt: skip

    return admit
