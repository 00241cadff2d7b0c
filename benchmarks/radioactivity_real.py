"""Radioactivity on a real vocabulary: SmolLM2 students of SmolLM2's watermarked answers.

    python benchmarks/radioactivity_real.py            # full CPU run (~30 min on 2 cores)
    python benchmarks/radioactivity_real.py --quick    # smoke run

The toy in ``radioactivity.py`` (a 16-symbol teacher) has only ~230 distinct windows, which
bounds any test's power. Here the teacher is SmolLM2-135M-Instruct (49,152 tokens), KGW with
gamma 0.25, delta 3 (Sander et al.'s strength) and context width 1 (the demo's per-previous-token
lists, the most radioactive width in Sander et al.); ``--context-width`` / ``--delta`` run another
setting into its own file and suffixed keys (the library default k 2, delta 2 is
``radioactivity_real_k2_d2.json``), sampling at temperature 1:

1. The teacher answers ``n_train`` prompts twice, once watermarked and once clean, plus
   ``n_heldout`` prompts watermarked only (answers cached under $POTSTILL_CACHE/benchmarks).
2. For each rho the student's training set takes the watermarked answer for round(rho N)
   random prompts and the clean one for the rest: the same prompts, tokens and steps for
   every rho. The student starts from SmolLM2-135M-Instruct itself (as in Sander et al., who
   fine-tune Llama-2 on Llama-2-chat's outputs: same family, and the base is clean because
   it never saw a watermarked token) and is fine-tuned by ``run_distill`` (SFT on the
   assistant tokens; the top ``train_top_layers`` decoder layers and the final norm train, the
   rest is frozen, which makes a step 2.5x faster on 2 cores).
3. Audits in open mode teacher-force the owner's whole watermarked pool (the N training-prompt
   answers: the owner does not know which the thief used) through each student: the soft test
   (weighting "sum" and "mean") and the argmax test, on the same students. The prompts are
   ours and unwatermarked, so their windows are not excluded. The held-out answers (never
   trained on) are audited too, and so are exactly the round(rho N) answers the thief was
   served ("supervised" in Sander et al.: an API owner has them in its logs). The clean teacher
   audited on those same answers under the owner's key is a same-size sanity check of the
   exclusion logic (one p-value per rho, not a null distribution; the fresh-key null is 4.).
4. Null: soft and argmax corpora of clean models (the rho = 0 student, the teacher on its
   own watermarked answers, the teacher on its clean answers) scored under fresh random keys,
   ``null_keys`` per model: KS against U(0, 1) and the FPR at 0.05 / 0.01 / 0.001 with exact
   99% intervals. The owner's key on those clean models is reported too.

Writes ``benchmarks/results/radioactivity_real.json`` (another setting:
``radioactivity_real_k<K>_d<D>.json``) and the ``_power.png`` / ``_null_qq.png`` beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import generate, make_log, write_result
from _provenance import provenance
from potstill.core.watermark import KGWProcessor, WatermarkParams
from potstill.detect.radioactivity import collect_open_tuples, score_corpus
from potstill.detect.soft import collect_soft, green_pairs, score_soft, weighted_bernoulli_tail
from radioactivity import KEY, calibration, null_key

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RHOS = (0.0, 0.01, 0.05, 0.10, 1.0)
TEACHER = "smollm2-135m-instruct"


log = make_log("radioactivity-real")


def settings_for(quick: bool) -> dict[str, Any]:
    s: dict[str, Any] = {
        "gamma": 0.25,
        "delta": 3.0,
        "context_width": 1,
        "gen_temperature": 1.0,
        "answer_tokens": 80,
        "n_train": 120,
        "n_heldout": 24,
        "gen_batch": 33,
        "epochs": 3,
        "micro_batch": 4,
        "lr": 2e-4,
        "train_top_layers": 8,  # of 30: 2.5x faster steps on this CPU (395 vs 155 tokens/s)
        "seq_len": 160,
        "null_keys": 700,
        "threads": 2,
        "top_k": 64,
    }
    if quick:
        s.update(answer_tokens=24, n_train=16, n_heldout=4, epochs=1, null_keys=40)
    return s


# ----------------------------------------------------------------------------- corpus


def _cache_path(s: dict[str, Any]) -> Path:
    keys = ("gamma", "delta", "context_width", "gen_temperature", "answer_tokens", "n_train",
            "n_heldout", "gen_batch")  # fmt: skip
    tag = hashlib.sha256(json.dumps({k: s[k] for k in keys}, sort_keys=True).encode()).hexdigest()
    root = Path(os.environ.get("POTSTILL_CACHE", Path.home() / ".cache" / "potstill"))
    return root / "benchmarks" / f"radioactivity_real_{tag[:16]}.json"


def make_corpus(s: dict[str, Any], model: Any, tok: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(corpus, reuse record): the answers, generated once per setting and cached."""
    from potstill.core.prompts import default_prompts

    path = _cache_path(s)
    if path.exists():
        raw = path.read_bytes()
        corpus = json.loads(raw)
        return corpus, {"reused": True, "path": str(path), "sha256": hashlib.sha256(raw).hexdigest(),
                        "commit": corpus.get("commit")}  # fmt: skip
    n, h = s["n_train"], s["n_heldout"]
    prompts = default_prompts(n + h, seed=11)
    proc = KGWProcessor(KEY, gamma=s["gamma"], delta=s["delta"], context_width=s["context_width"])
    asks = prompts + prompts[:n]  # every prompt watermarked; the training prompts also clean
    marked = [True] * (n + h) + [False] * n
    rows: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(asks), s["gen_batch"]):
        rows += generate(model, tok, asks[i : i + s["gen_batch"]], s["answer_tokens"],
                         processors=[], seed=100 + i, temperature=s["gen_temperature"],
                         marked=marked[i : i + s["gen_batch"]], watermark=proc)  # fmt: skip
        log(f"generated {len(rows)}/{len(asks)} answers ({time.perf_counter() - t0:.0f}s)")
    texts = [tok.decode(r, skip_special_tokens=True) for r in rows]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=False).stdout.strip()  # fmt: skip
    corpus = {
        "train_prompts": prompts[:n],
        "heldout_prompts": prompts[n:],
        "wm": texts[:n],
        "wm_heldout": texts[n : n + h],
        "clean": texts[n + h :],
        "generation_s": time.perf_counter() - t0,
        "commit": commit,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(corpus).encode()
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(raw)
    tmp.replace(path)
    return corpus, {"reused": False, "path": str(path), "sha256": hashlib.sha256(raw).hexdigest()}


# ----------------------------------------------------------------------------- students


def train_student(
    s: dict[str, Any], corpus: dict[str, Any], rho: float, work: Path
) -> tuple[Any, dict[str, Any]]:
    """SmolLM2 fine-tuned on the rho-mixed answers (same prompts, tokens and steps per rho)."""
    from transformers import AutoModelForCausalLM

    from potstill.core.models import resolve_model_dir
    from potstill.distill.config import DistillConfig
    from potstill.distill.train.recipe import run_distill

    n = len(corpus["train_prompts"])
    marked = set(random.Random(f"rho-{rho}").sample(range(n), round(rho * n)))
    path = work / f"rho_{rho:g}.jsonl"
    with path.open("w") as fh:
        for i, p in enumerate(corpus["train_prompts"]):
            ans = corpus["wm"][i] if i in marked else corpus["clean"][i]
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": ans}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    steps = max(1, s["epochs"] * n // s["micro_batch"])
    cfg = DistillConfig.model_validate(
        {
            "out_dir": str(work / f"run_rho_{rho:g}"),
            "teacher": {"spec": "none"},
            "student": {"init": "checkpoint", "checkpoint": str(resolve_model_dir(TEACHER)),
                        "train_top_layers": s["train_top_layers"]},
            "loss": {"ce_weight": 1.0},
            "optim": {"lr": s["lr"], "warmup_steps": 5, "weight_decay": 0.0},
            "data": {"train": f"messages:{path}", "eval": None, "seq_len": s["seq_len"]},
            "train": {"steps": steps, "micro_batch_size": s["micro_batch"], "threads": s["threads"],
                      "save_every": 0, "eval_every": 0, "log_every": 10, "seed": 0},
        }
    )  # fmt: skip
    out = run_distill(cfg, show_progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("split") == "train"][-1]
    model = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    return model, {"n_watermarked_texts": len(marked), "watermarked_ids": sorted(marked),
                   "steps": steps, "final_train_ce": last["ce"]}  # fmt: skip


def audit(
    s: dict[str, Any], model: Any, tok: Any, texts: list[str], params: WatermarkParams
) -> dict[str, Any]:
    """Soft (sum, mean) and argmax open-mode tests of one model on ``texts`` (owner's key)."""
    k = params.context_width
    corpus = collect_soft(model, tok, texts, k, top_k=s["top_k"], batch_size=4)
    tuples, n_tok, n_cp = collect_open_tuples(model, tok, texts, k, batch_size=4)
    hard = score_corpus(tuples, KEY, params, mode="open", n_texts=len(texts), n_tokens=n_tok,
                        n_excluded_copies=n_cp)  # fmt: skip
    out: dict[str, Any] = {"argmax": {"p": hard.p_value, "n_scored": hard.n_scored,
                                      "green_rate": hard.statistic}}  # fmt: skip
    for w in ("sum", "mean"):
        r = score_soft(corpus, KEY, params, weighting=w)
        out[f"soft_{w}"] = {"p": r.p_value, "log10_p": r.log10_p, "p_bound": r.p_bound,
                            "n_scored": r.n_scored, "green_share": r.statistic, "z": r.z}  # fmt: skip
    return {**out, "_soft": corpus, "_tuples": tuples}


def null_block(
    s: dict[str, Any], sources: dict[str, Any], params: WatermarkParams
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Fresh random keys on clean models' corpora: soft (sum, mean) and argmax p-values."""
    pvals: dict[str, list[float]] = {"soft_sum": [], "soft_mean": [], "argmax": []}
    per_model: dict[str, Any] = {}
    offset = 0
    for name, src in sources.items():
        keys = [null_key(10_000 + offset + i) for i in range(s["null_keys"])]
        offset += s["null_keys"]
        mine: dict[str, list[float]] = {"soft_sum": [], "soft_mean": [], "argmax": []}
        soft = src["_soft"]
        weights = {w: soft.weights(w) for w in ("sum", "mean")}
        for k in keys:
            green = green_pairs(soft, k, params)  # one green mask serves both weightings
            for w, a in weights.items():
                mine[f"soft_{w}"].append(
                    weighted_bernoulli_tail(float(a[green].sum()), a, params.gamma)[0]
                )
            hard = score_corpus(src["_tuples"], k, params, mode="open", n_texts=0, n_tokens=0)
            mine["argmax"].append(hard.p_value)
        per_model[name] = {t: calibration(v) | {"owner_key_p": src[t]["p"]}
                           for t, v in mine.items()}  # fmt: skip
        for t, v in mine.items():
            pvals[t] += v
    pooled = {t: calibration_full(v) for t, v in pvals.items()}
    return {"n_keys_per_model": s["null_keys"], "per_model": per_model, "pooled": pooled}, pvals


def calibration_full(pvals: list[float]) -> dict[str, Any]:
    """``calibration`` plus the FPR at 0.001."""
    from scipy import stats

    out = calibration(pvals)
    n, fp = len(pvals), sum(p < 0.001 for p in pvals)
    ci = stats.binomtest(fp, n).proportion_ci(confidence_level=0.99, method="exact")
    out |= {"fpr_at_0.001": fp / n, "fpr_at_0.001_ci99": [float(ci.low), float(ci.high)],
            "fpr_at_0.001_in_ci": bool(ci.low <= 0.001 <= ci.high)}  # fmt: skip
    return out


# ----------------------------------------------------------------------------- plots, main


def plot_power(per: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [max(r, 0.003) * 100 for r in RHOS]
    for test, style in (("soft_sum", "o-"), ("soft_mean", "s--"), ("argmax", "^:")):
        ys = [per[f"{r:g}"]["open"][test].get("log10_p", None) for r in RHOS]
        ys = [y if y is not None else math.log10(max(per[f"{r:g}"]["open"][test]["p"], 1e-300))
              for y, r in zip(ys, RHOS)]  # fmt: skip
        ax.plot(xs, ys, style, label=test.replace("_", " "))
        sup = [(x, per[f"{r:g}"]["open_supervised"]) for x, r in zip(xs, RHOS)]
        pts = [(x, math.log10(max(v[test]["p"], 1e-300))) for x, v in sup if v]  # none at rho 0
        ax.plot(*zip(*pts), style, alpha=0.45, label=test.replace("_", " ") + ", supervised")
    ax.set_xscale("log")
    ax.axhline(-5, ls="--", c="grey", lw=0.8)
    ax.axhline(-2, ls=":", c="grey", lw=0.8)
    ax.set_xlabel("watermarked fraction rho of the student's answers (%; 0 drawn at 0.3)")
    ax.set_ylabel("log10 p (owner's key, open mode; pale: served answers only)")
    ax.set_title("SmolLM2 students of SmolLM2's KGW answers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_qq(pvals: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for name, v in pvals.items():
        n = len(v)
        ax.plot([(i + 0.5) / n for i in range(n)], sorted(v), ".", ms=2, label=f"{name} (n={n})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("U(0,1) quantile")
    ax.set_ylabel("null p-value (fresh keys, clean models)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_own(path: Path, block: dict[str, Any], top: dict[str, Any]) -> None:
    """This run's results file: its provenance, the top-level figures, then the block (one
    benchmark run writes one file; another setting writes another file)."""
    res = {
        "provenance": block["provenance"],
        **top,
        **{k: v for k, v in block.items() if k != "provenance"},
    }
    write_result(path, res)


def sweep(
    s: dict[str, Any], corpus: dict[str, Any], teacher: Any, tok: Any, params: WatermarkParams
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One student per rho, audited four ways: (per-rho results, null sources)."""
    per: dict[str, Any] = {}
    sources: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="potstill-radio-real-") as tmp:
        for rho in RHOS:
            t0 = time.perf_counter()
            model, info = train_student(s, corpus, rho, Path(tmp))
            t1 = time.perf_counter()
            a = audit(s, model, tok, corpus["wm"], params)
            ho = audit(s, model, tok, corpus["wm_heldout"], params)
            # Supervised (Sander et al.): the owner scores exactly the answers it served to the
            # thief (an API owner has them in its logs), not its whole watermarked pool.
            served = [corpus["wm"][i] for i in info["watermarked_ids"]]
            sup = audit(s, model, tok, served, params) if served else None
            # Its null at the same size: the clean teacher teacher-forced on the same answers.
            sup0 = audit(s, teacher, tok, served, params) if served else None
            per[f"{rho:g}"] = {**info, "open": {k: v for k, v in a.items() if not k.startswith("_")},
                               "open_heldout": {k: v for k, v in ho.items() if not k.startswith("_")},
                               "open_supervised": sup and {k: v for k, v in sup.items()
                                                           if not k.startswith("_")},
                               "supervised_clean_teacher": sup0 and {
                                   k: v for k, v in sup0.items() if not k.startswith("_")},
                               "train_s": t1 - t0, "audit_s": time.perf_counter() - t1}  # fmt: skip
            if rho == 0.0:
                sources["control_student_on_wm"] = a
            log(f"rho={rho:g}: soft(sum) p={a['soft_sum']['p']:.2e} soft(mean) p={a['soft_mean']['p']:.2e} "
                f"argmax p={a['argmax']['p']:.2e}; held-out soft p={ho['soft_sum']['p']:.2e}; "
                f"supervised soft p={sup['soft_sum']['p'] if sup else float('nan'):.2e}; "
                f"train {t1 - t0:.0f}s, ce {info['final_train_ce']:.3f}")  # fmt: skip
            del model
    return per, sources


def top_keys(per: dict[str, Any], suffix: str) -> dict[str, Any]:
    """The acceptance keys: p per rho and test, and the smallest rho detected at p < 1e-5."""

    def p_of(r: float, audit: str, test: str) -> float:  # nan: nothing served at this rho
        v = per[f"{r:g}"][audit]
        return v[test]["p"] if v else float("nan")

    def best(test: str, audit: str = "open", thr: float = 1e-5) -> float:
        hits = [r for r in RHOS if r > 0 and p_of(r, audit, test) < thr]
        return min(hits) if hits else float("nan")

    top: dict[str, Any] = {}
    for r in RHOS[1:]:
        tag = f"{round(r * 100)}"
        top[f"p_open_soft_rho_{tag}"] = per[f"{r:g}"]["open"]["soft_sum"]["p"]
        top[f"p_open_argmax_rho_{tag}"] = per[f"{r:g}"]["open"]["argmax"]["p"]
        top[f"p_supervised_soft_rho_{tag}"] = p_of(r, "open_supervised", "soft_sum")
        top[f"p_supervised_argmax_rho_{tag}"] = p_of(r, "open_supervised", "argmax")
    top["min_rho_detected_1e-5_soft"] = best("soft_sum")
    top["min_rho_detected_1e-5_soft_mean"] = best("soft_mean")
    top["min_rho_detected_1e-5_argmax_real"] = best("argmax")
    top["min_rho_detected_1e-5_supervised_soft"] = best("soft_sum", "open_supervised")
    top["min_rho_detected_1e-5_supervised_argmax"] = best("argmax", "open_supervised")
    return {f"{k}{suffix}": v for k, v in top.items()}


def print_summary(
    per: dict[str, Any], null: dict[str, Any], top: dict[str, Any], suffix: str, started: float
) -> None:
    for r in RHOS:
        v = per[f"{r:g}"]["open"]
        print(f"rho={r:>5.0%}: soft(sum) p={v['soft_sum']['p']:.2e}  soft(mean) p={v['soft_mean']['p']:.2e}  "
              f"argmax p={v['argmax']['p']:.2e}")  # fmt: skip
    for t, c in null["pooled"].items():
        print(f"null {t}: n={c['n']} KS p={c['ks_pvalue']:.3f} FPR@0.01={c['fpr_at_0.01']:.4f} "
              f"{c['fpr_at_0.01_ci99']} FPR@0.001={c['fpr_at_0.001']:.4f} {c['fpr_at_0.001_ci99']}")  # fmt: skip
    print(f"min rho at p<1e-5: soft {top[f'min_rho_detected_1e-5_soft{suffix}']}, argmax "
          f"{top[f'min_rho_detected_1e-5_argmax_real{suffix}']}; supervised soft "
          f"{top[f'min_rho_detected_1e-5_supervised_soft{suffix}']}, argmax "
          f"{top[f'min_rho_detected_1e-5_supervised_argmax{suffix}']}; total {time.time() - started:.0f}s")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run")
    ap.add_argument(
        "--out", type=Path, help="results file (default: benchmarks/results/radioactivity_real"
        "[_k<K>_d<D>].json; "
        "--quick: a file in the temp dir, so a smoke run never touches the results)",
    )  # fmt: skip
    ap.add_argument(
        "--context-width", type=int, default=1,
        help="KGW window (default 1; another setting writes its own file and suffixed keys)",
    )  # fmt: skip
    ap.add_argument("--delta", type=float, default=3.0, help="KGW bias in logits (default 3)")
    args = ap.parse_args(argv)
    if args.out is None:
        quick_out = Path(tempfile.gettempdir()) / "radioactivity_real_quick.json"
    started = time.time()
    s = settings_for(args.quick)
    s["context_width"], s["delta"] = args.context_width, args.delta
    default = (args.context_width, args.delta) == (1, 3.0)
    suffix = "" if default else f"_k{args.context_width}_d{args.delta:g}"
    if args.out is None:
        args.out = quick_out if args.quick else RESULTS / f"radioactivity_real{suffix}.json"
    torch.set_num_threads(s["threads"])
    params = WatermarkParams(
        "kgw", gamma=s["gamma"], delta=s["delta"], context_width=s["context_width"]
    )
    from potstill.core.models import load_model

    teacher, tok = load_model(TEACHER)
    teacher.eval()
    corpus, reuse = make_corpus(s, teacher, tok)
    log(f"corpus: {len(corpus['wm'])} + {len(corpus['wm_heldout'])} watermarked, "
        f"{len(corpus['clean'])} clean answers ({'cached' if reuse['reused'] else 'generated'})")  # fmt: skip
    per, sources = sweep(s, corpus, teacher, tok, params)
    sources["teacher_on_wm"] = audit(s, teacher, tok, corpus["wm"], params)
    sources["teacher_on_clean"] = audit(s, teacher, tok, corpus["clean"], params)
    null, pvals = null_block(s, sources, params)
    stem = args.out.with_suffix("")
    plot_power(per, Path(f"{stem}_power.png"))
    plot_qq(pvals, Path(f"{stem}_null_qq.png"))

    top = top_keys(per, suffix)
    block = {
        "teacher": TEACHER,
        "student": f"SmolLM2-135M-Instruct, top {s['train_top_layers']} of 30 layers fine-tuned (SFT on assistant tokens)",
        "settings": {**s, "quick": args.quick, "key_id": KEY.key_id, "watermark": params.to_dict()},
        "corpus": reuse | {"generation_s": corpus.get("generation_s")},
        "per_rho": per,
        "null": null,
        "provenance": provenance(started),
    }
    write_own(args.out, block, top)
    print_summary(per, null, top, suffix, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
