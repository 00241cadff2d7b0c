"""Antidistillation on the server: a batched logits processor and ``serve --antidistill``.

The engine calls the processor once per decode step with all of its rows (``DecodeRows``:
stable row keys and contexts, prompt + generated) and their fp32 logits ``[B, V]``, BEFORE
temperature and top-p (like KGW's delta). :class:`AntidistillProcessor` returns
``logits + lam * delta(context)`` per row, so at temperature ``tau`` the effective bias on the
sampled distribution is ``lam * delta / tau``.

Cost: two proxy forward passes of ONE token per step for the whole batch. The processor keeps
its own left-padded batch of both proxies' KV caches, mirroring the engine's rows by key
(:class:`_ProxyBatch`): a row seen at the previous step with one more token is advanced in
that batched pass; a new row (or one whose context changed otherwise) is prefilled, together
with the other new rows, and merged in; rows the engine dropped are dropped at the next call.
Memory is therefore bounded by the engine's batch, not by a cache of past prefixes.

Order on the server: antidistill FIRST, then the watermark, so that the watermark is
applied last (Gumbel must see the final distribution, KGW stays detectable).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from potstill.core.errors import PotstillError

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from potstill.defend.antidistill import AntidistillFit, AntidistillPerturbation
    from potstill.serve.sampling import DecodeRows, LogitsProcessor

__all__ = [
    "AntidistillProcessor",
    "AntidistillSpec",
    "antidistill_processors",
    "antidistill_serving",
    "compose_processor_builders",
    "parse_antidistill_arg",
]

Builder = Callable[[dict[str, Any]], list["LogitsProcessor"]]


class _ProxyBatch:
    """Both proxies' KV caches for a set of rows, left-padded into one batch.

    ``keys[i]`` / ``lengths[i]``: the row held in batch slot ``i`` and how many of its context
    tokens the caches cover; ``deltas[i]``: its delta after those tokens ``[V]``.
    """

    def __init__(self, pert: AntidistillPerturbation) -> None:
        self.pert = pert
        self.keys: list[int] = []
        self.lengths: list[int] = []
        self.deltas: Tensor | None = None
        self.mask: Tensor | None = None  # [B, L] long
        self.past: tuple[Any, Any] | None = None
        self.stats = {"steps": 0, "prefilled_rows": 0}

    def _select(self, slots: list[int]) -> None:
        """Keep batch slots ``slots`` (in that order); trim all-padding leading columns."""
        import torch

        if not slots:
            self.keys, self.lengths, self.deltas, self.mask, self.past = [], [], None, None, None
            return
        if slots == list(range(len(self.keys))):  # the usual decode step: nothing to move
            return
        assert self.mask is not None and self.past is not None and self.deltas is not None
        idx = torch.tensor(slots, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        lead = int((mask.cumsum(-1) == 0).sum(-1).min())
        self.mask = mask[:, lead:]
        for cache in self.past:
            for ly in cache.layers:
                ly.keys = ly.keys.index_select(0, idx)[:, :, lead:]
                ly.values = ly.values.index_select(0, idx)[:, :, lead:]
        self.deltas = self.deltas.index_select(0, idx)
        self.keys = [self.keys[i] for i in slots]
        self.lengths = [self.lengths[i] for i in slots]

    def _step(self, tokens: list[int]) -> None:
        """Advance every held row by one token (``tokens[i]`` for slot ``i``)."""
        import torch

        assert self.mask is not None
        dev = self.mask.device
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        ids = torch.tensor(tokens, dtype=torch.long, device=dev)[:, None]
        self.deltas, self.past = self.pert(ids, self.mask, self.past)
        self.lengths = [n + 1 for n in self.lengths]
        self.stats["steps"] += 1

    def _add(self, keys: list[int], contexts: list[Sequence[int]]) -> None:
        """Prefill new rows together (left-padded) and append them to the batch."""
        import torch
        import torch.nn.functional as F

        width = max(len(c) for c in contexts)
        ids = torch.zeros((len(contexts), width), dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for r, c in enumerate(contexts):
            ids[r, width - len(c) :] = torch.tensor(list(c), dtype=torch.long)
            mask[r, width - len(c) :] = 1
        dev = self.pert.device
        deltas, past = self.pert(ids.to(dev), mask.to(dev))
        mask = mask.to(dev)
        if self.mask is None or self.past is None or self.deltas is None:
            self.mask, self.past, self.deltas = mask, past, deltas
        else:
            old, new = self.mask.shape[1], mask.shape[1]
            pad_old, pad_new = max(old, new) - old, max(old, new) - new
            self.mask = torch.cat([F.pad(self.mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
            for held, fresh in zip(self.past, past):
                for a, b in zip(held.layers, fresh.layers):
                    a.keys = torch.cat(
                        [F.pad(a.keys, (0, 0, pad_old, 0)), F.pad(b.keys, (0, 0, pad_new, 0))]
                    )
                    a.values = torch.cat(
                        [F.pad(a.values, (0, 0, pad_old, 0)), F.pad(b.values, (0, 0, pad_new, 0))]
                    )
            self.deltas = torch.cat([self.deltas, deltas])
        self.keys += keys
        self.lengths += [len(c) for c in contexts]
        self.stats["prefilled_rows"] += len(keys)

    def sync(self, rows: DecodeRows) -> Tensor:
        """``delta [B, V]`` for ``rows`` (in their order), the caches brought up to date.

        A row one token ahead of its cache is stepped (all such rows in one pass); any other
        row (new, or repeated after a failed call) is prefilled; rows the engine dropped are
        dropped. After an error the batch is emptied, so the next call starts clean.
        """
        import torch

        try:
            slot = {k: i for i, k in enumerate(self.keys)}
            ahead, fresh = [], []
            for r, (k, ctx) in enumerate(zip(rows.keys, rows.contexts)):
                i = slot.get(k)
                (ahead if i is not None and len(ctx) == self.lengths[i] + 1 else fresh).append(r)
            self._select([slot[rows.keys[r]] for r in ahead])
            if ahead:
                self._step([int(rows.contexts[r][-1]) for r in ahead])
            if fresh:
                self._add([rows.keys[r] for r in fresh], [rows.contexts[r] for r in fresh])
            assert self.deltas is not None
            if list(rows.keys) == self.keys:
                return self.deltas
            order = {k: i for i, k in enumerate(self.keys)}
            index = torch.tensor([order[k] for k in rows.keys], device=self.deltas.device)
            return self.deltas.index_select(0, index)
        except BaseException:
            self._select([])
            raise


class AntidistillProcessor:
    """Batched processor ``(rows, logits [B, V] fp32) -> logits + lam * delta [B, V]``.

    ``perturbation`` may be None only when ``lam == 0``; with ``lam == 0`` the input
    ``logits`` object is returned as is (bit-identical) and no proxy runs. Thread-safe (one
    lock). ``stats``: ``steps`` (batched one-token passes), ``prefilled_rows``.
    """

    def __init__(self, perturbation: AntidistillPerturbation | None, lam: float) -> None:
        if not (math.isfinite(lam) and lam >= 0):
            raise PotstillError(f"antidistill lambda must be a finite number >= 0, got {lam}")
        if perturbation is None and lam != 0:
            raise ValueError("a perturbation is needed when lam != 0")
        self.perturbation, self.lam = perturbation, float(lam)
        self._batch = _ProxyBatch(perturbation) if perturbation is not None else None
        self._lock = threading.Lock()

    def __call__(self, rows: DecodeRows, scores: Tensor) -> Tensor:
        if self.lam == 0:
            return scores
        return self.apply_(rows, scores.clone())

    def apply_(self, rows: DecodeRows, scores: Tensor) -> Tensor:
        """:meth:`__call__` in place on ``scores`` (returned). Columns past the proxy's logits
        (a served model with a padded vocabulary) are left as they are."""
        if self.lam == 0:
            return scores
        delta = self.deltas(rows, vocab_size=int(scores.shape[-1]))
        w = delta.shape[-1]
        scores[:, :w].add_(delta.to(device=scores.device, dtype=scores.dtype), alpha=self.lam)
        return scores

    def deltas(self, rows: DecodeRows, *, vocab_size: int | None = None) -> Tensor:
        """``delta [B, vocab_size]`` fp32 for ``rows``' contexts."""
        if self._batch is None:
            raise ValueError("this processor has no perturbation (lam == 0)")
        if any(len(c) < 1 for c in rows.contexts):
            raise ValueError("every row needs at least one context token")
        with self._lock:
            d = self._batch.sync(rows)
        return d[:, :vocab_size] if vocab_size is not None else d

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._batch.stats) if self._batch is not None else {}

    def clear(self) -> None:
        """Drop every held row (the next call prefills)."""
        with self._lock:
            if self._batch is not None:
                self._batch = _ProxyBatch(self._batch.pert)


def antidistill_processors(
    fit: AntidistillFit,
    lam: float,
    eps: float,
    device: Any = "cpu",
    *,
    proxy: PreTrainedModel | None = None,
) -> Builder:
    """A builder for ``ServeSettings.processors``: request record -> ``[processor]``.

    One processor (and one batch of proxy caches) is shared by all requests. ``proxy``: the proxy model (default: loaded from
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
            from potstill.core.models import load_model

            proxy, _ = load_model(fit.proxy_spec)
        pert = AntidistillPerturbation(proxy, fit.grads, eps, device=device)
        proc = AntidistillProcessor(pert, lam)
    return lambda rec: [proc]


def compose_processor_builders(*builders: Builder | None) -> Builder | None:
    """One builder whose chain is the builders' chains concatenated in order (None skipped);
    None when every builder is None."""
    live = [b for b in builders if b is not None]
    if not live:
        return None

    def build(rec: dict[str, Any]) -> list[LogitsProcessor]:
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
    from potstill.core.models import load_model
    from potstill.core.tokenizers import check_tokenizers_agree, tokenizer_fingerprint
    from potstill.defend.antidistill import check_grads, load_antidistill

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
        from potstill.core.models import load_tokenizer

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
