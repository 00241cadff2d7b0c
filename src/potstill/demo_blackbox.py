"""The demo's black-box half: serve a watermarked teacher, harvest it, distill, audit.

Everything crosses real loopback HTTP: ``potstill serve``'s FastAPI app runs under
uvicorn on 127.0.0.1 with a KGW watermark on every sampled completion, the
asyncio harvester collects answers (with top-k logprobs) into a SQLite store, and a
"thief" student is distilled from that store (SFT on the answers + sparse top-k KD).
A control gets the same start, the same prompts and the same training budget, with
answers that are not the teacher's (passages of the demo's training text). The
held-out NLL of teacher answers before and after training shows the thief really
learned from the harvest.

Both are then audited twice: soft open-mode radioactivity (did it learn our
watermark's green lists?) and the provenance test, which needs no watermark (is it
closer to the teacher than its own starting point and an independent model of the
same size, the CE baseline?). The watermark uses context width 1 here: its green
lists are per previous token, which a student this small learns from 6k harvested
tokens; with width 2 the same student shows nothing (see the README).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from potstill.distill.config import DistillConfig

BLACKBOX_DEFAULTS: dict[str, Any] = {
    "train_prompts": 96,  # 96 x 64 tokens keeps the whole demo under 10 min with margin
    "heldout_prompts": 24,
    "max_tokens": 64,
    "serve_dtype": "auto",
    "temperature": 0.8,
    "top_logprobs": 5,
    # one engine batch holds half the harvest (serve + harvest took 59 s against 91 s at 16 on
    # 2 cores; 64 and 120 rows were slower again, as the engine's per-row work grows)
    "concurrency": 48,
    "max_batch": 48,
    "steps": 60,
    "lr": 3e-3,
    "micro_batch_size": 8,
    "seq_len": 256,
    "gamma": 0.25,
    "delta": 3.0,
    "context_width": 1,
    "alpha": 0.01,
    "control_text": "shakespeare:train",  # the control's non-teacher answers
    "provenance_prompts": 64,  # 96 took ~20 s more on 2 cores
    # "asked": prompts the suspect's key sent (the owner's server logs them); "fresh": new ones
    "provenance_from": "fresh",
    "provenance_tokens": 32,
}


@dataclass
class BlackboxResult:
    nll_before: float
    nll_after: float
    n_heldout_tokens: int
    p_student: float  # soft radioactivity
    p_control: float
    verdict_student: str
    verdict_control: str
    harvest: dict[str, Any]
    timings: dict[str, float]
    audit: dict[str, Any]
    provenance: dict[str, Any]


def chat_nll(model: Any, data: Any, *, batch_size: int = 8) -> tuple[float, int]:
    """Mean NLL (nats) of the assistant tokens of chat blocks (labels != -100)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, data.blocks.shape[0], batch_size):
            ids, mask = data.blocks[i : i + batch_size], data.mask[i : i + batch_size]
            labels = data.labels[i : i + batch_size]
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(loss)
            count += int((labels != -100).sum())
    return total / max(1, count), count


def _harvest(url: str, model_name: str, prompts: list[str], store: Path, s: dict[str, Any]) -> Any:
    from potstill.harvest.client import GenParams, harvest

    params = GenParams(
        max_tokens=s["max_tokens"],
        temperature=s["temperature"],
        top_logprobs=s["top_logprobs"],
        seed=0,
    )
    messages = [[{"role": "user", "content": p}] for p in prompts]
    return harvest(
        messages,
        store,
        endpoint=f"{url}/v1",
        model=model_name,
        params=params,
        concurrency=s["concurrency"],
        progress=True,
    )


def _serve_and_harvest(
    out: Path,
    teacher: str,
    key: Any,
    wm: Any,
    prompts: tuple[list[str], list[str]],
    s: dict[str, Any],
    console: Any,
) -> tuple[Any, dict[str, Any]]:
    """Serve the watermarked teacher on loopback and harvest train and held-out answers."""
    from potstill.serve.app import ServeSettings, create_app
    from potstill.serve.background import serve_in_background
    from potstill.serve.engine import Engine
    from potstill.serve.watermarking import watermark_processors, write_serve_metadata

    engine = Engine.from_spec(
        teacher, max_batch=s["max_batch"], device="cpu", dtype=s["serve_dtype"]
    )
    app = create_app(
        engine,
        ServeSettings(processors=watermark_processors(key, wm), audit_log=out / "audit.jsonl"),
    )
    write_serve_metadata(out / "audit.jsonl.meta.json", model=teacher, key=key, params=wm)
    with serve_in_background(app) as url:
        console.print(f"serving {teacher} with a KGW watermark (key id {key.key_id}) at {url}/v1")
        stats = _harvest(url, teacher, prompts[0], out / "harvest.sqlite", s)
        _harvest(url, teacher, prompts[1], out / "heldout.sqlite", s)
        health = engine.health()
    console.print(
        f"harvested {stats.done} new answers ({stats.skipped} already in the store, "
        f"{stats.failed} failed); largest batch the server formed: {health.get('max_batch_seen')}"
    )
    return stats, health


