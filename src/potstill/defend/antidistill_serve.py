"""Antidistillation on the server: a per-row logits processor and ``serve --antidistill``.

The engine calls a request's processors once per decode step per row with the row's whole
context so far (``ids [T]``: prompt + generated) and its fp32 logits ``[V]``, BEFORE
temperature and top-p (like KGW's delta). :class:`AntidistillProcessor` returns
``logits + lam * delta(ids)``, so at temperature ``tau`` the effective bias on the sampled
distribution is ``lam * delta / tau``. Reported logprobs are the model's raw ones (the
engine never reports processed logits); only the sampled tokens carry the defence.

Cost: two proxy forward passes of ONE token per step. A bounded LRU keyed by the token
prefix (its int64 bytes) keeps both proxies' KV state; a call with ``ids[:T]`` extends the
entry of ``ids[:T-1]`` by one token, and an exact hit (the ``n`` rows of one request at
their first step share the prompt) costs nothing. Entries are never mutated: a fresh cache
object is built over an entry's tensors before each extension (HF's dynamic layers append
with ``torch.cat``, which allocates), so rows sharing a prefix cannot corrupt each other.

Order on the server: antidistill FIRST, then the watermark, so that the watermark is
applied last (Gumbel must see the final distribution, KGW stays detectable).
"""

from __future__ import annotations

import collections
import copy
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from potstill.errors import PotstillError

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from potstill.defend.antidistill import AntidistillFit, AntidistillPerturbation

__all__ = [
    "AntidistillProcessor",
    "AntidistillSpec",
    "antidistill_processors",
    "antidistill_serving",
    "compose_processor_builders",
    "parse_antidistill_arg",
]

Processor = Callable[["Tensor", "Tensor"], "Tensor"]
Builder = Callable[[dict[str, Any]], list[Processor]]


