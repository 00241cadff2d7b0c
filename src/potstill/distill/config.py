"""Typed configs: YAML files plus dotted command-line overrides, validated on load.

Every field carries a doc line (``Field(description=...)``); choices are
``Literal``s; unknown keys are rejected. :func:`load_config` turns any
validation problem into a one-line :class:`~potstill.core.errors.PotstillError` that
names the bad field and what is allowed, so the CLI can exit with code 2.

Example::

    potstill distill --config configs/tiny.yaml train.steps=20 loss.kind=reverse_kl
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)

from potstill.core.errors import PotstillError
from potstill.core.specs import (
    DataSource,
    ModelSpec,
    PromptSource,
    TeacherSpec,
    parse_data_source,
    parse_model_spec,
    parse_prompt_source,
    parse_teacher_spec,
)

LossKind = Literal[
    "forward_kl", "reverse_kl", "generalized_jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"
]


def _parse_with(parse: Callable[[Any], Any]) -> BeforeValidator:
    """Parse a spec string once, on load; its PotstillError becomes a validation error."""

    def run(value: Any) -> Any:
        try:
            return parse(value)
        except PotstillError as e:
            raise ValueError(str(e)) from None

    return BeforeValidator(run)


# Typed specs (potstill.core.specs): parsed on load, written back as their canonical strings.
TeacherField = Annotated[
    TeacherSpec, _parse_with(parse_teacher_spec), PlainSerializer(str, return_type=str)
]
ModelField = Annotated[
    ModelSpec, _parse_with(parse_model_spec), PlainSerializer(str, return_type=str)
]
DataField = Annotated[
    DataSource, _parse_with(parse_data_source), PlainSerializer(str, return_type=str)
]
PromptField = Annotated[
    PromptSource, _parse_with(parse_prompt_source), PlainSerializer(str, return_type=str)
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


class TeacherConfig(_Strict):
    spec: TeacherField = Field(
        "smollm2-135m-instruct",
        description=(
            "Teacher: a model spec (tiny:<seed>[:<L>x<W>], an alias, an HF directory, a .gguf file), "
            "cache:DIR (a logit cache), http(s)://host:port/v1 (an OpenAI-compatible endpoint "
            "that scores tokens by echoed logprobs), or none (the data carries the teacher's "
            "outputs)."
        ),
    )
    model: str | None = Field(
        None,
        description="Endpoint teacher: the served model's name; null = the first of /v1/models.",
    )
    api_key_env: str | None = Field(
        None,
        description="Endpoint teacher: the environment variable holding its API key (the key "
        "itself is never written to a config or log).",
    )
    top_logprobs: int = Field(
        20, ge=1, le=100, description="Endpoint teacher: top-k logprobs asked per position."
    )
    concurrency: int = Field(
        8, ge=1, le=256, description="Endpoint teacher: requests in flight at once."
    )
    timeout_s: float = Field(
        120.0, gt=0.0, description="Endpoint teacher: seconds per request before a retry."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32",
        description="Dtype the teacher's weights are loaded in; auto = bfloat16 only where the "
        "hardware runs bf16 natively (potstill.core.hardware), else float32.",
    )


class StudentConfig(_Strict):
    init: Literal["scratch", "checkpoint"] = Field(
        "scratch",
        description="Build a fresh Llama from the shape below, or start from `checkpoint`.",
    )
    checkpoint: ModelField | None = Field(
        None, description="Model spec to start from when init=checkpoint (HF directory or tiny:)."
    )
    layers: int = Field(4, ge=1, le=64, description="Decoder layers of a scratch student.")
    width: int = Field(256, ge=16, le=8192, description="Hidden size of a scratch student.")
    heads: int | None = Field(
        None, ge=1, description="Attention heads; default width // 64 (min 1)."
    )
    intermediate: int | None = Field(
        None, ge=1, description="MLP size; default 8/3 * width, rounded to 64."
    )
    seed: int = Field(0, description="Seed of the scratch student's initialisation.")
    tokenizer: ModelField | None = Field(
        None, description="Model spec whose tokenizer the student uses; default: the teacher's."
    )
    train_top_layers: int | None = Field(
        None,
        ge=1,
        description="Train only the top N decoder layers and the final norm (embeddings and "
        "the tied head frozen; ~2.5x faster steps for a 30-layer model); None trains all.",
    )

    @model_validator(mode="after")
    def _checkpoint_given(self) -> StudentConfig:
        if self.init == "checkpoint" and not self.checkpoint:
            raise ValueError("student.init=checkpoint needs student.checkpoint (a model spec)")
        if self.heads is not None and self.width % self.heads:
            raise ValueError(
                f"student.width={self.width} is not divisible by student.heads={self.heads}"
            )
        return self


class OnPolicyConfig(_Strict):
    """GKD-style on-policy distillation: some micro-batches are the student's own samples."""

    lmbda: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of micro-batches whose completions are sampled from the current "
        "student (GKD's lambda); 0 = off-policy only, 1 = on-policy only.",
    )
    temperature: float = Field(
        1.0, ge=0.0, le=2.0, description="Student sampling temperature; 0 = greedy."
    )
    max_new_tokens: int = Field(
        64, ge=1, le=4096, description="Tokens the student samples per completion, at most."
    )
    prompts: PromptField = Field(
        "data",
        description="Rollout prompts: data (the start of each training sequence), default, "
        "harvest:STORE.sqlite, or a prompts file (.jsonl or .txt).",
    )
    prompt_tokens: int = Field(
        32,
        ge=1,
        description="With prompts=data on plain text: the first N tokens of a sequence are "
        "its prompt.",
    )


