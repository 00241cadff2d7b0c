"""Cross-tokenizer distillation: byte alignment on hand-built strings, the hybrid and ULD losses
against closed forms, the exact reduction on identical tokenizers, and runs of the recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from potstill.cli import main
from potstill.core.models import load_tokenizer
from potstill.core.tokenizers import vocab_bytes
from potstill.distill.config import DistillConfig, load_config
from potstill.distill.data.align import aligned_pairs, next_token_starts, retokenize, utf8_runs
from potstill.distill.losses import forward_kl
from potstill.distill.losses.crosstok import hybrid_kd, sorted_l1, uld_kd
from potstill.distill.teachers.crosstok import shared_vocab
from potstill.distill.train.recipe import run_distill

from .conftest import REPO, tiny_overrides

pytestmark = pytest.mark.usefixtures("torch_one_thread")
TINY = REPO / "configs" / "tiny.yaml"
TEXTS = ["naïve café → 東京, ok", "  two  spaces\nand\ttabs", "the there then the theme",
         "ünïcödé 😀 emoji and 12345 digits", "merges: ing ing thing things"]  # fmt: skip
CORPUS = [t * 3 for t in TEXTS] + ["the quick brown fox jumps over the lazy dog " * 5]


def trained_tokenizer(kind: str) -> Any:
    """A small BPE trained in-process: byte-level (GPT-2 style) or Metaspace with byte fallback
    (SentencePiece / Gemma style), with merges, so tokens span several bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])  # fmt: skip
        alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=alphabet if kind == "bytelevel" else [])  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    if kind != "bytelevel":
        tok.add_tokens(alphabet)  # byte-fallback pieces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")  # fmt: skip


@pytest.fixture(scope="module")
def toks() -> dict[str, Any]:
    return {"tiny": load_tokenizer("tiny:0"), "bl": trained_tokenizer("bytelevel"),
            "sp": trained_tokenizer("metaspace")}  # fmt: skip


@pytest.mark.parametrize("name", ["tiny", "bl", "sp"])
def test_token_bytes_spell_the_text_exactly(toks: dict, name: str) -> None:
    tok = toks[name]
    table = vocab_bytes(tok)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table[i] or b"" for i in ids) == text.encode("utf-8"), (name, text)


@pytest.mark.parametrize(
    ("s_name", "t_name"), [("tiny", "bl"), ("bl", "sp"), ("sp", "tiny"), ("bl", "bl")]
)
def test_pairs_are_predictions_made_after_the_same_text(
    toks: dict, s_name: str, t_name: str
) -> None:
    s_tok, t_tok = toks[s_name], toks[t_name]
    s_table, t_table = vocab_bytes(s_tok), vocab_bytes(t_tok)
    for text in TEXTS:
        s_ids = list(s_tok(text, add_special_tokens=False)["input_ids"])
        view = retokenize(s_ids, s_table, t_tok, t_table, max_len=512)
        assert view.pairs, text
        for j, i in view.pairs:
            # an oracle that does not use the byte tables: the tokenizers' own decoders
            before_s = s_tok.decode(s_ids[: j + 1], skip_special_tokens=True)
            before_t = t_tok.decode(view.teacher_ids[: i + 1], skip_special_tokens=True)
            assert before_s == before_t, (text, j, i)
            nxt_s = s_tok.decode(s_ids[: j + 2], skip_special_tokens=True)
            assert len(nxt_s) > len(before_s) or "\ufffd" in nxt_s
        # every teacher boundary is a byte boundary of the byte tokenizer: all of them pair
        if s_name == "tiny":
            t_bounds = [o for o in view.teacher_starts if o is not None]
            assert len(view.pairs) == len(set(t_bounds) - {0}), (
                text
            )  # no student position before its first token
        # a boundary inside a multi-byte character is never paired (no char is split by both)
        for j, _ in view.pairs:
            pre = b"".join(s_table[x] or b"" for x in s_ids[: j + 1])
            pre.decode("utf-8")  # raises if the prefix ends inside a character


def test_identical_tokenizers_retokenize_to_the_same_ids_and_pair_every_position(
    toks: dict,
) -> None:
    tok = toks["bl"]
    table = vocab_bytes(tok)
    for text in TEXTS:
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
        view = retokenize(ids, table, tok, table, max_len=512)
        assert view.teacher_ids == ids
        assert view.pairs == [(j, j) for j in range(len(ids) - 1)]


def test_specials_are_zero_width_and_separate_segments() -> None:
    table: list[bytes | None] = [b"a", b"b", None, "é".encode()]  # id 2 is special
    starts = next_token_starts([0, 1, 2, 3, 0], table)
    assert starts == [1, None, 2, 4, None]  # position 1 predicts the special; the last has none
    assert aligned_pairs([1, None, 2], [None, 1, 2]) == [(0, 1), (2, 2)]
    assert utf8_runs(b"ab\xc3") == [(0, "ab")]  # a character cut at the end
    assert utf8_runs(b"\xa9ab\xffc") == [(1, "ab"), (4, "c")]


def test_hybrid_reduces_exactly_to_forward_kl_on_identical_vocabularies() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 50, generator=g, dtype=torch.float64).float().requires_grad_()
    t = torch.randn(7, 50, generator=g) * 3
    ident = (torch.arange(50), torch.arange(50))
    a = hybrid_kd(s, t, ident, temperature=1.7, uld_weight=1.0, reduction="mean")
    s2 = s.detach().clone().requires_grad_()
    b = forward_kl(s2, t, temperature=1.7, reduction="mean")
    assert torch.allclose(a, b, rtol=0, atol=1e-6)
    a.backward()
    b.backward()
    assert s.grad is not None and s2.grad is not None
    assert torch.allclose(s.grad, s2.grad, atol=1e-7)


