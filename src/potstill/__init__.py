"""potstill: LLM model distillation: doing it, detecting it, and defending against it.

The top-level import stays light (no torch, no transformers): import the
submodules you need, e.g. ``from potstill.losses import forward_kl``.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
