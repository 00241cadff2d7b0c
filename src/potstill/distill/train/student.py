"""Building the student: a fresh Llama of a given shape, or a checkpoint to start from."""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from potstill.core.tiny import padded_vocab_size
from potstill.distill.config import StudentConfig


def scratch_llama_config(
    cfg: StudentConfig, tokenizer: PreTrainedTokenizerBase, *, max_len: int
) -> LlamaConfig:
    heads = cfg.heads or max(1, cfg.width // 64)
    inter = cfg.intermediate or int(math.ceil(cfg.width * 8 / 3 / 64) * 64)
    return LlamaConfig(
        vocab_size=padded_vocab_size(len(tokenizer)),  # real models pad their embeddings
        hidden_size=cfg.width,
        intermediate_size=inter,
        num_hidden_layers=cfg.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(2048, max_len),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_student(
    cfg: StudentConfig, tokenizer: PreTrainedTokenizerBase, *, max_len: int
) -> PreTrainedModel:
    """A fresh student, initialised from ``cfg.seed`` without touching the global RNG."""
    config = scratch_llama_config(cfg, tokenizer, max_len=max_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    return model


def count_params(model: torch.nn.Module) -> int:
    # Tied embeddings are one tensor; count unique storage once.
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total
