"""Evidence of distillation: KGW watermark power, radioactivity, null calibration, ablations.

    python benchmarks/radioactivity.py            # full CPU run (~20 min on 2 shared cores)
    python benchmarks/radioactivity.py --quick    # smoke run (< 3 min)

After Sander et al. 2024, "Watermarking Makes Language Models Radioactive" (their anchor:
p < 1e-5 with 5% of the student's training text watermarked, open model). Writes
``benchmarks/results/radioactivity.json``, ``radioactivity_power.png`` and
``radioactivity_null_qq.png``:

1. single-text power: SmolLM2-135M-Instruct answers ``default_prompts`` (chat template) with
   KGW-watermarked sampling (gamma 0.25, delta 2, context width k = 2, the library
   defaults; temperature 1, no top-k/top-p, exactly ``--gen-tokens`` new tokens: EOS is
   suppressed until then). ``detect_text`` on the generated ids (dedup on, first k tokens
   unscored). Unwatermarked generations of the same prompts give the FPR, also measured
   over ``--null-keys`` random keys (many more tests).
2. radioactivity at CPU scale: SmolLM2's 49k vocab makes a from-scratch student far too slow
   to train on 2 cores, so the teacher here is ``tiny:0`` (random init, byte tokenizer,
   sampling restricted to 16 printable bytes: high-entropy text whose 2-token windows repeat,
   so a student can learn per-window green preferences). It answers N prompts watermarked
   and, with another seed, unwatermarked; the training set of the student for fraction rho
   takes the watermarked answer for round(rho N) random prompts and the clean one for the
   rest. Every student starts from the same scratch init (same seed) and is trained by
   ``run_distill`` (``messages:`` data, CE on assistant tokens = sequence-level KD). Audits:
   open mode teacher-forces the owner's whole watermarked pool (the N watermarked answers;
   the owner does not know which the student saw) and, separately, held-out watermarked
   answers never trained on; closed mode scores the student's own generations (temperature
   0.7) on held-out prompts. Dedup, prompt-window and copy exclusion on.
3. null calibration: open-mode tuples of clean models (the rho = 0 control, the tiny teacher,
   SmolLM2 on its unwatermarked answers) collected once, scored under random keys: KS vs
   U(0, 1), FPR at 0.05 / 0.01 with Clopper-Pearson 99% intervals, QQ plot.
4. ablations on the clean control: dedup off (FPR over random keys on repetitive tuples) and
   prompt-window exclusion off (the control's answers quote watermarked prompts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from potstill.core.watermark import KGWProcessor, WatermarkKey, WatermarkParams, detect_text
from potstill.detect import collect_open_tuples, score_corpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import generate, make_log, write_result
from _provenance import provenance
from _radioactivity_report import plot_qq, summary

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PRINTABLE = list(range(32, 127))  # tiny tokenizer: byte b is token id b
# The tiny teacher writes over 16 symbols ("0".."?"): 256 two-token windows, each seen ~150
# times in the 40k-token training set, so a CPU-sized student learns its (green-biased)
# continuations. With 32 symbols (1024 windows) a 2x64 student stayed near uniform (final CE
# 3.26 nats against ln 32 = 3.47) and the 100%-watermarked student was not detected (p = 0.46).
ALPHABET = list(range(48, 64))
PAPER_RHO = 0.05  # Sander et al.: p < 1e-5 at 5% watermarked training text (open model)
RHOS = (0.0, 0.01, 0.05, 0.10, 0.5, 1.0)

# The owner's key (fixed, so the run is reproducible; a real owner keeps it secret).
KEY = WatermarkKey(b"potstill-radioactivity-benchmark-key!")


log = make_log("radioactivity")


def null_key(i: int) -> WatermarkKey:
    return WatermarkKey(random.Random(f"null-key-{i}").randbytes(32))


def settings_for(quick: bool) -> dict[str, Any]:
    s: dict[str, Any] = {
        "gamma": 0.25,
        "delta": 2.0,
        "context_width": 2,
        "gen_temperature": 1.0,
        "radio_temperature": 5.0,
        "part1_prompts": 100,
        "part1_unwatermarked": 20,
        "gen_tokens": 200,
        "part1_alpha": 1e-4,
        "radio_teacher": "tiny:0",
        "radio_train_texts": 200,
        "radio_heldout_texts": 24,
        "radio_closed_prompts": 48,
        "radio_answer_tokens": 200,
        "closed_tokens": 160,
        "closed_temperature": 0.7,
        "student_layers": 2,
        "student_width": 128,
        "student_steps": 600,
        "student_batch": 16,
        "student_lr": 3e-3,
        "null_keys": 200,
        # torch threads: 1 keeps a shared 2-core machine from thrashing (OpenMP spin-waits
        # made a 2-thread student 17x slower next to another torch job)
        "threads": 1,
        "null_smollm_texts": 40,
        "quote_tokens": 100,
    }
    if quick:
        s.update(part1_prompts=12, part1_unwatermarked=6, gen_tokens=64, radio_train_texts=100,
                 radio_heldout_texts=8, radio_closed_prompts=16, radio_answer_tokens=120,
                 closed_tokens=80, student_steps=30, null_smollm_texts=10)  # fmt: skip
    return s


# ----------------------------------------------------------------------------- generation


class AllowOnly:
    """Logits processor: every id outside ``allowed`` gets -inf (printable text round-trips)."""

    def __init__(self, allowed: list[int]) -> None:
        self.allowed = torch.tensor(allowed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool)
        keep[self.allowed] = True
        return scores.masked_fill(~keep.to(scores.device), float("-inf"))


# ----------------------------------------------------------------------------- part 1


def part1_single_text(s: dict[str, Any], params: WatermarkParams) -> tuple[dict[str, Any], Any]:
    """KGW power on single SmolLM2 answers, and the FPR on unwatermarked ones."""
    from potstill.core.models import load_model
    from potstill.core.prompts import default_prompts

    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m-instruct")
    model.eval()
    prompts = default_prompts(s["part1_prompts"])
    n_clean = s["part1_unwatermarked"]
    proc = KGWProcessor(KEY, gamma=s["gamma"], delta=s["delta"], context_width=s["context_width"])
    # One batch: every prompt answered watermarked, the first n_clean also answered clean.
    rows = generate(model, tok, prompts + prompts[:n_clean], s["gen_tokens"], processors=[],
                    seed=1, temperature=s["gen_temperature"],
                    marked=[True] * len(prompts) + [False] * n_clean, watermark=proc)  # fmt: skip
    wm, clean = rows[: len(prompts)], rows[len(prompts) :]
    gen_s = time.perf_counter() - t0
    log(f"part 1: {len(wm)} watermarked + {len(clean)} clean answers in {gen_s:.0f}s")
    p_wm = [detect_text(ids, KEY, params).p_value for ids in wm]
    p_clean = [detect_text(ids, KEY, params).p_value for ids in clean]
    # Many more null tests: each clean answer under random keys.
    p_null = [
        detect_text(ids, null_key(i), params).p_value
        for ids in clean
        for i in range(s["null_keys"] // 4)
    ]
    a = s["part1_alpha"]
    res = {
        "model": "smollm2-135m-instruct (Q4_1 GGUF dequantized, fp32)",
        "n_prompts": len(wm),
        "n_tokens_per_text": s["gen_tokens"],
        "detection_rate_at_1e-4": sum(p < a for p in p_wm) / len(p_wm),
        "median_p": float(sorted(p_wm)[len(p_wm) // 2]),
        "max_p": max(p_wm),
        "mean_green_rate": sum(detect_text(i, KEY, params).statistic for i in wm) / len(wm),
        "n_unwatermarked": len(clean),
        "fpr_at_1e-4_owner_key": sum(p < a for p in p_clean) / len(p_clean),
        "min_p_unwatermarked": min(p_clean),
        "n_null_tests_random_keys": len(p_null),
        "fpr_at_1e-4_random_keys": sum(p < a for p in p_null) / len(p_null),
        "fpr_at_0.01_random_keys": sum(p < 0.01 for p in p_null) / len(p_null),
        "generation_s": gen_s,
        "p_values_watermarked": p_wm,
    }
    log(
        f"part 1: detection {res['detection_rate_at_1e-4']:.2f} at p<1e-4, median p {res['median_p']:.2e}"
    )
    return res, (model, tok)


# ----------------------------------------------------------------------------- part 2


def radio_prompts(n: int) -> list[str]:
    """Short distinct prompts (the byte tokenizer makes long ones costly)."""
    from potstill.core.prompts import default_prompts

    return [p for p in default_prompts(6 * n + 200, seed=1) if len(p) <= 90][:n]


def make_corpus(s: dict[str, Any]) -> dict[str, Any]:
    from potstill.core.models import load_model

    teacher, tok = load_model(s["radio_teacher"])
    teacher.eval()
    n_tr, n_ho, n_cl = s["radio_train_texts"], s["radio_heldout_texts"], s["radio_closed_prompts"]
    prompts = radio_prompts(n_tr + n_ho + n_cl)
    train_p, ho_p, closed_p = prompts[:n_tr], prompts[n_tr : n_tr + n_ho], prompts[n_tr + n_ho :]
    proc = KGWProcessor(KEY, gamma=s["gamma"], delta=s["delta"], context_width=s["context_width"])
    allow = AllowOnly(ALPHABET)
    L, T = s["radio_answer_tokens"], s["radio_temperature"]
    both = train_p + ho_p + train_p
    rows = generate(teacher, tok, both, L, processors=[allow], seed=3, temperature=T,
                    marked=[True] * (n_tr + n_ho) + [False] * n_tr, watermark=proc)  # fmt: skip
    wm, clean = rows[: n_tr + n_ho], rows[n_tr + n_ho :]
    dec = lambda rows: [tok.decode(r) for r in rows]  # noqa: E731
    return {
        "teacher": teacher,
        "tok": tok,
        "train_prompts": train_p,
        "closed_prompts": closed_p,
        "wm": dec(wm[:n_tr]),
        "wm_heldout": dec(wm[n_tr:]),
        "clean": dec(clean),
    }


def train_student(s: dict[str, Any], corpus: dict[str, Any], rho: float, work: Path) -> Any:
    """A student trained by ``run_distill`` on the rho-mixed set; returns the model (eval)."""
    from transformers import AutoModelForCausalLM

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
    cfg = DistillConfig.model_validate(
        {
            "out_dir": str(work / f"run_rho_{rho:g}"),
            "teacher": {"spec": "none"},
            "student": {"init": "scratch", "layers": s["student_layers"], "width": s["student_width"],
                        "seed": 0, "tokenizer": s["radio_teacher"]},
            "loss": {"ce_weight": 1.0},
            "optim": {"lr": s["student_lr"], "warmup_steps": 10, "weight_decay": 0.0},
            "data": {"train": f"messages:{path}", "eval": None, "seq_len": 320},
            "train": {"steps": s["student_steps"], "micro_batch_size": s["student_batch"],
                      "threads": s["threads"],
                      "save_every": 0, "eval_every": 0, "log_every": 10, "seed": 0},
        }
    )  # fmt: skip
    out = run_distill(cfg, show_progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("split") == "train"][-1]
    model = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    return model, {"n_watermarked_texts": len(marked), "final_train_ce": last["ce"]}


def open_p_curve(tuples: list[Any], params: WatermarkParams, sizes: list[int]) -> list[float]:
    """p under the owner's key on random subsamples (of ``sizes`` distinct tuples)."""
    distinct = list(dict.fromkeys(tuples))
    random.Random(0).shuffle(distinct)
    out = []
    for n in sizes:
        sub = distinct[: min(n, len(distinct))]
        out.append(score_corpus(sub, KEY, params, mode="open", n_texts=0, n_tokens=0).p_value)
    return out


