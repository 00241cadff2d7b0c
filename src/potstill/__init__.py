"""potstill: LLM model distillation: doing it, detecting it, and defending against it.

Three parts on a small core: :mod:`potstill.distill` (doing it), :mod:`potstill.serve`,
:mod:`potstill.harvest` and :mod:`potstill.defend` (serving, harvesting, defending),
:mod:`potstill.detect` (evidence), all on :mod:`potstill.core`. Only :mod:`potstill.cli`,
the demos and :mod:`potstill.report` wire parts together.

The top-level import stays light (no torch, no transformers): import the
submodules you need, e.g. ``from potstill.distill.losses import forward_kl``.
"""

from potstill.core import __version__

__all__ = ["__version__"]
