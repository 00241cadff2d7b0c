"""Every potstill defence inside vLLM's engine: antidistillation, then the watermark.

:class:`PotstillDefences` is :class:`~potstill.serve.vllm_processors.PotstillWatermark` (the
same slot bookkeeping and in-place ``apply``) whose chain also holds the antidistillation
processor of ``potstill serve --antidistill``: the proxy's two one-token passes are batched
over every row vLLM decodes in a step, keyed on the slot's stable key, exactly as in potstill's
engine (:mod:`potstill.defend.antidistill_serve`). Antidistillation runs first and the
watermark last (Gumbel must see the final distribution; KGW stays detectable).

Settings (``additional_config["potstill"]``, :func:`~potstill.serve.vllm_processors.vllm_config_for`):
``watermark`` as for ``PotstillWatermark``, and ``antidistill``: ``{"proxy_dir", "lambda",
"eps"}`` with ``lambda`` and ``eps`` already resolved from the fit (the front end checks the
proxy's tokenizer against the served model's before vLLM starts). The proxy is loaded here, in
vLLM's engine process, on the logits' device.
"""

from __future__ import annotations

from typing import Any

import torch

from potstill.core.errors import PotstillError
from potstill.defend.antidistill_serve import antidistill_processors, compose_processor_builders
from potstill.serve.vllm_processors import Builder, PotstillWatermark, watermark_builder

__all__ = ["PotstillDefences"]


class PotstillDefences(PotstillWatermark):
    """Antidistillation and/or a watermark on every request vLLM serves."""

    def builder(self, settings: dict[str, Any], device: torch.device) -> Builder:
        if "watermark" not in settings and "antidistill" not in settings:
            raise PotstillError(
                "PotstillDefences needs additional_config={'potstill': {'watermark': ..., "
                "'antidistill': ...}} (at least one): build it with "
                "potstill.serve.vllm_processors.vllm_config_for"
            )
        ad = None
        if "antidistill" in settings:
            from potstill.defend.antidistill import load_antidistill

            cfg = settings["antidistill"]
            fit = load_antidistill(cfg["proxy_dir"])
            ad = antidistill_processors(fit, float(cfg["lambda"]), float(cfg["eps"]), device)
        wm = watermark_builder(settings) if "watermark" in settings else None
        build = compose_processor_builders(ad, wm)
        assert build is not None
        return build