def audit_student(
    s: dict[str, Any], corpus: dict[str, Any], model: Any, params: WatermarkParams
) -> dict[str, Any]:
    from potstill.detect import radioactivity_closed
    from potstill.detect.radioactivity import windows_of

    tok, k = corpus["tok"], s["context_width"]
    excl = windows_of(
        [tok(p, add_special_tokens=False)["input_ids"] for p in corpus["train_prompts"]], k
    )
    out: dict[str, Any] = {}
    for name, texts in (("open", corpus["wm"]), ("open_heldout", corpus["wm_heldout"])):
        tuples, n_tok, n_cp = collect_open_tuples(model, tok, texts, k, batch_size=16)
        r = score_corpus(tuples, KEY, params, mode="open", n_texts=len(texts), n_tokens=n_tok,
                         prompt_windows=excl, n_excluded_copies=n_cp)  # fmt: skip
        out[name] = {"p": r.p_value, "n_scored": r.n_scored, "green_rate": r.statistic}
        if name == "open":
            out["_open_tuples"] = [t for t in tuples if t[0] not in excl]
    gen = generate(model, tok, corpus["closed_prompts"], s["closed_tokens"],
                      processors=[AllowOnly(ALPHABET)], seed=5,
                      temperature=s["closed_temperature"])  # fmt: skip
    texts = [tok.decode(g) for g in gen]
    rc = radioactivity_closed(texts, tok, KEY, params, prompts=corpus["closed_prompts"],
                              filter_texts=corpus["wm"])  # fmt: skip
    out["closed"] = {"p": rc.p_value, "n_scored": rc.n_scored, "green_rate": rc.statistic}
    tuples = [(tuple(g[j - k : j]), g[j]) for g in gen for j in range(k, len(g))]
    out["_closed_tuples"] = tuples
    out["_closed_texts"] = texts
    return out


