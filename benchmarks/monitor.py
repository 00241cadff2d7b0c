"""Extraction-monitor benchmark: calibrate for 1% FPR on simulated benign windows, then
measure the false-positive rate on FRESH benign windows and the detection rate (TPR) per
attacker fraction on windows that mix a harvester (default_prompts in order) into a benign
key's traffic.

    .venv/bin/python benchmarks/monitor.py [--embedder auto|minilm|hash] [--windows-per-fraction 100]

Writes benchmarks/results/NAME.json and NAME_tpr.png (``--name``, default ``monitor``; the
committed ``monitor.json`` uses the real all-MiniLM-L6-v2 encoder, ``monitor_hash.json`` the
hashed n-gram fallback).

``--new-traffic`` also scores the monitor on traffic that none of potstill's generators made,
with the calibration above (tuned on simulated users) left as it is:

* benign keys that ask about passages of Shakespeare's plays (a public-domain text; one play
  per key mostly, as a reader would), under a handful of phrasings;
* an attacker whose sweep (the default prompts, in order) was paraphrased by another model,
  SmolLM2-135M-Instruct served by potstill's engine, before sending.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance
from potstill.core.io import atomic_write_json
from potstill.core.prompts import default_prompts
from potstill.defend.embed import load_embedder
from potstill.defend.monitor import (
    DECISION_STATS,
    ExtractionMonitor,
    flagged_by,
    simulated_calibration,
    window_stats,
)
from potstill.defend.traffic import persona_pools, simulate_window

FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
OUT = Path(__file__).resolve().parent / "results"
ASKS = (
    "Explain this passage: {x}",
    "What does this line mean? {x}",
    "Put this into modern English: {x}",
    "Who is speaking here, and why? {x}",
    "{x}",
)
PARAPHRASE = "Rewrite this request in other words. Reply with the rewritten request only.\n\n{x}"


def shakespeare_pools(rng: random.Random, per_play: int) -> dict[str, list[str]]:
    """Per play, ``per_play`` reader questions about random passages of 1-3 lines."""
    from potstill.distill.data.corpus import shakespeare_works

    pools = {}
    for play, text in shakespeare_works("train").items():
        lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 25]
        pool = []
        for _ in range(per_play):
            i = rng.randrange(len(lines) - 3)
            pool.append(rng.choice(ASKS).format(x=" ".join(lines[i : i + rng.randint(1, 3)])))
        pools[play] = pool
    return pools


def paraphrased_sweep(n: int, max_tokens: int = 48) -> list[str]:
    """The first ``n`` default prompts, each rewritten by SmolLM2-135M-Instruct (T=0.7, seeded;
    cached under $POTSTILL_CACHE: a pure function of n and this code's settings)."""
    import hashlib
    import json
    import threading

    from potstill.distill.data.corpus import cache_root
    from potstill.serve.engine import Engine, Event, SamplingParams

    sweep = default_prompts(n)
    tag = hashlib.sha256(f"{PARAPHRASE}|{n}|{max_tokens}".encode()).hexdigest()[:12]
    path = cache_root() / "benchmarks" / f"paraphrased-sweep-{tag}.json"
    if path.is_file():
        return json.loads(path.read_text())
    engine = Engine.from_spec("smollm2-135m-instruct", max_batch=16)
    tok = engine.tokenizer
    out = [""] * n
    done = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(ev: Event) -> None:
            out[i] += ev.text
            if ev.finish_reason or ev.error:
                done.release()

        return sink

    engine.start()
    try:
        for i, p in enumerate(sweep):
            msgs = [{"role": "user", "content": PARAPHRASE.format(x=p)}]
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = list(tok(text, add_special_tokens=False).input_ids)
            sp = SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=i)
            engine.submit(ids, sp, [0], sink_for(i))
        for _ in sweep:
            assert done.acquire(timeout=3600)
    finally:
        engine.stop()
    out = [t.strip() or p for t, p in zip(out, sweep)]  # an empty rewrite sends the original
    atomic_write_json(path, out)
    return out


def _reader_window(rng: random.Random, pools: dict[str, list[str]], f: float, window: int,
                   sweep: list[str]) -> list[str]:  # fmt: skip
    """A Shakespeare reader's window (mostly one work) with ``round(f * window)`` requests of
    ``sweep`` (in order, from a random offset) at random positions."""
    plays = sorted(pools)
    main, loyalty = rng.choice(plays), rng.uniform(0.6, 1.0)
    k = round(f * window)
    attacker = [True] * k + [False] * (window - k)
    rng.shuffle(attacker)
    pos = rng.randrange(len(sweep))
    texts = []
    for a in attacker:
        if a:
            texts.append(sweep[pos % len(sweep)])
            pos += 1
        else:
            texts.append(rng.choice(pools[main if rng.random() < loyalty else rng.choice(plays)]))
    return texts


def _rates(monitor: ExtractionMonitor, emb: object, windows: dict[str, list[list[str]]]) -> dict:
    def flagged(texts: list[str]) -> bool:
        x = emb.encode(texts)  # type: ignore[attr-defined]
        nov, kbar = monitor.ref.per_prompt(x)
        return bool(
            flagged_by(window_stats(x, nov, kbar, monitor.ref, texts), monitor.cal.thresholds)
        )

    return {name: float(np.mean([flagged(w) for w in ws])) for name, ws in windows.items()}


