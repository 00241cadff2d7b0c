"""On-policy vs off-policy distillation at equal compute, and on-policy throughput vs TRL.

    python benchmarks/onpolicy.py            # full CPU run (~35 min on 2 cores)
    python benchmarks/onpolicy.py --quick    # smoke run (~5 min)

Quality (GKD, Agarwal et al. 2024, at CPU scale), on :mod:`potstill.distill.evaluate.tasks`
(2-digit addition with a carry trace: one wrong digit early derails the rest, which is where
training only on teacher text, *exposure bias*, hurts):

1. teacher: a scratch Llama trained on ground-truth traces (CE) until it solves the task;
2. off-policy data: one teacher sample (temperature 1) per distillation prompt;
3. a warm start: a smaller scratch student trained briefly (CE) on that data, shared by every
   run below (GKD starts from an SFT student too);
4. for each lambda in ``lambdas`` and each paired replicate ``r`` (``train.seed = r``: data
   order and rollouts), ``potstill distill`` from the warm start: ``loss.kind=generalized_jsd``
   (``beta``) against the teacher's full logits, ``loss.on_policy.lmbda = lambda``, the same
   optimizer steps, micro-batch, learning rate and teacher forward passes for every lambda
   (equal compute, counted in steps and sequences; on-policy runs also pay for the student's
   sampling, and their wall time is reported);
5. greedy exact-match accuracy on held-out test prompts.

``acc_diff_se`` is the paired difference (best lambda > 0 minus lambda = 0) over its standard
error across replicates. Throughput (``_onpolicy_trl.py``): TRL's GKDTrainer against potstill at
lambda = 1, same student, teacher, prompts, generation length and steps.

Writes ``benchmarks/results/onpolicy.json`` and ``onpolicy_lambda.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
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
from _common import apply_settings, make_log, write_result
from _onpolicy_trl import throughput
from _provenance import provenance
from _task import TOKENIZER, ground_truth, train_lm, write_pairs
from potstill.core.models import load_tokenizer
from potstill.distill.evaluate.tasks import accuracy, make_examples

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
log = make_log("onpolicy")


def settings_for(quick: bool) -> dict[str, Any]:
    s: dict[str, Any] = {
        "digits": 2, "seed": 0, "threads": 1, "lr": 3e-3, "seq_len": 48, "kd_seq_len": 64, "batch": 32,
        "n_teacher_train": 3000, "teacher_traces_per_prompt": 2,
        "teacher": [3, 128, 0], "teacher_steps": 2200,
        "n_distill": 1000, "n_test": 500, "max_new": 26,
        "student": [3, 96, 2], "warm_steps": 200,
        "kd_steps": 300, "kd_lr": 2e-3, "beta": 0.5, "sample_temperature": 1.0,
        "lambdas": [0.0, 0.5, 1.0], "replicates": 5,
        # throughput vs TRL, real models: SmolLM2-135M-Instruct teacher, 4x256 student
        "tp_teacher": "smollm2-135m-instruct", "tp_tokenizer": "smollm2-135m-instruct",
        "tp_student": [4, 256], "tp_batch": 8, "tp_max_new": 32, "tp_seq_len": 96,
        "tp_steps": 8, "tp_threads": 2,
    }  # fmt: skip
    if quick:
        s.update(n_teacher_train=1500, teacher_traces_per_prompt=1, teacher=[2, 96, 0],
                 teacher_steps=700, n_distill=300, n_test=150, warm_steps=60, kd_steps=60,
                 replicates=2, tp_steps=3)  # fmt: skip
    return s


def prompt_ids(tok: Any, prompt: str) -> list[int]:
    """A single-turn chat prompt, ending in the assistant header, as token ids."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, tokenize=False)  # fmt: skip
    return list(tok(text, add_special_tokens=False)["input_ids"])


def greedy_accuracy(model: Any, tok: Any, examples: list[Any], max_new: int) -> float:
    """Exact-match accuracy of greedy answers (potstill's batched, KV-cached sampler)."""
    from potstill.distill.train.rollout import sample_completions

    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [prompt_ids(tok, e.prompt) for e in examples]
    texts: list[str] = []
    for lo in range(0, len(prompts), 256):
        rows = sample_completions(model, prompts[lo : lo + 256], max_new_tokens=max_new,
                                  temperature=0.0, stop_ids=frozenset({end, tok.eos_token_id}),
                                  pad_id=tok.pad_token_id, generator=torch.Generator(),
                                  vocab=len(tok))  # fmt: skip
        texts += [tok.decode([t for t in r if t not in (end, tok.eos_token_id)]) for r in rows]
    return accuracy(examples, texts)


def teacher_samples(
    model: Any, tok: Any, examples: list[Any], max_new: int, seed: int
) -> list[str]:
    """One temperature-1 teacher answer per prompt (the off-policy distillation data)."""
    from potstill.distill.train.rollout import sample_completions

    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [prompt_ids(tok, e.prompt) for e in examples]
    out: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    for lo in range(0, len(prompts), 256):
        rows = sample_completions(model, prompts[lo : lo + 256], max_new_tokens=max_new,
                                  temperature=1.0, stop_ids=frozenset({end}), pad_id=tok.pad_token_id,
                                  generator=gen, vocab=len(tok))  # fmt: skip
        out += [tok.decode([t for t in r if t != end]) for r in rows]
    return out


