"""Antidistillation sampling vs plain temperature sampling: teacher utility vs student utility.

    python benchmarks/antidistill.py            # full CPU run (~25 min on 2 shared cores)
    python benchmarks/antidistill.py --quick    # smoke run (< 3 min)

After Savani et al. 2025, "Antidistillation Sampling", at CPU scale on the verifiable task
of :mod:`potstill.distill.evaluate.tasks` (2-digit addition with a carry trace whose operand order
is free, so outputs have slack). Writes ``benchmarks/results/antidistill.json`` and
``antidistill_tradeoff.png``:

1. teacher: a scratch Llama trained (``run_distill``, CE on assistant tokens) on ground-truth
   traces of its own prompts, until it answers well at temperature 1.
2. proxy: a SMALLER scratch Llama (other shape, other seed) trained on undefended teacher
   samples (tau = 1); ``g = fit_antidistill_grad`` of its CE on held-out undefended teacher
   outputs (assistant tokens); the finite-difference step ``eps`` is set so that
   ``eps * |g|`` is fixed (a parameter move of fixed L2 norm).
3. sweeps. Antidistill: ``softmax(z + lam * delta)`` at tau = 1, ``lam = b / sigma_delta``
   for bias scales ``b`` (``sigma_delta``: RMS over contexts of delta's std over the task's
   symbols). Temperature: ``softmax(z / tau)``. lam = 0 and tau = 1 are the same
   distribution: they share one set of outputs and one student. Per setting the teacher
   answers the same N distillation prompts (and the held-out test prompts) in one batched
   KV-cached loop; teacher utility = exact-match accuracy on those N answers (also on the
   test prompts) and the NLL (nats/token) of held-out reference traces teacher-forced through
   the sampled-from distribution; student utility = greedy test accuracy of a student (third
   shape, third seed, same init, same steps, same N outputs for every setting) trained on the
   N (prompt, output) pairs. Its undistilled baseline is the same init, untrained.
   gain = acc - baseline; kept fraction = gain / gain(undefended).
4. operating points: antidistill at the largest lam whose teacher accuracy drop is <= 5
   points; temperature at the tau whose teacher accuracy is closest to, not above, that
   (linear interpolation between sweep points when needed, flagged in the JSON).
5. cost: seconds per generated token of antidistill vs plain sampling, in this batched loop
   and through ``potstill.serve.engine.Engine`` (batched ``AntidistillProcessor`` vs none).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from potstill.defend.antidistill import AntidistillPerturbation, fit_antidistill_grad
from potstill.distill.evaluate.tasks import TaskExample, accuracy, make_examples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _antidistill_report import (
    antidistill_point,
    fill_gains,
    kept_fraction,
    noise_floor,
    plot_tradeoff,
    replicate_analysis,
    summary,
    temperature_point,
    verdict,
)
from _antidistill_sampling import REAL_VOCAB, cost_batched, cost_engine, sample_all
from _antidistill_sampling import sample_batch as sample_batch  # the tests drive it directly
from _common import apply_settings, make_log, write_result
from _provenance import provenance
from _task import TOKENIZER, ground_truth, train_lm

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TASK_SYMBOLS = "0123456789+= "  # with <|im_end|>: what a correct answer is made of
MAX_TEACHER_DROP = 0.05  # the antidistill operating point: teacher accuracy drop <= 5 points


log = make_log("antidistill")


def settings_for(quick: bool) -> dict[str, Any]:
    s: dict[str, Any] = {
        "digits": 2,
        "seed": 0,
        "n_teacher_train": 3000,  # prompts; ground-truth traces per prompt below
        "teacher_traces_per_prompt": 2,
        "n_proxy_train": 800,  # undefended teacher answers the proxy is trained on
        "n_proxy_grad": 300,  # held-out undefended answers g is computed on
        "n_distill": 1000,  # N: teacher answers each student is distilled from
        "n_test": 500,  # held-out test prompts (teacher and student accuracy)
        "n_ref": 300,  # held-out reference traces (teacher NLL)
        "max_new": 26,
        "seq_len": 48,
        "threads": 1,  # tiny models on a shared 2-core machine: one thread is faster
        "gen_batch": 500,
        "batch": 32,
        "lr": 3e-3,
        "teacher": [3, 128, 0],  # layers, width, init seed
        "teacher_steps": 2200,
        "proxy": [2, 64, 1],
        "proxy_steps": 800,
        "student": [4, 96, 2],
        "student_steps": 600,
        # paired replicates: replicate r uses sampling seed r and student init seed + r for
        # EVERY setting, so settings are compared on the same seeds (one student's accuracy
        # moved by 0.15 between two sampling seeds alone)
        "replicates": 3,
        "eps_step_norm": 1e-2,  # eps * |g|: L2 norm of the finite-difference parameter move
        "bias_scales": [0.0, 0.25, 0.5, 0.75, 1.0, 1.5],  # lambda * sigma_delta (nats)
        "temperatures": [1.0, 1.15, 1.3, 1.6],
        "cost_prompts": 64,
        "cost_engine_prompts": 16,
        "cost_max_batch": 16,
    }
    if quick:
        s.update(n_teacher_train=1500, teacher_traces_per_prompt=1, n_proxy_train=300,
                 n_proxy_grad=100, n_distill=300, n_test=150, n_ref=100, teacher=[2, 96, 0],
                 teacher_steps=700, proxy=[1, 64, 1], proxy_steps=200, student=[2, 64, 2],
                 student_steps=250, replicates=1, bias_scales=[0.0, 0.5, 2.0], temperatures=[1.0, 1.3, 2.0],
                 cost_prompts=32, cost_engine_prompts=8, cost_max_batch=8)  # fmt: skip
    return s


# ----------------------------------------------------------------------------- data, training


def split_examples(s: dict[str, Any]) -> dict[str, list[TaskExample]]:
    """Disjoint prompt sets: teacher / proxy / gradient / distillation from the train split,
    test and reference sets from the test split."""
    names = ("teacher", "proxy", "grad", "distill")
    sizes = [s["n_teacher_train"], s["n_proxy_train"], s["n_proxy_grad"], s["n_distill"]]
    train = make_examples(sum(sizes), seed=s["seed"], digits=s["digits"])
    test = make_examples(s["n_test"] + s["n_ref"], seed=s["seed"], digits=s["digits"], split="test")
    out, at = {}, 0
    for name, n in zip(names, sizes):
        out[name], at = train[at : at + n], at + n
    out["test"], out["ref"] = test[: s["n_test"]], test[s["n_test"] :]
    return out


# ----------------------------------------------------------------------------- proxy, delta


def chat_batches(
    tok: Any, pairs: list[tuple[str, str]], seq_len: int, batch: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids [b, T], labels [b, T]) batches; labels on assistant tokens
    (incl. <|im_end|>), -100 elsewhere (what ``run_distill`` trains on)."""
    from potstill.distill.data.chat import build_chat_data

    msgs = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": o}]}
        for p, o in pairs
    ]
    data = build_chat_data(msgs, tok, seq_len=seq_len, with_logprobs=False)
    return [
        (data.blocks[i : i + batch], data.labels[i : i + batch])
        for i in range(0, data.blocks.shape[0], batch)
    ]


