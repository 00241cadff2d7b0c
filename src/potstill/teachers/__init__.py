"""Model loading (specs) and the Teacher protocol.

``load_model("tiny:0")``, ``load_model("smollm2-135m-instruct")``, ``load_model("path/to/dir")``
or ``load_model("model.gguf")`` give ``(model, tokenizer)``; :class:`HFTeacher` wraps one as
a frozen teacher with logits cut to the vocab shared with the student.

Names are imported lazily so that ``import potstill.teachers`` (e.g. by the CLI to list
accepted specs) does not pull in torch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from potstill._lazy import lazy_exports

if TYPE_CHECKING:
    from potstill.teachers.base import (
        Teacher,
        check_tokenizers_agree,
        shared_vocab_size,
        tokenizer_fingerprint,
    )
    from potstill.teachers.hf import HFTeacher
    from potstill.teachers.registry import (
        ACCEPTED_FORMS,
        ALIASES,
        cache_root,
        load_model,
        load_tokenizer,
        resolve_model_dir,
    )
    from potstill.teachers.tiny import (
        build_tiny_model,
        build_tiny_tokenizer,
        padded_vocab_size,
        parse_tiny_spec,
        tiny_config,
    )

_EXPORTS = {
    "Teacher": "base",
    "check_tokenizers_agree": "base",
    "shared_vocab_size": "base",
    "tokenizer_fingerprint": "base",
    "HFTeacher": "hf",
    "ACCEPTED_FORMS": "registry",
    "ALIASES": "registry",
    "cache_root": "registry",
    "load_model": "registry",
    "load_tokenizer": "registry",
    "resolve_model_dir": "registry",
    "build_tiny_model": "tiny",
    "build_tiny_tokenizer": "tiny",
    "padded_vocab_size": "tiny",
    "parse_tiny_spec": "tiny",
    "tiny_config": "tiny",
}

__all__ = [
    "ACCEPTED_FORMS",
    "ALIASES",
    "HFTeacher",
    "Teacher",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "cache_root",
    "check_tokenizers_agree",
    "load_model",
    "load_tokenizer",
    "padded_vocab_size",
    "parse_tiny_spec",
    "resolve_model_dir",
    "shared_vocab_size",
    "tiny_config",
    "tokenizer_fingerprint",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
