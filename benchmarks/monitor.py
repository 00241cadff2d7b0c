"""Extraction-monitor benchmark: calibrate for 1% FPR on simulated benign windows, then
measure the false-positive rate on FRESH benign windows and the detection rate (TPR) per
attacker fraction on windows that mix a harvester (default_prompts in order) into a benign
key's traffic.

    .venv/bin/python benchmarks/monitor.py [--embedder auto|minilm|hash] [--windows-per-fraction 100]

Writes benchmarks/results/NAME.json and NAME_tpr.png (``--name``, default ``monitor``; the
committed ``monitor.json`` uses the real all-MiniLM-L6-v2 encoder, ``monitor_hash.json`` the
hashed n-gram fallback).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance
from potstill.defend.embed import load_embedder
from potstill.defend.monitor import (
    DECISION_STATS,
    ExtractionMonitor,
    flagged_by,
    simulated_calibration,
    window_stats,
)
from potstill.defend.traffic import persona_pools, simulate_window
from potstill.harvest.prompts import default_prompts
from potstill.io import atomic_write_json

FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--embedder", default="auto", choices=("auto", "minilm", "hash"))
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--fpr", type=float, default=0.01)
    ap.add_argument("--calibration-windows", type=int, default=1500)
    ap.add_argument("--benign-windows", type=int, default=500, help="fresh benign windows (FPR)")
    ap.add_argument("--windows-per-fraction", type=int, default=100)
    ap.add_argument("--name", default="monitor", help="results/NAME.json and NAME_tpr.png")
    args = ap.parse_args()
    started = time.time()

    t0 = time.perf_counter()
    emb = load_embedder(args.embedder)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    cal = simulated_calibration(
        emb, window=args.window, fpr=args.fpr, n_windows=args.calibration_windows, seed=0
    )
    t_cal = time.perf_counter() - t1
    monitor = ExtractionMonitor(cal, emb)

    # Fresh data: other seeds for the benign pools, the harvester walks the default prompts.
    rng = random.Random("potstill-monitor-benchmark:1")
    # New benign pools every 50 windows (fresh users), each pool embedded once (cached).
    n_total = args.benign_windows + args.windows_per_fraction * (len(FRACTIONS) - 1)
    pool_sets = [persona_pools(rng, 60) for _ in range(-(-n_total // 50))]
    harvest = default_prompts(1000)
    t2 = time.perf_counter()
    emb.encode([p for ps in pool_sets for pool in ps.values() for p in pool] + harvest)
    t_embed = time.perf_counter() - t2

    t3 = time.perf_counter()
    rows: dict[float, list[dict[str, float]]] = {}
    count = 0
    for f in FRACTIONS:
        n = args.benign_windows if f == 0.0 else args.windows_per_fraction
        rows[f] = []
        for _ in range(n):
            pools = pool_sets[count // 50]
            count += 1
            w = simulate_window(rng, harvest, f, args.window, pools)
            x = emb.encode(w.texts)
            nov, kbar = monitor.ref.per_prompt(x)
            rows[f].append(window_stats(x, nov, kbar, monitor.ref, w.texts))
    t_score = time.perf_counter() - t3

    th = cal.thresholds

    def rate(f: float, stats: tuple[str, ...] = DECISION_STATS) -> float:
        sub = {s: th[s] for s in stats}
        return float(np.mean([bool(flagged_by(r, sub)) for r in rows[f]]))

    n_windows = sum(len(v) for v in rows.values())
    attacked = [r for f in FRACTIONS if f >= 0.5 for r in rows[f]]
    result = {
        "embedder": cal.embedder,
        "window": args.window,
        "target_fpr": args.fpr,
        "thresholds": th,
        "tau": cal.tau,
        "sigma": cal.sigma,
        "calibration_windows": cal.n_windows,
        "scored_windows": n_windows,
        "benign_fpr": rate(0.0),
        "benign_windows": len(rows[0.0]),
        "tpr_at_50pct": float(np.mean([bool(flagged_by(r, th)) for r in attacked])),
        "tpr_by_fraction": {f"{f:g}": rate(f) for f in FRACTIONS},
        "tpr_by_fraction_per_statistic": {
            s: {f"{f:g}": rate(f, (s,)) for f in FRACTIONS} for s in DECISION_STATS
        },
        "mean_stats_by_fraction": {
            f"{f:g}": {k: float(np.mean([r[k] for r in rows[f]])) for k in rows[f][0]}
            for f in FRACTIONS
        },
        "timings_s": {
            "load_embedder": round(t_load, 2),
            "calibrate": round(t_cal, 2),
            "embed_test_pools": round(t_embed, 2),
            "score_windows": round(t_score, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
        "provenance": provenance(started),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / f"{args.name}.json", result)
    plot(result, OUT / f"{args.name}_tpr.png")
    print({k: result[k] for k in ("embedder", "benign_fpr", "tpr_at_50pct", "tpr_by_fraction")})
    print(result["timings_s"])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [float(f) for f in result["tpr_by_fraction"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, list(result["tpr_by_fraction"].values()), "o-", lw=2, label="monitor (any)")
    for s, by in result["tpr_by_fraction_per_statistic"].items():
        ax.plot(xs, list(by.values()), ".--", alpha=0.7, label=s)
    ax.axhline(result["target_fpr"], color="grey", lw=0.8, ls=":", label="target FPR")
    ax.set_xlabel("attacker fraction of the key's window")
    ax.set_ylabel("flagged windows")
    ax.set_title(f"extraction monitor, {result['embedder']}, W={result['window']}")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