def distill_run(s: dict[str, Any], env: dict[str, Any], work: Path, lam: float, rep: int) -> dict:
    """One ``potstill distill`` run from the warm start; its accuracy and wall time."""
    from transformers import AutoModelForCausalLM

    from potstill.distill.config import DistillConfig
    from potstill.distill.train.recipe import run_distill

    cfg = DistillConfig.model_validate({
        "out_dir": str(work / f"kd_l{lam}_r{rep}"),
        "teacher": {"spec": env["teacher_dir"]},
        "student": {"init": "checkpoint", "checkpoint": env["warm_dir"]},
        "loss": {"kind": "generalized_jsd", "beta": s["beta"],
                 "on_policy": {"lmbda": lam, "max_new_tokens": s["max_new"],
                               "temperature": s["sample_temperature"], "prompts": "data"}},
        "optim": {"lr": s["kd_lr"], "warmup_steps": 10, "weight_decay": 0.0},
        "data": {"train": f"messages:{env['distill_file']}", "eval": None, "seq_len": s["kd_seq_len"]},
        "train": {"steps": s["kd_steps"], "micro_batch_size": s["batch"], "save_every": 0,
                  "eval_every": 0, "log_every": 10, "seed": rep, "threads": s["threads"]},
    })  # fmt: skip
    t0 = time.perf_counter()
    out = run_distill(cfg, show_progress=False)
    wall = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    acc = greedy_accuracy(model, env["tok"], env["test"], s["max_new"])
    return {"lmbda": lam, "replicate": rep, "acc": acc, "train_s": wall}


def build_env(s: dict[str, Any], work: Path) -> dict[str, Any]:
    tok = load_tokenizer(TOKENIZER)
    train = make_examples(s["n_teacher_train"] + s["n_distill"], seed=s["seed"], digits=s["digits"])
    test = make_examples(s["n_test"], seed=s["seed"], digits=s["digits"], split="test")
    teach_ex, distill_ex = train[: s["n_teacher_train"]], train[s["n_teacher_train"] :]
    gt = ground_truth(teach_ex, s["seed"], s["teacher_traces_per_prompt"])
    teacher, tinfo = train_lm(s, gt, s["teacher"], s["teacher_steps"], work, "teacher")
    tinfo["test_acc_greedy"] = greedy_accuracy(teacher, tok, test, s["max_new"])
    log(f"teacher: greedy test acc {tinfo['test_acc_greedy']:.3f} ({tinfo['train_s']:.0f}s)")
    answers = teacher_samples(teacher, tok, distill_ex, s["max_new"], s["seed"])
    pairs = list(zip([e.prompt for e in distill_ex], answers, strict=True))
    tinfo["sample_acc"] = accuracy(distill_ex, answers)
    distill_file = write_pairs(work / "distill.jsonl", pairs)
    warm, winfo = train_lm(s, pairs, s["student"], s["warm_steps"], work, "warm")
    winfo["test_acc_greedy"] = greedy_accuracy(warm, tok, test, s["max_new"])
    log(f"warm start: greedy test acc {winfo['test_acc_greedy']:.3f}")
    return {"tok": tok, "test": test, "teacher_dir": tinfo["dir"], "warm_dir": winfo["dir"],
            "distill_file": distill_file, "teacher": tinfo, "warm": winfo}  # fmt: skip


def both_throughputs(s: dict[str, Any], env: dict[str, Any], work: Path) -> dict[str, Any]:
    """TRL vs potstill at lambda = 1 on the real pair (SmolLM2-135M-Instruct -> 4x256) and on
    this benchmark's own task models (teacher, student shape, prompts, generation length)."""
    torch.set_num_threads(s["tp_threads"])
    real = throughput(s, work, log, "real")
    layers, width, _ = s["student"]
    task = {**s, "tp_teacher": env["teacher_dir"], "tp_tokenizer": TOKENIZER,
            "tp_student": [layers, width], "tp_batch": s["batch"], "tp_max_new": s["max_new"],
            "tp_seq_len": s["kd_seq_len"], "tp_threads": s["threads"]}  # fmt: skip
    torch.set_num_threads(s["threads"])
    prompts = [e.prompt for e in env["test"]]
    return {"real": real, "task": throughput(task, work, log, "task", prompts)}


