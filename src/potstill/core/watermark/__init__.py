"""Keyed output watermarks and their detectors.

- :class:`KGWProcessor`: green/red lists (Kirchenbauer et al. 2023), adds ``delta`` to
  green-token logits; :class:`GumbelProcessor`: Aaronson's keyed Gumbel-max sampler.
  Both follow transformers' ``LogitsProcessor`` call convention.
- :func:`detect_text` / :func:`detect_kgw` / :func:`detect_gumbel`: exact-tail hypothesis
  tests on one text, returning a :class:`DetectionResult`.
- Keys: :func:`load_key`, :func:`generate_key`, :func:`write_key`; a
  :class:`WatermarkKey` only ever shows its id (first 8 hex of its sha256).

Corpus-level tests (did a suspect model train on watermarked text?) live in
:mod:`potstill.detect.radioactivity`. Names are imported lazily: ``import
potstill.core.watermark`` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from potstill.core.lazy import lazy_exports

if TYPE_CHECKING:
    from potstill.core.watermark.detect import (
        DetectionResult,
        binomial_tail,
        detect_gumbel,
        detect_kgw,
        detect_segments,
        detect_text,
        gamma_tail,
        make_processor,
        z_score,
    )
    from potstill.core.watermark.generate import generate_ids
    from potstill.core.watermark.gumbel import GumbelProcessor
    from potstill.core.watermark.keys import (
        WatermarkKey,
        generate_key,
        key_from_env,
        load_key,
        resolve_key,
        write_key,
    )
    from potstill.core.watermark.kgw import KGWProcessor
    from potstill.core.watermark.params import WatermarkParams

_EXPORTS = {
    "DetectionResult": "detect",
    "binomial_tail": "detect",
    "detect_text": "detect",
    "detect_gumbel": "detect",
    "detect_kgw": "detect",
    "detect_segments": "detect",
    "gamma_tail": "detect",
    "make_processor": "detect",
    "z_score": "detect",
    "generate_ids": "generate",
    "GumbelProcessor": "gumbel",
    "WatermarkKey": "keys",
    "generate_key": "keys",
    "key_from_env": "keys",
    "load_key": "keys",
    "resolve_key": "keys",
    "write_key": "keys",
    "KGWProcessor": "kgw",
    "WatermarkParams": "params",
}

__all__ = [
    "DetectionResult",
    "GumbelProcessor",
    "KGWProcessor",
    "WatermarkKey",
    "WatermarkParams",
    "binomial_tail",
    "detect_gumbel",
    "detect_kgw",
    "detect_segments",
    "detect_text",
    "gamma_tail",
    "generate_ids",
    "generate_key",
    "key_from_env",
    "load_key",
    "make_processor",
    "resolve_key",
    "write_key",
    "z_score",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
