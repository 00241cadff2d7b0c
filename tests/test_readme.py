"""Every command in the README's shell blocks names real verbs, flags and files.

The commands themselves are exercised by the behaviour tests of each verb; this test catches a
README that drifts from the CLI (a renamed flag, a removed verb, a missing config file), which
argparse would otherwise only report to the first user who copies the line.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from potstill.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def shell_commands(text: str) -> list[str]:
    """Commands of the ```sh blocks: continuation lines joined, comments dropped."""
    out: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def potstill_argv(command: str) -> list[str] | None:
    """The argv after ``potstill`` (or ``-m potstill.cli``), or None for other programs."""
    words = shlex.split(command)
    for marker in ("potstill", "potstill.cli"):
        if marker in words:
            return words[words.index(marker) + 1 :]
    return None


COMMANDS = shell_commands(README.read_text())
POTSTILL = [c for c in COMMANDS if potstill_argv(c) is not None]


def test_readme_has_the_two_setup_commands_first() -> None:
    assert COMMANDS[:2] == ["make demo", "make test"]
    targets = re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), flags=re.M)
    assert {"demo", "test"} <= set(targets)


def test_readme_lists_commands_for_every_part() -> None:
    verbs = {potstill_argv(c)[0] for c in POTSTILL}  # type: ignore[index]
    assert {"distill", "serve", "harvest", "audit", "defend", "monitor"} <= verbs


@pytest.mark.parametrize("command", POTSTILL)
def test_readme_command_parses(command: str) -> None:
    argv = potstill_argv(command)
    assert argv is not None
    args = build_parser().parse_args(argv)  # argparse raises SystemExit on a bad flag or verb
    assert callable(getattr(args, "func", None)), f"no handler for: {command}"
    for value in vars(args).values():  # shipped config files named in the README must exist
        if isinstance(value, str) and value.startswith("configs/"):
            assert (REPO / value).is_file(), f"{value} (in: {command}) does not exist"


DISTILL = [c for c in POTSTILL if (potstill_argv(c) or [""])[0] == "distill"]


@pytest.mark.parametrize("command", DISTILL)
def test_readme_distill_commands_give_valid_configs(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each `potstill distill` line's config file plus overrides validates (field names, ranges,
    the on-policy and cross-tokenizer checks), as the CLI does before running."""
    from potstill.distill.config import DistillConfig, load_config

    args = build_parser().parse_args(potstill_argv(command))
    monkeypatch.chdir(REPO)
    load_config(DistillConfig, args.config, args.overrides)
