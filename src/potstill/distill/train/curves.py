"""Loss-curve figures from a run's ``metrics.jsonl``.

``metrics.jsonl`` holds one JSON object per line. Training lines carry
``loss`` (and usually ``step``, ``tokens``, ``kd``, ``ce``, ``lr``,
``split: "train"``); evaluation lines carry ``eval_nll`` (and ``step``, maybe
``tokens``, ``split: "eval"``). Other lines are ignored.

matplotlib is imported inside the plotting function and drives the Agg canvas
directly (``Figure`` + ``FigureCanvasAgg``, no pyplot), so ``import potstill``
stays light, no display is needed, and a user's interactive backend is untouched.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from potstill.core.errors import PotstillError
from potstill.core.io import atomic_write_bytes, jsonl_records


def read_metrics(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``[(line_number, record), ...]`` from a JSON-lines file; blank lines skipped.

    Raises :class:`PotstillError` naming the file and line for a line that is not
    a JSON object, and for a missing file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PotstillError(
            f"metrics file {path} not found; point at a run's metrics.jsonl"
        ) from None
    out: list[tuple[int, dict[str, Any]]] = []
    for lineno, rec in jsonl_records(path, text, hint="fix or delete that line"):
        if not isinstance(rec, dict):
            raise PotstillError(f"{path}:{lineno}: expected a JSON object; fix or delete that line")
        out.append((lineno, rec))
    return out


@dataclass
class _Series:
    x_key: str
    train_x: list[float] = field(default_factory=list)
    train_y: list[float] = field(default_factory=list)
    # the objective's terms, per training line (None where a line does not log the term)
    train_ce: list[float | None] = field(default_factory=list)
    train_kd: list[float | None] = field(default_factory=list)
    eval_x: list[float] = field(default_factory=list)
    eval_y: list[float] = field(default_factory=list)


def _num(path: Path, lineno: int, rec: dict[str, Any], key: str) -> float:
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PotstillError(f"{path}:{lineno}: {key!r} is {v!r}, not a number; fix that line")
    return float(v)


def _tokens_at(steps: np.ndarray, tokens: np.ndarray, step: float) -> float:
    """Tokens seen at ``step``: interpolated between logged training steps, and
    scaled proportionally (tokens per step of the nearest end) outside them."""
    if steps[0] <= step <= steps[-1]:
        return float(np.interp(step, steps, tokens))
    i = 0 if step < steps[0] else -1
    return float(tokens[i] / steps[i] * step) if steps[i] > 0 else float(tokens[i])


def _series(path: Path, x_key: str | None = None) -> _Series:
    """Curves of one run. ``x_key`` None: ``"tokens"`` if every training line has
    it, else ``"step"``; pass ``"step"`` to force steps (mixed-run plots)."""
    records = read_metrics(path)
    train = [(n, r) for n, r in records if "loss" in r and r.get("split", "train") == "train"]
    evals = [(n, r) for n, r in records if "eval_nll" in r]
    if not train and not evals:
        raise PotstillError(
            f"{path} has no training ('loss') or eval ('eval_nll') lines; is it a metrics.jsonl?"
        )
    if x_key is None:
        x_key = "tokens" if train and all("tokens" in r for _, r in train) else "step"
    s = _Series(x_key=x_key)
    for n, r in train:
        if x_key not in r:
            raise PotstillError(f"{path}:{n}: training line has no {x_key!r}; fix that line")
        s.train_x.append(_num(path, n, r, x_key))
        s.train_y.append(_num(path, n, r, "loss"))
        s.train_ce.append(_num(path, n, r, "ce") if r.get("ce") is not None else None)
        s.train_kd.append(_num(path, n, r, "kd") if r.get("kd") is not None else None)
    # step -> tokens map from the training lines, to place eval lines without tokens.
    logged = [(n, r) for n, r in train if "step" in r and "tokens" in r]
    steps = np.array([_num(path, n, r, "step") for n, r in logged], dtype=float)
    toks = np.array([_num(path, n, r, "tokens") for n, r in logged], dtype=float)
    order = np.argsort(steps, kind="stable")  # np.interp needs increasing steps
    steps, toks = steps[order], toks[order]
    for n, r in evals:
        if x_key in r:
            x = _num(path, n, r, x_key)
        elif x_key == "tokens" and "step" in r and len(steps) > 0:
            x = _tokens_at(steps, toks, _num(path, n, r, "step"))
        else:
            raise PotstillError(
                f"{path}:{n}: eval line has neither 'tokens' nor 'step'; fix that line"
            )
        s.eval_x.append(x)
        s.eval_y.append(_num(path, n, r, "eval_nll"))
    return s


def _default_label(path: Path) -> str:
    # runs/<name>/metrics.jsonl -> "<name>"
    return path.parent.name if path.stem == "metrics" and path.parent.name else path.stem


def plot_loss_curves(
    metrics_jsonl: Path | Sequence[Path],
    out_png: Path,
    *,
    labels: list[str] | None = None,
    title: str | None = None,
) -> Path:
    """Held-out NLL of one or more runs on one axis, and their training terms on another.

    Left: eval NLL (nats per token), the one number every run shares whatever its objective.
    Right: the objective's terms, CE (solid) and KD (dashed) drawn apart; a mixed "loss" of
    different objectives is never drawn on one axis (a run whose lines log neither term falls
    back to its objective, labelled as such). The x axis is training tokens when every
    training line of every run has ``tokens`` (eval lines without ``tokens`` are placed by
    their ``step``), otherwise the step. Each run gets one colour. Writes ``out_png``
    atomically and returns it. ``labels`` default to the run directory names.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = (
        [Path(metrics_jsonl)]
        if isinstance(metrics_jsonl, (str, Path))
        else [Path(p) for p in metrics_jsonl]
    )
    if not paths:
        raise PotstillError("no metrics files given; pass at least one metrics.jsonl")
    if labels is not None and len(labels) != len(paths):
        raise PotstillError(
            f"{len(labels)} labels for {len(paths)} metrics files; give one label per file"
        )
    names = labels if labels is not None else [_default_label(p) for p in paths]
    series = [_series(p) for p in paths]
    x_key = "tokens" if all(s.x_key == "tokens" for s in series) else "step"
    if x_key == "step":  # some run lacks token counts: put every run on steps
        series = [_series(p, "step") for p in paths]

    fig = Figure(figsize=(11, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    nll, terms = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (name, s) in enumerate(zip(names, series)):
        color = f"C{i % 10}"
        if s.eval_x:
            nll.plot(s.eval_x, s.eval_y, color=color, marker="o", markersize=4, label=name)
        _plot_terms(terms, name, s, color)
    xlabel = "training tokens" if x_key == "tokens" else "step"
    nll.set(xlabel=xlabel, ylabel="held-out NLL (nats per token)", title="held-out NLL")
    if not any(s.eval_x for s in series):
        nll.text(0.5, 0.5, "no eval lines (data.eval unset)", ha="center", transform=nll.transAxes)
    terms.set(xlabel=xlabel, ylabel="nats per token", title="training terms: CE and KD")
    for ax in (nll, terms):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or "Training curves")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(out_png, buf.getvalue())


def _plot_terms(ax: Any, name: str, s: _Series, color: str) -> None:
    """CE solid, KD dashed; the objective itself only when a run logs neither term."""
    drawn = False
    for values, style, term in ((s.train_ce, "-", "CE"), (s.train_kd, "--", "KD")):
        pts = [(x, v) for x, v in zip(s.train_x, values) if v is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=color, linestyle=style, linewidth=1.3, label=f"{name}: {term}")
            drawn = True
    if not drawn and s.train_x:
        ax.plot(s.train_x, s.train_y, color=color, linestyle=":", label=f"{name}: objective")
