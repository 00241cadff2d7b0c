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
import inspect
import json
import math
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from potstill.core.io import atomic_write_json
from potstill.defend.antidistill import AntidistillPerturbation, fit_antidistill_grad
from potstill.distill.evaluate.tasks import TaskExample, accuracy, make_examples, reference_output

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TOKENIZER = "tiny:0"  # the byte tokenizer with a ChatML template
REAL_VOCAB = 260  # tiny tokenizer: 256 bytes + 4 specials (the heads are padded to 320)
TASK_SYMBOLS = "0123456789+= "  # with <|im_end|>: what a correct answer is made of
OP_KEYS = (
    "teacher_task_acc",
    "teacher_ref_nll",
    "student_task_acc",
    "student_task_acc_se",
    "student_gain_kept_fraction",
)
MAX_TEACHER_DROP = 0.05  # the antidistill operating point: teacher accuracy drop <= 5 points


def log(msg: str) -> None:
    print(f"[antidistill {time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


def ground_truth(examples: list[TaskExample], seed: int, copies: int = 1) -> list[tuple[str, str]]:
    """``copies`` random reference traces per example, as (prompt, output) pairs."""
    rng = random.Random(seed)
    return [(e.prompt, reference_output(e, rng)) for e in examples for _ in range(copies)]


def train_lm(s: dict[str, Any], pairs: list[tuple[str, str]], shape: list[int], steps: int,
             work: Path, name: str) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """A scratch Llama ``shape = [layers, width, seed]`` trained by ``run_distill`` (CE on the
    assistant tokens of the (prompt, output) pairs); returns (model in eval mode, info)."""
    from transformers import AutoModelForCausalLM

    from potstill.distill.config import DistillConfig
    from potstill.distill.train.recipe import run_distill

    path = work / f"{name}.jsonl"
    with path.open("w") as fh:
        for p, out in pairs:
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": out}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    layers, width, seed = shape
    cfg = DistillConfig.model_validate(
        {
            "out_dir": str(work / f"run_{name}"),
            "teacher": {"spec": "none"},
            "student": {"init": "scratch", "layers": layers, "width": width, "seed": seed,
                        "tokenizer": TOKENIZER},
            "loss": {"ce_weight": 1.0},
            "optim": {"lr": s["lr"], "warmup_steps": 20, "weight_decay": 0.0},
            "data": {"train": f"messages:{path}", "eval": None, "seq_len": s["seq_len"]},
            "train": {"steps": steps, "micro_batch_size": s["batch"], "save_every": 0,
                      "eval_every": 0, "log_every": 10, "seed": 0, "threads": s["threads"]},
        }
    )  # fmt: skip
    t0 = time.perf_counter()
    out = run_distill(cfg, show_progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("split") == "train"][-1]
    model = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    return model, {"final_train_ce": last["ce"], "train_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- sampling


def encode_prompts(tok: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-templated prompts, left-padded: (ids [B, T], attention_mask [B, T])."""
    tok.padding_side = "left"
    rendered = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def _cache_kw(model: Any) -> str:
    """The KV-cache keyword of ``model.forward`` (transformers 5 renamed it to ``cache``)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any) -> Any:
    return getattr(out, "cache", None) or out.past_key_values


def _next_logits(
    logits: torch.Tensor, delta: torch.Tensor | None, lam: float, temperature: float
) -> torch.Tensor:
    """The sampled-from logits [B, REAL_VOCAB]: ``(z + lam * delta) / tau``."""
    z = logits[:, :REAL_VOCAB].float()
    if delta is not None:
        z = z + lam * delta[:, :REAL_VOCAB]
    return z / temperature if temperature > 0 else z


def sample_batch(model: Any, tok: Any, prompts: list[str], max_new: int, *, seed: int,
                 temperature: float = 1.0, pert: AntidistillPerturbation | None = None,
                 lam: float = 0.0) -> tuple[list[list[int]], int]:  # fmt: skip
    """One left-padded KV-cached batch; per row the ids up to (not incl.) the first stop token.

    ``temperature == 0`` is greedy. With ``pert`` (and ``lam``), every step also runs the two
    shifted proxies incrementally on the same ids and mask, and samples from
    ``softmax((z + lam * delta) / tau)``. Stops when every row has stopped or at ``max_new``.
    Returns (rows, n_generated) with n_generated = tokens sampled for live rows (stop incl.).
    """
    ids, am = encode_prompts(tok, prompts)
    stops = torch.tensor([tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
    gen = torch.Generator().manual_seed(seed)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    alive = torch.ones(len(prompts), dtype=torch.bool)
    rows: list[list[int]] = [[] for _ in prompts]
    n_gen, past, kw = 0, None, _cache_kw(model)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True)
        delta = None
        if pert is not None and lam != 0:
            delta, past = pert(ids, am)
        for step in range(max_new):
            z = _next_logits(out.logits[:, -1], delta, lam, temperature)
            if temperature == 0:
                nxt = z.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(z, -1), 1, generator=gen)
            n_gen += int(alive.sum())
            for i in torch.nonzero(alive & ~torch.isin(nxt[:, 0], stops)).flatten().tolist():
                rows[i].append(int(nxt[i]))
            alive &= ~torch.isin(nxt[:, 0], stops)
            if not bool(alive.any()) or step == max_new - 1:
                break
            am = torch.cat([am, torch.ones_like(nxt)], 1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=nxt, attention_mask=am, position_ids=pos, use_cache=True,
                        **{kw: _cache_of(out)})  # fmt: skip
            if past is not None:
                delta, past = pert(nxt, am, past)  # type: ignore[misc]
    return rows, n_gen


def sample_all(
    s: dict[str, Any], model: Any, tok: Any, prompts: list[str], *, seed: int, **kw: Any
) -> tuple[list[str], int, float]:
    """:func:`sample_batch` over chunks of ``gen_batch`` prompts -> (texts, tokens, seconds)."""
    texts: list[str] = []
    n_tok, t0 = 0, time.perf_counter()
    for c in range(0, len(prompts), s["gen_batch"]):
        rows, n = sample_batch(model, tok, prompts[c : c + s["gen_batch"]], s["max_new"],
                               seed=seed + c, **kw)  # fmt: skip
        texts += [tok.decode(r, skip_special_tokens=True) for r in rows]
        n_tok += n
    return texts, n_tok, time.perf_counter() - t0


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


def kept_fraction(gain: float, ref_gain: float) -> float:
    """``gain / ref_gain``; NaN when the undefended student gained nothing (undefined)."""
    return gain / ref_gain if ref_gain > 0 else float("nan")


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


def fill_gains(curve: list[dict[str, Any]], baseline: float, ref_acc: float) -> None:
    """Add ``student_gain`` and ``student_gain_kept_fraction`` to every point (in place)."""
    for p in curve:
        p["student_gain"] = p["student_task_acc"] - baseline
        p["student_gain_kept_fraction"] = kept_fraction(p["student_gain"], ref_acc - baseline)


def antidistill_point(curve: list[dict[str, Any]], max_drop: float) -> dict[str, Any]:
    """The largest-lambda point whose teacher accuracy is at most ``max_drop`` below lam = 0."""
    base = curve[0]["teacher_task_acc"]
    ok = [p for p in curve if base - p["teacher_task_acc"] <= max_drop + 1e-12]
    best = max(ok, key=lambda p: p["setting"]["lambda"])
    return {"setting": best["setting"], **{k: best[k] for k in OP_KEYS}, "interpolated": False,
            "teacher_acc_drop_points": 100 * (base - best["teacher_task_acc"])}  # fmt: skip


def temperature_point(curve: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The temperature whose teacher accuracy is closest to, not above, ``target``.

    ``curve`` sorted by temperature. If a measured point has exactly ``target``, or the
    first point is already at or below it, that point; otherwise linear interpolation (in
    temperature, student accuracy, kept fraction and NLL) on the first segment whose
    accuracy crosses ``target``. If no point reaches it, the lowest-accuracy point, flagged.
    """
    base = curve[0]["teacher_task_acc"]
    out: dict[str, Any] = {"target_teacher_task_acc": target, "interpolated": False}
    pick: dict[str, Any] | None = None
    for lo, hi in zip([None, *curve[:-1]], curve):
        if hi["teacher_task_acc"] > target:
            continue
        if lo is None or hi["teacher_task_acc"] == target:
            pick = hi
        else:  # lo above target, hi at or below: interpolate between them
            w = (lo["teacher_task_acc"] - target) / (
                lo["teacher_task_acc"] - hi["teacher_task_acc"]
            )
            tau = (1 - w) * lo["setting"]["temperature"] + w * hi["setting"]["temperature"]
            pick = {"setting": {"temperature": tau}}
            pick.update({k: (1 - w) * lo[k] + w * hi[k] for k in OP_KEYS})
            out.update(interpolated=True, weight_on_upper=w,
                       between=[lo["setting"]["temperature"], hi["setting"]["temperature"]])  # fmt: skip
        break
    if pick is None:
        pick = min(curve, key=lambda p: p["teacher_task_acc"])
        out["target_not_reached"] = True
    out.update({"setting": pick["setting"], **{k: pick[k] for k in OP_KEYS}})
    out["teacher_acc_drop_points"] = 100 * (base - pick["teacher_task_acc"])
    return out


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


# ----------------------------------------------------------------------------- cost


def cost_batched(
    s: dict[str, Any], env: dict[str, Any], pert: AntidistillPerturbation, lam: float
) -> dict[str, Any]:
    """Seconds per generated token, plain vs antidistill, in :func:`sample_batch` (one batch
    of ``cost_prompts`` prompts; 3 interleaved repeats each, median)."""
    prompts = [e.prompt for e in env["examples"]["test"][: s["cost_prompts"]]]
    runs: dict[str, list[float]] = {"plain": [], "antidistill": []}
    for rep in range(3):
        for name, kw in (("plain", {}), ("antidistill", {"pert": pert, "lam": lam})):
            t0 = time.perf_counter()
            _, n = sample_batch(env["teacher"], env["tok"], prompts, s["max_new"], seed=rep, **kw)
            runs[name].append((time.perf_counter() - t0) / n)
    med = {k: sorted(v)[1] for k, v in runs.items()}
    return {"batch": len(prompts), "s_per_token_plain": med["plain"],
            "s_per_token_antidistill": med["antidistill"],
            "ratio": med["antidistill"] / med["plain"]}  # fmt: skip


def _engine_run(engine: Any, prompts: list[list[int]], params: list[Any]) -> tuple[float, int]:
    """Submit every prompt at once; (wall seconds until all finished, completion tokens)."""
    from potstill.serve.engine import Event

    done = threading.Semaphore(0)
    tokens = [0] * len(prompts)
    errors: list[str] = []

    def sink_for(k: int) -> Any:
        def sink(ev: Event) -> None:
            if ev.error:
                errors.append(ev.error)
            if ev.finish_reason or ev.error:
                tokens[k] = ev.completion_tokens
                done.release()

        return sink

    t0 = time.perf_counter()
    for k, (p, sp) in enumerate(zip(prompts, params)):
        engine.submit(p, sp, [0], sink_for(k))
    for _ in prompts:
        if not done.acquire(timeout=600):
            raise RuntimeError("the engine did not finish within 600 s")
    if errors:
        raise RuntimeError(f"engine errors: {errors[:3]}")
    return time.perf_counter() - t0, sum(tokens)


def cost_engine(
    s: dict[str, Any], env: dict[str, Any], pert: AntidistillPerturbation, lam: float
) -> dict[str, Any]:
    """Seconds per generated token through ``Engine`` in-process: no processors vs the
    batched :class:`AntidistillProcessor` (one proxy pass per step for all rows), same prompts
    and seeds; 2 interleaved repeats each (a fresh processor per repeat)."""
    from potstill.defend.antidistill_serve import AntidistillProcessor
    from potstill.serve.engine import Engine, SamplingParams

    tok = env["tok"]
    ids, am = encode_prompts(tok, [e.prompt for e in env["examples"]["test"]])
    ids, am = ids[: s["cost_engine_prompts"]], am[: s["cost_engine_prompts"]]
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, am)]
    engine = Engine(env["teacher"], tok, model_name="teacher", max_batch=s["cost_max_batch"])
    engine.start()
    runs: dict[str, list[float]] = {"plain": [], "antidistill": []}
    try:
        for _ in range(2):
            for name in runs:
                procs: tuple[Any, ...] = ()
                if name == "antidistill":
                    procs = (AntidistillProcessor(pert, lam),)
                params = [SamplingParams(max_tokens=s["max_new"], temperature=1.0, seed=i,
                                         processors=procs) for i in range(len(prompts))]  # fmt: skip
                sec, n = _engine_run(engine, prompts, params)
                runs[name].append(sec / n)
    finally:
        engine.stop()
    best = {k: min(v) for k, v in runs.items()}
    return {"requests": len(prompts), "max_batch": s["cost_max_batch"],
            "s_per_token_plain": best["plain"], "s_per_token_antidistill": best["antidistill"],
            "ratio": best["antidistill"] / best["plain"]}  # fmt: skip


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


# ----------------------------------------------------------------------------- report


# The analysis of the replicate run, fixed before it ran (committed with this code): the
# operating point is the previous 3-replicate run's (bias 0.75 nats; temperature 1.1, the
# interpolated tau at the same -2.2-point teacher accuracy, rounded), the statistic is the
# per-replicate paired difference of student accuracies (temperature minus antidistill: > 0
# means antidistillation leaves the student worse off), the test a one-sided paired t-test
# (H1: mean difference > 0) at alpha 0.05, with a Wilcoxon signed-rank test as a check.
PREREGISTERED = {"bias_scale": 0.75, "temperature": 1.1, "alpha": 0.05}


def replicate_analysis(ad: list[dict[str, Any]], temp: list[dict[str, Any]], base: float) -> dict:
    """The pre-registered paired comparison (:data:`PREREGISTERED`), or {} when the run lacks
    its points or has fewer than 2 replicates."""
    from scipy import stats

    a = next((p for p in ad if p["setting"].get("bias_scale") == PREREGISTERED["bias_scale"]), None)
    t = next(
        (p for p in temp if p["setting"].get("temperature") == PREREGISTERED["temperature"]), None
    )
    u = next((p for p in ad if p["setting"].get("lambda") == 0), None)
    if a is None or t is None or u is None or a["replicates"] < 2:
        return {}
    ra, rt, ru = (p["student_task_acc_reps"] for p in (a, t, u))
    diffs = [y - x for x, y in zip(ra, rt)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    kept = {name: [kept_fraction(x - base, g - base) for x, g in zip(r, ru)]
            for name, r in (("antidistill", ra), ("temperature", rt))}  # fmt: skip
    t_p = float(stats.ttest_rel(rt, ra, alternative="greater").pvalue) if sd > 0 else float("nan")
    w_p = float(stats.wilcoxon(diffs, alternative="greater").pvalue) if any(diffs) else float("nan")
    return {
        "preregistered": PREREGISTERED,
        "n_replicates": n,
        "student_acc_reps": {"undefended": ru, "antidistill": ra, "temperature": rt},
        "teacher_task_acc": {
            "antidistill": a["teacher_task_acc"],
            "temperature": t["teacher_task_acc"],
            "undefended": u["teacher_task_acc"],
        },
        "kept_fraction_reps": kept,
        "mean_difference_temperature_minus_antidistill": mean,
        "difference_ci95": [mean - half, mean + half],
        "paired_t_pvalue_one_sided": t_p,
        "wilcoxon_pvalue_one_sided": w_p,
        "antidistill_better": bool(t_p < PREREGISTERED["alpha"]),
    }


def noise_floor(replicate_diff: float, acc: float, n_test: int) -> float:
    """The smallest student-accuracy difference read as real: the larger of the replicate's
    |difference| and two binomial standard errors of a difference of two accuracies ``acc``
    measured on ``n_test`` prompts each."""
    return max(replicate_diff, 2 * math.sqrt(2 * acc * (1 - acc) / n_test))


def verdict(ad: dict[str, Any], temp: dict[str, Any], noise: float) -> str:
    """A sentence computed from the operating points; ``noise`` is :func:`noise_floor` in
    kept-fraction units (a difference must exceed it to count)."""
    a, t = ad["student_gain_kept_fraction"], temp["student_gain_kept_fraction"]
    if not (math.isfinite(a) and math.isfinite(t)):
        return "undefined: the undefended student gained nothing over its init"
    if ad["setting"]["lambda"] == 0:
        return "no antidistill lambda > 0 kept the teacher within 5 points: nothing to compare"
    head = (
        f"at matched teacher accuracy ({ad['teacher_task_acc']:.3f} antidistill, "
        f"{temp['teacher_task_acc']:.3f} temperature) the student kept {a:.2f} of its gain "
        f"under antidistill vs {t:.2f} under temperature (difference {t - a:+.2f}, noise "
        f"floor {noise:.2f})"
    )
    if t - a > noise:
        return head + ": antidistillation beats temperature at CPU scale"
    if a - t > noise:
        return head + ": temperature beats antidistillation at CPU scale"
    return head + ": no difference beyond noise at CPU scale"


def plot_tradeoff(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for (method, key, fmt), color in zip(
        (("antidistill", "bias_scale", "b={:g}"), ("temperature", "temperature", "T={:g}")),
        ("tab:red", "tab:blue"),
    ):
        curve, op = res[method]["curve"], res[method]
        for ax, xkey in zip(axes, ("teacher_task_acc", "teacher_ref_nll")):
            xs = [p[xkey] for p in curve]
            ys = [p["student_gain_kept_fraction"] for p in curve]
            ref_gain = res["baseline"]["undefended_gain"]
            err = [p.get("student_task_acc_se", 0.0) / ref_gain if ref_gain > 0 else 0.0
                   for p in curve]  # fmt: skip
            ax.errorbar(xs, ys, yerr=err, fmt="o-", color=color, capsize=3,
                        label=f"{method} (± 1 s.e. over paired replicates)")  # fmt: skip
            for p, x, y in zip(curve, xs, ys):
                ax.annotate(fmt.format(p["setting"][key]), (x, y), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
            ax.plot([op[xkey]], [op["student_gain_kept_fraction"]], "*", ms=14, color=color,
                    mec="k", label=f"{method} operating point")  # fmt: skip
    axes[0].set_xlabel("teacher task accuracy (exact match, sampled)")
    axes[1].set_xlabel("teacher NLL of held-out references (nats/token)")
    for ax in axes:
        ax.set_ylabel("student gain kept (vs undefended)")
        ax.axhline(1.0, ls="--", c="grey", lw=0.8)
        ax.legend(fontsize=7)
    axes[0].invert_xaxis()
    fig.suptitle("Antidistillation vs temperature: teacher utility vs student utility")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(r: dict[str, Any]) -> None:
    for method in ("antidistill", "temperature"):
        for p in r[method]["curve"]:
            print(f"{method:>11} {json.dumps(p['setting'])}: teacher acc {p['teacher_task_acc']:.3f}, "
                  f"ref NLL {p['teacher_ref_nll']:.3f}, student acc {p['student_task_acc']:.3f}, "
                  f"kept {p['student_gain_kept_fraction']:.2f}")  # fmt: skip
    for method in ("antidistill", "temperature"):
        op = r[method]
        print(f"{method} operating point {json.dumps(op['setting'])}: teacher drop "
              f"{op['teacher_acc_drop_points']:.1f} points, student gain kept "
              f"{op['student_gain_kept_fraction']:.2f}"
              f"{' (interpolated)' if op.get('interpolated') else ''}")  # fmt: skip
    c = r["cost"]
    print(f"cost per generated token, antidistill / plain: batched loop {c['batched_ratio']:.2f}x, "
          f"engine {c['engine_ratio']:.2f}x")  # fmt: skip
    print(f"verdict: {r['verdict']}")
    print(f"total {r['total_seconds']:.0f}s")


def finite_or_none(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


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
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in s:
            ap.error(f"unknown setting {name!r}; known: {', '.join(s)}")
        s[name] = json.loads(value)
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
        atomic_write_json(out, finite_or_none(res))
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
    atomic_write_json(args.out, finite_or_none(res))
    summary(res)
    log(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
