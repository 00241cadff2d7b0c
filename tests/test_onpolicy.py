"""On-policy distillation: the sampler against transformers' generate, the rollout layout,
lambda = 0 against the off-policy recipe, bit-exact resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from potstill.cli import main
from potstill.core.errors import PotstillError
from potstill.core.models import load_model
from potstill.distill.config import DistillConfig, load_config
from potstill.distill.train.onpolicy import make_rollouts
from potstill.distill.train.recipe import run_distill
from potstill.distill.train.rollout import pack_rollouts, sample_completions

from .conftest import REPO, tiny_overrides

pytestmark = pytest.mark.usefixtures("torch_one_thread")
TINY = REPO / "configs" / "tiny.yaml"
ON = {"loss.on_policy.lmbda": 1.0, "loss.on_policy.max_new_tokens": 8,
      "loss.on_policy.prompt_tokens": 6, "loss.kind": "generalized_jsd", "loss.beta": 1.0}  # fmt: skip


def cfg_of(out: Path, **extra: object) -> DistillConfig:
    return load_config(DistillConfig, TINY, tiny_overrides(out, **extra))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student" / "model.safetensors"))


@pytest.mark.parametrize("texts", [("ab", "hello wor", "x"), ("abc", "xyz", "123")])
def test_greedy_sampler_equals_transformers_generate(texts: tuple[str, ...]) -> None:
    """Left-padded (mixed lengths) and unpadded (one length: no attention mask) batches."""
    model, tok = load_model("tiny:3:2x64")
    prompts = [tok(t).input_ids for t in texts]
    got = sample_completions(
        model, prompts, max_new_tokens=7, temperature=0.0, stop_ids=frozenset(),
        pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    for p, row in zip(prompts, got, strict=True):  # one by one: no padding at all
        ref = model.generate(torch.tensor([p]), max_new_tokens=7, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)  # fmt: skip
        assert row == ref[0, len(p) :].tolist()


def test_sampling_is_a_function_of_the_generator_and_stops_after_a_stop_token() -> None:
    model, tok = load_model("tiny:3:2x64")
    prompts = [tok("ab").input_ids] * 6

    def draw(seed: int) -> list[list[int]]:
        return sample_completions(
            model, prompts, max_new_tokens=12, temperature=1.0, stop_ids=frozenset({101}),
            pad_id=0, generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    a, b, c = draw(1), draw(1), draw(2)
    assert a == b and a != c
    for row in a + c:
        assert 101 not in row[:-1] and 1 <= len(row) <= 12


def test_pack_rollouts_labels_score_exactly_the_sampled_tokens() -> None:
    b = pack_rollouts([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0, width=6)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1, 2, 0], [8, 3, 4, 9, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    # logits at t predict token t + 1: only completion tokens are targets
    assert b["labels"].tolist() == [[-100, -100, 1, 2, -100, -100], [3, 4, 9, -100, -100, -100]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_rollouts([[1, 2, 3]], [[4, 5, 6, 7]], pad_id=0, width=6)


def test_lambda_zero_is_the_off_policy_recipe_bit_for_bit(tmp_path: Path) -> None:
    off = run_distill(cfg_of(tmp_path / "off"), show_progress=False)
    zero = run_distill(
        cfg_of(tmp_path / "zero", **{"loss.on_policy.lmbda": 0.0}), show_progress=False
    )
    a, b = weights(off), weights(zero)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_on_policy_trains_on_rollouts_and_resumes_bit_exactly(tmp_path: Path) -> None:
    extra = {**ON, "train.save_every": 3}
    full = run_distill(cfg_of(tmp_path / "full", **extra), show_progress=False)
    cut = cfg_of(tmp_path / "cut", **extra)
    run_distill(cut, stop_after=5, show_progress=False)
    run_distill(cut, resume=True, show_progress=False)
    a, b = weights(full), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Rollouts, not data: on-policy steps score at most max_new_tokens per sequence.
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in rows if r["split"] == "train"]
    per_step = [b - a for a, b in zip([0, *tokens], tokens)]
    assert all(n <= 8 * 4 * 2 for n in per_step)  # 8 new tokens x 4 rows x 2 micro-batches
    # ... and they differ from the off-policy run's.
    off = run_distill(cfg_of(tmp_path / "off", **{"loss.kind": "generalized_jsd",
                                                  "loss.beta": 1.0}), show_progress=False)  # fmt: skip
    c = weights(off)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_lambda_mixes_micro_batches_deterministically() -> None:
    cfg = cfg_of(Path("unused"), **{**ON, "loss.on_policy.lmbda": 0.5}).loss.on_policy
    assert cfg is not None
    _, tok = load_model("tiny:0")
    r = make_rollouts(cfg, tok, seq_len=32, seed=0, micro_batch_size=4, world_size=1)
    picks = [r.on_policy(g) for g in range(400)]
    assert picks == [r.on_policy(g) for g in range(400)]
    assert 160 < sum(picks) < 240  # ~Binomial(400, 0.5): 4.9 sd either side


def test_prompts_file_rollouts_use_the_file(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "12+34"}\n{"prompt": "5+6"}\n')
    cfg = cfg_of(Path("unused"), **{**ON, "loss.on_policy.prompts": str(f)}).loss.on_policy
    assert cfg is not None
    model, tok = load_model("tiny:0")
    r = make_rollouts(cfg, tok, seq_len=32, seed=0, micro_batch_size=4, world_size=1)
    batch = r.batch(model, 0, 0, {})
    texts = {tok.decode(row[: int(m.sum())]) for row, m in zip(batch["input_ids"],
                                                                batch["attention_mask"])}  # fmt: skip
    assert all(t.startswith("<|im_start|>user\n12+34") or t.startswith("<|im_start|>user\n5+6")
               for t in texts), texts  # fmt: skip


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.on_policy.lmbda=1.5", "loss.on_policy.lmbda"),
        ("loss.on_policy.lmbda=-0.1", "loss.on_policy.lmbda"),
        ("loss.on_policy.max_new_tokens=40", "leaves no room"),
    ],
)
def test_bad_on_policy_config_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    out = tmp_path / "run"
    code = main(["distill", "--config", str(TINY), f"out_dir={out}",
                 "loss.on_policy.lmbda=0.5", override])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_on_policy_without_a_teacher_that_scores_is_refused(tmp_path: Path) -> None:
    cfg = cfg_of(tmp_path / "run", **{**ON, "teacher.spec": "none", "loss.ce_weight": 1.0,
                                      "student.tokenizer": "tiny:0"})  # fmt: skip
    with pytest.raises(PotstillError, match="needs a teacher that scores"):
        run_distill(cfg, show_progress=False)
    assert not (tmp_path / "run").exists()


def test_the_sampler_draws_from_the_softmax_at_its_temperature() -> None:
    from scipy.stats import chisquare

    from potstill.distill.train.rollout import _draw

    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -3.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.5):
        got = torch.bincount(_draw(logits, temperature, g), minlength=5).double()
        want = torch.softmax(logits[0].double() / temperature, -1) * len(logits)
        assert chisquare(got.numpy(), want.numpy()).pvalue > 1e-3
    assert bool((_draw(logits[:3], 0.0, g) == 0).all())


def test_chat_data_prompts_are_the_turns_before_the_answer(tmp_path: Path) -> None:
    """prompts=data on chat data: each rollout prompt is its row's conversation up to and
    including the assistant header, whole (never cut at the front or the back)."""
    f = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a}+{a + 1}"},
                          {"role": "assistant", "content": "answer"}]} for a in range(10, 30)]  # fmt: skip
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_of(tmp_path / "r", **{**ON, "data.train": f"messages:{f}", "data.seq_len": 48})
    from potstill.distill.train.data import prepare_data

    model, tok = load_model("tiny:0")
    data = prepare_data(cfg, tok, world_size=1)
    assert cfg.loss.on_policy is not None
    r = make_rollouts(cfg.loss.on_policy, tok, seq_len=48, seed=0, micro_batch_size=4, world_size=1)
    batch = r.batch(model, 0, 0, data.micro_batch(0, 0))
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        first = int((labels != -100).nonzero()[0])
        prompt = tok.decode(ids[: first + 1])
        assert prompt.startswith("<|im_start|>user\n") and prompt.endswith(
            "<|im_start|>assistant\n"
        )