def test_hybrid_against_its_closed_form_on_a_partial_map() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 6, generator=g), torch.randn(3, 9, generator=g)
    t_ids, s_ids = torch.tensor([0, 4, 8]), torch.tensor([5, 1, 2])
    got = hybrid_kd(s, t, (t_ids, s_ids), uld_weight=0.5, uld_top=2, reduction="sum")
    want = 0.0
    for r in range(3):
        p = torch.softmax(t[r].double(), -1).tolist()
        q = torch.softmax(s[r].double(), -1).tolist()
        kl = sum(p[a] * math.log(p[a] / q[b]) for a, b in zip(t_ids.tolist(), s_ids.tolist()))
        p_rest = 1 - sum(p[a] for a in t_ids.tolist())
        q_rest = 1 - sum(q[b] for b in s_ids.tolist())
        kl += p_rest * math.log(p_rest / q_rest)
        p_other = sorted((p[a] for a in range(9) if a not in t_ids.tolist()), reverse=True)[:2]
        q_other = sorted((q[b] for b in range(6) if b not in s_ids.tolist()), reverse=True)[:2]
        want += kl + 0.5 * sum(abs(x - y) for x, y in zip(p_other, q_other))
    assert abs(float(got) - want) < 1e-5


def test_uld_and_sorted_l1_closed_forms() -> None:
    p, q = torch.tensor([[0.5, 0.2, 0.3]]), torch.tensor([[0.1, 0.9]])
    # sorted: [.5, .3, .2] vs [.9, .1, 0]
    assert torch.allclose(sorted_l1(p, q, 8), torch.tensor([0.4 + 0.2 + 0.2]))
    assert torch.allclose(sorted_l1(p, q, 1), torch.tensor([0.4]))
    s, t = torch.log(q), torch.log(p)
    assert torch.allclose(uld_kd(s, t, uld_top=8, reduction="mean"), torch.tensor(0.8))
    assert float(hybrid_kd(s[:0], t[:0], (torch.tensor([0]), torch.tensor([0])))) == 0.0


def test_shared_vocab_is_the_identity_on_identical_tokenizers(toks: dict) -> None:
    tok = toks["bl"]
    t_ids, s_ids = shared_vocab(tok, tok)
    assert t_ids == s_ids == list(range(len(tok)))
    t2, s2 = shared_vocab(toks["sp"], toks["bl"])
    assert 0 < len(t2) < len(toks["sp"]) and len(set(t2)) == len(t2) and len(set(s2)) == len(s2)
    sp_t, bl_t = vocab_bytes(toks["sp"]), vocab_bytes(toks["bl"])
    assert all(sp_t[a] == bl_t[b] for a, b in zip(t2, s2) if sp_t[a] is not None)


# ------------------------------------------------------------------ the recipe


def student_dir(tmp: Path, tok: Any) -> Path:
    """A tiny Llama folder with ``tok``: a model spec whose tokenizer the student uses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp / "bpe-model"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def xcfg(tmp: Path, **extra: object) -> DistillConfig:
    over = {"loss.cross_tokenizer.kind": "hybrid", "train.steps": 4, **extra}
    return load_config(DistillConfig, TINY, tiny_overrides(tmp / "run", **over))


def test_cross_tokenizer_run_trains_off_and_on_policy_and_resumes(
    tmp_path: Path, toks: dict
) -> None:
    d = student_dir(tmp_path, toks["bl"])
    extra = {"student.tokenizer": str(d), "loss.ce_weight": 0.5, "train.save_every": 2,
             "loss.on_policy.lmbda": 0.5, "loss.on_policy.max_new_tokens": 8,
             "loss.on_policy.prompt_tokens": 4}  # fmt: skip
    full = run_distill(xcfg(tmp_path / "a", **extra), show_progress=False)
    cut = xcfg(tmp_path / "b", **extra)
    run_distill(cut, stop_after=3, show_progress=False)
    run_distill(cut, resume=True, show_progress=False)
    from safetensors.torch import load_file

    a = load_file(str(full / "student" / "model.safetensors"))
    b = load_file(str(Path(cut.out_dir) / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if r["split"] == "train"]
    assert all(k is not None and k > 0 for k in kd)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"teacher.spec": "none"}, "has no text to align"),
        ({"student.tokenizer": None}, "needs the student's own tokenizer"),
        ({"loss.kind": "reverse_kl"}, "leave loss.kind=forward_kl"),
    ],
)
def test_bad_cross_tokenizer_configs_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: dict, message: str
) -> None:
    over = {"loss.cross_tokenizer.kind": "hybrid", "student.tokenizer": "tiny:0", **extra}
    out = tmp_path / "run"
    argv = ["distill", "--config", str(TINY), *tiny_overrides(out, **over)]
    argv = [a if not a.endswith("=None") else a.replace("=None", "=null") for a in argv]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_data_with_no_text_to_align_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "specials.txt"
    f.write_text("<|endoftext|>" * 400)
    cfg = xcfg(
        tmp_path, **{"student.tokenizer": "tiny:0", "data.train": str(f), "data.eval": "null"}
    )
    from potstill.core.errors import PotstillError

    with pytest.raises(PotstillError, match="no text to align"):
        run_distill(cfg, show_progress=False)
    assert not (tmp_path / "run").exists()
