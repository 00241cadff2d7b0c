"""Every benchmark result file says where it came from (benchmarks/_provenance.py): the commit,
whether the tree was dirty, the command, when it ran, the machine and the library versions;
and a file or block moved from another run names that run's commit and the moved bytes' hash."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO

RESULTS = sorted((REPO / "benchmarks" / "results").glob("*.json"))
SHA1, SHA256 = re.compile(r"[0-9a-f]{40}"), re.compile(r"[0-9a-f]{64}")
STAMP = "%Y-%m-%dT%H:%M:%SZ"


def check_provenance(p: Any) -> None:
    assert isinstance(p, dict), "no top-level provenance object"
    assert SHA1.fullmatch(p["commit"]), p["commit"]
    assert isinstance(p["dirty"], bool)
    assert isinstance(p["command"], str) and p["command"].split()[0].startswith("python")
    started, ended = (time.strptime(p[k], STAMP) for k in ("started", "ended"))
    assert ended >= started
    machine = p["machine"]
    assert machine["cpu"] and isinstance(machine["cores"], int) and machine["cores"] >= 1
    assert "torch" in p["versions"]
    for block, origin in (p.get("reused") or {}).items():  # a block taken from another run
        assert SHA256.fullmatch(origin["sha256"]) and SHA1.fullmatch(origin["commit"]), block


def test_there_are_result_files() -> None:
    assert len(RESULTS) >= 10


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_every_result_file_records_its_provenance(path: Path) -> None:
    check_provenance(json.loads(path.read_text())["provenance"])


def _git_show(rev: str, path: str) -> bytes | None:
    out = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True)
    return out.stdout if out.returncode == 0 else None


@pytest.mark.parametrize(
    "path",
    [p for p in RESULTS if "relocated" in json.loads(p.read_text())],
    ids=lambda p: p.name,
)
def test_a_relocated_result_names_its_origin_and_its_hash_matches(path: Path) -> None:
    """Where the history is in the checkout, the recorded hash is checked against the bytes
    committed at the named commit (a whole file, or the named block of it)."""
    moved = json.loads(path.read_text())
    rec = moved["relocated"]
    assert SHA1.fullmatch(rec["committed_in"]) and rec["from"].startswith("benchmarks/results/")
    old = _git_show(rec["committed_in"], rec["from"])
    if old is None:
        pytest.skip(f"{rec['committed_in'][:8]} is not in this checkout's history")
    if "sha256_of_file" in rec:
        assert hashlib.sha256(old).hexdigest() == rec["sha256_of_file"]
        assert {k: v for k, v in moved.items() if k != "relocated"} == json.loads(old)
    else:
        block = json.loads(old)[rec["block"]]
        digest = hashlib.sha256(json.dumps(block, sort_keys=True).encode()).hexdigest()
        assert digest == rec["sha256_of_block"]


def test_the_helper_writes_what_the_check_asks_for() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from _provenance import provenance
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    check_provenance(provenance(time.time() - 1.0))
