"""The keyed pseudo-random function behind both watermarks.

Two stages, so that a whole vocabulary costs one HMAC plus a few vectorised integer ops:

1. ``seed = HMAC-SHA256(key, domain || k context token ids)``: 32 bytes per context,
   read as eight 32-bit words. Only this stage sees the key; ``domain`` separates the
   schemes so one key used for KGW and Gumbel gives unrelated draws.
2. ``h(seed, token) = mix(mix(token + w0) + w1)`` (``mix``: the ``lowbias32`` integer
   hash, a bijection of 32-bit integers), computed with torch int64 ops over any tensor of
   token ids. For a fixed token and a uniformly random seed, ``h`` is exactly uniform on
   ``[0, 2^32)``; across tokens it is pseudo-random, which the null-calibration tests check.

The reference form keeps every integer below 2^63 inside int64 (see :func:`_fmix32`), so
nothing relies on signed overflow and CPU and GPU give identical bits. Whole green lists, the
hot loop of serving, run the same function in int32 that wraps mod 2^32 (3.7x faster), on
devices where a probe shows the wrapping gives those bits (:func:`_int32_wraps`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from potstill.core.watermark.keys import WatermarkKey

__all__ = ["MASK32", "SeedCache", "hash32", "hash32_below", "uniform53"]

MASK32 = 0xFFFFFFFF
_WORDS = struct.Struct("<8I")


def _pack(context: tuple[int, ...]) -> bytes:
    return struct.pack(f"<{len(context)}q", *context)


_MAX_CACHE = 1 << 16


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` (C. Wellons' hash-prospector): a bijection of [0, 2^32) with low bias.

    ``x * 0x7FEB352D`` stays below 2^63 for x < 2^32; ``0x846CA68B = 2^31 + 0x046CA68B``
    and ``x * 2^31 mod 2^32 = (x & 1) << 31``, so that product never overflows either.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x046CA68B + ((x & 1) << 31)) & MASK32
    return x ^ (x >> 16)


def hash32(tokens: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Keyed 32-bit hash of token ids, as int64 in [0, 2^32).

    ``tokens``: int64, any shape broadcastable with the seed words ``w0``, ``w1`` (int64
    in [0, 2^32)), e.g. ``[1, V]`` against ``[B, 1]`` or ``[N]`` against ``[N]``.
    """
    x = _fmix32((tokens + w0) & MASK32)
    return _fmix32((x + w1) & MASK32)


def _fmix32_(x: torch.Tensor) -> torch.Tensor:
    """:func:`_fmix32` in place on int64 ``x`` (each value in [0, 2^32)); returns ``x``."""
    x ^= x >> 16
    x.mul_(0x7FEB352D).bitwise_and_(MASK32)
    x ^= x >> 15
    low = (x & 1) << 31
    x.mul_(0x046CA68B).add_(low).bitwise_and_(MASK32)
    x ^= x >> 16
    return x


# Rows of an [N, V] green-list block hashed at once: two rows of a 49,152-token vocabulary are
# 384 KiB of int32, so the in-place passes stay in a core's L2. 100 whole lists took 334 ms
# as one [100, V] block of fresh int64 temporaries, 29 ms two rows at a time (same bits).
_HASH_ROWS = 2
_INT32_MIN = -(2**31)


