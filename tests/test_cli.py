"""The CLI: bad input gives one clear line and exit code 2, and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from potstill.cli import main

from .conftest import REPO, tiny_overrides

TINY = str(REPO / "configs" / "tiny.yaml")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code: int, err: str, needle: str) -> None:
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert "Traceback" not in err


def _tokenizer_mismatch_dir(tmp_path: Path) -> Path:
    """A tiny Llama whose tokenizer is not the tiny byte-level one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "the", "a", "cat", "dog"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    path = tmp_path / "other"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"loss.kindd": "forward_kl"}, "loss.kindd: unknown field"),
        ({"optim.lr": -0.1}, "optim.lr"),
        ({"data.train": "/no/such/file.txt"}, "/no/such/file.txt"),
        ({"teacher.spec": "tiny:zero"}, "tiny:zero"),
    ],
)
def test_distill_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: dict, needle: str
) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "distill", "--config", TINY, *tiny_overrides(out, **extra))
    assert_clean_failure(code, err, needle)
    assert not out.exists()


def test_distill_empty_dataset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "distill", "--config", TINY, *tiny_overrides(out, **{"data.train": str(empty)})
    )
    assert_clean_failure(code, err, str(empty))
    assert not out.exists()


def test_distill_too_little_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("just a few words\n")  # not even one 32-token sequence
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "distill", "--config", TINY, *tiny_overrides(out, **{"data.train": str(small)})
    )
    assert_clean_failure(code, err, "seq_len")
    assert not out.exists()
    small.write_text("just a few words " * 6)  # 3 sequences, but a micro-batch needs 4
    code, _, err = run_cli(
        capsys, "distill", "--config", TINY, *tiny_overrides(out, **{"data.train": str(small)})
    )
    assert_clean_failure(code, err, "fewer than one global micro-batch")
    assert not out.exists()


def test_distill_mismatched_tokenizers(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    other = _tokenizer_mismatch_dir(tmp_path)
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "distill",
        "--config",
        TINY,
        *tiny_overrides(out, **{"student.init": "checkpoint", "student.checkpoint": str(other)}),
    )
    assert_clean_failure(code, err, "tokenizer")
    assert not out.exists()


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "distill", "--config", str(tmp_path / "nope.yaml"))
    assert_clean_failure(code, err, "nope.yaml")


def test_eval_table_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import json

    out = tmp_path / "eval.json"
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "--teacher",
        "tiny:0:2x64",
        "--student",
        "tiny:1:1x32",
        "--baseline",
        "tiny:2:1x32",
        "--data",
        "synthetic:3:40",
        "--seq-len",
        "32",
        "--max-blocks",
        "4",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert "| teacher" in stdout and "gap recovered" in stdout.lower()
    res = json.loads(out.read_text())
    for who in ("teacher", "student", "baseline"):
        assert res[who]["n_tokens"] > 0 and res[who]["ppl"] > 1
    assert "gap_recovered" in res


def test_eval_mismatched_tokenizers(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    other = _tokenizer_mismatch_dir(tmp_path)
    code, _, err = run_cli(
        capsys,
        "eval",
        "--teacher",
        "tiny:0",
        "--student",
        str(other),
        "--data",
        "synthetic:0:20",
        "--seq-len",
        "16",
    )
    assert_clean_failure(code, err, "tokenizer")


def test_console_script_end_to_end(tmp_path: Path) -> None:
    """The installed `potstill` entry point: a real process, exit codes included."""
    exe = Path(sys.executable).with_name("potstill")
    ok = subprocess.run(
        [
            str(exe),
            "distill",
            "--config",
            TINY,
            "--no-progress",
            *tiny_overrides(tmp_path / "r", **{"train.steps": 2}),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "r" / "student" / "config.json").is_file()
    bad = subprocess.run(
        [str(exe), "distill", "--config", TINY, "optim.lr=-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "optim.lr" in bad.stderr


def test_sigkill_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    """A real crash: SIGKILL right after the step-6 checkpoint, then `--resume` finishes the run
    bit-identically. The kill is a fault point (``potstill.core.faults``) inside the child, so it lands
    at that moment every time: no polling, no race with the run finishing."""
    import signal

    import torch
    from safetensors.torch import load_file

    exe = str(Path(sys.executable).with_name("potstill"))
    extra = {"train.steps": 12, "train.save_every": 3, "train.eval_every": 0}
    full = subprocess.run(
        [
            exe,
            "distill",
            "--config",
            TINY,
            "--no-progress",
            *tiny_overrides(tmp_path / "full", **extra),
        ],
        capture_output=True,
        timeout=300,
    )
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    args = [exe, "distill", "--config", TINY, "--no-progress", *tiny_overrides(cut, **extra)]
    env = {**os.environ, "POTSTILL_FAULT": "train.after_checkpoint:2"}  # the step-6 checkpoint
    killed = subprocess.run(args, capture_output=True, timeout=300, env=env)
    assert killed.returncode == -signal.SIGKILL
    steps = sorted(p.name for p in (cut / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps[-1] == "step_000006" and not (cut / "student").exists()
    again = subprocess.run([*args, "--resume"], capture_output=True, timeout=300)
    assert again.returncode == 0, again.stderr
    a = load_file(str(tmp_path / "full" / "student" / "model.safetensors"))
    b = load_file(str(cut / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_extra_names_the_extra(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without pyarrow (the [cache] extra), a parquet export is exit 2 with the install line."""
    from potstill.core import store as st

    db = tmp_path / "h.sqlite"
    st.connect(db).close()
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # `import pyarrow` now fails
    code, _, err = run_cli(
        capsys, "harvest", "export", "--store", str(db), "--out", str(tmp_path / "x.parquet")
    )
    assert_clean_failure(code, err, "pip install 'potstill[cache]'")
    assert not (tmp_path / "x.parquet").exists()
