"""On-policy distillation through an OpenAI-compatible endpoint against the white-box path, on
the same tiny teacher, in one run.

    python benchmarks/onpolicy_endpoint.py            # ~6 min on 2 CPU cores
    python benchmarks/onpolicy_endpoint.py --quick    # ~2 min

A teacher for :mod:`potstill.distill.evaluate.tasks` (addition with a carry trace) is trained,
and a warm-started student is distilled on-policy (lambda = 1, forward KL) twice from the same
start, with the same seeds, steps and prompts:

* ``white_box``: the teacher in-process, forward KL on its full distribution;
* ``endpoint``: the teacher behind ``potstill serve`` over loopback HTTP, scored by echoed
  prompt logprobs: forward KL on its top-``K`` plus the sampled token plus a tail bucket
  (:mod:`potstill.distill.teachers.endpoint`).

Reported: the final full-vocabulary KL(teacher || student) of both students on the same fresh
student-sampled completions (the quantity both runs minimise, measured white-box), their greedy
accuracy, the estimator's bias on those completions (top-K-plus-tail KL over full KL, the
data-processing lower bound), and training tokens/s. Writes
``benchmarks/results/onpolicy_endpoint.json``.
"""

from __future__ import annotations

import argparse
import json
import os
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
from _common import make_log, write_result
from _provenance import provenance
from _task import TOKENIZER, ground_truth, train_lm, write_pairs
from onpolicy import greedy_accuracy, prompt_ids, teacher_samples
from potstill.core.models import load_tokenizer
from potstill.distill.evaluate.tasks import make_examples

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
log = make_log("onpolicy_endpoint")


def settings_for(quick: bool) -> dict[str, Any]:
    s: dict[str, Any] = {"digits": 2, "seed": 0, "threads": 1, "lr": 3e-3, "seq_len": 48,
                         "kd_seq_len": 64, "batch": 32, "n_teacher_train": 1500,
                         "teacher_traces_per_prompt": 1, "teacher": [2, 96, 0], "teacher_steps": 700,
                         "n_distill": 600, "n_test": 300, "max_new": 26, "student": [2, 64, 2],
                         "warm_steps": 150, "kd_steps": 150, "kd_lr": 2e-3, "top_logprobs": 20,
                         "concurrency": 8, "n_eval_rollouts": 256}  # fmt: skip
    if quick:
        s.update(teacher_steps=300, warm_steps=60, kd_steps=30, n_test=100, n_eval_rollouts=64)
    return s


def kd_run(s: dict[str, Any], env: dict[str, Any], work: Path, name: str, teacher: dict) -> Path:
    from potstill.distill.config import DistillConfig
    from potstill.distill.train.recipe import run_distill

    cfg = DistillConfig.model_validate({
        "out_dir": str(work / name), "teacher": teacher,
        "student": {"init": "checkpoint", "checkpoint": env["warm_dir"]},
        "loss": {"kind": "forward_kl",
                 "on_policy": {"lmbda": 1.0, "max_new_tokens": s["max_new"], "prompts": "data"}},
        "optim": {"lr": s["kd_lr"], "warmup_steps": 10, "weight_decay": 0.0},
        "data": {"train": f"messages:{env['distill_file']}", "eval": None, "seq_len": s["kd_seq_len"]},
        "train": {"steps": s["kd_steps"], "micro_batch_size": s["batch"], "save_every": 0,
                  "eval_every": 0, "log_every": 1, "seed": 0, "threads": s["threads"]},
    })  # fmt: skip
    t0 = time.perf_counter()
    out = run_distill(cfg, show_progress=False)
    log(f"{name}: {s['kd_steps']} steps in {time.perf_counter() - t0:.0f}s")
    return out


@torch.no_grad()
def heldout_kl(student: Any, teacher: Any, tok: Any, prompts: list[list[int]], s: dict) -> dict:
    """Full KL(teacher || student) and the top-K-plus-tail estimate, nats per sampled token, on
    completions the student samples for ``prompts`` (seed fixed)."""
    from potstill.distill.losses import forward_kl, sparse_topk_kl, topk_from_logits
    from potstill.distill.train.rollout import pack_rollouts, sample_completions

    end = tok.convert_tokens_to_ids("<|im_end|>")
    comps = sample_completions(student, prompts, max_new_tokens=s["max_new"], temperature=1.0,
                               stop_ids=frozenset({end}), pad_id=tok.pad_token_id,
                               generator=torch.Generator().manual_seed(123), vocab=len(tok))  # fmt: skip
    b = pack_rollouts(prompts, comps, pad_id=tok.pad_token_id)
    keep = b["labels"] != -100
    sl = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[
        ..., : len(tok)
    ][keep]
    tl = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[
        ..., : len(tok)
    ][keep]
    ids, lps = topk_from_logits(tl, s["top_logprobs"])
    return {"full_kl": float(forward_kl(sl, tl)), "topk_tail_kl": float(sparse_topk_kl(sl, ids, lps)),
            "tokens": int(keep.sum())}  # fmt: skip