def make_perturbation(
    s: dict[str, Any], proxy: Any, tok: Any, pairs: list[tuple[str, str]]
) -> tuple[AntidistillPerturbation, dict[str, Any]]:
    """g from the proxy's CE on held-out undefended teacher outputs; ``eps`` such that the
    finite-difference move ``eps * g`` has L2 norm ``eps_step_norm``."""
    grads, stats = fit_antidistill_grad(proxy, chat_batches(tok, pairs, s["seq_len"], s["batch"]))
    eps = s["eps_step_norm"] / stats["grad_norm"]
    pert = AntidistillPerturbation(proxy, grads, eps)
    return pert, {**stats, "eps": eps}


def full_delta(pert: AntidistillPerturbation, ids: torch.Tensor) -> torch.Tensor:
    """delta at EVERY position of right-padded ``ids [B, T]``: [B, T, REAL_VOCAB] fp32 (the
    same finite difference :class:`AntidistillPerturbation` takes at the last position)."""
    with torch.inference_mode():
        plus = pert.plus(input_ids=ids, use_cache=False).logits[..., :REAL_VOCAB].float()
        minus = pert.minus(input_ids=ids, use_cache=False).logits[..., :REAL_VOCAB].float()
    return (plus - minus) / (2.0 * pert.eps)