def summarise(s: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean accuracy per lambda with a 95% CI, and paired differences against lambda = 0."""
    by = {lam: {r["replicate"]: r for r in runs if r["lmbda"] == lam} for lam in s["lambdas"]}
    n = s["replicates"]
    curve = []
    for lam in s["lambdas"]:
        accs = [by[lam][i]["acc"] for i in range(n)]
        se = statistics.stdev(accs) / math.sqrt(n) if n > 1 else float("nan")
        curve.append({"lmbda": lam, "acc_mean": statistics.fmean(accs), "acc_se": se,
                      "accs": accs, "train_s_mean": statistics.fmean(by[lam][i]["train_s"] for i in range(n))})  # fmt: skip
    diffs = {}
    for lam in s["lambdas"][1:]:
        d = [by[lam][i]["acc"] - by[0.0][i]["acc"] for i in range(n)]
        se = statistics.stdev(d) / math.sqrt(n) if n > 1 else float("nan")
        diffs[str(lam)] = {"mean": statistics.fmean(d), "se": se, "diffs": d}
    best = max(s["lambdas"][1:], key=lambda lam: diffs[str(lam)]["mean"])
    bd = diffs[str(best)]
    return {"curve": curve, "paired_diff_vs_lambda0": diffs, "best_lmbda": best,
            "acc_onpolicy": next(c["acc_mean"] for c in curve if c["lmbda"] == best),
            "acc_offpolicy": next(c["acc_mean"] for c in curve if c["lmbda"] == 0.0),
            "acc_diff": bd["mean"], "acc_diff_se": bd["mean"] / bd["se"] if bd["se"] else None,
            "onpolicy_beats_offpolicy_by_2se": bool(bd["se"] and bd["mean"] > 2 * bd["se"])}  # fmt: skip


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = res["quality"]["curve"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs = [p["lmbda"] for p in c]
    ax.errorbar(xs, [p["acc_mean"] for p in c], yerr=[1.96 * (p["acc_se"] or 0) for p in c],
                marker="o", capsize=4, label="student (mean, 95% CI)")  # fmt: skip
    for p in c:
        ax.scatter([p["lmbda"]] * len(p["accs"]), p["accs"], s=10, alpha=0.4, color="gray")
    ax.axhline(res["teacher"]["test_acc_greedy"], ls="--", color="green", label="teacher")
    ax.axhline(res["warm"]["test_acc_greedy"], ls=":", color="red", label="warm start")
    ax.set_xlabel("GKD lambda (fraction of on-policy micro-batches)")
    ax.set_ylabel("greedy exact-match accuracy")
    ax.set_title("on-policy vs off-policy at equal steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (~5 min)")
    ap.add_argument("--out", type=Path, default=RESULTS / "onpolicy.json")
    ap.add_argument("--skip-throughput", action="store_true", help="quality part only")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                    help="override a setting (JSON value), e.g. --set warm_steps=600")  # fmt: skip
    args = ap.parse_args(argv)
    s = settings_for(args.quick)
    apply_settings(ap, s, args.set)
    started, t0 = time.time(), time.perf_counter()
    torch.set_num_threads(s["threads"])
    with tempfile.TemporaryDirectory(prefix="potstill-onpolicy-") as tmp:
        work = Path(tmp)
        env = build_env(s, work)
        runs = []
        for rep in range(s["replicates"]):
            for lam in s["lambdas"]:
                runs.append(distill_run(s, env, work, lam, rep))
                log(
                    f"lambda {lam} replicate {rep}: acc {runs[-1]['acc']:.3f} ({runs[-1]['train_s']:.0f}s)"
                )
        res: dict[str, Any] = {"quality": summarise(s, runs), "runs": runs,
                               "teacher": env["teacher"], "warm": env["warm"]}  # fmt: skip
        if not args.skip_throughput:
            res["throughput"] = both_throughputs(s, env, work)
            res["speedup_vs_trl_lmbda1"] = res["throughput"]["real"]["speedup_vs_trl"]
            res["speedup_vs_trl_lmbda1_task_models"] = res["throughput"]["task"]["speedup_vs_trl"]
    q = res["quality"]
    res.update({k: q[k] for k in ("acc_onpolicy", "acc_offpolicy", "acc_diff", "acc_diff_se")})
    res["settings"] = {**s, "quick": args.quick, "tokenizer": TOKENIZER}
    res["notes"] = [
        "equal compute = the same optimizer steps, micro-batch size, learning rate and teacher "
        "forward passes for every lambda; on-policy runs also sample from the student "
        "(train_s_mean shows the wall-time cost)",
        "acc_diff_se = (mean paired difference, best lambda > 0 minus lambda 0) / its SE over "
        "replicates; replicate r uses train.seed = r in every lambda",
        "the loss is generalized JSD (beta) against the teacher's full logits in every run",
    ]
    res["total_seconds"] = time.perf_counter() - t0
    res["provenance"] = provenance(started)
    png = args.out.with_name(args.out.stem + "_lambda.png")
    plot(res, png)
    write_result(args.out, res)
    log(f"on-policy {q['acc_onpolicy']:.3f} (lambda {q['best_lmbda']}) vs off-policy "
        f"{q['acc_offpolicy']:.3f}: diff {q['acc_diff']:+.3f} = {q['acc_diff_se']} SE")  # fmt: skip
    if "throughput" in res:
        log(
            f"throughput vs TRL at lambda 1: {res['speedup_vs_trl_lmbda1']:.2f}x (real pair), "
            f"{res['speedup_vs_trl_lmbda1_task_models']:.2f}x (task models)"
        )
    log(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