def build(s: dict[str, Any], work: Path) -> dict[str, Any]:
    tok = load_tokenizer(TOKENIZER)
    train = make_examples(s["n_teacher_train"] + s["n_distill"], seed=s["seed"], digits=s["digits"])
    test = make_examples(s["n_test"], seed=s["seed"], digits=s["digits"], split="test")
    gt = ground_truth(train[: s["n_teacher_train"]], s["seed"], s["teacher_traces_per_prompt"])
    teacher, tinfo = train_lm(s, gt, s["teacher"], s["teacher_steps"], work, "teacher")
    distill = train[s["n_teacher_train"] :]
    answers = teacher_samples(teacher, tok, distill, s["max_new"], s["seed"])
    pairs = list(zip([e.prompt for e in distill], answers, strict=True))
    distill_file = write_pairs(work / "distill.jsonl", pairs)
    _, winfo = train_lm(s, pairs, s["student"], s["warm_steps"], work, "warm")
    return {"tok": tok, "test": test, "teacher": teacher, "teacher_dir": tinfo["dir"],
            "warm_dir": winfo["dir"], "distill_file": distill_file,
            "teacher_acc": greedy_accuracy(teacher, tok, test, s["max_new"])}  # fmt: skip


def run(s: dict[str, Any], work: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from potstill.serve.app import ServeSettings, create_app
    from potstill.serve.background import serve_in_background
    from potstill.serve.engine import Engine

    env = build(s, work)
    runs = {"white_box": kd_run(s, env, work, "white_box", {"spec": env["teacher_dir"]})}
    engine = Engine(env["teacher"], env["tok"], model_name="task-teacher", max_batch=64)
    with serve_in_background(create_app(engine, ServeSettings())) as url:
        endpoint = {"spec": url + "/v1", "model": "task-teacher", "top_logprobs": s["top_logprobs"],
                    "concurrency": s["concurrency"]}  # fmt: skip
        runs["endpoint"] = kd_run(s, env, work, "endpoint", endpoint)
    tok = env["tok"]
    prompts = [prompt_ids(tok, e.prompt) for e in env["test"][: s["n_eval_rollouts"]]]
    res: dict[str, Any] = {"teacher_acc": env["teacher_acc"]}
    for name, run_dir in runs.items():
        model = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["split"] == "train"]
        res[name] = {"acc": greedy_accuracy(model, tok, env["test"], s["max_new"]),
                     **heldout_kl(model, env["teacher"], tok, prompts, s),
                     "tok_per_s": train[-1]["tok_per_s"], "kd_curve": [r["kd"] for r in train]}  # fmt: skip
    wb, ep = res["white_box"], res["endpoint"]
    res["kl_rel_diff"] = (ep["full_kl"] - wb["full_kl"]) / wb["full_kl"]
    res["acc_diff"] = ep["acc"] - wb["acc"]
    res["estimator_lower_bound_ratio"] = wb["topk_tail_kl"] / wb["full_kl"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "onpolicy_endpoint.json")
    args = ap.parse_args(argv)
    s = settings_for(args.quick)
    torch.set_num_threads(s["threads"])
    started, t0 = time.time(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="potstill-opep-") as tmp:
        res = run(s, Path(tmp))
    res["settings"] = {**s, "quick": args.quick, "tokenizer": TOKENIZER}
    res["notes"] = ["both students: same warm start, seeds, prompts, steps; lambda = 1, forward KL",
                    "full_kl / topk_tail_kl: nats per sampled token on the same 123-seeded "
                    "student completions of held-out prompts, computed with the white-box teacher"]  # fmt: skip
    res["total_seconds"] = time.perf_counter() - t0
    res["provenance"] = provenance(started)
    write_result(args.out, res)
    log(f"full KL: white-box {res['white_box']['full_kl']:.4f}, endpoint {res['endpoint']['full_kl']:.4f} "
        f"({res['kl_rel_diff']:+.1%}); acc {res['white_box']['acc']:.3f} vs {res['endpoint']['acc']:.3f}; "
        f"top-{s['top_logprobs']}+tail / full KL = {res['estimator_lower_bound_ratio']:.3f}")  # fmt: skip
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
