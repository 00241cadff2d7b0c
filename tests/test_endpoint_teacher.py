"""The endpoint teacher against a real `potstill serve` (tiny:0 over loopback HTTP): its targets
and loss against the white-box teacher's, an on-policy run through it, and endpoints that lack
a capability."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from potstill.core.errors import PotstillError
from potstill.core.models import load_model
from potstill.distill.config import DistillConfig, load_config
from potstill.distill.losses import forward_kl, sparse_topk_kl
from potstill.distill.teachers.endpoint import EndpointTeacher
from potstill.distill.train.recipe import run_distill
from potstill.distill.train.rollout import pack_rollouts, sample_completions
from potstill.serve.app import ServeSettings, create_app
from potstill.serve.background import serve_in_background
from potstill.serve.engine import Engine

from .conftest import REPO, assert_endpoint_targets, tiny_overrides
from .fake_openai import FakeOpenAI

pytestmark = pytest.mark.usefixtures("torch_one_thread")
MODEL, K = "tiny:0", 20


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return load_model(MODEL)


@pytest.fixture(scope="module")
def url(tiny: tuple[Any, Any]) -> Iterator[str]:
    model, tok = tiny
    engine = Engine(model, tok, model_name=MODEL, max_batch=8)
    with serve_in_background(create_app(engine, ServeSettings())) as base:
        yield base + "/v1"


def teacher_at(url: str, vocab: int = 320, model: str = MODEL) -> EndpointTeacher:
    return EndpointTeacher(url, model=model, api_key=None, top_logprobs=K, concurrency=4,
                           timeout_s=30, vocab_size=vocab, max_retries=0)  # fmt: skip


def rollout_batch(tiny: tuple[Any, Any]) -> dict[str, torch.Tensor]:
    student, tok = load_model("tiny:5:1x32")
    prompts = [tok(t).input_ids for t in ("once upon", "the cat sat", "ab", "12+34=")]
    comps = sample_completions(student, prompts, max_new_tokens=10, temperature=1.0,
                               stop_ids=frozenset(), pad_id=tok.pad_token_id,
                               generator=torch.Generator().manual_seed(0), vocab=len(tok))  # fmt: skip
    return pack_rollouts(prompts, comps, pad_id=tok.pad_token_id)


def test_endpoint_targets_are_the_white_box_teachers_logprobs(url: str, tiny: tuple) -> None:
    model, tok = tiny
    teacher = teacher_at(url)
    try:
        teacher.check(tok)
        batch = rollout_batch(tiny)
        ids, lps = teacher.submit(
            batch["input_ids"], batch["attention_mask"], batch["labels"]
        ).result()
    finally:
        teacher.close()
    with torch.no_grad():  # the server normalises over the real tokens, not padded logit rows
        full = F.log_softmax(
            model(input_ids=batch["input_ids"]).logits[..., : len(tok)].float(), -1
        )
    assert assert_endpoint_targets(ids, lps, full, batch["labels"], K) > 20


def test_endpoint_loss_matches_white_box_top_k_and_bounds_the_full_kl(
    url: str, tiny: tuple
) -> None:
    model, tok = tiny
    batch = rollout_batch(tiny)
    teacher = teacher_at(url)
    try:
        ids, lps = teacher.submit(
            batch["input_ids"], batch["attention_mask"], batch["labels"]
        ).result()
    finally:
        teacher.close()
    student, _ = load_model("tiny:5:1x32")
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"]).logits[..., : len(tok)].float()
        t_logits = model(input_ids=batch["input_ids"]).logits[..., : len(tok)].float()
    keep = batch["labels"] != -100
    s, t = s_logits[keep], t_logits[keep]
    api = sparse_topk_kl(s, ids[keep], lps[keep], reduction="mean")
    # the white-box twin: the same buckets from the teacher's own logits
    log_t = F.log_softmax(t, dim=-1)
    white_lps = log_t.gather(-1, ids[keep].clamp(min=0)).masked_fill(ids[keep] < 0, 0.0)
    white = sparse_topk_kl(s, ids[keep], white_lps, reduction="mean")
    full = forward_kl(s, t, reduction="mean")
    assert abs(float(api) - float(white)) < 1e-4
    # bucketing coarsens both distributions: a lower bound of the full KL (data processing)
    assert float(api) <= float(full) + 1e-5


def test_on_policy_distillation_through_potstill_serve(url: str, tmp_path: Path) -> None:
    over = {"teacher.spec": url, "teacher.model": MODEL, "student.tokenizer": MODEL,
            "loss.on_policy.lmbda": 1.0, "loss.on_policy.max_new_tokens": 8,
            "loss.on_policy.prompt_tokens": 6, "train.steps": 4}  # fmt: skip
    cfg = load_config(
        DistillConfig, REPO / "configs" / "tiny.yaml", tiny_overrides(tmp_path / "r", **over)
    )
    run = run_distill(cfg, show_progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 4 and all(r["kd"] is not None and r["kd"] > 0 for r in train)
    assert (run / "student" / "model.safetensors").is_file()


def test_an_endpoint_without_prompt_logprobs_is_refused_by_name(tiny: tuple) -> None:
    _, tok = tiny
    with FakeOpenAI(latency_s=0.0) as fake:  # answers logprobs of the completion only
        teacher = teacher_at(fake.url, model="fake")
        try:
            with pytest.raises(PotstillError, match=r"echo=true|prompt logprobs|token ids"):
                teacher.check(tok)
        finally:
            teacher.close()


def test_an_endpoint_with_another_tokenizer_is_refused(url: str) -> None:
    from transformers import AutoTokenizer

    from potstill.core.tiny import build_tiny_tokenizer

    other = build_tiny_tokenizer()
    other = AutoTokenizer.from_pretrained(_shifted(other))  # same class, ids moved by one
    teacher = teacher_at(url)
    try:
        with pytest.raises(PotstillError, match="tokenizes a probe text differently"):
            teacher.check(other)
    finally:
        teacher.close()


def _shifted(tok: Any) -> str:
    """A copy of ``tok`` saved with every byte token's id rotated: same strings, other ids."""
    import tempfile

    d = tempfile.mkdtemp()
    tok.save_pretrained(d)
    p = Path(d) / "tokenizer.json"
    spec = json.loads(p.read_text())
    vocab = spec["model"]["vocab"]
    byte_tokens = sorted((v, k) for k, v in vocab.items() if v < 256)
    for v, k in byte_tokens:
        vocab[k] = (v + 1) % 256
    spec["model"]["merges"] = []
    p.write_text(json.dumps(spec))
    return d


