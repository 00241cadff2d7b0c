"""Typed configs: YAML + dotted overrides, one clear error per bad field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from potstill.core.errors import PotstillError
from potstill.distill.config import DistillConfig, dump_config, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides() -> None:
    cfg = load_config(
        DistillConfig, None, ["loss.kind=reverse_kl", "train.steps=7", "optim.grad_clip=null"]
    )
    assert cfg.loss.kind == "reverse_kl"
    assert cfg.train.steps == 7
    assert cfg.optim.grad_clip is None
    assert str(cfg.teacher.spec) == "smollm2-135m-instruct"


def test_override_values_are_yaml_scalars() -> None:
    tree = parse_overrides(["a.b=1e-3", "a.c=true", "d=tiny:0", "e=[1, 2]"])
    assert tree == {"a": {"b": 1e-3, "c": True}, "d": "tiny:0", "e": [1, 2]}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(DistillConfig, path)
    # Round trip: the dump of a loaded config loads to the same config.
    again = DistillConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["loss.kindd=forward_kl"], "loss.kindd: unknown field"),
        (["optim.lr=-1"], "optim.lr"),
        (["loss.kind=kl"], "loss.kind"),
        (["loss.beta=1.5"], "loss.beta"),
        (["student.init=checkpoint"], "student.checkpoint"),
        (["train.steps=0"], "train.steps"),
        (["nonsense"], "not of the form"),
    ],
)
def test_bad_values_name_the_field(overrides: list[str], needle: str) -> None:
    with pytest.raises(PotstillError) as exc:
        load_config(DistillConfig, None, overrides)
    msg = str(exc.value)
    assert needle in msg
    assert "\n" not in msg


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(PotstillError, match="does not exist"):
        load_config(DistillConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(PotstillError, match="not valid YAML"):
        load_config(DistillConfig, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(PotstillError, match="mapping"):
        load_config(DistillConfig, lst)


def test_every_field_has_a_doc_line() -> None:
    from pydantic import BaseModel

    def walk(model: type[BaseModel]) -> None:
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann)

    walk(DistillConfig)
