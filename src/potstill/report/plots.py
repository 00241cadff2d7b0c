"""The run's report: ``report.md`` and the p-value figure (matplotlib imported lazily).

Loss curves are drawn by :mod:`potstill.distill.train.curves`; this module only assembles.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from potstill.core.errors import PotstillError
from potstill.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text


def plot_pvalues(
    rows: Sequence[tuple[str, str, float]], alpha: float, out_png: Path, *, title: str
) -> Path:
    """Bars of ``-log10 p`` for ``(test, model, p)`` rows, with the ``alpha`` line.

    A bar past the dashed line is a flag. p-values below 1e-300 are drawn at 300.
    Writes ``out_png`` atomically and returns it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise PotstillError("no p-values to plot")
    fig = Figure(figsize=(7.5, 0.5 * len(rows) + 1.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    tests = list(dict.fromkeys(r[0] for r in rows))
    heights = [min(300.0, -math.log10(max(r[2], 1e-300))) for r in rows]
    colors = [f"C{tests.index(r[0]) % 10}" for r in rows]
    ax.barh(range(len(rows)), heights, color=colors)
    ax.set_yticks(range(len(rows)), [f"{t}: {m}" for t, m, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(-math.log10(alpha), color="black", linestyle="--", label=f"α = {alpha:g}")
    for i, (h, r) in enumerate(zip(heights, rows)):
        ax.text(h, i, f" p={r[2]:.2g}", va="center", fontsize=8)
    ax.set_xlabel("-log10 p (longer bar = stronger evidence)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(out_png, buf.getvalue())


def _plain(obj: Any) -> Any:
    """Settings/results -> YAML/JSON-safe builtins: pydantic models and dataclasses to
    dicts, scalars unwrapped, non-finite floats to None, anything else (paths) to str."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _plain(obj.item())
    if hasattr(obj, "model_dump") and callable(obj.model_dump):  # pydantic models
        return _plain(obj.model_dump())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    return str(obj)


def write_report(
    out_dir: Path,
    *,
    title: str,
    eval_result: dict[str, Any] | None,
    figures: list[Path],
    settings: dict[str, Any],
    extra_md: str = "",
) -> Path:
    """Write ``out_dir/report.md`` (and ``out_dir/eval.json`` when ``eval_result``
    is given), each atomically; return the report path.

    The report has the title, the settings as a YAML block, the evaluation table
    (:func:`potstill.distill.evaluate.to_markdown`), the figures linked relative to
    ``out_dir``, then ``extra_md``. In ``eval.json`` non-finite floats become null.
    """
    import yaml

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        f"# {title}",
        "",
        "## Settings",
        "",
        "```yaml",
        yaml.safe_dump(_plain(settings), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    if eval_result is not None:
        from potstill.distill.evaluate.metrics import to_markdown

        parts += ["## Held-out evaluation", "", to_markdown(eval_result).rstrip(), ""]
    if figures:
        parts += ["## Figures", ""]
        for fig in figures:
            fig = Path(fig)
            if not fig.is_file():
                raise PotstillError(
                    f"figure {fig} does not exist; create it before writing the report"
                )
            rel = Path(os.path.relpath(fig.resolve(), out_dir.resolve())).as_posix()
            parts += [f"![{fig.stem}]({rel})", ""]
    if extra_md.strip():
        parts += [extra_md.rstrip(), ""]
    if eval_result is not None:
        atomic_write_json(out_dir / "eval.json", _plain(eval_result))
    return atomic_write_text(out_dir / "report.md", "\n".join(parts))