def _distill_from_harvest(out: Path, student_init: Path, tok: Any, s: dict[str, Any]) -> Any:
    """SFT (+ top-k KD where the API's logprobs map onto our tokenizer) from the harvest."""
    from potstill.distill.data.chat import load_chat_data
    from potstill.distill.train.recipe import run_distill

    quiet = logging.getLogger("potstill.distill.data.chat")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # training below reports the same data summary once
    probe = load_chat_data(
        f"harvest:{out / 'harvest.sqlite'}", tok, seq_len=s["seq_len"], with_logprobs=True
    )
    quiet.setLevel(level)
    ce_weight = 0.5 if probe.targets is not None else 1.0
    cfg = _student_config(
        out / "student", student_init, f"harvest:{out / 'harvest.sqlite'}", ce_weight, s
    )
    run_distill(cfg, resume=True)
    return probe


def _student_config(
    out: Path, student_init: Path, train: str, ce_weight: float, s: dict[str, Any]
) -> DistillConfig:
    """The thief's and the control's run: same start, budget and schedule; only the data
    (and, with logprobs in the harvest, the KD term) differ."""
    from potstill.distill.config import DistillConfig

    return DistillConfig.model_validate(
        {
            "out_dir": str(out),
            "teacher": {"spec": "none"},
            "student": {"init": "checkpoint", "checkpoint": str(student_init)},
            "loss": {"kind": "forward_kl", "ce_weight": ce_weight},
            "optim": {"lr": s["lr"], "warmup_steps": 3, "min_lr_ratio": 0.1},
            "data": {"train": train, "eval": None, "seq_len": s["seq_len"]},
            "train": {
                "steps": s["steps"],
                "micro_batch_size": s["micro_batch_size"],
                "save_every": 10,
                "eval_every": 0,
            },
        }
    )


def _control_answers(source: str, n: int, words: int) -> list[str]:
    """``n`` passages of ``words`` words of non-teacher text (the control's answers)."""
    from potstill.core.errors import PotstillError
    from potstill.distill.data.corpus import load_texts

    flat = " ".join(load_texts(source)).split()
    if len(flat) < n * words:
        raise PotstillError(
            f"{source} has {len(flat)} words, fewer than the control needs ({n} x {words}); "
            "give a longer control_text"
        )
    return [" ".join(flat[i * words : (i + 1) * words]) for i in range(n)]