def _fork_cache(cache: Any, config: Any) -> Any:
    """A cache object over the same state as ``cache`` that a forward pass may extend without
    touching ``cache``: zero-copy for plain dynamic layers (they extend by ``torch.cat``),
    a deep copy for any other layer type (sliding windows etc. may write in place)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    new = DynamicCache(config=config)
    layers: list[Any] = list(cache.layers)
    fresh: list[Any] = list(new.layers)
    if len(layers) != len(fresh) or not all(
        type(a) is DynamicLayer and type(b) is DynamicLayer for a, b in zip(layers, fresh)
    ):
        return copy.deepcopy(cache)
    for src, dst in zip(layers, fresh):
        if src.is_initialized:
            dst.lazy_initialization(src.keys, src.values)
            dst.keys, dst.values = src.keys, src.values
    return new


@dataclass
class _Entry:
    past: tuple[Any, Any]  # (plus, minus) caches after the prefix; never extended in place
    delta: Tensor  # [V_proxy] fp32 at the prefix's last position


class AntidistillProcessor:
    """Per-row processor ``(ids [T] long, logits [V] fp32) -> logits + lam * delta [V]``.

    ``perturbation`` may be None only when ``lam == 0``; with ``lam == 0`` the input
    ``logits`` object is returned as is (bit-identical) and no proxy runs. ``max_entries``
    bounds the prefix cache (each entry holds both proxies' KV for its prefix); after an
    extension the parent entry is moved to the eviction end, so it stays available to
    sibling rows in the same decode step while not crowding out live rows. Keep
    ``max_entries >= 2 * concurrent rows``. Thread-safe (one lock).
    ``stats``: ``hits`` (exact prefix), ``extends`` (one new token), ``prefills`` (full).
    """

    def __init__(
        self, perturbation: AntidistillPerturbation | None, lam: float, *, max_entries: int = 64
    ) -> None:
        if not (math.isfinite(lam) and lam >= 0):
            raise PotstillError(f"antidistill lambda must be a finite number >= 0, got {lam}")
        if perturbation is None and lam != 0:
            raise ValueError("a perturbation is needed when lam != 0")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.perturbation, self.lam, self.max_entries = perturbation, float(lam), max_entries
        self._lru: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "extends": 0, "prefills": 0}

    def __call__(self, ids: Tensor, logits: Tensor) -> Tensor:
        if self.lam == 0:
            return logits
        delta = self.delta(ids, vocab_size=int(logits.shape[-1]))
        return logits + self.lam * delta.to(device=logits.device, dtype=logits.dtype)

    def delta(self, ids: Tensor, *, vocab_size: int | None = None) -> Tensor:
        """``delta [vocab_size]`` fp32 for the context ``ids [T]`` (cached by prefix)."""
        import torch

        pert = self.perturbation
        if pert is None:
            raise ValueError("this processor has no perturbation (lam == 0)")
        if ids.dim() != 1 or ids.shape[0] < 1:
            raise ValueError(f"ids must be [T] with T >= 1, got {tuple(ids.shape)}")
        key = ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
        with self._lock:
            entry = self._lru.get(key)
            if entry is not None:
                self._lru.move_to_end(key)
                self.stats["hits"] += 1
            else:
                entry = self._compute(key, ids, pert)
        return entry.delta[:vocab_size] if vocab_size is not None else entry.delta

    def _compute(self, key: bytes, ids: Tensor, pert: AntidistillPerturbation) -> _Entry:
        parent_key = key[:-8]
        parent = self._lru.get(parent_key) if parent_key else None
        if parent is not None:
            past = (
                _fork_cache(parent.past[0], pert.plus.config),
                _fork_cache(parent.past[1], pert.minus.config),
            )
            delta, past = pert(ids[-1:].reshape(1, 1), past=past)
            self._lru.move_to_end(parent_key, last=False)  # evict the parent first
            self.stats["extends"] += 1
        else:
            delta, past = pert(ids.reshape(1, -1))
            self.stats["prefills"] += 1
        entry = _Entry(past, delta[0])
        self._lru[key] = entry
        while len(self._lru) > self.max_entries:
            self._lru.popitem(last=False)
        return entry

    def clear(self) -> None:
        """Drop every cached prefix."""
        with self._lock:
            self._lru.clear()


def antidistill_processors(
    fit: AntidistillFit,
    lam: float,
    eps: float,
    device: Any = "cpu",
    *,
    proxy: PreTrainedModel | None = None,
    max_entries: int = 64,
) -> Builder:
    """A builder for ``ServeSettings.processors``: request record -> ``[processor]``.

    One processor (and one prefix cache) is shared by all requests, so requests with the
    same prompt share their prefill. ``proxy``: the proxy model (default: loaded from
    ``fit.proxy_spec``); with ``lam == 0`` no proxy is loaded at all.
    """
    from potstill.defend.antidistill import AntidistillPerturbation

    if not (math.isfinite(eps) and eps > 0):
        raise PotstillError(
            f"antidistill eps must be a finite number > 0, got {eps}: e.g. eps=1e-3"
        )
    if lam == 0:
        proc = AntidistillProcessor(None, 0.0)
    else:
        if proxy is None:
            from potstill.teachers import load_model

            proxy, _ = load_model(fit.proxy_spec)
        pert = AntidistillPerturbation(proxy, fit.grads, eps, device=device)
        proc = AntidistillProcessor(pert, lam, max_entries=max_entries)
    return lambda rec: [proc]


def compose_processor_builders(*builders: Builder | None) -> Builder | None:
    """One builder whose chain is the builders' chains concatenated in order (None skipped);
    None when every builder is None."""
    live = [b for b in builders if b is not None]
    if not live:
        return None

    def build(rec: dict[str, Any]) -> list[Processor]:
        return [p for b in live for p in b(rec)]

    return build


# ----------------------------------------------------------------------------- serve flag
@dataclass(frozen=True)
class AntidistillSpec:
    """A parsed ``--antidistill proxy=DIR,lambda=L|bias=B[,eps=E]``: exactly one of ``lam``
    and ``bias`` is set; ``eps`` None = the fit's suggested step (see :meth:`resolve`)."""

    proxy_dir: Path
    lam: float | None
    eps: float | None
    bias: float | None = None

    def resolve(self, meta: dict[str, Any]) -> tuple[float, float]:
        """``(lam, eps)`` given the fit's metadata: ``bias`` is in units of the fit's
        ``delta_sigma`` (lam = bias / delta_sigma, i.e. a typical logit shift of ``bias``
        nats), and a missing ``eps`` is the fit's ``suggested_eps``."""
        eps = self.eps if self.eps is not None else meta.get("suggested_eps")
        if eps is None:
            raise PotstillError(
                f"--antidistill proxy={self.proxy_dir} records no suggested eps (an older fit): "
                "pass eps=E or refit with `potstill defend fit-antidistill`"
            )
        if self.lam is not None:
            return self.lam, float(eps)
        sigma = meta.get("delta_sigma")
        if not sigma or not math.isfinite(sigma):
            raise PotstillError(
                f"--antidistill bias= needs the fit's delta_sigma, which {self.proxy_dir} lacks: "
                "pass lambda=L or refit with `potstill defend fit-antidistill`"
            )
        assert self.bias is not None
        return self.bias / float(sigma), float(eps)


_FLAG_FORM = (
    "--antidistill proxy=DIR,bias=B or proxy=DIR,lambda=L[,eps=E] "
    "(e.g. proxy=runs/ad,bias=0.5: a typical logit shift of 0.5 nats)"
)


def parse_antidistill_arg(text: str) -> AntidistillSpec:
    """Parse and check ``proxy=DIR,lambda=L|bias=B[,eps=E]``; PotstillError naming the fix.

    ``DIR`` must be a ``potstill defend fit-antidistill`` output; ``lambda``/``bias >= 0``,
    ``eps > 0``.
    """
    from potstill.defend.antidistill import GRAD_FILE, META_FILE

    fields: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or not name or not value.strip():
            raise PotstillError(f"bad --antidistill item {part!r}: use {_FLAG_FORM}")
        if name not in ("proxy", "lambda", "bias", "eps"):
            raise PotstillError(f"unknown --antidistill field {name!r}: use {_FLAG_FORM}")
        if name in fields:
            raise PotstillError(f"--antidistill field {name!r} given twice: use {_FLAG_FORM}")
        fields[name] = value.strip()
    if "proxy" not in fields:
        raise PotstillError(f"--antidistill lacks proxy: use {_FLAG_FORM}")
    if ("lambda" in fields) == ("bias" in fields):
        raise PotstillError(
            f"--antidistill needs exactly one of lambda= and bias=: use {_FLAG_FORM}"
        )
    nums: dict[str, float] = {}
    for k in [k for k in ("lambda", "bias", "eps") if k in fields]:
        try:
            nums[k] = float(fields[k])
        except ValueError:
            raise PotstillError(
                f"--antidistill {k}={fields[k]!r} is not a number: use {_FLAG_FORM}"
            ) from None
        if not math.isfinite(nums[k]):
            raise PotstillError(f"--antidistill {k} must be finite, got {fields[k]}")
    for k in ("lambda", "bias"):
        if nums.get(k, 0.0) < 0:
            raise PotstillError(f"--antidistill {k} must be >= 0, got {fields[k]} (0 = off)")
    if nums.get("eps", 1.0) <= 0:
        raise PotstillError(f"--antidistill eps must be > 0, got {fields['eps']} (e.g. eps=1e-3)")
    d = Path(fields["proxy"]).expanduser()
    if not (d / META_FILE).is_file() or not (d / GRAD_FILE).is_file():
        raise PotstillError(
            f"--antidistill proxy={fields['proxy']} is not a fit-antidistill output (no {META_FILE} "
            f"or {GRAD_FILE}): make it with `potstill defend fit-antidistill --out {fields['proxy']}`"
        )
    return AntidistillSpec(d, nums.get("lambda"), nums.get("eps"), nums.get("bias"))


def antidistill_serving(
    spec: AntidistillSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_name: str = "served model",
    vocab_size: int,
    device: Any = "cpu",
) -> tuple[Builder, dict[str, Any]]:
    """(processor builder, metadata record) for ``serve --antidistill``.

    Loads the fit and its proxy, checks the proxy's tokenizer against the fit's record and
    against the served model's ``tokenizer``, and that the proxy's logits cover
    ``vocab_size`` (the served model's real vocab). PotstillError on any mismatch.
    """
    from potstill.defend.antidistill import check_grads, load_antidistill
    from potstill.teachers import load_model
    from potstill.teachers.base import check_tokenizers_agree, tokenizer_fingerprint

    fit = load_antidistill(spec.proxy_dir)
    lam, eps = spec.resolve(fit.meta)
    proxy = None
    if lam != 0:
        proxy, proxy_tok = load_model(fit.proxy_spec)
        if tokenizer_fingerprint(proxy_tok) != fit.tokenizer_fingerprint:
            raise PotstillError(
                f"--antidistill {spec.proxy_dir}: proxy {fit.proxy_spec!r} now has another "
                "tokenizer than at fit time: refit with `potstill defend fit-antidistill`"
            )
        check_grads(proxy, fit.grads, where=f"--antidistill {spec.proxy_dir}")
    elif tokenizer_fingerprint(tokenizer) != fit.tokenizer_fingerprint:  # no proxy to load
        from potstill.teachers import load_tokenizer

        proxy_tok = load_tokenizer(fit.proxy_spec)
    else:
        proxy_tok = tokenizer
    check_tokenizers_agree(
        tokenizer, proxy_tok, teacher_name=model_name, student_name=f"proxy {fit.proxy_spec}"
    )
    build = antidistill_processors(fit, lam, eps, device, proxy=proxy)
    if proxy is not None:
        width = build({})[0].perturbation.vocab_size  # type: ignore[attr-defined]
        if width < vocab_size:
            raise PotstillError(
                f"--antidistill proxy {fit.proxy_spec!r} has {width} logits, fewer than the "
                f"served vocabulary ({vocab_size}): use a proxy with the served model's tokenizer"
            )
    meta = {
        "proxy": fit.proxy_spec,
        "proxy_dir": str(spec.proxy_dir),
        "lambda": lam,
        "eps": eps,
        "bias": spec.bias,
        "delta_sigma": fit.meta.get("delta_sigma"),
        "grad_sha256": fit.grad_sha256,
        "grad_norm": fit.grad_norm,
    }
    return build, meta
