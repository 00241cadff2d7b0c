"""Evidence of distillation at corpus level.

:mod:`potstill.detect.radioactivity`: did a suspect model train on text that carries
our watermark? (Sander et al. 2024, "Watermarking Makes Language Models Radioactive"),
in open mode (we can run the suspect) or closed mode (we only see its outputs).
:mod:`potstill.detect.soft`: the open-mode test on the suspect's green probability mass.
:mod:`potstill.detect.provenance`: no watermark; is the suspect closer to our teacher
than independent controls? (Nikolic et al. 2025).
:mod:`potstill.detect.stats`: Holm–Bonferroni for several keys/suspects.
Names are imported lazily: ``import potstill.detect`` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from potstill.core.lazy import lazy_exports

if TYPE_CHECKING:
    from potstill.detect.provenance import Candidate, Endpoint, ProvenanceResult, provenance_test
    from potstill.detect.radioactivity import (
        RadioactivityResult,
        collect_closed_tuples,
        collect_generations,
        collect_open_tuples,
        radioactivity_closed,
        radioactivity_open,
        radioactivity_open_keys,
        score_corpus,
    )
    from potstill.detect.soft import SoftResult, collect_soft, radioactivity_soft, score_soft
    from potstill.detect.stats import holm_adjusted, holm_bonferroni

_EXPORTS = {
    "RadioactivityResult": "radioactivity",
    "collect_closed_tuples": "radioactivity",
    "collect_generations": "radioactivity",
    "collect_open_tuples": "radioactivity",
    "radioactivity_closed": "radioactivity",
    "radioactivity_open": "radioactivity",
    "radioactivity_open_keys": "radioactivity",
    "score_corpus": "radioactivity",
    "holm_adjusted": "stats",
    "holm_bonferroni": "stats",
    "Candidate": "provenance",
    "Endpoint": "provenance",
    "ProvenanceResult": "provenance",
    "provenance_test": "provenance",
    "SoftResult": "soft",
    "collect_soft": "soft",
    "radioactivity_soft": "soft",
    "score_soft": "soft",
}

__all__ = [
    "Candidate",
    "Endpoint",
    "ProvenanceResult",
    "RadioactivityResult",
    "SoftResult",
    "collect_closed_tuples",
    "collect_generations",
    "collect_open_tuples",
    "collect_soft",
    "holm_adjusted",
    "holm_bonferroni",
    "provenance_test",
    "radioactivity_closed",
    "radioactivity_open",
    "radioactivity_open_keys",
    "radioactivity_soft",
    "score_corpus",
    "score_soft",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
