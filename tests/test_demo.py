"""`potstill demo` end to end on tiny models, and its shipped config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from potstill.cli import main
from potstill.demo import DEFAULTS, demo_configs
from potstill.distill.config import DistillConfig, load_config

from .conftest import REPO


def test_shipped_demo_config_equals_the_embedded_defaults() -> None:
    kd, base = demo_configs(DEFAULTS, Path("runs/demo"))
    assert load_config(DistillConfig, REPO / "configs" / "demo.yaml") == kd
    # The baseline differs from the distilled run in the objective alone.
    assert base.loss.ce_weight == 1.0
    assert base.model_dump(exclude={"loss", "out_dir"}) == kd.model_dump(
        exclude={"loss", "out_dir"}
    )


def test_demo_runs_end_to_end_on_tiny_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--out",
        str(out),
        "--teacher",
        "tiny:0:2x64",
        "--steps",
        "6",
        "--student-layers",
        "1",
        "--student-width",
        "32",
        "--seq-len",
        "32",
        "--micro-batch-size",
        "4",
        "--eval-blocks",
        "4",
        "--train-data",
        "synthetic:0:200",
        "--heldout-data",
        "synthetic:1:40",
        *[
            f"--blackbox-option={kv}"
            for kv in (
                "train_prompts=12",
                "heldout_prompts=4",
                "max_tokens=24",
                "steps=3",
                "micro_batch_size=4",
                "seq_len=256",
                "max_batch=8",
                "context_width=1",
                "delta=4.0",
                "temperature=2.0",
                "provenance_prompts=12",
                "provenance_tokens=8",
            )
        ],
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| teacher" in printed and "report:" in printed
    result = json.loads((out / "eval.json").read_text())
    for who in ("teacher", "student", "baseline"):
        assert result[who]["n_tokens"] > 0
    assert "gap_recovered" in result
    bb = result["blackbox"]
    assert bb["harvest"]["train_records"] == 12 and bb["harvest"]["max_batch_seen"] > 1
    assert 0.0 <= bb["p_student"] <= 1.0 and 0.0 <= bb["p_control"] <= 1.0
    for who in ("student", "control"):
        soft, hard = bb["audit"][who]["soft"], bb["audit"][who]["argmax"]
        assert soft["settings"]["score"] == "soft" and soft["n_scored"] > 0
        assert soft["p_value"] == bb["p_student" if who == "student" else "p_control"]
        assert hard["n_scored"] > 0
        prov = bb["provenance"][who]
        assert prov["statistic"] == "agreement" and prov["n_prompts"] == 12
        assert [c["control"] for c in prov["comparisons"]] == ["start", "baseline"]
    assert bb["n_heldout_tokens"] > 0
    assert bb["audit"]["student"]["soft_mean"]["settings"]["weighting"] == "mean"
    assert "radioactivity, soft (sum)" in printed and "provenance (no watermark)" in printed
    assert (out / "audit_pvalues.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "audit_pvalues.png" in report
    assert "by chance" in report or "no preference" in report
    assert (out / "report.md").is_file()
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    # A rerun resumes: both students are already trained, nothing is retrained.
    before = (out / "distilled" / "metrics.jsonl").read_text()
    assert main(argv) == 0
    assert (out / "distilled" / "metrics.jsonl").read_text() == before
