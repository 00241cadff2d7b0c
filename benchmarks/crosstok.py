"""Cross-tokenizer distillation on a real pair: Gemma-3-270M (262,144 tokens) into a student with
SmolLM2's tokenizer (49,152 tokens), against a CE-only student with the same budget.

    python benchmarks/crosstok.py            # full CPU run (~17 min on 2 cores)
    python benchmarks/crosstok.py --quick    # smoke run (~6 min)

Three students, identical except the objective: the same 4x256 Llama init (seed 0), the same
Shakespeare blocks in the same order, the same steps, batch, learning rate and schedule:

* ``ce``: cross-entropy on the student's own tokens only (``loss.ce_weight = 1``);
* ``hybrid``: ``alpha CE + (1 - alpha) KD``, KD = exact KL on the tokens both vocabularies
  share plus ULD on the rest, on byte-aligned positions
  (:func:`potstill.distill.losses.crosstok.hybrid_kd`);
* ``uld``: the same with KD = ULD alone on the whole distributions
  (:func:`~potstill.distill.losses.crosstok.uld_kd`; ULD papers align positions by index, here
  both KD variants use the same byte alignment, so the comparison isolates the loss).

Held-out metric: nats per *byte* of the held-out plays (tokenizations differ, so per-token
numbers do not compare): each model's summed NLL over the tokens it predicts given at least
one token of context, divided by those tokens' bytes. ``gap_recovered_X = (ce - X) /
(ce - teacher)``. Writes ``benchmarks/results/crosstok.json`` and ``crosstok_curves.png``.
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
from _gemma import gemma_dir
from _provenance import provenance

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
STUDENT_TOKENIZER = "smollm2-135m-instruct"
log = make_log("crosstok")


def settings_for(quick: bool) -> dict[str, Any]:
    s: dict[str, Any] = {"steps": 80, "batch": 8, "seq_len": 128, "layers": 4, "width": 256,
                         "lr": 2e-3, "warmup": 10, "alpha": 0.5, "uld_weight": 1.0, "uld_top": 256,
                         "eval_blocks": 24, "eval_every": 20, "threads": 2}  # fmt: skip
    if quick:
        s.update(steps=12, eval_blocks=6, eval_every=6)
    return s


def student_run(s: dict[str, Any], work: Path, name: str, teacher: str) -> Path:
    from potstill.distill.config import DistillConfig
    from potstill.distill.train.recipe import run_distill

    loss: dict[str, Any] = {"ce_weight": 1.0}
    if name != "ce":
        loss = {"ce_weight": s["alpha"],
                "cross_tokenizer": {"kind": name, "uld_weight": s["uld_weight"], "uld_top": s["uld_top"]}}  # fmt: skip
    cfg = DistillConfig.model_validate({
        "out_dir": str(work / name),
        "teacher": {"spec": teacher if name != "ce" else "none", "dtype": "float32"},
        "student": {"layers": s["layers"], "width": s["width"], "seed": 0,
                    "tokenizer": STUDENT_TOKENIZER},
        "loss": loss,
        "optim": {"lr": s["lr"], "warmup_steps": s["warmup"], "min_lr_ratio": 0.1, "weight_decay": 0.1},
        "data": {"train": "shakespeare:train", "eval": "shakespeare:heldout", "seq_len": s["seq_len"],
                 "eval_blocks": min(8, s["eval_blocks"])},
        "train": {"steps": s["steps"], "micro_batch_size": s["batch"], "eval_every": s["eval_every"],
                  "save_every": 0, "log_every": 1, "seed": 0, "threads": s["threads"]},
    })  # fmt: skip
    t0 = time.perf_counter()
    out = run_distill(cfg, show_progress=False)
    log(f"{name}: {s['steps']} steps in {time.perf_counter() - t0:.0f}s")
    return out


def heldout_blocks(s: dict[str, Any]) -> tuple[Any, torch.Tensor]:
    from potstill.core.models import load_tokenizer
    from potstill.distill.data import load_texts, pack_sequences, tokenize_texts

    tok = load_tokenizer(STUDENT_TOKENIZER)
    blocks = pack_sequences(tokenize_texts(load_texts("shakespeare:heldout"), tok), s["seq_len"])
    return tok, blocks[: s["eval_blocks"]]


@torch.no_grad()
def student_nats_per_byte(model: Any, tok: Any, blocks: torch.Tensor) -> float:
    """Summed NLL of tokens 1..T-1 of each block over their bytes."""
    from potstill.core.tokenizers import vocab_bytes

    table = vocab_bytes(tok)
    nats, nbytes = 0.0, 0
    for b in blocks:
        logits = model(input_ids=b[None]).logits[0, :-1, : len(tok)].float()
        nll = torch.nn.functional.cross_entropy(logits, b[1:], reduction="none")
        text = torch.tensor([t < len(table) and table[t] is not None for t in b[1:].tolist()])
        nats += float(nll[text].sum())
        nbytes += sum(len(table[t] or b"") for t in b[1:].tolist())
    return nats / nbytes


@torch.no_grad()
def teacher_nats_per_byte(teacher_dir: Path, s_tok: Any, blocks: torch.Tensor) -> float:
    """The teacher on the same bytes: each block's text in Gemma's tokens after its BOS; summed
    NLL of tokens 2.. (one token of context, as the student) over their bytes."""
    from potstill.core.models import load_model
    from potstill.core.tokenizers import vocab_bytes
    from potstill.distill.data.align import retokenize

    model, t_tok = load_model(str(teacher_dir))
    s_table, t_table = vocab_bytes(s_tok), vocab_bytes(t_tok)
    nats, nbytes = 0.0, 0
    for b in blocks:
        ids = retokenize(b.tolist(), s_table, t_tok, t_table, max_len=4 * len(b)).teacher_ids
        x = torch.tensor(ids)
        logits = model(input_ids=x[None]).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, x[1:], reduction="none")
        keep = [i for i in range(1, len(ids) - 1) if t_table[ids[i + 1]] is not None]
        nats += float(nll[keep].sum())
        nbytes += sum(len(t_table[ids[i + 1]] or b"") for i in keep)
    return nats / nbytes


def plot(runs: dict[str, Path], teacher: float, res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, run in runs.items():
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        ev = [r for r in rows if r["split"] == "eval"]
        a.plot([r["step"] for r in ev], [r["eval_nll"] for r in ev], marker="o", label=name)
        tr = [r for r in rows if r["split"] == "train" and r.get("kd") is not None]
        if tr:
            b.plot([r["step"] for r in tr], [r["kd"] for r in tr], label=f"{name} KD term")
    a.set_xlabel("step")
    a.set_ylabel("held-out NLL (nats/student token, 8 blocks)")
    a.set_title("held-out NLL, same budget")
    a.legend(fontsize=8)
    b.set_xlabel("step")
    b.set_ylabel("KD term (nats/token, its own scale)")
    b.set_title("KD terms (not comparable across losses)")
    b.legend(fontsize=8)
    fig.suptitle(f"Gemma-3-270M -> SmolLM2-tokenizer student; teacher {teacher:.3f} nats/byte; "
                 f"recovered: hybrid {res['gap_recovered_hybrid']:.1%}, ULD {res['gap_recovered_uld']:.1%}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(s: dict[str, Any], work: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from potstill.core.models import load_tokenizer
    from potstill.distill.teachers.crosstok import shared_vocab

    teacher = gemma_dir()
    t_tok = load_tokenizer(str(teacher))
    s_tok, blocks = heldout_blocks(s)
    t_shared, _ = shared_vocab(t_tok, s_tok)
    runs = {name: student_run(s, work, name, str(teacher)) for name in ("ce", "hybrid", "uld")}
    nll = {name: student_nats_per_byte(AutoModelForCausalLM.from_pretrained(r / "student").eval(),
                                       s_tok, blocks) for name, r in runs.items()}  # fmt: skip
    nll["teacher"] = teacher_nats_per_byte(teacher, s_tok, blocks)
    gap = nll["ce"] - nll["teacher"]
    res = {"heldout_nats_per_byte": nll,
           "gap_recovered_hybrid": (nll["ce"] - nll["hybrid"]) / gap,
           "gap_recovered_uld": (nll["ce"] - nll["uld"]) / gap,
           "shared_tokens": len(t_shared), "teacher_vocab": len(t_tok), "student_vocab": len(s_tok)}  # fmt: skip
    res["hybrid_at_least_uld"] = res["gap_recovered_hybrid"] >= res["gap_recovered_uld"]
    res["train_tok_per_s"] = {}
    for name, r in runs.items():
        rows = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
        res["train_tok_per_s"][name] = [x for x in rows if x["split"] == "train"][-1]["tok_per_s"]
    plot(
        runs,
        nll["teacher"],
        res,
        RESULTS / "crosstok_curves.png" if s.get("write_png") else work / "c.png",
    )
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run")
    ap.add_argument("--out", type=Path, default=RESULTS / "crosstok.json")
    args = ap.parse_args(argv)
    s = settings_for(args.quick)
    s["write_png"] = args.out == RESULTS / "crosstok.json"
    torch.set_num_threads(s["threads"])
    started, t0 = time.time(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="potstill-crosstok-") as tmp:
        res = run(s, Path(tmp))
    res["settings"] = {**s, "quick": args.quick, "student_tokenizer": STUDENT_TOKENIZER,
                       "teacher": "gemma-3-270m (Q4_K_M GGUF, dequantised to fp32)"}  # fmt: skip
    res["notes"] = [
        "the three students share init, data order, steps, batch and LR; only the objective differs",
        "nats/byte: summed NLL of the tokens each model predicts with >= 1 token of context, over "
        "their bytes, on the same held-out Shakespeare bytes",
        "both KD variants use potstill's byte alignment; ULD's paper pairs positions by index",
    ]
    res["total_seconds"] = time.perf_counter() - t0
    res["provenance"] = provenance(started)
    write_result(args.out, res)
    n = res["heldout_nats_per_byte"]
    log(f"nats/byte: teacher {n['teacher']:.4f}, ce {n['ce']:.4f}, hybrid {n['hybrid']:.4f}, "
        f"uld {n['uld']:.4f}; gap recovered hybrid {res['gap_recovered_hybrid']:.1%}, "
        f"uld {res['gap_recovered_uld']:.1%}")  # fmt: skip
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
