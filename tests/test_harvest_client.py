"""The harvester and its store: retries, failures kept, exactly once under SIGKILL, CLI, prompts."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from potstill.cli import main
from potstill.core import store as st
from potstill.core.errors import PotstillError
from potstill.core.prompts import default_prompts, read_prompts
from potstill.harvest.client import GenParams, RetryPolicy, harvest, parse_retry_after

from .fake_openai import FakeOpenAI, answer_text

REPO = Path(__file__).resolve().parents[1]
# ~40% of the fake's answers are faults in the retry test: allow enough attempts
FAST = RetryPolicy(max_retries=20, base_s=0.005, cap_s=0.05, timeout_s=10)


def _msgs(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": p}] for p in default_prompts(n)]


def _expected_keys(prompts: list, model: str, params: GenParams, samples: int) -> set[str]:
    kp = params.key_dict()
    return {st.record_key(model, kp, m, s) for m in prompts for s in range(samples)}


def test_retries_then_every_record_once_with_deterministic_answers(tmp_path: Path) -> None:
    prompts, params, db = _msgs(60), GenParams(seed=5, max_tokens=64), tmp_path / "h.sqlite"
    with FakeOpenAI(latency_s=0.002, fail_every=5, rate_limit_every=7, drop_every=11) as fake:
        stats = harvest(
            prompts,
            db,
            endpoint=fake.url,
            model="m",
            params=params,
            samples=2,
            concurrency=8,
            policy=FAST,
        )
        n_http = fake.n_requests
    assert stats.done == 120 and stats.failed == 0 and stats.retries > 0, stats
    assert n_http == 120 + stats.retries  # every failed attempt was retried, none extra
    conn = st.connect(db)
    recs = list(st.iter_records(conn))
    assert {r["key"] for r in recs} == _expected_keys(prompts, "m", params, 2)
    assert len(recs) == 120
    for r in recs:  # the fake's answer is a pure function of (messages, seed): check the mapping
        sent = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        want = answer_text(json.dumps(sent), 5 + r["sample"], 64)
        assert r["completion"] == want and r["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] == len(want.encode())
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_failures_are_recorded_and_retried_next_run(tmp_path: Path) -> None:
    prompts, db = _msgs(30), tmp_path / "h.sqlite"
    no_retry = RetryPolicy(max_retries=0, base_s=0.001, timeout_s=10)
    with FakeOpenAI(fail_every=3) as fake:
        s1 = harvest(prompts, db, endpoint=fake.url, model="m", concurrency=1, policy=no_retry)
    assert s1.failed == 10 and s1.done == 20  # every 3rd request failed, not silently dropped
    conn = st.connect(db)
    assert st.counts(conn) == {"records": 20, "failed": 10}
    fails = conn.execute("SELECT status, attempts FROM failures").fetchall()
    assert fails == [(500, 1)] * 10
    with FakeOpenAI() as fake:
        s2 = harvest(prompts, db, endpoint=fake.url, model="m", concurrency=4, policy=no_retry)
    assert (s2.skipped, s2.done, s2.failed) == (20, 10, 0)
    assert st.counts(conn) == {"records": 30, "failed": 0}
    assert conn.execute("SELECT COUNT(*) FROM failures").fetchone()[0] == 0


def test_retry_after_and_backoff() -> None:
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({}) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < parse_retry_after({"retry-after": date}) <= 30  # type: ignore[operator]
    pol, rng = RetryPolicy(base_s=0.5, cap_s=4.0), random.Random(0)
    for attempt in range(8):
        d = [pol.delay(attempt, None, rng) for _ in range(200)]
        bound = min(4.0, 0.5 * 2**attempt)
        assert min(d) >= 0 and max(d) <= bound and max(d) > 0.8 * bound  # full jitter
    assert pol.delay(0, 3.0, rng) == 3.0  # never sooner than the server asked


def test_bad_endpoint_or_prompts_are_user_errors(tmp_path: Path) -> None:
    with FakeOpenAI() as fake, pytest.raises(PotstillError, match="--endpoint"):
        harvest(
            _msgs(3), tmp_path / "h.sqlite", endpoint=fake.url + "/nope", model="m", policy=FAST
        )
    with pytest.raises(PotstillError, match="bad endpoint URL"):
        harvest(_msgs(1), tmp_path / "h.sqlite", endpoint="ftp://x", model="m")
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(PotstillError, match=r"p.jsonl:2"):
        read_prompts(bad)
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(PotstillError, match=r"p.jsonl:2: not valid JSON"):
        read_prompts(bad)
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(PotstillError, match="no prompts"):
        read_prompts(tmp_path / "e.txt")
    with pytest.raises(PotstillError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_prompt_files_and_default_set(tmp_path: Path) -> None:
    p = default_prompts(2000)
    assert len(p) == len(set(p)) == 2000 and default_prompts(2000) == p
    assert default_prompts(500, seed=1) != p[:500] and default_prompts(100) == p[:100]
    lengths = sorted(len(x) for x in p)
    assert lengths[0] < 40 and lengths[-1] > 400  # one-liners and passages
    assert read_prompts("default") == [[{"role": "user", "content": x}] for x in p]
    assert main(["harvest", "prompts", "--out", str(tmp_path / "d.jsonl"), "--n", "50"]) == 0
    assert read_prompts(tmp_path / "d.jsonl") == [[{"role": "user", "content": x}] for x in p[:50]]
    f = tmp_path / "c.jsonl"
    f.write_text(
        json.dumps(
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
        )
        + "\n"
    )
    assert read_prompts(f) == [
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    ]
    (tmp_path / "t.txt").write_text("first\n\nsecond\n")
    assert read_prompts(tmp_path / "t.txt") == [
        [{"role": "user", "content": "first"}],
        [{"role": "user", "content": "second"}],
    ]


def _harvest_cmd(url: str, prompts: Path, db: Path) -> list[str]:
    return [
        sys.executable, "-c", "from potstill.cli import main; raise SystemExit(main())",
        "harvest", "--endpoint", url, "--model", "m", "--prompts", str(prompts), "--store", str(db),
        "--concurrency", "4", "--samples", "2", "--seed", "3", "--no-progress", "--max-retries", "20",
    ]  # fmt: skip


def _count(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(db, timeout=10)
    try:
        return conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0
    finally:
        conn.close()


# Where each of the four runs dies: inside a transaction before COMMIT (its rows must vanish
# whole) or right after a commit (its rows must stay), at different depths into the run.
KILLS = [
    ("harvest.after_commit", 4),
    ("store.before_commit", 3),
    ("harvest.after_commit", 11),
    ("store.before_commit", 1),
]


def test_sigkill_at_chosen_moments_leaves_every_prompt_answered_once(tmp_path: Path) -> None:
    prompts, db = tmp_path / "p.jsonl", tmp_path / "h.sqlite"
    assert main(["harvest", "prompts", "--out", str(prompts), "--n", "200"]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    seen_counts = [0]
    with FakeOpenAI(latency_s=0.02) as fake:
        cmd = _harvest_cmd(fake.url, prompts, db)
        for point, nth in KILLS:
            run_env = {**env, "POTSTILL_FAULT": f"{point}:{nth}"}
            proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=120)
            assert proc.returncode == -signal.SIGKILL, proc.stderr  # died at the fault point
            # the dead run's lock file is left behind, naming it: it must not block the rerun
            assert (tmp_path / "h.sqlite.lock").read_text().strip().isdigit()
            seen_counts.append(_count(db))
            if (point, nth) == ("store.before_commit", 1):  # died in its first transaction
                assert seen_counts[-1] == seen_counts[-2]  # which left no row behind
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert seen_counts == sorted(seen_counts) and 0 < seen_counts[-1] < 400  # kills hit mid-run
    conn = st.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    want = _expected_keys(read_prompts(prompts), "m", GenParams(seed=3), 2)
    rows = conn.execute("SELECT key, prompt_idx, sample FROM records").fetchall()
    assert len(rows) == 400 and {k for k, _, _ in rows} == want  # none lost, none duplicated
    assert sorted((i, s) for _, i, s in rows) == [(i, s) for i in range(200) for s in range(2)]
    assert f"{400 - seen_counts[-1]} new, {seen_counts[-1]} already stored, 0 failed" in done.stdout


def test_cli_export_round_trip(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite"
    with FakeOpenAI() as fake:
        rc = main(["harvest", "run", "--endpoint", fake.url, "--model", "m", "--store", str(db),
                   "--prompts", str(_write_prompts(tmp_path)), "--top-logprobs", "2", "--no-progress"])  # fmt: skip
    assert rc == 0
    from potstill.core.messages import read_examples, store_examples

    direct = list(store_examples(db))
    for name in ("x.jsonl", "x.parquet"):
        assert main(["harvest", "export", "--store", str(db), "--out", str(tmp_path / name)]) == 0
        back = read_examples(tmp_path / name)
        assert back == direct
    assert (
        direct[0]["messages"][-1]["role"] == "assistant"
        and len(direct[0]["logprobs"][0]["top"]) == 2
    )


def _write_prompts(tmp_path: Path) -> Path:
    f = tmp_path / "p.txt"
    f.write_text("say hi\nsay bye\ncount to three\n")
    return f


# ------------------------------------------------------------------ one harvester, fail fast
def test_duplicate_prompts_are_requested_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "p.txt"
    f.write_text("say hi\nsay bye\nsay hi\nsay hi\ncount to three\n")
    db = tmp_path / "h.sqlite"
    with FakeOpenAI() as fake:
        rc = main(["harvest", "--endpoint", fake.url, "--model", "m", "--store", str(db),
                   "--prompts", str(f), "--samples", "2", "--no-progress"])  # fmt: skip
        n_http = fake.n_requests
    assert rc == 0 and n_http == 3 * 2  # three distinct prompts, two samples each
    rows = st.connect(db).execute("SELECT prompt_idx, sample FROM records").fetchall()
    assert sorted(rows) == [(0, 0), (0, 1), (1, 0), (1, 1), (4, 0), (4, 1)]
    assert "4 repeated (prompt, sample) pairs requested once" in capsys.readouterr().out


def test_second_harvester_on_one_store_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "h.sqlite"
    with FakeOpenAI() as fake, st.lock_store(db):  # another harvest holds the store
        rc = main(["harvest", "--endpoint", fake.url, "--model", "m", "--store", str(db),
                   "--prompts", str(_write_prompts(tmp_path)), "--no-progress"])  # fmt: skip
        n_http = fake.n_requests
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and n_http == 0  # refused before a single paid request
    assert len(err) == 1 and f"in use by pid {os.getpid()}" in err[0] and "Traceback" not in err[0]
    with FakeOpenAI() as fake:  # released: the next run proceeds
        assert main(["harvest", "--endpoint", fake.url, "--model", "m", "--store", str(db),
                     "--prompts", str(_write_prompts(tmp_path)), "--no-progress"]) == 0  # fmt: skip


def test_writer_failure_stops_the_workers_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 3rd commit fails (as a full disk would): the run stops right there with exit 2 and
    one line, instead of paying for the remaining requests; the first two commits stay."""
    db = tmp_path / "h.sqlite"
    real, calls = st.write_batch, []

    def full_disk(conn: sqlite3.Connection, records: Any, failures: Any = ()) -> int:
        calls.append(1)
        if len(calls) == 3:
            raise sqlite3.OperationalError("database or disk is full")
        return real(conn, records, failures)

    monkeypatch.setattr(st, "write_batch", full_disk)
    prompts = tmp_path / "p.jsonl"
    assert main(["harvest", "prompts", "--out", str(prompts), "--n", "300"]) == 0
    capsys.readouterr()
    with FakeOpenAI(latency_s=0.01) as fake:
        rc = main(["harvest", "--endpoint", fake.url, "--model", "m", "--store", str(db),
                   "--prompts", str(prompts), "--concurrency", "4", "--no-progress"])  # fmt: skip
        n_http = fake.n_requests
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "disk is full" in err[0] and "rerun to resume" in err[0]
    kept = _count(db)
    assert 0 < kept < 300 and f"{kept} answers committed are intact" in err[0]
    # Stopped within a few commit intervals: nowhere near the 300 requests of a full run.
    assert n_http < 60, n_http
    assert st.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_no_failure_row_for_a_done_key(tmp_path: Path) -> None:
    conn = st.connect(tmp_path / "h.sqlite")
    msgs = [{"role": "user", "content": "hi"}]
    rec = st.Record("k1", 0, 0, "m", {}, msgs, "hello")
    assert st.write_batch(conn, [rec]) == 1
    st.write_batch(conn, [], [st.Failure("k1", 0, 0, msgs, 500, "late retry failed")])
    st.write_batch(conn, [], [st.Failure("k2", 1, 0, msgs, 500, "boom")])
    st.write_batch(conn, [], [st.Failure("k2", 1, 0, msgs, 503, "boom again")])
    rows = conn.execute("SELECT key, attempts, status FROM failures").fetchall()
    assert rows == [("k2", 2, 503)] and st.counts(conn) == {"records": 1, "failed": 1}