def part2_radioactivity(
    s: dict[str, Any], params: WatermarkParams, work: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    t0 = time.perf_counter()
    corpus = make_corpus(s)
    log(f"part 2: corpus ({len(corpus['wm'])} train prompts) in {time.perf_counter() - t0:.0f}s")
    per: dict[str, Any] = {}
    keep: dict[str, Any] = {"corpus": corpus}
    for rho in RHOS:
        t1 = time.perf_counter()
        model, info = train_student(s, corpus, rho, work)
        t2 = time.perf_counter()
        a = audit_student(s, corpus, model, params)
        per[f"{rho:g}"] = {
            **info,
            **{m: a[m] for m in ("open", "open_heldout", "closed")},
            "train_s": t2 - t1,
            "audit_s": time.perf_counter() - t2,
        }
        keep[f"{rho:g}"] = {"model": model, **a}
        log(f"part 2: rho={rho:g}: open p={a['open']['p']:.2e} (n={a['open']['n_scored']}), "
            f"held-out p={a['open_heldout']['p']:.2e}, closed p={a['closed']['p']:.2e}, "
            f"train {t2 - t1:.0f}s")  # fmt: skip
    detected = [r for r in RHOS if r > 0 and per[f"{r:g}"]["open"]["p"] < 1e-5]
    res = {
        "teacher": s["radio_teacher"],
        "student": f"scratch Llama {s['student_layers']}x{s['student_width']}, same init (seed 0)",
        "per_rho": per,
        "p_open_rho_100": per["1"]["open"]["p"],
        "p_open_heldout_rho_100": per["1"]["open_heldout"]["p"],
        "p_closed_rho_100": per["1"]["closed"]["p"],
        "p_control": per["0"]["open"]["p"],
        "p_control_closed": per["0"]["closed"]["p"],
        "min_rho_detected_1e-5": min(detected) if detected else float("nan"),
        "seconds": time.perf_counter() - t0,
    }
    return res, keep


# ----------------------------------------------------------------------------- part 3, 4


def null_pvalues(
    tuples: list[Any], params: WatermarkParams, n_keys: int, dedup: bool = True
) -> list[float]:
    return [
        score_corpus(tuples, null_key(i), params, mode="open", n_texts=0, n_tokens=0, dedup=dedup).p_value
        for i in range(n_keys)
    ]  # fmt: skip


def calibration(pvals: list[float]) -> dict[str, Any]:
    from scipy import stats

    n = len(pvals)
    out: dict[str, Any] = {"n": n, "ks_pvalue": float(stats.kstest(pvals, "uniform").pvalue)}
    for a in (0.05, 0.01):
        fp = sum(p < a for p in pvals)
        ci = stats.binomtest(fp, n).proportion_ci(confidence_level=0.99, method="exact")
        out[f"fpr_at_{a}"] = fp / n
        out[f"fpr_at_{a}_ci99"] = [float(ci.low), float(ci.high)]
        out[f"fpr_at_{a}_in_ci"] = bool(ci.low <= a <= ci.high)
    return out


def part3_null(
    s: dict[str, Any], params: WatermarkParams, keep: dict[str, Any], smol: Any
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    t0 = time.perf_counter()
    corpus, k = keep["corpus"], s["context_width"]
    sources = {"control_student": keep["0"]["_open_tuples"]}
    teacher_tuples, _, _ = collect_open_tuples(
        corpus["teacher"], corpus["tok"], corpus["wm"], k, batch_size=16
    )
    sources["tiny_teacher"] = teacher_tuples
    # SmolLM2 teacher-forced on clean human-style text (the default prompts themselves).
    from potstill.core.prompts import default_prompts

    model, tok = smol
    clean_texts = default_prompts(s["null_smollm_texts"], seed=7)
    smol_tuples, _, _ = collect_open_tuples(model, tok, clean_texts, k, batch_size=8)
    sources["smollm2_teacher"] = smol_tuples
    pvals = {name: null_pvalues(t, params, s["null_keys"]) for name, t in sources.items()}
    pooled = [p for v in pvals.values() for p in v]
    res = {
        "n_keys": s["null_keys"],
        "n_scored_per_key": {n: len(set(t)) for n, t in sources.items()},
        "per_model": {n: calibration(v) for n, v in pvals.items()},
        "pooled": calibration(pooled),
        "seconds": time.perf_counter() - t0,
    }
    return res, pvals


def ablation_texts(s: dict[str, Any], corpus: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(watermarked prompts, clean answers): the tiny teacher over the printable bytes, the
    held-out prompts answered once watermarked and once (another seed) clean."""
    teacher, tok = corpus["teacher"], corpus["tok"]
    used = s["radio_train_texts"] + s["radio_heldout_texts"] + s["radio_closed_prompts"]
    asks = radio_prompts(used + s["radio_heldout_texts"])[used:]  # prompts no other part uses
    proc = KGWProcessor(KEY, gamma=s["gamma"], delta=s["delta"], context_width=s["context_width"])
    allow = AllowOnly(PRINTABLE)
    n = len(asks)
    rows = generate(teacher, tok, asks + asks, s["radio_answer_tokens"], processors=[allow],
                    seed=7, temperature=s["radio_temperature"], marked=[True] * n + [False] * n,
                    watermark=proc)  # fmt: skip
    texts = [tok.decode(r) for r in rows]
    return texts[:n], texts[n:]


def part4_ablation(
    s: dict[str, Any], params: WatermarkParams, keep: dict[str, Any]
) -> dict[str, Any]:
    from potstill.detect import radioactivity_closed

    corpus, ctl = keep["corpus"], keep["0"]
    tok, n_keys = corpus["tok"], s["null_keys"]
    # dedup: the control's open-mode tuples repeat (same window, same guess) -> over-dispersed.
    tup = ctl["_open_tuples"]
    off, on = (
        calibration(null_pvalues(tup, params, n_keys, dedup=False)),
        calibration(null_pvalues(tup, params, n_keys)),
    )
    # prompt windows: the audit prompts are watermarked texts and a clean model's answers quote
    # them. Over the 16-symbol corpus alphabet a few prompts hold every one of the 256 windows
    # (excluding them leaves nothing), so this part uses the tiny teacher's text over all 95
    # printable bytes (9,025 windows): watermarked prompts, clean answers that quote them.
    q = s["quote_tokens"]
    prompts, clean = ablation_texts(s, corpus)
    answers = [p[:q] + g for p, g in zip(prompts, clean)]
    kw = {"prompts": prompts}
    no_ex = radioactivity_closed(answers, tok, KEY, params, exclude_prompt_windows=False, **kw)
    ex = radioactivity_closed(answers, tok, KEY, params, **kw)
    no_dd = radioactivity_closed(answers, tok, KEY, params, dedup=False, **kw)
    return {
        "ablation_dedup_off_fpr_at_0.01": off["fpr_at_0.01"],
        "ablation_dedup_on_fpr_at_0.01": on["fpr_at_0.01"],
        "ablation_dedup_off_fpr_at_0.05": off["fpr_at_0.05"],
        "ablation_dedup_on_fpr_at_0.05": on["fpr_at_0.05"],
        "ablation_dedup_off_ks_pvalue": off["ks_pvalue"],
        "ablation_dedup_on_ks_pvalue": on["ks_pvalue"],
        "ablation_dedup_duplicate_fraction": 1 - len(set(tup)) / max(1, len(tup)),
        "ablation_prompt_window_off_p": no_ex.p_value,
        "ablation_prompt_window_on_p": ex.p_value,
        "ablation_prompt_window_on_dedup_off_p": no_dd.p_value,
        "ablation_prompt_window_n_excluded": ex.n_excluded_prompt,
        "ablation_prompt_window_n_scored_on": ex.n_scored,
        "ablation_quote_chars": q,
    }


# ----------------------------------------------------------------------------- plots, main


def plot_power(keep: dict[str, Any], params: WatermarkParams, path: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    curves: dict[str, Any] = {}
    for mode in ("open", "closed"):
        ps = [max(keep[f"{r:g}"][mode]["p"], 1e-300) for r in RHOS]
        ax1.plot([max(r, 0.003) * 100 for r in RHOS], [math.log10(p) for p in ps], "o-", label=mode)
    ax1.set_xscale("log")
    ax1.set_xlabel("watermarked fraction rho of training text (%; 0 drawn at 0.3)")
    ax1.set_ylabel("log10 p")
    for y, lab in ((-5, "1e-5"), (math.log10(0.01), "0.01")):
        ax1.axhline(y, ls="--", c="grey", lw=0.8)
        ax1.text(0.35, y, lab, fontsize=7, va="bottom")
    ax1.legend()
    for r in RHOS:
        for mode, style in (("open", "-"), ("closed", ":")):
            tup = keep[f"{r:g}"][f"_{mode}_tuples"]
            n_all = len(set(tup))
            sizes = sorted({min(n_all, x) for x in (100, 250, 500, 1000, 2000, 4000, 8000, n_all)})
            ps = open_p_curve(tup, params, sizes)
            curves[f"{mode}_rho_{r:g}"] = {"n": sizes, "p": ps}
            ax2.plot(sizes, [math.log10(max(p, 1e-300)) for p in ps], style, marker=".",
                     label=f"{mode} rho={r:g}")  # fmt: skip
    ax2.set_xscale("log")
    ax2.set_xlabel("scored (distinct) tuples")
    ax2.set_ylabel("log10 p")
    ax2.axhline(-5, ls="--", c="grey", lw=0.8)
    ax2.legend(fontsize=6, ncol=2)
    fig.suptitle("Radioactivity of students distilled on KGW-watermarked text")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return curves


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (< 3 min)")
    ap.add_argument("--out", type=Path, default=RESULTS / "radioactivity.json")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="override a setting, e.g. --set part1_prompts=50 student_steps=200",
    )
    ap.add_argument("--part1-json", type=Path, help="reuse part 1 from this results JSON")
    args = ap.parse_args(argv)
    s = settings_for(args.quick)
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in s:
            ap.error(f"unknown setting {name!r}; known: {', '.join(s)}")
        s[name] = type(s[name])(value)
    params = WatermarkParams(
        "kgw", gamma=s["gamma"], delta=s["delta"], context_width=s["context_width"]
    )
    torch.set_num_threads(s["threads"])
    t0 = time.perf_counter()
    started = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    reused: dict[str, Any] = {}  # blocks taken from an earlier run (--part1-json), recorded
    with tempfile.TemporaryDirectory(prefix="potstill-radio-") as tmp:
        partial = args.out.with_name(args.out.stem + "_partial.json")
        if args.part1_json is not None:  # reuse a finished part 1 (e.g. a *_partial.json)
            from potstill.core.models import load_model

            src = json.loads(args.part1_json.read_text())
            p1 = src["single_text"]
            smol = load_model("smollm2-135m-instruct")
            digest = hashlib.sha256(json.dumps(p1, sort_keys=True).encode()).hexdigest()
            reused["single_text"] = {"file": str(args.part1_json), "sha256": digest,
                                     "commit": src.get("provenance", {}).get("commit")}  # fmt: skip
        else:
            p1, smol = part1_single_text(s, params)
        write_result(partial, {"single_text": p1, "settings": s})
        p2, keep = part2_radioactivity(s, params, Path(tmp))
        write_result(partial, {"single_text": p1, "radioactivity": p2, "settings": s})
        p3, pvals = part3_null(s, params, keep, smol)
        p4 = part4_ablation(s, params, keep)
    partial.unlink(missing_ok=True)
    stem = args.out.with_suffix("")
    curves = plot_power(keep, params, Path(f"{stem}_power.png"))
    plot_qq(pvals, Path(f"{stem}_null_qq.png"))
    pooled = p3["pooled"]
    res: dict[str, Any] = {
        "null_ks_pvalue": pooled["ks_pvalue"],
        "null_fpr_at_0.05": pooled["fpr_at_0.05"],
        "null_fpr_at_0.05_ci99": pooled["fpr_at_0.05_ci99"],
        "null_fpr_at_0.01": pooled["fpr_at_0.01"],
        "null_fpr_at_0.01_ci99": pooled["fpr_at_0.01_ci99"],
        "p_open_rho_100": p2["p_open_rho_100"],
        "p_control": p2["p_control"],
        "min_rho_detected_1e-5": p2["min_rho_detected_1e-5"],
        "min_rho_vs_paper_5pct": p2["min_rho_detected_1e-5"] / PAPER_RHO,
        "single_text": p1,
        "radioactivity": p2,
        "null": p3,
        "ablation": p4,
        "power_curves": curves,
        "settings": {**s, "quick": args.quick, "key_id": KEY.key_id, "watermark": params.to_dict()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "total_seconds": time.perf_counter() - t0,
    }  # fmt: skip
    if reused:
        res["reused_from_earlier_run"] = reused
    res["provenance"] = provenance(started)
    write_result(args.out, res)
    summary(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
