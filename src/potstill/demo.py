"""``potstill demo``: distill a real teacher into a small student, end to end, on a CPU.

One run trains two students of the same shape, from the same initialisation, on
the same Shakespeare tokens: one distilled from the teacher (forward KL on the
full vocabulary), one baseline on cross-entropy alone. Both are then evaluated
against the teacher on held-out plays, and the report folder gets the table,
the loss curves and every setting. Rerunning the demo resumes where it stopped.

The defaults below are sized to finish in under 10 minutes on 2 CPU cores
(measured figures are in the README).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from potstill.distill.config import DistillConfig

# The embedded defaults of `make demo`. configs/demo.yaml is the same distilled
# run as a file (a test keeps them equal).
DEFAULTS: dict[str, Any] = {
    "teacher": "smollm2-135m-instruct",
    "teacher_dtype": "auto",
    "steps": 40,
    "student_layers": 4,
    "student_width": 256,
    "seq_len": 128,
    "micro_batch_size": 8,
    "eval_blocks": 24,
    "train": "shakespeare:train",
    "heldout": "shakespeare:heldout",
}


@dataclass
class DemoSettings:
    """What the demo runs; any field left None takes its value from DEFAULTS."""

    out_dir: Path = Path("runs/demo")
    teacher: str | None = None
    teacher_dtype: str | None = None
    steps: int | None = None
    student_layers: int | None = None
    student_width: int | None = None
    seq_len: int | None = None
    micro_batch_size: int | None = None
    eval_blocks: int | None = None
    train: str | None = None
    heldout: str | None = None
    blackbox: bool = True
    blackbox_overrides: dict[str, Any] = field(default_factory=dict)
    resolved: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> dict[str, Any]:
        vals = {
            k: getattr(self, k) if getattr(self, k) is not None else v for k, v in DEFAULTS.items()
        }
        self.resolved = vals
        return vals


def demo_configs(s: dict[str, Any], out: Path) -> tuple[DistillConfig, DistillConfig]:
    """The distilled and baseline configs: identical except the objective."""
    common = {
        "teacher": {"spec": s["teacher"], "dtype": s["teacher_dtype"]},
        "student": {"layers": s["student_layers"], "width": s["student_width"], "seed": 0},
        "optim": {"lr": 2e-3, "warmup_steps": 10, "min_lr_ratio": 0.1, "weight_decay": 0.1},
        # held-out NLL every 5 steps on 8 blocks: the curve both students share
        "data": {
            "train": s["train"],
            "eval": s["heldout"],
            "eval_blocks": 8,
            "seq_len": s["seq_len"],
            "packing": True,
        },
        "train": {
            "steps": s["steps"],
            "micro_batch_size": s["micro_batch_size"],
            "grad_accum": 1,
            "seed": 0,
            "eval_every": 5,
            "save_every": 20,
            "log_every": 1,
        },
    }
    kd = DistillConfig.model_validate(
        {
            **common,
            "out_dir": str(out / "distilled"),
            "loss": {"kind": "forward_kl", "ce_weight": 0.0},
        }
    )
    base = DistillConfig.model_validate(
        {
            **common,
            "out_dir": str(out / "baseline"),
            "loss": {"kind": "forward_kl", "ce_weight": 1.0},
        }
    )
    return kd, base


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    from rich.console import Console

    from potstill.core.models import load_model
    from potstill.distill.evaluate import to_markdown
    from potstill.distill.train.recipe import run_distill
    from potstill.report import plot_loss_curves, write_report

    console = Console()
    s = settings.resolve()
    out = settings.out_dir
    t_start = time.perf_counter()
    console.rule("[bold]potstill demo: distill a real teacher on 2 CPU cores")
    console.print(
        f"teacher {s['teacher']}; student {s['student_layers']}x{s['student_width']} Llama; "
        f"{s['steps']} steps x {s['micro_batch_size']} x {s['seq_len']} tokens each"
    )
    t0 = time.perf_counter()
    teacher_model, tokenizer = load_model(s["teacher"])  # converts the GGUF once, then cached
    console.print(f"teacher ready in {time.perf_counter() - t0:.1f}s")
    kd_cfg, base_cfg = demo_configs(s, out)
    timings: dict[str, float] = {}
    for name, cfg in (("distilled", kd_cfg), ("baseline", base_cfg)):
        console.print(f"[bold]training the {name} student[/] -> {cfg.out_dir}")
        t0 = time.perf_counter()
        run_distill(cfg, resume=True)
        timings[f"train_{name}_s"] = round(time.perf_counter() - t0, 1)

    console.print("[bold]evaluating teacher, distilled student and baseline on held-out plays")
    t0 = time.perf_counter()
    result = _evaluate_students(s, out, teacher_model, tokenizer)
    timings["eval_s"] = round(time.perf_counter() - t0, 1)
    console.print(to_markdown(result))
    del teacher_model

    extra_md, figures_bb = "", []
    if settings.blackbox:
        extra_md, figures_bb = _blackbox_part(settings, s, console, timings, result)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    result["timings"] = timings

    curves = plot_loss_curves(
        [out / "distilled" / "metrics.jsonl", out / "baseline" / "metrics.jsonl"],
        out / "loss_curves.png",
        labels=["distilled (forward KL)", "baseline (CE)"],
        title="demo: distilled vs baseline student",
    )
    settings_dump = {
        "demo": s,
        "distilled": kd_cfg.model_dump(mode="json"),
        "baseline": base_cfg.model_dump(mode="json"),
        "timings": timings,
    }
    write_report(
        out,
        title="potstill demo: SmolLM2-135M-Instruct -> small Llama",
        eval_result=result,
        figures=[curves, *figures_bb],
        settings=settings_dump,
        extra_md=extra_md,
    )
    gap = result.get("gap_recovered")
    if gap is not None:
        console.print(
            f"[bold green]the distilled student recovered {100 * gap:.1f}% of the teacher gap "
            f"(perplexity) over the CE baseline, at the same tokens"
        )
    console.print(f"report: {out / 'report.md'}  ({timings['total_s']:.0f}s in all)")
    return {"result": result, "settings": asdict(settings) | {"out_dir": str(out)}}


def _blackbox_part(
    settings: DemoSettings,
    s: dict[str, Any],
    console: Any,
    timings: dict[str, float],
    result: dict[str, Any],
) -> tuple[str, list[Path]]:
    """Serve, harvest, distill a thief, audit; adds its timings and result to the demo's."""
    from potstill.demo_blackbox import BLACKBOX_DEFAULTS, run_blackbox

    out = settings.out_dir
    console.rule("[bold]black box: serve a watermarked teacher, harvest it, distill, audit")
    bb_settings = {**BLACKBOX_DEFAULTS, "control_text": s["train"], **settings.blackbox_overrides}
    bb = run_blackbox(
        out / "blackbox",
        teacher=s["teacher"],
        student_init=out / "distilled" / "student",
        baseline=out / "baseline" / "student",
        settings=bb_settings,
        console=console,
    )
    timings.update(bb.timings)
    result["blackbox"] = asdict(bb)
    extra_md = _blackbox_markdown(bb, bb_settings)
    console.print(extra_md)
    return extra_md, [_pvalue_figure(bb, bb_settings, out / "audit_pvalues.png")]


