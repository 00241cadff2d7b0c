"""API keys (constant-time check, hashed ids) and per-key token-bucket rate limits."""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections.abc import Callable, Iterable

from potstill.serve.protocol import APIError

__all__ = ["ANONYMOUS", "KeyRing", "RateLimiter", "TokenBucket", "key_id"]

ANONYMOUS = "anonymous"  # key id of every request when the server has no keys


def key_id(key: str) -> str:
    """Loggable id of ``key``: the first 8 hex digits of its SHA-256 (never the key)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


class KeyRing:
    """The accepted API keys; empty = no authentication."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode("utf-8") for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> str:
        """Key id for an ``Authorization: Bearer <key>`` header; APIError 401 otherwise.

        Every configured key is compared with ``hmac.compare_digest`` (no early exit), so
        the time taken does not reveal which key, or how much of one, matched.
        """
        if not self.enabled:
            return ANONYMOUS
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        cand = given.strip().encode("utf-8")
        ok = False
        for k in self._keys:
            ok |= hmac.compare_digest(cand, k)
        if not ok:
            raise APIError(
                401,
                "incorrect API key provided",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        return key_id(given.strip())


class TokenBucket:
    """``per_minute`` units per minute, bursting up to ``per_minute``; starts full."""

    def __init__(self, per_minute: float, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = float(per_minute) / 60.0  # units per second
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` units are available (0 = now; inf = never)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)


class RateLimiter:
    """Per-key requests/min and tokens/min buckets (None = that limit is off).

    A request is charged its prompt tokens plus ``n * max_tokens`` up front (OpenAI does
    the same); :meth:`refund` returns what generation did not use.
    """

    def __init__(
        self,
        rpm: int | None = None,
        tpm: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm, self.tpm = rpm, tpm
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def _bucket(self, kid: str, kind: str, per_minute: int, now: float) -> TokenBucket:
        b = self._buckets.get((kid, kind))
        if b is None:
            b = self._buckets[(kid, kind)] = TokenBucket(per_minute, now)
        b.refill(now)
        return b

    def acquire(self, kid: str, tokens: int) -> None:
        """Take 1 request and ``tokens`` tokens from ``kid``'s buckets, or raise APIError 429
        with a ``Retry-After`` header (whole seconds). Nothing is taken on a 429."""
        now = self._clock()
        with self._lock:
            need: list[tuple[TokenBucket, float, str]] = []
            if self.rpm is not None:
                need.append((self._bucket(kid, "rpm", self.rpm, now), 1.0, "requests"))
            if self.tpm is not None:
                need.append((self._bucket(kid, "tpm", self.tpm, now), float(tokens), "tokens"))
            waits = [(b.wait_for(a), what) for b, a, what in need]
            worst, what = max(waits, default=(0.0, ""))
            if worst > 0:
                if math.isinf(worst):
                    msg = f"request needs {tokens} tokens, over the limit of {self.tpm} tokens/min"
                    retry = 60
                else:
                    msg = f"rate limit reached for {what} per minute; retry later"
                    retry = max(1, math.ceil(worst))
                raise APIError(
                    429,
                    msg,
                    type=what or "tokens",  # OpenAI: "requests" or "tokens"
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry)},
                )
            for b, a, _ in need:
                b.level -= a

    def refund(self, kid: str, tokens: int) -> None:
        """Give back ``tokens`` unused tokens (charged by :meth:`acquire`)."""
        if self.tpm is None or tokens <= 0:
            return
        with self._lock:
            b = self._buckets.get((kid, "tpm"))
            if b is not None:
                b.level = min(b.capacity, b.level + tokens)
