"""How fast on-policy KD at lambda = 1 can be on this machine: potstill and TRL against a bound.

    python benchmarks/onpolicy_bound.py     # ~3 min on 2 cores

``onpolicy.py`` asks for 2x TRL's training tokens/s. Both trainers run the same fp32 teacher
over the same sequences on every step, so no trainer can beat TRL by more than TRL's step time
over the time of that shared work plus the least the rest can cost. In one run this measures:

1. potstill and TRL at lambda = 1 on the real pair (``_onpolicy_trl.throughput``, the same
   settings as ``onpolicy.py``): training tokens/s (completion tokens scored per second);
2. the teacher's forward pass alone on sequences of the same shape: ``batch`` rows of the
   mean prompt length plus the mean completion length, no padding, and the output head only on
   the completion rows (what potstill already does; TRL projects every position);
3. two lower bounds on the rest, from this machine's measured copy bandwidth and fp32 GEMM rate:
   sampling must read the student's weights once per new token (``max_new`` decode steps of
   ``params * 4`` bytes), and a training step costs at least ``6 * params * tokens`` FLOPs
   (attention and the optimizer left out).

``bound_tok_per_s = tokens_per_step / (teacher_s + sample_s + train_s)``, so
``max_speedup_vs_trl = bound_tok_per_s / trl_tok_per_s``: no implementation of this algorithm
with this teacher in fp32 on this CPU exceeds it. ``teacher_only_speedup_vs_trl`` drops the two
lower bounds (sampling and the student's step for free).

Writes ``benchmarks/results/onpolicy_bound.json``.
"""

from __future__ import annotations

import argparse
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
from _common import copy_bandwidth, make_log, median_time, write_result
from _onpolicy_trl import short_prompts, throughput
from _provenance import provenance
from onpolicy import settings_for

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
log = make_log("onpolicy_bound")


def gemm_flops(n: int = 2048) -> float:
    """fp32 FLOP/s of one ``n x n x n`` matmul: the rate a training step could run at."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_time(lambda: a @ b, 5)


def teacher_seconds(s: dict[str, Any], prompt_len: int, completion_len: int) -> float:
    """One teacher forward on ``tp_batch`` unpadded rows, head on the completion rows only."""
    from potstill.core.models import load_model

    teacher, _ = load_model(s["tp_teacher"])
    teacher.eval()
    body, head = teacher.get_decoder(), teacher.get_output_embeddings().weight
    ids = torch.randint(0, head.shape[0], (s["tp_batch"], prompt_len + completion_len))

    def forward() -> None:
        with torch.no_grad():
            hidden = body(input_ids=ids).last_hidden_state[:, prompt_len:]
            torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), head)

    return median_time(forward, 5)


def student_sizes(s: dict[str, Any]) -> tuple[int, int]:
    """(all parameters, output-head parameters) of the ``tp_student`` shape."""
    from potstill.core.models import load_tokenizer
    from potstill.distill.config import StudentConfig
    from potstill.distill.train.student import build_student

    layers, width = s["tp_student"]
    tok = load_tokenizer(s["tp_tokenizer"])
    student = build_student(StudentConfig(layers=layers, width=width, seed=0), tok,
                            max_len=s["tp_seq_len"])  # fmt: skip
    total = sum(p.numel() for p in student.parameters())  # a tied head is counted once
    return total, student.get_output_embeddings().weight.numel()


def mean_prompt_tokens(s: dict[str, Any], n: int) -> int:
    """Mean chat-templated length of the ``n`` prompts the throughput runs train on."""
    from potstill.core.models import load_tokenizer

    tok = load_tokenizer(s["tp_tokenizer"])
    lens = []
    for p in short_prompts(tok, n):
        text = tok.apply_chat_template([{"role": "user", "content": p}],
                                       add_generation_prompt=True, tokenize=False)  # fmt: skip
        lens.append(len(tok(text, add_special_tokens=False)["input_ids"]))
    return round(statistics.mean(lens))


def bound(s: dict[str, Any], tokens_per_step: float) -> dict[str, Any]:
    """The lower bound on a step's seconds, its parts, and the machine rates behind them."""
    batch = s["tp_batch"]
    completion = max(1, round(tokens_per_step / batch))
    prompt = mean_prompt_tokens(s, batch * (s["tp_steps"] + 1))
    params, head = student_sizes(s)
    bandwidth, flops = copy_bandwidth(), gemm_flops()
    teacher_s = teacher_seconds(s, prompt, completion)
    sample_s = completion * params * 4 / bandwidth
    body = params - head  # the body runs on every position, the head on completion rows only
    train_s = 6 * (body * batch * (prompt + completion) + head * tokens_per_step) / flops
    return {"teacher_s": teacher_s, "sample_s": sample_s, "train_s": train_s,
            "step_s": teacher_s + sample_s + train_s, "tokens_per_step": tokens_per_step,
            "prompt_tokens_mean": prompt, "completion_tokens_mean": completion,
            "student_params": params, "student_head_params": head,
            "copy_bandwidth_gb_s": bandwidth / 1e9, "gemm_gflop_s": flops / 1e9}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "onpolicy_bound.json")
    args = ap.parse_args(argv)
    s = settings_for(quick=False)
    started = time.time()
    torch.set_num_threads(s["tp_threads"])
    with tempfile.TemporaryDirectory(prefix="potstill-onpolicy-bound-") as tmp:
        run = throughput(s, Path(tmp), log, "real")
    ours, trl = run["potstill"], run["trl"]
    steps = s["tp_steps"] - 1  # both leave the first step out
    b = bound(s, ours["tokens"] / steps)
    bound_tps = b["tokens_per_step"] / b["step_s"]
    res: dict[str, Any] = {
        "throughput": run,
        "bound": b,
        "speedup_vs_trl_lmbda1": run["speedup_vs_trl"],
        "bound_tok_per_s": bound_tps,
        "max_speedup_vs_trl": bound_tps / trl["tok_per_s"],
        "teacher_only_speedup_vs_trl": b["tokens_per_step"] / b["teacher_s"] / trl["tok_per_s"],
        "potstill_fraction_of_bound": ours["tok_per_s"] / bound_tps,
        "potstill_step_s": ours["seconds"] / steps,
        "trl_step_s": trl["seconds"] / steps,
        "settings": {k: v for k, v in s.items() if k.startswith("tp_") or k == "beta"},
        "notes": [
            "bound = the teacher's forward measured alone (unpadded, head on completion rows) "
            "+ sampling at the copy bandwidth (student weights read once per new token) "
            "+ 6 * params * tokens FLOPs at the GEMM rate; attention and AdamW are left out, "
            "so the true bound is lower than this",
            "tokens = completion tokens scored; TRL's count is its logged mean completion length",
        ],
    }
    res["provenance"] = provenance(started)
    write_result(args.out, res)
    log(f"potstill {ours['tok_per_s']:.1f} tok/s, TRL {trl['tok_per_s']:.1f}: "
        f"{run['speedup_vs_trl']:.2f}x; bound {bound_tps:.1f} tok/s = "
        f"{res['max_speedup_vs_trl']:.2f}x TRL (teacher alone: "
        f"{res['teacher_only_speedup_vs_trl']:.2f}x); potstill at "
        f"{res['potstill_fraction_of_bound']:.0%} of the bound")  # fmt: skip
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