def _recalibrated(emb: object, window: int, fpr: float, n_windows: int) -> ExtractionMonitor:
    """The monitor calibrated as an operator would, on its own users: here simulated users AND
    Shakespeare readers (other passages than the test's), half of the windows each."""
    from potstill.defend.monitor import calibrate
    from potstill.defend.traffic import benign_pool

    rng = random.Random("potstill-monitor-recalibration")
    pools = shakespeare_pools(rng, 40)
    readers = [p for ps in pools.values() for p in ps]

    def mixed(n: int) -> list[str]:
        return benign_pool(rng, n // 2) + rng.sample(readers, n - n // 2)

    windows = []
    for i in range(n_windows):
        if i % 2:
            windows.append(_reader_window(rng, pools, 0.0, window, ["-"]))
        else:
            if i % 100 == 0:
                sim_pools = persona_pools(rng, 60)
            windows.append(simulate_window(rng, ["-"], 0.0, window, sim_pools).texts)
    cal = calibrate(emb, mixed(512), mixed(512), windows, fpr=fpr)  # type: ignore[arg-type]
    return ExtractionMonitor(cal, emb)  # type: ignore[arg-type]


def new_traffic(monitor: ExtractionMonitor, emb: object, args: argparse.Namespace,
                rng: random.Random, n_sweep: int = 400) -> dict:  # fmt: skip
    """Shakespeare readers (FPR) and a paraphrased sweep mixed into their traffic (TPR), for the
    shipped calibration and for one recalibrated on the operator's own users."""
    t0 = time.perf_counter()
    pools = shakespeare_pools(rng, 40)
    sweeps = {"paraphrased": paraphrased_sweep(n_sweep), "original": default_prompts(n_sweep)}
    t_make = time.perf_counter() - t0
    w, n_b, n_f = args.window, args.benign_windows, args.windows_per_fraction
    windows = {"benign": [_reader_window(rng, pools, 0.0, w, ["-"]) for _ in range(n_b)]}
    for name, sw in sweeps.items():
        for f in FRACTIONS[1:]:
            windows[f"{name}_{f:g}"] = [_reader_window(rng, pools, f, w, sw) for _ in range(n_f)]
    sim = [simulate_window(rng, ["-"], 0.0, w, persona_pools(rng, 60)).texts for _ in range(n_f)]
    out: dict = {
        "benign_source": "reader questions about passages of the 37 Shakespeare works of the train split",
        "attacker": "default-prompt sweep paraphrased by SmolLM2-135M-Instruct (T=0.7)",
        "benign_windows": n_b,
        "windows_per_fraction": n_f,
        "examples": {
            "benign": windows["benign"][0][:3],
            "paraphrased": sweeps["paraphrased"][:3],
            "original": sweeps["original"][:3],
        },
    }
    t1 = time.perf_counter()
    recal = _recalibrated(emb, w, args.fpr, args.calibration_windows)
    t_recal = time.perf_counter() - t1
    for label, mon in (("shipped_calibration", monitor), ("recalibrated_on_own_users", recal)):
        r = _rates(mon, emb, {**windows, "simulated_benign": sim})
        out[label] = {
            "benign_fpr": r["benign"],
            "simulated_benign_fpr": r["simulated_benign"],
            "tpr_by_fraction": {
                name: {f"{f:g}": r[f"{name}_{f:g}"] for f in FRACTIONS[1:]} for name in sweeps
            },
        }
    out["seconds"] = {"make_traffic": t_make, "recalibrate": t_recal,
                      "total": time.perf_counter() - t0}  # fmt: skip
    return out


def main() -> None:
    args = _parse()
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
    rows = _score_windows(args, rng, harvest, pool_sets, emb, monitor)
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
    }
    if args.new_traffic:
        result["new_traffic"] = new_traffic(monitor, emb, args, rng)
    result["provenance"] = provenance(started)
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / f"{args.name}.json", result)
    plot(result, OUT / f"{args.name}_tpr.png")
    print({k: result[k] for k in ("embedder", "benign_fpr", "tpr_at_50pct", "tpr_by_fraction")})
    if "new_traffic" in result:
        nt = result["new_traffic"]
        for label in ("shipped_calibration", "recalibrated_on_own_users"):
            print(label, nt[label])
    print(result["timings_s"])


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--embedder", default="auto", choices=("auto", "minilm", "hash"))
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--fpr", type=float, default=0.01)
    ap.add_argument("--calibration-windows", type=int, default=1500)
    ap.add_argument("--benign-windows", type=int, default=500, help="fresh benign windows (FPR)")
    ap.add_argument("--windows-per-fraction", type=int, default=100)
    ap.add_argument("--name", default="monitor", help="results/NAME.json and NAME_tpr.png")
    ap.add_argument("--new-traffic", action="store_true",
                    help="also score Shakespeare readers and a paraphrased sweep (needs SmolLM2)")  # fmt: skip
    return ap.parse_args()


def _score_windows(
    args: argparse.Namespace, rng: random.Random, harvest: list[str], pool_sets: list[Any],
    emb: Any, monitor: Any,
) -> dict[float, list[dict[str, float]]]:  # fmt: skip
    """Each fraction's simulated windows (harvester share ``f``), scored: their statistics."""
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
    return rows


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
