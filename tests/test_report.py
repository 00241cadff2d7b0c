"""potstill.report: loss-curve PNGs and report.md / eval.json."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from potstill.core.errors import PotstillError
from potstill.distill.train.curves import _series, _tokens_at
from potstill.report import plot_loss_curves, read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass
class Opt:
    lr: float


def write_run(path: Path, *, decay: float, with_tokens: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(10, 210, 10):
        rec: dict[str, object] = {"step": step, "loss": 4.0 * math.exp(-decay * step) + 1.0}
        if with_tokens:
            rec |= {"tokens": step * 2048, "kd": 0.5, "ce": 3.0, "lr": 1e-3}
        rec["split"] = "train"
        lines.append(json.dumps(rec))
        if step % 50 == 0:
            lines.append(
                json.dumps(
                    {"step": step, "eval_nll": 1.2 + 3 * math.exp(-decay * step), "split": "eval"}
                )
            )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plot_is_a_real_png(tmp_path: Path) -> None:
    a = write_run(tmp_path / "distilled" / "metrics.jsonl", decay=0.03)
    b = write_run(tmp_path / "baseline" / "metrics.jsonl", decay=0.01)
    out = tmp_path / "figs" / "loss.png"
    assert plot_loss_curves([a, b], out, title="KD vs baseline") == out
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    # A PNG's IHDR gives width/height: 11x4.5 in at 120 dpi (NLL and terms side by side).
    assert int.from_bytes(data[16:20], "big") == 1320 and int.from_bytes(data[20:24], "big") == 540
    assert sorted(p.name for p in out.parent.iterdir()) == ["loss.png"]  # no temp files left
    single = plot_loss_curves(a, tmp_path / "one.png", labels=["kd"])
    assert single.read_bytes()[:8] == PNG_MAGIC


def test_series_places_eval_by_tokens(tmp_path: Path) -> None:
    p = write_run(tmp_path / "r" / "metrics.jsonl", decay=0.02)
    s = _series(p)
    assert s.x_key == "tokens"
    assert s.train_x[:2] == [10 * 2048, 20 * 2048] and len(s.train_y) == 20
    assert s.train_ce == [3.0] * 20 and s.train_kd == [0.5] * 20  # the terms, kept apart
    # Eval lines have only "step": mapped through the train lines' step -> tokens.
    assert s.eval_x == [50 * 2048, 100 * 2048, 150 * 2048, 200 * 2048]
    assert s.eval_y[0] == pytest.approx(1.2 + 3 * math.exp(-1.0))
    steps, toks = np.array([10.0, 20.0]), np.array([100.0, 300.0])
    assert _tokens_at(steps, toks, 15) == 200.0  # interpolated
    assert _tokens_at(steps, toks, 40) == 600.0  # 300 tokens / 20 steps, proportional
    assert _tokens_at(steps, toks, 5) == 50.0
    # Without token counts the x axis is the step.
    q = write_run(tmp_path / "q" / "metrics.jsonl", decay=0.02, with_tokens=False)
    sq = _series(q)
    assert sq.x_key == "step" and sq.eval_x == [50, 100, 150, 200]
    assert sq.train_ce == [None] * 20  # no terms logged: the plot falls back to the objective
    # Mixed runs fall back to steps for both and still plot.
    out = plot_loss_curves([p, q], tmp_path / "mixed.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_malformed_metrics_line(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": \n')
    with pytest.raises(PotstillError, match=r"metrics\.jsonl:3: not valid JSON"):
        plot_loss_curves(p, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    p.write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n')
    with pytest.raises(PotstillError, match=r":2: expected a JSON object"):
        read_metrics(p)
    p.write_text('{"step": 1, "loss": "nan?"}\n')
    with pytest.raises(PotstillError, match=r":1: 'loss' is 'nan\?', not a number"):
        plot_loss_curves(p, tmp_path / "x.png")
    p.write_text('{"note": "hello"}\n')
    with pytest.raises(PotstillError, match="no training"):
        plot_loss_curves(p, tmp_path / "x.png")
    with pytest.raises(PotstillError, match="not found"):
        plot_loss_curves(tmp_path / "nope.jsonl", tmp_path / "x.png")
    good = write_run(tmp_path / "g" / "metrics.jsonl", decay=0.1)
    with pytest.raises(PotstillError, match="one label per file"):
        plot_loss_curves([good], tmp_path / "x.png", labels=["a", "b"])


def test_write_report(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run" / "metrics.jsonl", decay=0.03)
    fig = plot_loss_curves(run, tmp_path / "run" / "figs" / "loss.png")
    result = {
        "teacher": {"nll": 2.0, "ppl": math.exp(2.0), "n_tokens": 64},
        "student": {"nll": 2.5, "ppl": math.exp(2.5), "n_tokens": 64,
                    "top1_agreement": 0.5, "kl_teacher_student": 0.25},
        "baseline": {"nll": 3.0, "ppl": math.inf, "n_tokens": 64,
                     "top1_agreement": 0.25, "kl_teacher_student": 0.75},
        "gap_recovered": None, "gap_recovered_warning": "undefined: inf", "n_tokens": 64,
    }  # fmt: skip
    settings = {
        "loss": "forward_kl", "temperature": 2.0, "out": tmp_path / "run", "layers": (1, 2),
        "opt": Opt(lr=0.001), "steps": np.int64(100),
    }  # fmt: skip
    md_path = write_report(
        tmp_path / "run", title="Distillation run", eval_result=result, figures=[fig],
        settings=settings, extra_md="Notes: tiny smoke run.",
    )  # fmt: skip
    assert md_path == tmp_path / "run" / "report.md"
    md = md_path.read_text()
    assert md.startswith("# Distillation run\n")
    assert "| model | NLL" in md and "| student | 2.5000 | 12.182 | 50.0% | 0.2500 |" in md
    assert "| baseline | 3.0000 | inf |" in md
    assert "![loss](figs/loss.png)" in md
    assert (md_path.parent / "figs" / "loss.png").is_file()
    assert "temperature: 2.0" in md and f"out: {tmp_path / 'run'}" in md
    assert "opt:\n  lr: 0.001\n" in md and "steps: 100\n" in md and "- 1\n- 2\n" in md
    assert md.rstrip().endswith("Notes: tiny smoke run.")
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["student"] == result["student"]
    assert ev["baseline"]["ppl"] is None  # inf is not JSON
    assert ev["gap_recovered"] is None

    # No eval result: report without the table and no eval.json.
    other = tmp_path / "other"
    md2 = write_report(other, title="t", eval_result=None, figures=[fig], settings={}).read_text()
    assert "| model |" not in md2 and not (other / "eval.json").exists()
    assert "![loss](../run/figs/loss.png)" in md2
    with pytest.raises(PotstillError, match="does not exist"):
        write_report(other, title="t", eval_result=None, figures=[other / "x.png"], settings={})
