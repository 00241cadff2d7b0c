"""Typed specs (potstill.core.specs): each form parses to its type, round-trips through str,
is parsed once on config load, and no other module tests a spec's prefix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from potstill.core.errors import PotstillError
from potstill.core.specs import (
    AliasModel,
    CachedTeacher,
    ChatSource,
    GgufModel,
    HFDirModel,
    NoTeacher,
    ShakespeareText,
    SyntheticText,
    TextPath,
    TinyModel,
    parse_data_source,
    parse_model_spec,
    parse_teacher_spec,
)
from potstill.distill.config import DistillConfig, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "kind", "fields"),
    [
        ("tiny:7:3x32", TinyModel, {"seed": 7, "layers": 3, "width": 32}),
        ("tiny:2", TinyModel, {"seed": 2}),
        ("SmolLM2-135M-Instruct", AliasModel, {"name": "smollm2-135m-instruct"}),
        ("runs/x/student", HFDirModel, {"path": Path("runs/x/student")}),
        ("m/Model.GGUF", GgufModel, {"path": Path("m/Model.GGUF")}),
    ],
)
def test_model_specs_parse_to_their_type(text: str, kind: type, fields: dict) -> None:
    spec = parse_model_spec(f"  {text} ")
    assert isinstance(spec, kind)
    assert {k: getattr(spec, k) for k in fields} == fields
    assert parse_model_spec(str(spec)) == spec  # the canonical string round-trips
    assert parse_model_spec(spec) is spec  # a parsed spec is not parsed again


def test_teacher_kinds_and_data_sources() -> None:
    assert parse_teacher_spec("none") == NoTeacher()
    cache = parse_teacher_spec("cache:caches/k64")
    assert (
        cache == CachedTeacher(Path("caches/k64"), "caches/k64")
        and str(cache) == "cache:caches/k64"
    )
    assert isinstance(parse_teacher_spec("tiny:0"), TinyModel)
    cases = {
        "shakespeare:heldout": ShakespeareText("heldout"),
        "synthetic:3": SyntheticText(3, 200, "synthetic:3"),
        "synthetic:3:50": SyntheticText(3, 50, "synthetic:3:50"),
        "harvest:h.sqlite": ChatSource("harvest", Path("h.sqlite"), "h.sqlite"),
        "messages:m.jsonl": ChatSource("messages", Path("m.jsonl"), "m.jsonl"),
        "docs/a.txt": TextPath(Path("docs/a.txt"), "docs/a.txt"),
    }
    for text, want in cases.items():
        got = parse_data_source(text)
        assert got == want and str(got) == text


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (parse_model_spec, "", "empty"),
        (parse_model_spec, "tiny:x", "bad tiny model spec"),
        (parse_model_spec, "tiny:1:0x64", "layers must be in"),
        (parse_teacher_spec, "cache:", "give the cache directory"),
        (parse_data_source, "shakespeare:all", "use shakespeare:train or shakespeare:heldout"),
        (parse_data_source, "synthetic:1:0", "n_docs >= 1"),
        (parse_data_source, "harvest:", "give a path after harvest:"),
    ],
)
def test_bad_specs_say_what_to_write(parse: object, text: str, message: str) -> None:
    with pytest.raises(PotstillError, match=re.escape(message)):
        parse(text)  # type: ignore[operator]


def test_config_parses_specs_once_on_load_and_dumps_them_as_strings(tmp_path: Path) -> None:
    cfg = DistillConfig.model_validate(
        {
            "out_dir": str(tmp_path / "o"),
            "teacher": {"spec": "cache:c"},
            "student": {"tokenizer": "tiny:0"},
            "data": {"train": "messages:m.jsonl", "eval": None},
        }
    )
    assert isinstance(cfg.teacher.spec, CachedTeacher)
    assert isinstance(cfg.student.tokenizer, TinyModel)
    assert isinstance(cfg.data.train, ChatSource) and cfg.data.eval is None
    assert isinstance(DistillConfig.model_validate({"out_dir": "o"}).teacher.spec, AliasModel)
    dumped = cfg.model_dump(mode="json")
    assert dumped["teacher"]["spec"] == "cache:c" and dumped["data"]["train"] == "messages:m.jsonl"
    assert DistillConfig.model_validate(dumped) == cfg
    cfg.data.train = "synthetic:1"  # assignment is validated too
    assert cfg.data.train == SyntheticText(1, 200, "synthetic:1")
    bad = tmp_path / "bad.yaml"
    bad.write_text("out_dir: o\ndata:\n  train: synthetic:zero\n")
    with pytest.raises(PotstillError, match="synthetic:<seed>"):
        load_config(DistillConfig, bad)


def test_no_module_but_the_spec_module_tests_a_spec_prefix() -> None:
    prefixes = "none|cache:|harvest:|messages:|shakespeare:|synthetic:|tiny:"
    sniff = re.compile(
        rf"""(startswith|removeprefix)\(\(?["']({prefixes})|==\s*["']({prefixes})["']"""
    )
    found = []
    for path in sorted((REPO / "src" / "potstill").rglob("*.py")):
        if path.name == "specs.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if sniff.search(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "parse specs in potstill.core.specs:\n" + "\n".join(found)
