"""Training/evaluation text: sources (:mod:`.corpus`, :mod:`.synthetic`) and
tokenization + block packing (:mod:`.packing`).

The packing names need torch and are imported lazily, so
``from potstill.distill.data import load_texts`` stays light.
"""

from __future__ import annotations

from typing import Any

from potstill.distill.data.corpus import (
    cache_root,
    fetch_shakespeare,
    is_heldout,
    load_texts,
    shakespeare_texts,
    shakespeare_works,
)
from potstill.distill.data.synthetic import synthetic_texts

_LAZY = {
    "BlockDataset",
    "IGNORE_INDEX",
    "make_labels",
    "pack_sequences",
    "pad_sequences",
    "tokenize_texts",
}

__all__ = [
    "IGNORE_INDEX",
    "BlockDataset",
    "cache_root",
    "fetch_shakespeare",
    "is_heldout",
    "load_texts",
    "make_labels",
    "pack_sequences",
    "pad_sequences",
    "shakespeare_texts",
    "shakespeare_works",
    "synthetic_texts",
    "tokenize_texts",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from potstill.distill.data import packing

        return getattr(packing, name)
    raise AttributeError(f"module 'potstill.distill.data' has no attribute {name!r}")
