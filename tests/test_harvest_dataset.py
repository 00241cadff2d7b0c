"""Harvested conversations as training data: assistant-only labels, top-k placement, distill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from potstill.core.errors import PotstillError
from potstill.core.messages import export_store
from potstill.core.models import load_tokenizer
from potstill.distill.config import DistillConfig, load_config
from potstill.distill.data.chat import TokenMapper, build_chat_data, load_chat_data
from potstill.distill.train.data import prepare_data
from potstill.distill.train.recipe import run_distill
from potstill.harvest.client import GenParams, harvest

from .conftest import REPO, tiny_overrides
from .fake_openai import FakeOpenAI, byte_logprobs

TOK = load_tokenizer("tiny:0")  # byte-level: token id == byte value; 258/259 = im_start/im_end


def _ids(text: str) -> list[int]:
    return list(text.encode())


def _lp(text: str, k: int) -> list[dict]:
    """The fake endpoint's chat logprobs, in the store's normalised layout."""
    return [
        {"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"],
         "top": [[x["token"], x["logprob"], x["bytes"]] for x in t["top_logprobs"]]}
        for t in byte_logprobs(text, k)
    ]  # fmt: skip


def test_assistant_only_labels_by_hand() -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    d = build_chat_data([{"messages": msgs}], TOK, seq_len=32, with_logprobs=False)
    # <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n  then <|pad|>
    want = [258, *_ids("user\nhi"), 259, 10, 258, *_ids("assistant\nyo"), 259, 10]
    assert d.blocks[0, : len(want)].tolist() == want and len(want) == 25
    assert d.blocks[0, 25:].tolist() == [257] * 7 and d.mask[0].tolist() == [1] * 25 + [0] * 7
    # "y" is token 21: the label at 20 predicts it; "o" at 21, <|im_end|> at 22; the "\n" after it
    # (token 24) is not trained, nor is anything in the prompt.
    labels = [-100] * 32
    labels[20], labels[21], labels[22] = ord("y"), ord("o"), 259
    assert d.labels[0].tolist() == labels and d.targets is None


def test_multi_turn_trains_every_assistant_turn_and_counts_truncation() -> None:
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "DE"},
    ]
    d = build_chat_data([{"messages": msgs}], TOK, seq_len=64, with_logprobs=False)
    ids = d.blocks[0].tolist()
    kept = [(t, ids[t + 1]) for t in range(63) if d.labels[0, t] != -100]
    assert [tok for _, tok in kept] == [ord("B"), 259, ord("D"), ord("E"), 259]
    assert all(int(d.labels[0, t]) == tok for t, tok in kept)
    short = build_chat_data([{"messages": msgs}], TOK, seq_len=36, with_logprobs=False)
    assert short.stats["truncated"] == 1 and int((short.labels != -100).sum()) == 2  # only "B", eot
    with pytest.raises(PotstillError, match="no example has an assistant token"):
        build_chat_data([{"messages": msgs}], TOK, seq_len=8, with_logprobs=False)


def test_topk_logprobs_land_on_the_label_positions() -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    d = build_chat_data(
        [{"messages": msgs, "logprobs": _lp("yo", 3)}], TOK, seq_len=32, with_logprobs=True
    )
    assert d.stats["aligned"] == 1 and d.targets is not None and d.targets.k == 3
    ids, lps = d.targets.lookup(torch.tensor([0, 0]))
    assert ids.shape == (2, 32, 3) and lps.dtype == torch.float32
    # label 20 -> "y" (121), label 21 -> "o" (111); the fake's alternatives are (b + 7j) % 128
    assert ids[0, 20].tolist() == [121, 0, 7] and ids[0, 21].tolist() == [111, 118, 125]
    assert torch.allclose(lps[0, 20], torch.log(torch.tensor([0.5, 0.2, 0.2])))
    other = [t for t in range(32) if t not in (20, 21)]
    assert (ids[0, other] == -1).all() and (lps[0, other] == 0).all()
    assert (d.labels[0, 20:22] == ids[0, 20:22, 0]).all()  # the sampled token is the label


def test_misaligned_record_falls_back_to_sft_and_unmappable_entries_drop() -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    bad = _lp("ya", 2)  # the API tokens do not spell the stored completion
    good = _lp("yo", 2)
    good[0]["top"].append(["é", -3.0, [195, 169]])  # two bytes = two tiny tokens: dropped
    d = build_chat_data(
        [{"messages": msgs, "logprobs": bad}, {"messages": msgs, "logprobs": good}],
        TOK, seq_len=32, with_logprobs=True,
    )  # fmt: skip
    assert (d.stats["aligned"], d.stats["align_failed"], d.stats["topk_dropped"]) == (1, 1, 1)
    assert d.targets is not None
    ids, _ = d.targets.lookup(torch.tensor([0, 1]))
    assert (ids[0] == -1).all() and ids[1, 20].tolist() == [121, 0]
    assert torch.equal(d.labels[0], d.labels[1])  # both still train SFT
    mapper = TokenMapper(TOK)
    assert (
        mapper.byte_level and mapper("\ufffd", [195]) == 195 and mapper("<|im_end|>", None) == 259
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("harvest") / "h.sqlite"
    prompts = [[{"role": "user", "content": f"Say something about item {i}."}] for i in range(16)]
    with FakeOpenAI() as fake:
        s = harvest(
            prompts,
            db,
            endpoint=fake.url,
            model="m",
            params=GenParams(top_logprobs=4, max_tokens=48),
        )
    assert s.done == 16
    return db


def test_export_round_trip_gives_the_same_training_data(store: Path, tmp_path: Path) -> None:
    ref = load_chat_data(f"harvest:{store}", TOK, seq_len=96, with_logprobs=True)
    assert ref.stats["records"] == 16 and ref.stats["aligned"] == 16 and ref.targets is not None
    rows = torch.arange(16)
    for name in ("e.jsonl", "e.parquet"):
        export_store(store, tmp_path / name)
        got = load_chat_data(f"messages:{tmp_path / name}", TOK, seq_len=96, with_logprobs=True)
        assert torch.equal(got.blocks, ref.blocks) and torch.equal(got.labels, ref.labels)
        assert torch.equal(got.mask, ref.mask) and got.targets is not None
        for a, b in zip(got.targets.lookup(rows), ref.targets.lookup(rows)):
            assert torch.equal(a, b)
    line = json.loads((tmp_path / "e.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in line["messages"]] == ["user", "assistant"]
    assert set(line["metadata"]) >= {"key", "model", "params", "sample", "finish_reason", "usage"}


def _cfg(out: Path, store: Path, ce_weight: float) -> DistillConfig:
    extra = {
        "teacher.spec": "none", "student.tokenizer": "tiny:0", "loss.ce_weight": ce_weight,
        "data.train": f"harvest:{store}", "data.seq_len": 96, "data.packing": False,
        "train.steps": 12, "optim.lr": 1e-2,
    }  # fmt: skip
    return load_config(DistillConfig, REPO / "configs" / "tiny.yaml", tiny_overrides(out, **extra))


@pytest.mark.parametrize("ce_weight", [1.0, 0.5])
def test_distill_from_a_harvest_store(store: Path, tmp_path: Path, ce_weight: float) -> None:
    cfg = _cfg(tmp_path / "run", store, ce_weight)
    data = prepare_data(cfg, TOK, world_size=1)
    batch = data.micro_batch(0, 0)
    assert ("topk_ids" in batch) == (ce_weight < 1.0)
    if ce_weight < 1.0:  # top-k targets at every generated token (the fake API does not
        has = (batch["topk_ids"] >= 0).any(-1)  # report the end-of-turn token)
        labels = batch["labels"]
        assert torch.equal(has, (labels != -100) & (labels != 259))
        assert torch.equal(batch["topk_ids"][..., 0][has], labels[has])
    run = run_distill(cfg, show_progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 12 and train[-1]["loss"] < 0.8 * train[0]["loss"]
    assert (run / "student" / "model.safetensors").is_file()


def test_a_harvest_store_is_an_on_policy_prompt_source(store: Path) -> None:
    """loss.on_policy.prompts=harvest:STORE: every turn before each record's answer."""
    from potstill.core.specs import parse_prompt_source
    from potstill.distill.train.onpolicy import load_prompts

    prompts = load_prompts(parse_prompt_source(f"harvest:{store}"), TOK)
    assert prompts is not None and len(prompts) == 16
    texts = sorted(TOK.decode(p) for p in prompts)
    assert texts[0].startswith("<|im_start|>user\nSay something about item 0.")
    assert all(t.endswith("<|im_start|>assistant\n") for t in texts)
