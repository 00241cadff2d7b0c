"""Antidistillation sampling (Savani et al. 2025): the proxy gradient and the logit perturbation.

The served teacher adds ``lam * delta`` to its next-token logits, where ``delta`` estimates
how much sampling each token would *raise* a proxy student's held-out loss if the proxy were
trained on it. With proxy parameters ``theta`` and ``g = grad_theta L(theta)`` (``L``: the
proxy's token-mean cross-entropy on held-out teacher outputs):

* training on token ``x`` moves ``theta`` along ``grad log p(x)``, so ``L`` changes by about
  ``eta * <grad log p(x), g>`` (first order). ``log p(x) = logit(x) - logsumexp``; the
  normaliser is the same for every candidate ``x`` and only shifts all logits equally, so the
  per-token score is ``<grad logit(x), g>``, a directional derivative of the logits along ``g``;
* it is estimated with one central finite difference, i.e. two extra forward passes::

      delta = [ logits_{theta + eps g}(ctx) - logits_{theta - eps g}(ctx) ] / (2 eps)   [V], fp32

  (error ``O(eps^2 |g|^3)`` from curvature, plus fp32 cancellation ``~1e-7 |logit| / eps``).

This module: :func:`fit_antidistill_grad` (``g`` from data), :func:`save_antidistill` /
:func:`load_antidistill` (a fit directory), :class:`AntidistillPerturbation` (the two shifted
fp32 proxies, batched + incremental). The server side (per-row processor with a prefix KV
cache, ``--antidistill`` parsing) is :mod:`potstill.defend.antidistill_serve`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from potstill.core.errors import PotstillError
from potstill.core.kvcache import cache_kw
from potstill.core.tokenizers import logit_width

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from transformers import PreTrainedModel

__all__ = [
    "DEFAULT_STEP_NORM",
    "GRAD_FILE",
    "META_FILE",
    "AntidistillFit",
    "AntidistillPerturbation",
    "check_grads",
    "delta_sigma",
    "fit_antidistill_grad",
    "load_antidistill",
    "save_antidistill",
    "suggested_eps",
    "trainable_parameters",
]

GRAD_FILE = "antidistill_grad.safetensors"
META_FILE = "antidistill.json"
FORMAT_VERSION = 1
_REQUIRED_META = ("proxy", "tokenizer_fingerprint", "data", "n_tokens", "loss", "grad_norm")
_FIX = "run `potstill defend fit-antidistill --proxy SPEC --data SRC --out DIR`"


def trainable_parameters(model: PreTrainedModel) -> dict[str, torch.nn.Parameter]:
    """``name -> parameter`` for every parameter that requires grad; tied weights once
    (``named_parameters`` drops duplicates, e.g. a tied ``lm_head.weight``)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- fitting
def fit_antidistill_grad(
    proxy: PreTrainedModel,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """``g = grad_theta`` of the proxy's TOKEN-mean cross-entropy over all ``batches``.

    ``batches`` yields ``(input_ids [B, T] long, labels [B, T] long)``; labels are aligned
    with logits (``labels[:, t]`` is the target of position ``t``, as
    :func:`potstill.distill.data.make_labels` builds them), ``-100`` = not scored. No attention mask
    is used, so padding must be on the right (causal attention never sees it).

    Per batch the *summed* CE is differentiated and added up; the total is divided by the
    number of scored tokens once at the end, so ``g`` does not depend on how the data is cut
    into batches. Computed in fp32 (a non-fp32 proxy is copied to fp32), in eval mode (no
    dropout); the proxy's ``.grad`` fields are left alone. ``on_batch(n_tokens)`` is called
    after each batch (progress).

    Returns ``(grads, stats)``: ``grads`` maps every trainable parameter name (tied weights
    once) to an fp32 tensor of its shape on the proxy's device; ``stats`` has ``n_tokens``,
    ``loss`` (mean CE, nats/token) and ``grad_norm`` (L2 over all parameters).
    """
    import torch
    import torch.nn.functional as F

    model = proxy
    if any(p.dtype != torch.float32 for p in proxy.parameters()):
        model = copy.deepcopy(proxy).float()
    params = trainable_parameters(model)
    if not params:
        raise PotstillError(
            "the proxy has no trainable parameters: pass a model whose weights require grad"
        )
    names = list(params)
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    dev = next(iter(params.values())).device
    n_tokens, loss_sum = 0, 0.0
    was_training = model.training
    model.eval()
    try:
        for input_ids, labels in batches:
            if input_ids.shape != labels.shape or input_ids.dim() != 2:
                raise ValueError(
                    f"input_ids {tuple(input_ids.shape)} / labels {tuple(labels.shape)}: need equal [B, T]"
                )
            labels = labels.to(dev)
            n = int((labels != -100).sum())
            if n == 0:
                continue
            with torch.enable_grad():
                logits = model(input_ids=input_ids.to(dev), use_cache=False).logits.float()
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                grads = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
            for k, g in zip(names, grads):
                if g is not None:  # an unused parameter (no path to the loss) keeps a zero gradient
                    sums[k] += g.float()
            n_tokens += n
            loss_sum += float(loss.detach())
            if on_batch is not None:
                on_batch(n)
    finally:
        model.train(was_training)
    if n_tokens == 0:
        raise PotstillError(
            "the data has no scored tokens (every label is -100): pass data with targets"
        )
    out = {k: s / n_tokens for k, s in sums.items()}
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in out.values()))
    return out, {"n_tokens": n_tokens, "loss": loss_sum / n_tokens, "grad_norm": norm}


