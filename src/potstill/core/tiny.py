"""Tiny, deterministic, in-process models: the ``tiny:<seed>[:<layers>x<width>]`` spec.

Every tiny model is a random :class:`~transformers.LlamaForCausalLM` built from a seed,
so tests and demos run without any download. All tiny models share ONE tokenizer (a
byte-level tokenizer with four special tokens), whatever their seed or size, so any tiny
teacher can be distilled into any tiny student.

The model's vocab is *padded*: ``vocab_size`` is ``len(tokenizer)`` (260) rounded up to a
multiple of 64 (320), like real checkpoints, so the padded-vocab code paths run in tests.

Determinism: weights are drawn from a private :class:`torch.Generator` seeded with the
spec's seed, in a fixed parameter order, so the same spec gives bit-identical weights in
every process; the global RNG state is left untouched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from potstill.core.errors import PotstillError
from potstill.core.tokenizers import gpt2_byte_table

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "BOS_EOS_TOKEN",
    "DEFAULT_LAYERS",
    "DEFAULT_WIDTH",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "PAD_TOKEN",
    "TINY_CHAT_TEMPLATE",
    "TinySpec",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "padded_vocab_size",
    "parse_tiny_spec",
    "tiny_config",
]

DEFAULT_LAYERS = 2
DEFAULT_WIDTH = 64
# Upper bounds only guard against typos like `tiny:1:2x64000` allocating gigabytes.
MAX_LAYERS = 64
MAX_WIDTH = 4096
VOCAB_MULTIPLE = 64

BOS_EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Order fixes the ids: bytes take 0..255, specials 256..259.
SPECIAL_TOKENS = (BOS_EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

# ChatML, as SmolLM2-Instruct uses, minus SmolLM2's injected default system prompt.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_SPEC_FORMS = "'tiny:<seed>' or 'tiny:<seed>:<layers>x<width>' (e.g. 'tiny:0', 'tiny:7:4x128')"
_TINY_RE = re.compile(r"tiny:(\d+)(?::(\d+)x(\d+))?")


@dataclass(frozen=True)
class TinySpec:
    """A parsed ``tiny:`` spec: RNG seed and architecture (layers, hidden width)."""

    seed: int
    layers: int = DEFAULT_LAYERS
    width: int = DEFAULT_WIDTH


def parse_tiny_spec(spec: str) -> TinySpec:
    """Parse ``tiny:<seed>`` / ``tiny:<seed>:<layers>x<width>``; PotstillError if malformed."""
    m = _TINY_RE.fullmatch(spec.strip())
    if m is None:
        raise PotstillError(f"bad tiny model spec {spec!r}: use {TINY_SPEC_FORMS}")
    seed = int(m.group(1))
    layers = int(m.group(2)) if m.group(2) else DEFAULT_LAYERS
    width = int(m.group(3)) if m.group(3) else DEFAULT_WIDTH
    _check_arch(layers, width, where=f"tiny model spec {spec!r}")
    return TinySpec(seed=seed, layers=layers, width=width)


def _check_arch(layers: int, width: int, *, where: str) -> None:
    if not 1 <= layers <= MAX_LAYERS:
        raise PotstillError(f"{where}: layers must be in 1..{MAX_LAYERS}, got {layers}")
    # Even width keeps head_dim even (RoPE rotates pairs of channels).
    if not (8 <= width <= MAX_WIDTH and width % 2 == 0):
        raise PotstillError(
            f"{where}: width must be an even number in 8..{MAX_WIDTH}, got {width} (e.g. 64, 128)"
        )


def padded_vocab_size(n_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``n_tokens`` rounded up to a multiple of ``multiple`` (the padded logits width)."""
    return int(math.ceil(n_tokens / multiple) * multiple)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The shared tiny tokenizer: 256 byte tokens (id == byte value) + 4 specials (256..259).

    No merges, so every UTF-8 byte is one token and encode/decode round-trips any text
    exactly. ``<|endoftext|>`` is bos and eos, ``<|pad|>`` is pad; ``chat_template`` is
    ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``) with ``add_generation_prompt``.
    Built from scratch every call (cheap, no files).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in gpt2_byte_table().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: with no merges, splitting into words would change nothing.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_EOS_TOKEN,
        eos_token=BOS_EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=2048,
        padding_side="right",
    )


def _n_heads(width: int) -> tuple[int, int]:
    """(query heads, key/value heads) for ``width``: head_dim ~16, GQA 2:1 when possible."""
    heads = max(1, width // 16)
    # Shrink until heads divide width with an even head_dim (RoPE needs pairs).
    while width % heads or (width // heads) % 2:
        heads -= 1
    kv_heads = heads // 2 if heads % 2 == 0 else heads
    return heads, kv_heads


def tiny_config(layers: int, width: int, vocab_size: int) -> LlamaConfig:
    """LlamaConfig for a tiny model: ``layers`` blocks of hidden size ``width``.

    Heads = width // 16 (head_dim 16, at least 1 head), grouped-query attention with
    half as many key/value heads when the head count is even, MLP width 2*width,
    2048 positions, tied input/output embeddings. Token ids follow
    :func:`build_tiny_tokenizer` (bos = eos = 256, pad = 257).
    """
    from transformers import LlamaConfig

    _check_arch(layers, width, where="tiny_config")
    heads, kv_heads = _n_heads(width)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=257,
        attention_dropout=0.0,
    )


def build_tiny_model(spec: TinySpec | str, *, dtype: torch.dtype | None = None) -> LlamaForCausalLM:
    """Build the random tiny model for ``spec`` (deterministic; eval mode).

    Init (ours, not transformers', so a library upgrade cannot change the weights):
    RMSNorm weights 1; token embeddings N(0, 1/width), so tied-head logits have std ~1
    (a peaked enough teacher to distil); every other matrix N(0, 0.02^2).
    """
    import torch
    from transformers import LlamaForCausalLM

    if isinstance(spec, str):
        spec = parse_tiny_spec(spec)
    config = tiny_config(spec.layers, spec.width, padded_vocab_size(len(build_tiny_tokenizer())))
    # fork_rng: transformers' own init draws from the global RNG; keep callers' RNG intact.
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    with torch.no_grad():
        # named_parameters() lists a tied weight once, in module order: a fixed sequence.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("embed_tokens.weight"):
                std = 1.0 / math.sqrt(spec.width)
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    if dtype is not None:
        model = model.to(dtype)  # type: ignore[arg-type]  # transformers mistypes .to
    model.config.name_or_path = f"tiny:{spec.seed}:{spec.layers}x{spec.width}"
    return model.eval()