def symbol_ids(tok: Any) -> list[int]:
    """Token ids of the task's symbols (bytes) and <|im_end|>."""
    ids = tok(TASK_SYMBOLS, add_special_tokens=False)["input_ids"]
    return [*ids, tok.convert_tokens_to_ids("<|im_end|>")]


def delta_sigma(
    s: dict[str, Any], pert: AntidistillPerturbation, tok: Any, pairs: list[tuple[str, str]]
) -> float:
    """RMS over answer contexts of delta's std over the task's symbols: the scale that
    ``lam`` multiplies (so ``lam * sigma`` is a typical logit bias in nats)."""
    sym = torch.tensor(symbol_ids(tok))
    sq, n = 0.0, 0
    for ids, labels in chat_batches(tok, pairs, s["seq_len"], s["batch"]):
        d = full_delta(pert, ids)[..., sym]  # [b, T, S]
        keep = labels != -100  # contexts whose next token is an answer token
        sq += float(d[keep].std(-1).pow(2).sum())
        n += int(keep.sum())
    return math.sqrt(sq / n)


def ref_nll(s: dict[str, Any], teacher: Any, tok: Any, pairs: list[tuple[str, str]], *,
            temperature: float = 1.0, pert: AntidistillPerturbation | None = None,
            lam: float = 0.0) -> float:  # fmt: skip
    """Mean NLL (nats/token) of the reference outputs' assistant tokens under the sampled-from
    distribution ``softmax((z + lam * delta) / tau)`` over the real vocabulary."""
    total, n = 0.0, 0
    for ids, labels in chat_batches(tok, pairs, s["seq_len"], s["batch"]):
        with torch.inference_mode():
            z = teacher(input_ids=ids, use_cache=False).logits[..., :REAL_VOCAB].float()
        if pert is not None and lam != 0:
            z = z + lam * full_delta(pert, ids)
        lp = torch.log_softmax(z / temperature, -1)
        keep = labels != -100
        total -= float(lp[keep].gather(-1, labels[keep].unsqueeze(-1)).sum())
        n += int(keep.sum())
    return total / n


# ----------------------------------------------------------------------------- the sweep


def run_setting(s: dict[str, Any], env: dict[str, Any], work: Path, name: str,
                setting: dict[str, float], **sampling: Any) -> dict[str, Any]:  # fmt: skip
    """One sweep point, averaged over ``s["replicates"]`` paired replicates: teacher answers
    (distill + test prompts), teacher accuracy and reference NLL under the sampled-from
    distribution, then a student distilled from the N distillation answers and its greedy test
    accuracy (gain and kept fraction filled later). ``student_task_acc_se``: standard error of
    the mean over replicates (0 with one replicate)."""
    ex, tok, teacher = env["examples"], env["tok"], env["teacher"]
    distill, test = ex["distill"], ex["test"]
    prompts = [e.prompt for e in distill + test]
    nll = ref_nll(s, teacher, tok, env["refs"], **sampling)
    reps: list[dict[str, Any]] = []
    for r in range(s["replicates"]):
        texts, n_tok, gen_s = sample_all(s, teacher, tok, prompts, seed=s["seed"] + 101 + 1009 * r,
                                         **sampling)  # fmt: skip
        d_texts, t_texts = texts[: len(distill)], texts[len(distill) :]
        layers, width, seed = s["student"]
        student, info = train_lm(s, list(zip([e.prompt for e in distill], d_texts)),
                                 [layers, width, seed + r], s["student_steps"], work,
                                 f"student_{name}_r{r}")  # fmt: skip
        reps.append({
            "teacher_task_acc": accuracy(distill + test, texts),
            "teacher_task_acc_distill": accuracy(distill, d_texts),
            "teacher_task_acc_test": accuracy(test, t_texts),
            "student_task_acc": student_accuracy(s, env, student),
            "student_final_train_ce": info["final_train_ce"],
            "tokens": sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in d_texts),
            "gen_tokens_all": n_tok, "gen_s": gen_s, "train_s": info["train_s"],
            "examples": d_texts[:4],
        })  # fmt: skip
    accs = [x["student_task_acc"] for x in reps]
    n = len(accs)
    sd = math.sqrt(sum((a - sum(accs) / n) ** 2 for a in accs) / (n - 1)) if n > 1 else 0.0
    point: dict[str, Any] = {"setting": setting, "teacher_ref_nll": nll, "n_outputs": len(distill)}
    for k in ("teacher_task_acc", "teacher_task_acc_distill", "teacher_task_acc_test",
              "student_task_acc", "student_final_train_ce", "tokens", "gen_tokens_all", "gen_s",
              "train_s"):  # fmt: skip
        point[k] = sum(x[k] for x in reps) / n
    point.update(student_task_acc_reps=accs, student_task_acc_se=sd / math.sqrt(n),
                 replicates=n, examples=reps[0]["examples"])  # fmt: skip
    log(f"{name}: teacher acc {point['teacher_task_acc']:.3f}, ref NLL {nll:.3f}, "
        f"student acc {point['student_task_acc']:.3f} ± {point['student_task_acc_se']:.3f} "
        f"({[round(a, 3) for a in accs]})")  # fmt: skip
    return point