def _signed32(w: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as int32 holding the same 32 bits."""
    import torch

    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _fmix32_wrapping_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """:func:`_fmix32` in place on int32 ``x`` holding 32-bit patterns (``tmp``: scratch of
    its shape). The products wrap mod 2^32 and the masks turn arithmetic shifts logical."""
    import torch

    torch.bitwise_right_shift(x, 16, out=tmp).bitwise_and_(0xFFFF)
    x ^= tmp
    x.mul_(0x7FEB352D)
    torch.bitwise_right_shift(x, 15, out=tmp).bitwise_and_(0x1FFFF)
    x ^= tmp
    x.mul_(0x846CA68B - 2**32)
    torch.bitwise_right_shift(x, 16, out=tmp).bitwise_and_(0xFFFF)
    x ^= tmp
    return x


def _below_wrapping(
    tokens: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, threshold: int
) -> torch.Tensor:
    """:func:`hash32_below` in int32 arithmetic that wraps: half the bytes per pass and no
    masking after each product (3.7x faster than the int64 form on a 2-core CPU, [32, 49152])."""
    import torch

    vocab = tokens.to(torch.int32)
    a, b = _signed32(w0), _signed32(w1)
    out = torch.empty((w0.shape[0], tokens.shape[-1]), dtype=torch.bool, device=tokens.device)
    x = torch.empty((_HASH_ROWS, tokens.shape[-1]), dtype=torch.int32, device=tokens.device)
    tmp = torch.empty_like(x)
    for i in range(0, w0.shape[0], _HASH_ROWS):
        rows = slice(i, i + _HASH_ROWS)
        n = min(_HASH_ROWS, w0.shape[0] - i)
        xs, ts = x[:n], tmp[:n]
        torch.add(vocab, a[rows], out=xs)
        _fmix32_wrapping_(xs, ts).add_(b[rows])
        _fmix32_wrapping_(xs, ts).bitwise_xor_(_INT32_MIN)  # unsigned order as signed order
        torch.lt(xs, threshold + _INT32_MIN, out=out[rows])
    return out


def _below_exact(
    tokens: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, threshold: int
) -> torch.Tensor:
    """:func:`hash32_below` in int64 with no overflow anywhere (the reference form)."""
    import torch

    out = torch.empty((w0.shape[0], tokens.shape[-1]), dtype=torch.bool, device=tokens.device)
    for i in range(0, w0.shape[0], _HASH_ROWS):
        rows = slice(i, i + _HASH_ROWS)
        x = _fmix32_((tokens + w0[rows]).bitwise_and_(MASK32))
        x = _fmix32_(x.add_(w1[rows]).bitwise_and_(MASK32))
        torch.lt(x, threshold, out=out[rows])
    return out


_WRAPS: dict[str, bool] = {}  # device type -> whether its int32 kernels wrap as required


def _int32_wraps(device: torch.device) -> bool:
    """Whether :func:`_below_wrapping` gives :func:`_below_exact`'s bits on ``device``.

    C++ leaves signed overflow undefined; torch's CPU (SIMD ``mullo``) and CUDA kernels wrap,
    but that is checked once per device type on a probe that covers the vectorised body and
    the scalar tail, every seed bit and every threshold sign, rather than assumed.
    """
    import torch

    if device.type not in _WRAPS:
        gen = torch.Generator().manual_seed(0)
        tokens = torch.arange(1031, dtype=torch.int64)[None, :].to(device)
        seeds = torch.randint(0, 2**32, (5, 2), generator=gen, dtype=torch.int64)
        seeds[0], seeds[1] = 0, MASK32
        w0, w1 = seeds[:, :1].to(device), seeds[:, 1:].to(device)
        _WRAPS[device.type] = all(
            torch.equal(_below_wrapping(tokens, w0, w1, t), _below_exact(tokens, w0, w1, t))
            for t in (1, 2**31, round(0.25 * 2**32), MASK32)
        )
    return _WRAPS[device.type]


def hash32_below(
    tokens: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, threshold: int
) -> torch.Tensor:
    """``hash32(tokens, w0, w1) < threshold`` for many seeds at once: bool ``[N, V]``.

    ``tokens``: int64 ``[1, V]``, ids below 2^31; ``w0``, ``w1``: int64 ``[N, 1]``;
    ``threshold`` in ``[1, 2^32)``. The same bits as :func:`hash32`, a few rows at a time,
    in wrapping int32 where the device's kernels are checked to wrap.
    """
    if threshold <= MASK32 and _int32_wraps(tokens.device):
        return _below_wrapping(tokens, w0, w1, threshold)
    return _below_exact(tokens, w0, w1, threshold)


def uniform53(tokens: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Keyed uniforms in the open interval (0, 1), float64 with 53 random bits.

    ``words``: int64 ``[..., 4]`` seed words (two 32-bit hashes are combined); ``tokens``
    broadcastable with ``words[..., 0]``.
    """
    import torch

    a = hash32(tokens, words[..., 0], words[..., 1])
    b = hash32(tokens, words[..., 2], words[..., 3])
    bits = (a << 21) | (b >> 11)  # 53 bits, < 2^53: exact in float64
    return (bits.to(torch.float64) + 0.5) / float(1 << 53)


class SeedCache:
    """Per-context HMAC seeds for one key and domain, memoised (contexts repeat a lot).

    :meth:`words` returns int64 ``[N, 8]``: the 32-byte HMAC as eight 32-bit words.
    """

    def __init__(self, key: WatermarkKey, domain: bytes) -> None:
        self._key = key
        self._domain = domain + b"|"
        self._cache: dict[tuple[int, ...], tuple[int, ...]] = {}

    def seed(self, context: tuple[int, ...]) -> tuple[int, ...]:
        hit = self._cache.get(context)
        if hit is not None:
            return hit
        words = _WORDS.unpack(self._key.digest(self._domain + _pack(context)))
        if len(self._cache) >= _MAX_CACHE:
            self._cache.clear()  # bounded memory; a miss only costs one HMAC
        self._cache[context] = words
        return words

    def words(self, contexts: Sequence[tuple[int, ...]], device: torch.device) -> torch.Tensor:
        import torch

        rows = [self.seed(c) for c in contexts]
        return torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(rows), 8)