class CrossTokenizerConfig(_Strict):
    """KD between different tokenizers, on byte-aligned positions (potstill.distill.losses.crosstok)."""

    kind: Literal["hybrid", "uld"] = Field(
        "hybrid",
        description="hybrid: exact KL on the shared tokens plus ULD on the rest; uld: ULD "
        "(sorted-probability L1) on the whole distributions.",
    )
    uld_weight: float = Field(
        1.0, ge=0.0, description="hybrid: weight of the ULD term on the unshared tokens."
    )
    uld_top: int = Field(
        256, ge=1, description="Largest probabilities per side that ULD compares (sorted)."
    )
    chunk_rows: int = Field(
        256, ge=1, description="Aligned positions whose teacher logits exist at once."
    )


class LossConfig(_Strict):
    kind: LossKind = Field("forward_kl", description="KD divergence between teacher and student.")
    beta: float = Field(
        0.5, ge=0.0, le=1.0, description="generalized_jsd mix: 0=forward KL, 1=reverse KL."
    )
    skew_alpha: float = Field(
        0.1, ge=0.0, le=1.0, description="Skew KL mix of the student into the teacher (DistiLLM)."
    )
    temperature: float = Field(
        1.0, gt=0.0, description="Softmax temperature; the loss is scaled by T^2."
    )
    ce_weight: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="alpha in alpha*CE + (1-alpha)*KD. 1.0 trains on CE alone (no teacher is loaded).",
    )
    chunk_tokens: int | None = Field(
        None,
        ge=1,
        description="Compute the student's projection and KD loss in chunks of this many tokens (bounded memory).",
    )
    on_policy: OnPolicyConfig | None = Field(
        None, description="On-policy rollouts (GKD); null = train on the data only."
    )
    cross_tokenizer: CrossTokenizerConfig | None = Field(
        None,
        description="Distil from a teacher with another tokenizer (needs student.tokenizer); "
        "null = the tokenizers must agree.",
    )


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(
        0.1, ge=0.0, description="AdamW decoupled weight decay (matrices only)."
    )
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW beta2.")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    grad_clip: float | None = Field(
        1.0, gt=0.0, description="Clip the global gradient norm; null = off."
    )
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Final LR as a fraction of the peak."
    )