def test_cli_refuses_an_endpoint_without_the_capability_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from potstill.cli import main

    out = tmp_path / "run"
    with FakeOpenAI(latency_s=0.0) as fake:
        code = main(["distill", "--config", str(REPO / "configs" / "tiny.yaml"),
                     *tiny_overrides(out, **{"teacher.spec": fake.url, "teacher.model": "fake",
                                             "student.tokenizer": MODEL})])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "return_tokens_as_token_ids" in err and "Traceback" not in err, err
    assert not out.exists()


def test_an_endpoint_teacher_needs_forward_kl_and_temperature_one(url: str, tmp_path: Path) -> None:
    over = {"teacher.spec": url, "teacher.model": MODEL, "student.tokenizer": MODEL}
    for extra, needle in [({"loss.kind": "reverse_kl"}, "use loss.kind=forward_kl"),
                          ({"loss.temperature": 2.0}, "loss.temperature=2.0")]:  # fmt: skip
        out = tmp_path / needle[:8]
        cfg = load_config(DistillConfig, REPO / "configs" / "tiny.yaml",
                          tiny_overrides(out, **over, **extra))  # fmt: skip
        with pytest.raises(PotstillError, match=needle.replace(".", r"\.")):
            run_distill(cfg, show_progress=False)
        assert not out.exists()


def test_the_probe_accepts_an_echo_that_ends_in_a_stop_token(tiny: tuple) -> None:
    """A model whose first generated token is a stop token answers the echoed prompt alone."""
    from potstill.distill.teachers.endpoint import PROBE_TEXT

    _, tok = tiny
    ids = tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]

    def answer(n: int) -> dict:
        names = [f"token_id:{i}" for i in ids[:n]]
        lps = {"tokens": names, "token_logprobs": [None] + [-1.0] * (n - 1),
               "top_logprobs": [None] + [{x: -1.0} for x in names[1:]]}  # fmt: skip
        return {"choices": [{"logprobs": lps}]}

    teacher = teacher_at("http://127.0.0.1:9/v1")
    reply = answer(len(ids))

    async def fake_post(body: bytes) -> dict:
        return reply

    teacher._post = fake_post  # type: ignore[method-assign]
    try:
        teacher.check(tok)  # no generated token after the prompt: accepted
        reply = answer(len(ids) - 1)  # a prompt token missing: a different tokenization
        with pytest.raises(PotstillError, match="tokenizes a probe text differently"):
            teacher.check(tok)
    finally:
        teacher.close()


def test_the_api_key_comes_from_the_named_environment_variable(
    tiny: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from potstill.distill.train.models import load_endpoint_teacher

    model, tok = tiny
    engine = Engine(model, tok, model_name=MODEL, max_batch=4)
    with serve_in_background(create_app(engine, ServeSettings(api_keys=("sk-secret-1",)))) as base:
        over = {"teacher.spec": base + "/v1", "teacher.model": MODEL, "student.tokenizer": MODEL,
                "teacher.api_key_env": "POTSTILL_TEST_KEY"}  # fmt: skip
        cfg = load_config(
            DistillConfig, REPO / "configs" / "tiny.yaml", tiny_overrides(tmp_path, **over)
        )
        monkeypatch.delenv("POTSTILL_TEST_KEY", raising=False)
        with pytest.raises(PotstillError, match=r"POTSTILL_TEST_KEY.*unset"):
            load_endpoint_teacher(cfg, cfg.teacher.spec, tok, 320)  # type: ignore[arg-type]
        monkeypatch.setenv("POTSTILL_TEST_KEY", "sk-wrong")
        with pytest.raises(PotstillError, match="rejected the API key") as err:
            load_endpoint_teacher(cfg, cfg.teacher.spec, tok, 320)  # type: ignore[arg-type]
        assert "sk-wrong" not in str(err.value)  # the key never reaches a message
        monkeypatch.setenv("POTSTILL_TEST_KEY", "sk-secret-1")
        load_endpoint_teacher(cfg, cfg.teacher.spec, tok, 320).close()  # type: ignore[arg-type]