def _train_control(out: Path, student_init: Path, prompts: list[str], s: dict[str, Any]) -> None:
    """The control: same start, prompts, steps and optimiser; answers not from the teacher."""
    import json

    from potstill.core.io import atomic_write_text
    from potstill.distill.train.recipe import run_distill

    data = out / "control_data.jsonl"
    if not data.exists():
        words = max(8, round(0.7 * s["max_tokens"]))  # ~1.4 tokens per English word
        answers = _control_answers(s["control_text"], len(prompts), words)
        rows = [
            json.dumps(
                {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            )
            for p, a in zip(prompts, answers)
        ]
        atomic_write_text(data, "\n".join(rows) + "\n")
    cfg = _student_config(out / "control", student_init, f"messages:{data}", 1.0, s)
    run_distill(cfg, resume=True)


def _audits(
    out: Path,
    models: dict[str, Any],
    tok: Any,
    key: Any,
    wm: Any,
    s: dict[str, Any],
    asked: list[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Soft + argmax radioactivity and provenance of the thief and the control.

    ``asked``: the prompts the thief's key sent (the owner's server has them);
    ``provenance_from: asked`` tests on those, ``fresh`` (the default, as in Nikolic et al.)
    on prompts nobody asked.
    """
    from potstill.core.messages import store_examples
    from potstill.core.prompts import default_prompts
    from potstill.detect.provenance import Candidate, compare, score_models
    from potstill.detect.radioactivity import radioactivity_open
    from potstill.detect.soft import collect_soft, score_soft

    # Every watermarked answer the owner has: the thief's harvest and the held-out answers (the
    # owner does not know which the thief trained on; a width-1 green list is a per-word habit,
    # so it shows on answers the thief never saw). The harvest prompts are ours and
    # unwatermarked, so their windows stay in: excluding them would drop most of the vocabulary.
    texts = [
        ex["messages"][-1]["content"]
        for store in ("harvest.sqlite", "heldout.sqlite")
        for ex in store_examples(out / store)
    ]
    radio: dict[str, Any] = {}
    for who in ("student", "control"):
        corpus = collect_soft(models[who], tok, texts, wm.context_width)  # one pass, two weightings
        soft = score_soft(corpus, key, wm, weighting="sum")
        mean = score_soft(corpus, key, wm, weighting="mean")
        hard = radioactivity_open(models[who], tok, texts, key, wm)
        radio[who] = {"soft": soft.to_dict(), "soft_mean": mean.to_dict(), "argmax": hard.to_dict()}
    n = s["provenance_prompts"]
    prompts = asked[:n] if s["provenance_from"] == "asked" else default_prompts(n, seed=1)
    names = ("student", "control", "start", "baseline")
    stat, scores = score_models(
        Candidate("teacher", models["teacher"], tok),
        [Candidate(k, models[k], tok) for k in names],
        prompts, statistic="agreement", new_tokens=s["provenance_tokens"],
    )  # fmt: skip
    by = dict(zip(names, scores))
    prov = {
        who: compare(by[who], [by["start"], by["baseline"]], teacher="teacher", statistic=stat,
                     alpha=s["alpha"]).to_dict()
        for who in ("student", "control")
    }  # fmt: skip
    return radio, prov


def run_blackbox(
    out: Path,
    *,
    teacher: str,
    student_init: Path,
    baseline: Path,
    settings: dict[str, Any],
    console: Any,
) -> BlackboxResult:
    """Serve -> harvest -> distill thief and control -> evaluate -> audit (module doc)."""
    from potstill.core.models import load_model
    from potstill.core.prompts import default_prompts
    from potstill.core.watermark.keys import generate_key, load_key, write_key
    from potstill.core.watermark.params import WatermarkParams
    from potstill.distill.data.chat import load_chat_data

    s = settings
    timings: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    key_file = out / "watermark.key"
    if not key_file.exists():  # a rerun keeps the key its harvest was marked with
        write_key(key_file, generate_key())
    key = load_key(key_file)
    wm = WatermarkParams(
        "kgw", gamma=s["gamma"], delta=s["delta"], context_width=s["context_width"]
    )
    prompts = default_prompts(s["train_prompts"] + s["heldout_prompts"], seed=0)
    train_prompts, heldout_prompts = prompts[: s["train_prompts"]], prompts[s["train_prompts"] :]

    t0 = time.perf_counter()
    stats, health = _serve_and_harvest(
        out, teacher, key, wm, (train_prompts, heldout_prompts), s, console
    )
    timings["serve_and_harvest_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    before, tok = load_model(str(student_init))
    probe = _distill_from_harvest(out, student_init, tok, s)
    timings["distill_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    console.print("[bold]training the control[/] (same start and budget, non-teacher answers)")
    _train_control(out, student_init, train_prompts, s)
    timings["control_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    models = {
        "student": load_model(str(out / "student" / "student"))[0],
        "control": load_model(str(out / "control" / "student"))[0],
        "start": before,
        "baseline": load_model(str(baseline))[0],
        "teacher": load_model(teacher)[0],
    }
    heldout = load_chat_data(
        f"harvest:{out / 'heldout.sqlite'}", tok, seq_len=s["seq_len"], with_logprobs=False
    )
    nll_before, n_tok = chat_nll(before, heldout)
    nll_after, _ = chat_nll(models["student"], heldout)
    radio, prov = _audits(out, models, tok, key, wm, s, train_prompts)
    timings["eval_and_audit_s"] = round(time.perf_counter() - t0, 1)
    soft_s, soft_c = radio["student"]["soft"], radio["control"]["soft"]
    return BlackboxResult(
        nll_before=nll_before,
        nll_after=nll_after,
        n_heldout_tokens=n_tok,
        p_student=soft_s["p_value"],
        p_control=soft_c["p_value"],
        verdict_student=_word(soft_s["p_value"], s["alpha"]),
        verdict_control=_word(soft_c["p_value"], s["alpha"]),
        harvest={
            "topk_aligned": probe.stats.get("aligned"),
            "objective": "SFT + top-k KD" if probe.targets is not None else "SFT",
            "train_records": len(train_prompts),
            "max_batch_seen": health.get("max_batch_seen"),
            "completion_tokens_this_run": stats.completion_tokens,
            "failed": stats.failed,
        },
        timings=timings,
        audit=radio,
        provenance=prov,
    )


def _word(p: float, alpha: float) -> str:
    return (
        f"flagged: p={p:.3g} < α={alpha:g}"
        if p < alpha
        else f"not flagged: p={p:.3g} ≥ α={alpha:g}"
    )