def _pvalue_figure(bb: Any, s: dict[str, Any], path: Path) -> Path:
    from potstill.report import plot_pvalues

    rows = []
    for who, label in (("student", "thief"), ("control", "control")):
        rows.append(("radioactivity (soft)", label, bb.audit[who]["soft"]["p_value"]))
        rows.append(("radioactivity (argmax)", label, bb.audit[who]["argmax"]["p_value"]))
        rows.append(("provenance", label, bb.provenance[who]["p_value"]))
    return plot_pvalues(rows, s["alpha"], path, title="demo audit: thief vs control")


def _explain(test: str, who: str, flagged: bool, p: float) -> str:
    """One sentence a non-statistician can read."""
    odds = f"about 1 in {1 / p:,.0f}" if p > 0 else "smaller than any number we can print"
    if test == "radioactivity":
        if flagged:
            return (
                f"The {who} prefers our watermark's secret green tokens; a model that never "
                f"trained on our watermarked answers would do this by chance {odds}."
            )
        return f"The {who} shows no preference for our watermark's green tokens."
    if flagged:
        return (
            f"The {who} predicts the teacher's next words more often than its own starting point "
            f"and an independent model of the same size; chance gives this {odds}."
        )
    return f"The {who} is not measurably closer to the teacher than the models it is compared with."


def _blackbox_markdown(bb: Any, s: dict[str, Any]) -> str:
    alpha = s["alpha"]
    lines = [
        "## Black box: serve, harvest, distill, audit",
        "",
        f"Harvested {bb.harvest['train_records']} watermarked answers (KGW, gamma={s['gamma']}, "
        f"delta={s['delta']}, context width {s['context_width']}) over loopback HTTP; the server "
        f"batched up to {bb.harvest['max_batch_seen']} sequences at once. The thief trained on "
        "them; the control had the same start and budget and answers that are not the teacher's.",
        "",
        "| held-out teacher answers | NLL (nats/token) |",
        "|---|---|",
        f"| thief before the harvest | {bb.nll_before:.4f} |",
        f"| thief after the harvest | {bb.nll_after:.4f} |",
        "",
        f"({bb.n_heldout_tokens} assistant tokens.)",
        "",
        f"| test (alpha = {alpha:g}) | thief p | control p |",
        "|---|---|---|",
    ]
    tests = (("radioactivity, soft (sum)", "soft"), ("radioactivity, soft (mean)", "soft_mean"),
             ("radioactivity, argmax", "argmax"))  # fmt: skip
    for name, key in tests:
        ps, pc = bb.audit["student"][key]["p_value"], bb.audit["control"][key]["p_value"]
        lines.append(f"| {name} | {ps:.3g} | {pc:.3g} |")
    ps, pc = bb.provenance["student"]["p_value"], bb.provenance["control"]["p_value"]
    lines += [f"| provenance (no watermark) | {ps:.3g} | {pc:.3g} |", ""]
    for who, label in (("student", "thief"), ("control", "control")):
        p_soft = bb.audit[who]["soft"]["p_value"]
        lines.append(f"- {_explain('radioactivity', label, p_soft < alpha, p_soft)}")
        prov = bb.provenance[who]
        lines.append(f"- {_explain('provenance', label, prov['flagged'], prov['p_value'])}")
        lines += [f"  (warning: {w})" for w in prov["warnings"]]
    return "\n".join(lines)


def _evaluate_students(
    s: dict[str, Any], out: Path, teacher_model: Any, tokenizer: Any
) -> dict[str, Any]:
    """Teacher, distilled student and baseline on the same held-out blocks."""
    from potstill.core.models import load_model
    from potstill.distill.evaluate import compare
    from potstill.distill.evaluate.cli import heldout_blocks

    student, _ = load_model(str(out / "distilled" / "student"))
    baseline, _ = load_model(str(out / "baseline" / "student"))
    blocks = heldout_blocks(
        s["heldout"], tokenizer, seq_len=s["seq_len"], max_blocks=s["eval_blocks"]
    )
    vocab = min(
        m.get_output_embeddings().weight.shape[0] for m in (teacher_model, student, baseline)
    )
    return compare(teacher_model, student, blocks, baseline=baseline, vocab_size=vocab)