class DataConfig(_Strict):
    train: DataField = Field(
        "shakespeare:train",
        description="Training text source (see potstill.distill.data.load_texts).",
    )
    eval: DataField | None = Field(
        "shakespeare:heldout", description="Held-out text source; null = no eval."
    )
    seq_len: int = Field(256, ge=8, le=32768, description="Tokens per training sequence.")
    packing: bool = Field(
        True, description="Pack documents end to end (eos-separated) instead of padding."
    )
    eval_blocks: int = Field(32, ge=1, description="Held-out sequences used for periodic eval.")


class TrainConfig(_Strict):
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward pass per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    bf16: bool = Field(
        False, description="bf16 autocast for the student and teacher forward passes."
    )
    seed: int = Field(0, description="Seed for data order and any sampling.")
    eval_every: int = Field(
        50, ge=0, description="Eval interval in optimizer steps; 0 = only at the end."
    )
    save_every: int = Field(
        50, ge=0, description="Checkpoint interval in optimizer steps; 0 = only at the end."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (oldest deleted).")
    log_every: int = Field(1, ge=1, description="Metrics interval in optimizer steps.")
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; null = torch default."
    )


class DistillConfig(_Strict):
    """One distillation run: teacher, student, loss, optimiser, data and loop."""

    out_dir: str = Field(
        "runs/distill", description="Run folder: student/, checkpoints/, metrics.jsonl, report."
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher model.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="Student model.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Objective.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser and schedule.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")

    @model_validator(mode="after")
    def _cross_tokenizer_needs(self) -> DistillConfig:
        if self.loss.cross_tokenizer is None:
            return self
        if self.student.tokenizer is None and self.student.init != "checkpoint":
            raise ValueError(
                "loss.cross_tokenizer needs the student's own tokenizer: set student.tokenizer "
                "(a model spec), or start from student.checkpoint"
            )
        if self.loss.kind != "forward_kl":
            raise ValueError(
                f"loss.cross_tokenizer sets its own divergence (loss.cross_tokenizer.kind); "
                f"leave loss.kind=forward_kl (got {self.loss.kind})"
            )
        return self

    @model_validator(mode="after")
    def _on_policy_fits(self) -> DistillConfig:
        op = self.loss.on_policy
        if op is not None and op.lmbda > 0 and op.max_new_tokens >= self.data.seq_len:
            raise ValueError(
                f"loss.on_policy.max_new_tokens={op.max_new_tokens} leaves no room for a prompt "
                f"in data.seq_len={self.data.seq_len}; lower it or raise data.seq_len"
            )
        return self


C = TypeVar("C", bound=BaseModel)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise PotstillError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise PotstillError(f"override {item!r} is not of the form section.field=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and value.strip().lower() not in ("nan", "inf", "-inf"):
            # YAML 1.1 reads "1e-3" as a string; users mean a float.
            with contextlib.suppress(ValueError):
                value = float(value)
        _set_dotted(tree, key.strip(), value)
    return tree


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line naming each bad field, e.g. ``loss.kindd: unknown field``."""
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            problems.append(
                f"{loc}: unknown field (check the spelling; see configs/ for the schema)"
            )
        else:
            problems.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid config {source}: " + "; ".join(problems)


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus overrides.

    Raises PotstillError with one line naming the bad field when validation fails.
    """
    raw: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise PotstillError(
                f"config file {p} does not exist; pass an existing YAML file (see configs/)"
            )
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise PotstillError(
                f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}"
            ) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise PotstillError(
                f"config file {p} must hold a mapping of sections, not {type(loaded).__name__}"
            )
        raw = loaded
    if overrides:
        raw = _deep_merge(raw, parse_overrides(overrides))
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, source)) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML, recorded in every run folder for reproducibility."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
