"""Training/evaluation text: sources (:mod:`.corpus`, :mod:`.synthetic`) and
tokenization + block packing (:mod:`.packing`).

The packing names need torch and are imported lazily, so
``from potstill.distill.data import load_texts`` stays light.
"""

from __future__ import annotations

from potstill.core.lazy import lazy_exports
from potstill.distill.data.corpus import (
    cache_root,
    fetch_shakespeare,
    is_heldout,
    load_texts,
    shakespeare_texts,
    shakespeare_works,
)
from potstill.distill.data.synthetic import synthetic_texts

# The packing names need torch: imported on first use.
_EXPORTS = {name: "packing" for name in (
    "BlockDataset", "IGNORE_INDEX", "make_labels", "pack_sequences", "pad_sequences", "tokenize_texts",
)}  # fmt: skip

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