def student_accuracy(s: dict[str, Any], env: dict[str, Any], model: Any) -> float:
    """Greedy exact-match accuracy on the held-out test prompts."""
    test = env["examples"]["test"]
    texts, _, _ = sample_all(s, model, env["tok"], [e.prompt for e in test], seed=0,
                             temperature=0.0)  # fmt: skip
    return accuracy(test, texts)


def baseline_accuracy(s: dict[str, Any], env: dict[str, Any]) -> float:
    """Greedy test accuracy of the students' inits (the same scratch weights that
    ``run_distill`` builds from ``student.seed + r``), before any distillation; mean over
    the replicates."""
    from potstill.distill.config import StudentConfig
    from potstill.distill.train.student import build_student

    layers, width, seed = s["student"]
    accs = []
    for r in range(s["replicates"]):
        cfg = StudentConfig(init="scratch", layers=layers, width=width, seed=seed + r)
        model = build_student(cfg, env["tok"], max_len=s["seq_len"]).eval()
        accs.append(student_accuracy(s, env, model))
    return sum(accs) / len(accs)


# ----------------------------------------------------------------------------- pipeline


def build_env(s: dict[str, Any], work: Path) -> dict[str, Any]:
    """Teacher (on ground truth), proxy (on undefended teacher samples), the perturbation."""
    from potstill.core.models import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    ex = split_examples(s)
    env: dict[str, Any] = {"tok": tok, "examples": ex, "info": {}}
    gt = ground_truth(ex["teacher"], s["seed"], s["teacher_traces_per_prompt"])
    teacher, info = train_lm(s, gt, s["teacher"], s["teacher_steps"], work, "teacher")
    env["teacher"] = teacher
    greedy, _, _ = sample_all(s, teacher, tok, [e.prompt for e in ex["test"]], seed=0,
                              temperature=0.0)  # fmt: skip
    info["test_acc_greedy"] = accuracy(ex["test"], greedy)
    env["info"]["teacher"] = info
    log(f"teacher: final CE {info['final_train_ce']:.3f}, greedy test acc "
        f"{info['test_acc_greedy']:.3f} ({info['train_s']:.0f}s)")  # fmt: skip
    undefended = {}
    for name, seed in (("proxy", 11), ("grad", 12)):
        texts, _, _ = sample_all(s, teacher, tok, [e.prompt for e in ex[name]], seed=seed)
        undefended[name] = [(e.prompt, t) for e, t in zip(ex[name], texts)]
    proxy, pinfo = train_lm(s, undefended["proxy"], s["proxy"], s["proxy_steps"], work, "proxy")
    pinfo["test_acc_greedy"] = student_accuracy(s, env, proxy)
    pert, gstats = make_perturbation(s, proxy, tok, undefended["grad"])
    sigma = delta_sigma(s, pert, tok, undefended["grad"])
    env["pert"], env["sigma"] = pert, sigma
    env["info"]["proxy"] = pinfo
    env["info"]["delta"] = {**gstats, "sigma_delta": sigma}
    env["refs"] = ground_truth(ex["ref"], s["seed"] + 7)
    log(f"proxy: greedy test acc {pinfo['test_acc_greedy']:.3f}; |g| {gstats['grad_norm']:.3g}, "
        f"eps {gstats['eps']:.3g}, sigma_delta {sigma:.3g}")  # fmt: skip
    return env


