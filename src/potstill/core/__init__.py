"""The shared core under every part: errors, atomic io, fault points, hardware probes, lazy
exports, model specs and loading (:mod:`~potstill.core.models`, :mod:`~potstill.core.tiny`),
tokenizer checks, probe prompts and the keyed watermark scheme (:mod:`~potstill.core.watermark`:
serving embeds it, detection scores it). It imports no part.
"""

__version__ = "0.1.0"
