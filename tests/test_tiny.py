"""Tiny in-process models: spec parsing, determinism, the shared byte-level tokenizer."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch

from potstill.core.errors import PotstillError
from potstill.core.models import load_model, load_tokenizer, resolve_model_dir
from potstill.core.tiny import (
    TinySpec,
    build_tiny_model,
    build_tiny_tokenizer,
    padded_vocab_size,
    parse_tiny_spec,
    tiny_config,
)

UNICODE_TEXT = (
    "Grüße, naïve café! 日本語のテキスト, Ελληνικά, עברית, emoji 🙂👍🏽, "
    "zero-width\u200bjoiner, tab\tnewline\n, NUL\x00, CRLF\r\n, combining e\u0301, "
    "literal specials <|im_start|>user<|im_end|> and <|endoftext|>."
)


def _weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- spec parsing


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tiny:0", TinySpec(0, 2, 64)),
        ("tiny:42", TinySpec(42, 2, 64)),
        ("tiny:7:4x128", TinySpec(7, 4, 128)),
        (" tiny:1:1x8 ", TinySpec(1, 1, 8)),
    ],
)
def test_parse_tiny_spec(spec: str, expected: TinySpec) -> None:
    assert parse_tiny_spec(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "tiny:",
        "tiny:x",
        "tiny:-1",
        "tiny:1:3y5",
        "tiny:1:3x",
        "tiny:1:0x64",
        "tiny:1:2x7",
        "tiny:1:2x65",
        "tiny:1:2x999999",
        "tiny:1:2x64:extra",
        "tiny:1.5",
    ],
)
def test_bad_tiny_specs_name_the_spec(spec: str) -> None:
    with pytest.raises(PotstillError) as exc:
        parse_tiny_spec(spec)
    assert repr(spec.strip()) in str(exc.value)
    # The same error reaches every entry point that takes a model spec.
    with pytest.raises(PotstillError, match="tiny"):
        load_model(spec)


def test_resolve_model_dir_is_none_for_tiny() -> None:
    assert resolve_model_dir("tiny:3:2x32") is None


# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    ("layers", "width", "heads", "kv_heads"),
    [(2, 64, 4, 2), (1, 8, 1, 1), (3, 48, 3, 3), (2, 128, 8, 4), (2, 40, 2, 1)],
)
def test_tiny_config_shapes(layers: int, width: int, heads: int, kv_heads: int) -> None:
    cfg = tiny_config(layers, width, 320)
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (layers, width)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (heads, kv_heads)
    assert cfg.intermediate_size == 2 * width
    assert cfg.max_position_embeddings == 2048
    assert cfg.tie_word_embeddings is True
    assert width % heads == 0 and (width // heads) % 2 == 0


def test_tiny_model_sizes_and_padded_vocab() -> None:
    tok = build_tiny_tokenizer()
    assert len(tok) == 260
    assert padded_vocab_size(260) == 320
    assert padded_vocab_size(320) == 320 and padded_vocab_size(321) == 384
    model = build_tiny_model("tiny:5:3x32")
    assert model.config.vocab_size == 320
    assert len(model.model.layers) == 3
    assert model.model.embed_tokens.weight.shape == (320, 32)
    # Tied head: one tensor, the padded rows included.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training
    # Tokenizer special ids match the config's.
    cfg = model.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )


def test_tiny_model_runs_and_logits_are_not_degenerate() -> None:
    model, tok = load_model("tiny:0")
    ids = torch.tensor([tok("hello world")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 320)
    # Embedding std 1/sqrt(width) => tied-head logits have std ~1 (see build_tiny_model).
    assert 0.5 < logits.std().item() < 2.0


def test_load_model_dtype() -> None:
    model, _ = load_model("tiny:0", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref, _ = load_model("tiny:0")
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight.bfloat16())


# ---------------------------------------------------------------- determinism


def test_same_spec_same_weights_different_seed_differs() -> None:
    a, b = build_tiny_model("tiny:11"), build_tiny_model("tiny:11")
    c = build_tiny_model("tiny:12")
    for (na, ta), (nb, tb), (_, tc) in zip(
        a.state_dict().items(), b.state_dict().items(), c.state_dict().items()
    ):
        assert na == nb
        assert torch.equal(ta, tb), na
        if not na.endswith("norm.weight"):  # norms are all ones by design
            assert not torch.equal(ta, tc), na


def test_tiny_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    build_tiny_model("tiny:3")
    assert torch.equal(torch.rand(5), expected)


def test_tiny_weights_identical_across_processes() -> None:
    here = _weights_digest(build_tiny_model("tiny:9:2x32"))
    code = (
        "import hashlib, torch\n"
        "from potstill.core.tiny import build_tiny_model\n"
        "torch.manual_seed(999)  # a different global RNG state must not matter\n"
        "m = build_tiny_model('tiny:9:2x32')\n"
        "h = hashlib.sha256()\n"
        "for n, t in sorted(m.state_dict().items()):\n"
        "    h.update(n.encode()); h.update(t.contiguous().view(torch.uint8).numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == here


# ---------------------------------------------------------------- tokenizer


def test_byte_ids_are_byte_values_and_specials_fixed() -> None:
    tok = build_tiny_tokenizer()
    assert tok("AZ\n")["input_ids"] == [65, 90, 10]
    assert tok("é")["input_ids"] == list("é".encode())  # [195, 169]
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")] == [
        256,
        257,
        258,
        259,
    ]
    assert tok.bos_token == tok.eos_token == "<|endoftext|>"
    assert tok.pad_token == "<|pad|>"


def test_tokenizer_round_trips_unicode_exactly() -> None:
    tok = load_tokenizer("tiny:0")
    ids = tok(UNICODE_TEXT, add_special_tokens=True)["input_ids"]
    assert tok.decode(ids) == UNICODE_TEXT
    # Apart from the 4 literal specials (one id each), every UTF-8 byte is one token.
    specials = UNICODE_TEXT.count("<|")
    stripped = UNICODE_TEXT
    for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        stripped = stripped.replace(s, "")
    assert len(ids) == len(stripped.encode("utf-8")) + specials
    # Only byte ids and the three specials written in the text occur (no pad, no unknown).
    assert all(i < 256 or i in (256, 258, 259) for i in ids)


def test_chat_template_renders_and_tokenizes() -> None:
    tok = build_tiny_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 🙂"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi 🙂<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 258 and ids.count(258) == 3 and ids.count(259) == 2
    assert tok.decode(ids) == text


def test_every_tiny_model_shares_the_tokenizer() -> None:
    from potstill.core.tokenizers import tokenizer_fingerprint

    fps = {tokenizer_fingerprint(load_tokenizer(s)) for s in ("tiny:0", "tiny:1:4x128")}
    assert len(fps) == 1