def run_sweeps(
    s: dict[str, Any], env: dict[str, Any], work: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Both curves; lam = 0 and tau = 1 (the same distribution) share one point."""
    ad: list[dict[str, Any]] = []
    for b in s["bias_scales"]:
        lam = b / env["sigma"]
        setting = {"lambda": lam, "bias_scale": b}
        kw = {"pert": env["pert"], "lam": lam} if lam else {}
        ad.append(run_setting(s, env, work, f"lam_{b:g}", setting, **kw))
    temp: list[dict[str, Any]] = []
    for tau in s["temperatures"]:
        if tau == 1.0 and ad[0]["setting"]["lambda"] == 0:
            temp.append({**ad[0], "setting": {"temperature": 1.0}, "shared_with": "lambda=0"})
            continue
        temp.append(run_setting(s, env, work, f"tau_{tau:g}", {"temperature": tau},
                                temperature=tau))  # fmt: skip
    return ad, temp


def replicate_spread(s: dict[str, Any], env: dict[str, Any], work: Path, ref: float) -> dict:
    """A second undefended student (other sampling seed): the run-to-run noise of the
    student's accuracy, against which differences between settings are read."""
    distill = env["examples"]["distill"]
    texts, _, _ = sample_all(s, env["teacher"], env["tok"], [e.prompt for e in distill],
                             seed=s["seed"] + 202)  # fmt: skip
    model, _ = train_lm(s, list(zip([e.prompt for e in distill], texts)), s["student"],
                        s["student_steps"], work, "student_replicate")  # fmt: skip
    acc = student_accuracy(s, env, model)
    return {"student_task_acc": acc, "abs_diff_vs_undefended": abs(acc - ref)}


def run(s: dict[str, Any], work: Path) -> dict[str, Any]:
    """The whole measurement (everything but plotting and writing)."""
    t0 = time.perf_counter()
    env = build_env(s, work)
    t_env = time.perf_counter() - t0
    ad, temp = run_sweeps(s, env, work)
    t_sweep = time.perf_counter() - t0 - t_env
    base = baseline_accuracy(s, env)
    ref_acc = ad[0]["student_task_acc"]
    fill_gains(ad, base, ref_acc)
    fill_gains(temp, base, ref_acc)
    ad_op = antidistill_point(ad, MAX_TEACHER_DROP)
    temp_op = temperature_point(temp, ad_op["teacher_task_acc"])
    if s["replicates"] > 1:  # two standard errors of the difference (ignoring the pairing,
        # which only makes it conservative when the paired students are positively correlated)
        se = math.hypot(ad_op["student_task_acc_se"], temp_op["student_task_acc_se"])
        rep: dict[str, Any] = {"paired_replicates": s["replicates"], "se_of_difference": se}
        noise = kept_fraction(2 * se, ref_acc - base)
    else:  # one replicate: a second undefended student gives the run-to-run spread
        rep = replicate_spread(s, env, work, ref_acc)
        noise = kept_fraction(noise_floor(rep["abs_diff_vs_undefended"], ref_acc, s["n_test"]),
                              ref_acc - base)  # fmt: skip
    # the cost does not depend on lam's value (only lam = 0 skips the proxies)
    lam = ad_op["setting"]["lambda"] or max(p["setting"]["lambda"] for p in ad) or 1.0
    t1 = time.perf_counter()
    cost = {"lambda": lam, "batched_loop": cost_batched(s, env, env["pert"], lam),
            "engine": cost_engine(s, env, env["pert"], lam)}  # fmt: skip
    cost["batched_ratio"] = cost["batched_loop"]["ratio"]
    cost["engine_ratio"] = cost["engine"]["ratio"]
    log(f"cost: batched {cost['batched_ratio']:.2f}x, engine {cost['engine_ratio']:.2f}x")
    return {
        "antidistill": {**ad_op, "curve": ad},
        "temperature": {**temp_op, "curve": temp},
        "baseline": {
            "student_init_task_acc": base,
            "undefended_student_task_acc": ref_acc,
            "undefended_gain": ref_acc - base,
            "replicate": rep,
            "noise_kept_fraction": noise,
        },
        "cost": cost,
        "server_cost_per_token_ratio": cost["engine_ratio"],
        "replicate_analysis": replicate_analysis(ad, temp, base),
        "verdict": verdict(ad_op, temp_op, noise),
        "teacher": env["info"]["teacher"],
        "proxy": env["info"]["proxy"],
        "delta": env["info"]["delta"],
        "seconds": {"setup": t_env, "sweeps": t_sweep, "cost": time.perf_counter() - t1},
    }


def run_cost(s: dict[str, Any], work: Path, bias: float) -> dict[str, Any]:
    """Only the cost part: the same teacher, proxy and perturbation as a full run, then the
    batched-loop and engine cost at lambda = bias / sigma_delta."""
    t0 = time.perf_counter()
    env = build_env(s, work)
    lam = bias / env["info"]["delta"]["sigma_delta"]
    cost = {"lambda": lam, "bias": bias, "batched_loop": cost_batched(s, env, env["pert"], lam),
            "engine": cost_engine(s, env, env["pert"], lam)}  # fmt: skip
    out = {"cost": cost, "batched_ratio": cost["batched_loop"]["ratio"],
           "server_cost_per_token_ratio": cost["engine"]["ratio"],
           "seconds": time.perf_counter() - t0}  # fmt: skip
    log(
        f"cost: batched {out['batched_ratio']:.2f}x, engine {out['server_cost_per_token_ratio']:.2f}x"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (< 3 min)")
    ap.add_argument("--cost-only", type=float, default=None, metavar="BIAS",
                    help="measure only the per-token cost at bias=BIAS (writes antidistill_cost.json)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS / "antidistill.json")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                    help="override a setting (JSON value), e.g. --set student_steps=400")  # fmt: skip
    args = ap.parse_args(argv)
    s = settings_for(args.quick)
    apply_settings(ap, s, args.set)
    torch.set_num_threads(s["threads"])
    t0 = time.perf_counter()
    started = time.time()
    if args.cost_only is not None:
        with tempfile.TemporaryDirectory(prefix="potstill-antidistill-") as tmp:
            res = run_cost(s, Path(tmp), args.cost_only)
        res["settings"] = {**s, "quick": args.quick, "tokenizer": TOKENIZER}
        res["provenance"] = provenance(started)
        out = (
            args.out
            if args.out != RESULTS / "antidistill.json"
            else RESULTS / "antidistill_cost.json"
        )
        write_result(out, res)
        log(f"wrote {out}")
        return 0
    with tempfile.TemporaryDirectory(prefix="potstill-antidistill-") as tmp:
        res = run(s, Path(tmp))
    res["settings"] = {**s, "quick": args.quick, "tokenizer": TOKENIZER,
                       "max_teacher_drop_points": 100 * MAX_TEACHER_DROP}  # fmt: skip
    res["notes"] = [
        "lambda = bias_scale / sigma_delta; sampling at tau = 1 from softmax(z + lambda * delta)",
        "teacher_task_acc pools the N distillation answers and the test-prompt answers",
        "the temperature operating point is linearly interpolated between sweep points when "
        "'interpolated' is true (student numbers too: an estimate, not a measured student)",
        "lambda = 0 and tau = 1 are one distribution: one set of outputs and one student",
        "student_gain_kept_fraction = (acc - init acc) / (undefended acc - init acc)",
    ]
    res["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                      "platform": platform.platform()}  # fmt: skip
    res["total_seconds"] = time.perf_counter() - t0
    res["provenance"] = provenance(started)
    png = args.out.with_name(args.out.stem + "_tradeoff.png")
    plot_tradeoff(res, png)
    write_result(args.out, res)
    summary(res)
    log(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