# ----------------------------------------------------------------------------- files
def save_antidistill(out_dir: str | Path, grads: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write ``out_dir/antidistill_grad.safetensors`` then ``out_dir/antidistill.json``.

    Each file is written atomically (temp + fsync + rename). The JSON is written last and
    records the sha256 of the gradient file, so a run interrupted between the two renames
    leaves a mismatch that :func:`load_antidistill` reports instead of a silent mix.
    ``meta`` must hold ``proxy``, ``tokenizer_fingerprint``, ``data``, ``n_tokens``, ``loss``,
    ``grad_norm``; ``format``, ``grad_sha256``, ``n_params`` and ``created`` are added.
    """
    import torch
    from safetensors.torch import save

    from potstill.core.io import atomic_write_bytes, atomic_write_json

    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"save_antidistill: meta lacks {missing}")
    blob = save({n: g.detach().to("cpu", torch.float32).contiguous() for n, g in grads.items()})
    out = Path(out_dir)
    atomic_write_bytes(out / GRAD_FILE, blob)
    record = {
        "format": FORMAT_VERSION,
        **meta,
        "grad_sha256": hashlib.sha256(blob).hexdigest(),
        "n_params": int(sum(g.numel() for g in grads.values())),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(out / META_FILE, record)
    return out


@dataclass(frozen=True)
class AntidistillFit:
    """A loaded fit directory: fp32 CPU gradients ``name -> Tensor`` and the JSON record."""

    path: Path
    grads: dict[str, Tensor]
    meta: dict[str, Any]

    @property
    def proxy_spec(self) -> str:
        return str(self.meta["proxy"])

    @property
    def grad_sha256(self) -> str:
        return str(self.meta["grad_sha256"])

    @property
    def grad_norm(self) -> float:
        return float(self.meta["grad_norm"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.meta["tokenizer_fingerprint"])


def load_antidistill(path: str | Path, proxy: PreTrainedModel | None = None) -> AntidistillFit:
    """Read a :func:`save_antidistill` directory; with ``proxy``, also :func:`check_grads`.

    PotstillError (naming the fix) for a missing directory or file, unreadable JSON, a
    gradient file whose sha256 differs from the record, or a gradient that does not match
    ``proxy``'s parameter names/shapes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    d = Path(path).expanduser()
    where = f"antidistill dir {str(path)!r}"
    if not d.is_dir():
        raise PotstillError(f"{where} not found: {_FIX.replace('DIR', str(path))}")
    meta_path, grad_path = d / META_FILE, d / GRAD_FILE
    if not meta_path.is_file() or not grad_path.is_file():
        raise PotstillError(
            f"{where} lacks {META_FILE} or {GRAD_FILE}: {_FIX.replace('DIR', str(path))}"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PotstillError(f"{where}: unreadable {META_FILE} ({exc}); {_FIX}") from exc
    missing = [
        k for k in (*_REQUIRED_META, "grad_sha256") if not isinstance(meta, dict) or k not in meta
    ]
    if missing:
        raise PotstillError(f"{where}: {META_FILE} lacks {', '.join(missing)}; {_FIX}")
    blob = grad_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["grad_sha256"]:
        raise PotstillError(
            f"{where}: {GRAD_FILE} does not match the sha256 in {META_FILE} (an interrupted or "
            f"mixed write); {_FIX.replace('DIR', str(path))} again"
        )
    try:
        grads = load(blob)
    except SafetensorError as exc:
        raise PotstillError(f"{where}: unreadable {GRAD_FILE} ({exc}); {_FIX}") from exc
    fit = AntidistillFit(d, grads, meta)
    if proxy is not None:
        check_grads(proxy, grads, where=where)
    return fit


def check_grads(
    proxy: PreTrainedModel, grads: dict[str, Tensor], *, where: str = "the gradient"
) -> None:
    """PotstillError unless ``grads`` has exactly ``proxy``'s trainable names and shapes."""
    params = trainable_parameters(proxy)
    fix = f"refit it for this proxy ({_FIX})"
    extra, missing = sorted(set(grads) - set(params)), sorted(set(params) - set(grads))
    if extra or missing:
        what = f"missing {missing[:3]}" if missing else f"unknown {extra[:3]}"
        raise PotstillError(f"{where} does not match the proxy's parameters ({what}): {fix}")
    for n, p in params.items():
        if tuple(grads[n].shape) != tuple(p.shape):
            raise PotstillError(
                f"{where}: parameter {n!r} has shape {tuple(grads[n].shape)}, the proxy's is "
                f"{tuple(p.shape)}: {fix}"
            )


# ----------------------------------------------------------------------------- perturbation
def _shifted_copy(
    proxy: PreTrainedModel, grads: dict[str, Tensor], step: float, device: Any
) -> PreTrainedModel:
    """An fp32 eval-mode copy of ``proxy`` with every trainable parameter ``p + step * g``."""
    import torch

    model = copy.deepcopy(proxy)
    model.to(device=device, dtype=torch.float32)  # type: ignore[call-arg]  # mistyped .to
    model.eval()
    with torch.no_grad():
        # deepcopy keeps tied weights tied, and trainable_parameters lists them once:
        # each shared tensor is shifted exactly once.
        for n, p in trainable_parameters(model).items():
            p.add_(grads[n].to(device=p.device, dtype=torch.float32), alpha=step)
    model.requires_grad_(False)
    return model


class AntidistillPerturbation:
    """The two shifted proxies ``theta +- eps g`` (fp32, eval, no grad) and the finite difference.

    ``__call__(input_ids [B, T], attention_mask [B, L] | None, past) -> (delta [B, V] fp32,
    past)`` with ``delta = (logits_plus - logits_minus) / (2 eps)`` at the last position
    (``lam`` is NOT applied). HF-style incremental use: ``past`` (a pair of caches, one per
    proxy) is extended in place and returned; with ``past`` given, ``input_ids`` holds only
    the new tokens and ``attention_mask`` covers all ``L = past + T`` columns. Left padding
    is supported through ``position_ids = cumsum(mask) - 1`` (what HF Llama needs); without
    a mask positions continue from the cache length. ``vocab_size``: return exactly the
    first ``vocab_size`` columns (the proxy's head may be padded wider than the teacher's).
    """

    def __init__(
        self, proxy: PreTrainedModel, grads: dict[str, Tensor], eps: float, *, device: Any = None
    ) -> None:
        if not (math.isfinite(eps) and eps > 0):
            raise PotstillError(
                f"antidistill eps must be a finite number > 0, got {eps}: e.g. eps=1e-3"
            )
        check_grads(proxy, grads)
        device = device if device is not None else next(proxy.parameters()).device
        self.eps = float(eps)
        self.plus = _shifted_copy(proxy, grads, self.eps, device)
        self.minus = _shifted_copy(proxy, grads, -self.eps, device)
        self.vocab_size = logit_width(self.plus)
        self._cache_kw = cache_kw(self.plus)

    @property
    def device(self) -> torch.device:
        return next(self.plus.parameters()).device

    def new_past(self) -> tuple[Any, Any]:
        """An empty cache pair ``(plus, minus)``."""
        from transformers import DynamicCache

        return DynamicCache(config=self.plus.config), DynamicCache(config=self.minus.config)

    def _last_logits(
        self, model: PreTrainedModel, ids: Tensor, mask: Tensor | None, pos: Tensor, cache: Any
    ) -> Tensor:
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        return out.logits[:, -1].float()

    def __call__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        past: tuple[Any, Any] | None = None,
        *,
        vocab_size: int | None = None,
    ) -> tuple[Tensor, tuple[Any, Any]]:
        import torch

        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
        if vocab_size is not None and vocab_size > self.vocab_size:
            raise PotstillError(
                f"the antidistill proxy has {self.vocab_size} logits but the served model needs "
                f"{vocab_size}: use a proxy whose vocabulary covers the served tokenizer"
            )
        dev = self.device
        b, t = input_ids.shape
        with torch.inference_mode():
            past = self.new_past() if past is None else past
            done = past[0].get_seq_length()
            ids = input_ids.to(dev)
            mask = None
            if attention_mask is None:
                pos = torch.arange(done, done + t, device=dev).expand(b, t)
            else:
                mask = attention_mask.to(dev)
                if tuple(mask.shape) != (b, done + t):
                    raise ValueError(
                        f"attention_mask {tuple(mask.shape)} != [B, past + T] = {(b, done + t)}"
                    )
                pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            plus = self._last_logits(self.plus, ids, mask, pos, past[0])
            minus = self._last_logits(self.minus, ids, mask, pos, past[1])
            delta = (plus - minus) / (2.0 * self.eps)
        if vocab_size is not None:
            delta = delta[:, :vocab_size]
        return delta, past


# ----------------------------------------------------------------------------- scale
# A raw lambda means nothing until delta's size is known: |delta| grows with |g| and differs
# by orders of magnitude between proxies (51 vs 13 for two tiny proxies of one benchmark).
# fit-antidistill therefore records a finite-difference step of fixed parameter-space length
# and delta's typical spread, so `serve --antidistill bias=B` can mean "B nats of logit shift".
DEFAULT_STEP_NORM = 1e-2  # eps * |g|: the L2 length of the finite-difference parameter move


def suggested_eps(grad_norm: float, step_norm: float = DEFAULT_STEP_NORM) -> float:
    """``eps`` whose parameter move ``eps * g`` has L2 norm ``step_norm``."""
    if not (grad_norm > 0 and math.isfinite(grad_norm)):
        raise PotstillError(f"|g| = {grad_norm}: the proxy gradient is zero or not finite; refit")
    return step_norm / grad_norm


def delta_sigma(
    pert: AntidistillPerturbation,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    top_k: int = 64,
) -> float:
    """Typical spread of ``delta`` (logit units per unit lambda): the RMS over scored positions
    of delta's standard deviation across the proxy's ``top_k`` most likely next tokens (the
    candidates sampling actually chooses among; the long tail of the vocabulary would dominate
    a full-vocabulary spread and say nothing about sampling).

    ``batches`` yields ``(input_ids [B, T], labels [B, T])`` as for
    :func:`fit_antidistill_grad` (right padding, ``labels != -100`` marks scored positions).
    """
    import torch

    total, n = 0.0, 0
    with torch.inference_mode():
        for ids, labels in batches:
            ids = ids.to(pert.device)
            scored = (labels != -100).to(pert.device)
            if not bool(scored.any()):
                continue
            plus = pert.plus(input_ids=ids, use_cache=False).logits.float()
            minus = pert.minus(input_ids=ids, use_cache=False).logits.float()
            delta = ((plus - minus) / (2.0 * pert.eps))[scored]  # [N, V]
            mid = ((plus + minus) / 2)[scored]  # ~ the proxy's own logits
            top = mid.topk(min(top_k, mid.shape[-1]), dim=-1).indices
            total += float(delta.gather(-1, top).std(dim=-1).pow(2).sum())
            n += int(scored.sum())
    if n == 0:
        raise PotstillError("no scored tokens to measure delta's spread on: pass more data")
    return math.sqrt(total / n)
