"""Watermark keys: secret bytes that only ever leave this module as a key id.

A key is at least 16 random bytes. It lives in a file (hex digits, or raw bytes) or in
the ``POTSTILL_WATERMARK_KEY`` environment variable (hex, or text of >= 16 bytes).
``repr``/``str`` show only the key id, the first 8 hex digits of ``sha256(key)``, so
results, logs and JSON can say *which* key was used without revealing it. Error
messages name the file, never its content.

Every pseudo-random draw of the watermarks is ``HMAC-SHA256(key, domain || context)``:
:meth:`WatermarkKey.digest` is the only place the secret is used.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from potstill.core.errors import PotstillError

__all__ = [
    "ENV_VAR",
    "MIN_KEY_BYTES",
    "WatermarkKey",
    "generate_key",
    "key_from_env",
    "load_key",
    "resolve_key",
    "write_key",
]

ENV_VAR = "POTSTILL_WATERMARK_KEY"
MIN_KEY_BYTES = 16
NEW_KEY_BYTES = 32
_HEX_RE = re.compile(rb"\A\s*((?:[0-9a-fA-F]{2})+)\s*\Z")


class WatermarkKey:
    """A secret watermark key. Shows only :attr:`key_id`; compare with ``==`` (constant time)."""

    __slots__ = ("_secret", "key_id")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_KEY_BYTES:
            raise PotstillError(
                f"watermark key too short: {len(secret)} bytes, need >= {MIN_KEY_BYTES}; "
                "make one with `potstill audit keygen --out KEYFILE`"
            )
        self._secret = bytes(secret)
        # Public fingerprint: names the key in results without revealing it.
        self.key_id = hashlib.sha256(self._secret).hexdigest()[:8]

    def digest(self, message: bytes) -> bytes:
        """``HMAC-SHA256(key, message)``: 32 bytes, the watermarks' only use of the secret."""
        return hmac.digest(self._secret, message, "sha256")

    def __repr__(self) -> str:
        return f"WatermarkKey(id={self.key_id})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WatermarkKey):
            return NotImplemented
        return hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would copy the secret into caches/logs of other tools: refuse.
        raise TypeError("WatermarkKey cannot be pickled (it is a secret); pass the key file path")


def _decode(raw: bytes) -> bytes:
    """Hex digits (whitespace around them allowed) decode to bytes; anything else is raw."""
    m = _HEX_RE.match(raw)
    return bytes.fromhex(m.group(1).decode("ascii")) if m else raw


def load_key(path: str | Path) -> WatermarkKey:
    """Read a key file: hex digits, or raw bytes; >= 16 bytes. PotstillError names the file."""
    path = Path(path).expanduser()
    fix = "make one with `potstill audit keygen --out KEYFILE`"
    if not path.exists():
        raise PotstillError(f"watermark key file {path} does not exist; {fix}")
    if not path.is_file():
        raise PotstillError(f"watermark key file {path} is not a regular file; {fix}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PotstillError(
            f"cannot read watermark key file {path}: {e.strerror}; check its permissions"
        ) from None
    secret = _decode(raw)
    if len(secret) < MIN_KEY_BYTES:
        raise PotstillError(
            f"watermark key file {path} holds {len(secret)} key bytes, need >= {MIN_KEY_BYTES} "
            f"(hex digits or raw bytes); {fix}"
        )
    return WatermarkKey(secret)


def key_from_env(var: str = ENV_VAR) -> WatermarkKey | None:
    """The key in environment variable ``var`` (hex, or >= 16 bytes of text); None if unset."""
    value = os.environ.get(var)
    if value is None or not value.strip():
        return None
    secret = _decode(value.encode("utf-8"))
    if len(secret) < MIN_KEY_BYTES:
        raise PotstillError(
            f"environment variable {var} holds {len(secret)} key bytes, need >= {MIN_KEY_BYTES}: "
            f"set it to the hex digits of a key from `potstill audit keygen`"
        )
    return WatermarkKey(secret)


def resolve_key(path: str | Path | None) -> WatermarkKey:
    """The key in ``path`` if given, else the one in ``$POTSTILL_WATERMARK_KEY``."""
    if path is not None:
        return load_key(path)
    key = key_from_env()
    if key is None:
        raise PotstillError(
            f"no watermark key: pass --key-file KEYFILE or set {ENV_VAR} "
            "(make a key with `potstill audit keygen --out KEYFILE`)"
        )
    return key


def generate_key() -> WatermarkKey:
    """A fresh key of 32 bytes from the OS CSPRNG."""
    return WatermarkKey(secrets.token_bytes(NEW_KEY_BYTES))


def write_key(path: str | Path, key: WatermarkKey, *, overwrite: bool = False) -> Path:
    """Write ``key`` as hex to ``path``: mode 0600, atomically (temp file + rename).

    Refuses to replace an existing file unless ``overwrite``: a lost key can no longer
    detect anything it watermarked.
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise PotstillError(
            f"{path} already exists; refusing to overwrite a key (pass --force to replace it)"
        )
    from potstill.core.io import atomic_write_bytes

    atomic_write_bytes(path, key._secret.hex().encode("ascii") + b"\n", mode=0o600)
    return path
