"""Model specs: the one way every potstill command turns a string into a model.

Accepted specs (checked in this order):

1. ``tiny:<seed>`` / ``tiny:<seed>:<layers>x<width>``: a random tiny Llama built in
   process (:mod:`potstill.core.tiny`); nothing touches the disk.
2. An alias, e.g. ``smollm2-135m-instruct``: a GGUF file shipped inside a PyPI wheel
   (located via package metadata, never imported), converted ONCE to a safetensors HF
   directory under ``$POTSTILL_CACHE/models/<alias>`` (default ``~/.cache/potstill``).
   An alias shadows a same-named directory in the working dir; write ``./name`` for that.
3. A local HF directory (contains ``config.json``).
4. A path to a ``.gguf`` file: converted once too, cached under
   ``$POTSTILL_CACHE/models/gguf-<stem>-<key>`` where ``key`` hashes the file's absolute
   path, size and mtime, so an edited file is converted again (the old copy is left).

Conversions are atomic: written into a temp dir next to the target, then renamed, so a
crash never leaves a half-written cache and concurrent first uses are safe. Nothing
ever goes to the network: every load passes ``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from potstill.core.errors import PotstillError
from potstill.core.io import cache_root
from potstill.core.specs import (
    ACCEPTED_FORMS,
    ALIASES,
    AliasModel,
    GgufAlias,
    GgufModel,
    ModelSpec,
    TinyModel,
    parse_model_spec,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ACCEPTED_FORMS",
    "ALIASES",
    "GgufAlias",
    "alias_gguf_path",
    "cache_root",
    "convert_gguf",
    "load_model",
    "load_tokenizer",
    "resolve_model_dir",
]

log = logging.getLogger(__name__)


_SOURCE_FILE = "potstill_source.json"  # provenance note written into converted dirs


def alias_gguf_path(alias: str) -> Path:
    """Locate the GGUF file of ``alias`` in its installed wheel; PotstillError if absent."""
    entry = ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(entry.dist)
    except importlib.metadata.PackageNotFoundError:
        raise PotstillError(
            f"model {alias!r} needs the {entry.dist} package, which is not installed: "
            f"{entry.install_hint}"
        ) from None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == entry.file:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise PotstillError(
        f"model {alias!r}: {entry.file} is missing from the installed {entry.dist} "
        f"{dist.version}: reinstall it: {entry.install_hint}"
    )


def _pretrained_dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` for transformers >= 4.56 (it renamed ``torch_dtype``), else ``torch_dtype=``."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / "models" / f"gguf-{gguf.stem.lower()}-{key[:16]}"


def _load_from_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise a GGUF file into an fp32 transformers model + its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, **kwargs, **_pretrained_dtype_kwargs(torch.float32)
        )
    except ImportError as e:
        raise PotstillError(f"loading {gguf} needs the gguf package: pip install gguf ({e})") from e
    except (ValueError, KeyError, NotImplementedError) as e:
        raise PotstillError(
            f"cannot load GGUF file {gguf}: {e}; transformers reads GGUF only for some "
            "architectures (llama, mistral, qwen2, ...): convert it to a Hugging Face directory"
        ) from e
    # The weights are now plain dequantised tensors; drop the GGUF marker so the saved
    # directory loads as an ordinary checkpoint.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module's setattr typing
    return model, tok


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Convert ``gguf`` into a safetensors HF directory at ``target`` unless it exists.

    Written into a temp dir beside ``target`` and renamed into place (atomic on one
    filesystem). If another process wins the race, its copy is kept. Returns ``target``.
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        t0 = time.perf_counter()
        log.info("converting %s to %s (once)", gguf, target)
        model, tok = _load_from_gguf(gguf)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        st = gguf.stat()
        source = {"gguf": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache is an ordinary directory
        try:
            os.rename(tmp, target)
        except OSError:
            # Lost a race: target appeared (non-empty dir) after our check.
            if not (target / "config.json").is_file():
                raise
        log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _bad_spec(spec: object, why: str) -> PotstillError:
    return PotstillError(f"bad model spec {str(spec)!r}: {why}; use {ACCEPTED_FORMS}")


def resolve_model_dir(spec: str | ModelSpec) -> Path | None:
    """Local HF directory for ``spec``; None for ``tiny:`` specs (built in memory).

    Aliases and ``.gguf`` paths are converted on first use (see module doc) and the cache
    directory is returned. PotstillError for anything that is not an accepted form.
    """
    parsed = parse_model_spec(spec)
    if isinstance(parsed, TinyModel):
        return None
    if isinstance(parsed, AliasModel):
        return convert_gguf(alias_gguf_path(parsed.name), cache_root() / "models" / parsed.name)
    path = parsed.path  # a directory named *.gguf still counts as a directory, as it is one
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise _bad_spec(parsed, f"directory {path} has no config.json")
    if path.is_file():
        if isinstance(parsed, GgufModel):
            return convert_gguf(path, _gguf_cache_dir(path))
        raise _bad_spec(parsed, f"{path} is a file but not a .gguf")
    raise _bad_spec(
        parsed, "no such file or directory and not a known alias (nothing is downloaded)"
    )


def load_tokenizer(spec: str | ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer of ``spec`` (see module doc for the accepted forms)."""
    model_dir = resolve_model_dir(spec)
    if model_dir is None:
        from potstill.core.tiny import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise PotstillError(
            f"cannot load the tokenizer of {str(spec)!r} from {model_dir}: {e}"
        ) from e


def load_model(
    spec: str | ModelSpec, *, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(causal LM in eval mode, its tokenizer) for ``spec``; weights in ``dtype`` (fp32 default).

    The model lives on the CPU; move it with ``.to(device)``.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    parsed = parse_model_spec(spec)
    model_dir = resolve_model_dir(parsed)
    if isinstance(parsed, TinyModel):
        from potstill.core.tiny import TinySpec, build_tiny_model, build_tiny_tokenizer

        arch = TinySpec(parsed.seed, parsed.layers, parsed.width)
        return build_tiny_model(arch, dtype=dtype), build_tiny_tokenizer()
    assert model_dir is not None
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(parsed)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, **_pretrained_dtype_kwargs(dtype)
        )
    except (OSError, ValueError) as e:
        raise PotstillError(f"cannot load model {str(spec)!r} from {model_dir}: {e}") from e
    return model.eval(), tok
