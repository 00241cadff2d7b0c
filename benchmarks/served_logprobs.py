"""Do served logprobs carry the watermark to a thief who distils them? Raw vs served, end to end.

A thief that trains on an API's top-k logprobs rather than on its text (top-k KD) learns
whatever distribution those logprobs describe. This runs the whole path twice, identically but
for ``ServeSettings.logprobs_source``:

1. ``potstill serve`` (in-process, over loopback) serves the radioactivity benchmark's tiny
   teacher (``tiny:0``, 16-symbol alphabet, sampled at an effective temperature 5: its head
   divided by 2.5, served at the API's maximum of 2) with a KGW watermark;
2. ``potstill harvest`` collects N answers with their top-5 logprobs into a SQLite store;
3. a student is distilled from the store by pure top-k KD (``loss.ce_weight=0``: the sampled
   text is only the context, the targets are the logprobs), from the same init and seed;
4. the student is audited for radioactivity with the owner's key: open mode on the harvested
   (watermarked) answers and on held-out watermarked answers it never saw, with the argmax
   test and the soft test (the student's green probability mass, weighting "sum").

With ``raw`` the targets are the undefended teacher's, so the student should look clean; with
``served`` they are the watermarked distribution. Writes ``results/served_logprobs.json``.

``--teacher real`` runs the same path on a real vocabulary, in the setting of
``radioactivity_real.py``: SmolLM2-135M-Instruct served with KGW (gamma 0.25, delta 3, context
width 1) at temperature 1, and a SmolLM2 student (its top 8 of 30 layers) distilled from the
harvested top-5 logprobs alone for 3 epochs. Writes ``results/served_logprobs_real.json``.

    python benchmarks/served_logprobs.py [--n 200] [--steps 600]
    python benchmarks/served_logprobs.py --teacher real [--sources served]   # n 120, ~10 min
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import radioactivity as radio
from _provenance import provenance
from potstill.core.io import atomic_write_json

OUT = Path(__file__).resolve().parent / "results" / "served_logprobs.json"
OUT_REAL = OUT.with_name("served_logprobs_real.json")
SMOLLM2 = "smollm2-135m-instruct"


def real_settings() -> dict[str, Any]:
    """The real-vocabulary setting (radioactivity_real.py's watermark, student and budget)."""
    return {"gamma": 0.25, "delta": 3.0, "context_width": 1, "radio_teacher": SMOLLM2,
            "temperature": 1.0, "radio_answer_tokens": 80, "train_top_layers": 8, "epochs": 3,
            "student_batch": 4, "student_lr": 2e-4, "seq_len": 200, "threads": 2}  # fmt: skip


def harvest_from_server(source: str, prompts: list[str], store: Path, s: dict[str, Any]) -> dict:
    """Serve the watermarked teacher with ``logprobs_source=source`` and harvest ``prompts``."""
    from potstill.core.models import load_model
    from potstill.core.watermark import KGWProcessor
    from potstill.harvest.client import GenParams, harvest
    from potstill.serve.app import ServeSettings, create_app
    from potstill.serve.background import serve_in_background
    from potstill.serve.engine import Engine
    from potstill.serve.watermarking import ServedKGW

    model, tok = load_model(s["radio_teacher"])
    if s["radio_teacher"] == SMOLLM2:  # the real vocabulary: the model as it is, temperature 1
        kgw = KGWProcessor(radio.KEY, gamma=s["gamma"], delta=s["delta"],
                           context_width=s["context_width"])  # fmt: skip
        chain: list[Any] = [ServedKGW(kgw)]
        temperature = s["temperature"]
    else:
        chain, temperature = _tiny_chain(model, s), 2.0
    settings = ServeSettings(processors=lambda rec: chain, logprobs_source=source)  # type: ignore[arg-type]
    engine = Engine(model, tok, model_name="teacher", max_batch=16)
    params = GenParams(mode="chat", max_tokens=s["radio_answer_tokens"],
                       temperature=temperature, top_logprobs=5, seed=3)  # fmt: skip
    msgs = [[{"role": "user", "content": p}] for p in prompts]
    with serve_in_background(create_app(engine, settings)) as url:
        stats = harvest(msgs, store, endpoint=url + "/v1", model="teacher", params=params,
                        concurrency=16)  # fmt: skip
    return {"done": stats.done, "failed": stats.failed, "seconds": stats.elapsed_s}


def _tiny_chain(model: Any, s: dict[str, Any]) -> list[Any]:
    """The tiny teacher's processors (and its flattened head, changed in place)."""
    from potstill.core.watermark import KGWProcessor
    from potstill.serve.watermarking import ServedKGW

    # The radioactivity benchmark samples this teacher at temperature 5; the API caps
    # temperature at 2, so the model itself is made flatter (lm_head / 2.5, untied from the
    # embeddings) and served at temperature 2: the same sampled distribution before the
    # watermark, z / 5. Raw logprobs are this flatter model's log-softmax.
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(
            head.weight.detach().clone() / (s["radio_temperature"] / 2.0)
        )
    kgw = KGWProcessor(
        radio.KEY, gamma=s["gamma"], delta=s["delta"], context_width=s["context_width"]
    )
    allow = radio.AllowOnly(radio.ALPHABET)  # ignores its first argument: batch-ready as is
    return [allow, ServedKGW(kgw)]


def distill(store: Path, work: Path, s: dict[str, Any], steps: int) -> Any:
    from transformers import AutoModelForCausalLM

    from potstill.core.models import resolve_model_dir
    from potstill.distill.config import DistillConfig
    from potstill.distill.train.recipe import run_distill

    if s["radio_teacher"] == SMOLLM2:  # fine-tune the model itself, as radioactivity_real.py
        student = {"init": "checkpoint", "checkpoint": str(resolve_model_dir(SMOLLM2)),
                   "train_top_layers": s["train_top_layers"]}  # fmt: skip
    else:
        student = {"init": "scratch", "layers": s["student_layers"], "width": s["student_width"],
                   "seed": 0, "tokenizer": s["radio_teacher"]}  # fmt: skip
    cfg = DistillConfig.model_validate(
        {
            "out_dir": str(work),
            "teacher": {"spec": "none"},
            "student": student,
            "loss": {"ce_weight": 0.0},
            "optim": {"lr": s["student_lr"], "warmup_steps": 10, "weight_decay": 0.0},
            "data": {"train": f"harvest:{store}", "eval": None, "seq_len": s.get("seq_len", 320)},
            "train": {"steps": steps, "micro_batch_size": s["student_batch"], "threads": s["threads"],
                      "save_every": 0, "eval_every": 0, "log_every": 10, "seed": 0},
        }
    )  # fmt: skip
    out = run_distill(cfg, show_progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("split") == "train"][-1]
    return AutoModelForCausalLM.from_pretrained(out / "student").eval(), last


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    started = time.time()
    real = args.teacher == "real"
    s = real_settings() if real else radio.settings_for(False)
    args.n = args.n or (120 if real else 200)
    args.steps = args.steps or (s["epochs"] * args.n // s["student_batch"] if real else 600)
    args.out = args.out or str(OUT_REAL if real else OUT)
    sources = [x for x in args.sources.split(",") if x]
    if not sources or set(sources) - {"raw", "served"}:
        raise SystemExit(f"--sources takes raw and/or served, got {args.sources!r}")
    torch.set_num_threads(s["threads"])
    from potstill.core import store as st
    from potstill.core.models import load_tokenizer
    from potstill.core.watermark import WatermarkParams
    from potstill.detect.radioactivity import windows_of

    params = WatermarkParams(
        "kgw", gamma=s["gamma"], delta=s["delta"], context_width=s["context_width"]
    )
    tok = load_tokenizer(s["radio_teacher"])
    if real:
        from potstill.core.prompts import default_prompts

        prompts = default_prompts(args.n + args.heldout, seed=11)
    else:
        prompts = radio.radio_prompts(args.n + args.heldout)
    train_p, held_p = prompts[: args.n], prompts[args.n :]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    excl = windows_of(ids, s["context_width"])
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="potstill-served-lp-") as tmp:
        work = Path(tmp)
        held_store = work / "heldout.sqlite"
        harvest_from_server("served", held_p, held_store, s)
        conn = st.connect(held_store, readonly=True)
        heldout = [r["completion"] for r in st.iter_records(conn)]
        conn.close()
        for source in sources:
            t0 = time.perf_counter()
            store = work / f"{source}.sqlite"
            h = harvest_from_server(source, train_p, store, s)
            conn = st.connect(store, readonly=True)
            recs = list(st.iter_records(conn))
            conn.close()
            texts = [r["completion"] for r in recs]
            green_mass = _green_top_mass(recs, tok, params, real)
            model, last = distill(store, work / f"run_{source}", s, args.steps)
            pools = {"open": texts, "open_heldout": heldout}
            audit = _audit(model, tok, pools, params, excl, batch_size=8 if real else 16)
            runs[source] = {"harvest": h, "top5_green_mass_share": green_mass,
                            "final_train_kd": last.get("kd"), "audit": audit,
                            "seconds": time.perf_counter() - t0}  # fmt: skip
            print(f"{source:6s} top-5 green share {green_mass:.3f}  open p {audit['open']['p']:.3g}  "
                  f"held-out p {audit['open_heldout']['p']:.3g}  soft open p "
                  f"{audit['open_soft']['p']:.3g}  soft held-out p "
                  f"{audit['open_heldout_soft']['p']:.3g}")  # fmt: skip
    result = {
        "benchmark": "served_logprobs",
        "settings": _settings(args, s, params, real, sources),
        **runs,
        "provenance": provenance(started),
    }
    for src in sources:
        a = runs[src]["audit"]
        result |= {f"p_open_{src}": a["open"]["p"], f"p_heldout_{src}": a["open_heldout"]["p"],
                   f"p_open_soft_{src}": a["open_soft"]["p"],
                   f"p_heldout_soft_{src}": a["open_heldout_soft"]["p"]}  # fmt: skip
    atomic_write_json(args.out, result)
    print(f"-> {args.out}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", choices=["tiny", "real"], default="tiny",
                    help="tiny: the 16-symbol teacher; real: SmolLM2 (see the module doc)")  # fmt: skip
    ap.add_argument("--n", type=int, help="harvested answers per run (default 200; real: 120)")
    ap.add_argument("--heldout", type=int, default=24, help="held-out watermarked answers")
    ap.add_argument(
        "--steps", type=int, help="student optimizer steps (default 600; real: 3 epochs)"
    )
    ap.add_argument(
        "--sources", default="raw,served", help="which logprobs to distil, comma-separated"
    )
    ap.add_argument("--out", help="results file (default results/served_logprobs[_real].json)")
    return ap.parse_args(argv)


def _audit(
    model: Any, tok: Any, pools: dict[str, list[str]], params: Any, excl: set, *, batch_size: int
) -> dict[str, Any]:
    """The argmax and soft open-mode tests of ``model`` on each pool of answers."""
    from potstill.detect import collect_open_tuples, collect_soft, score_corpus, score_soft

    k, audit = params.context_width, {}
    for name, pool in pools.items():
        tuples, n_tok, n_cp = collect_open_tuples(model, tok, pool, k, batch_size=batch_size)
        r = score_corpus(tuples, radio.KEY, params, mode="open", n_texts=len(pool),
                         n_tokens=n_tok, prompt_windows=excl, n_excluded_copies=n_cp)  # fmt: skip
        audit[name] = {"p": r.p_value, "n_scored": r.n_scored, "green_rate": r.statistic}
        soft = score_soft(collect_soft(model, tok, pool, k, prompt_windows=excl),
                          radio.KEY, params, weighting="sum")  # fmt: skip
        audit[f"{name}_soft"] = {"p": soft.p_value, "log10_p": soft.log10_p,
                                 "p_bound": soft.p_bound, "n_scored": soft.n_scored,
                                 "green_share": soft.statistic}  # fmt: skip
    return audit


def _settings(
    args: argparse.Namespace, s: dict[str, Any], params: Any, real: bool, sources: list[str]
) -> dict[str, Any]:
    return {
        "n_answers": args.n,
        "heldout_answers": args.heldout,
        "student_steps": args.steps,
        "top_logprobs": 5,
        "loss": "pure top-k KD (ce_weight 0)",
        "teacher": s["radio_teacher"],
        "temperature": s.get("temperature", s.get("radio_temperature")),
        "watermark": params.to_dict(),
        "student": (
            f"{SMOLLM2}, top {s['train_top_layers']} of 30 layers"
            if real
            else [s["student_layers"], s["student_width"]]
        ),
        "sources": sources,
    }


def _green_top_mass(recs: list[dict], tok: Any, params: Any, real: bool) -> float:
    """Share of the harvested top-5 probability mass on green tokens (under the owner's key).

    A reported token maps to its id by its bytes: the tiny teacher's ids are its bytes; a real
    vocabulary goes through the harvester's own ``TokenMapper`` (tokens it cannot map: skipped).
    """
    import math

    from potstill.core.watermark.kgw import KGWProcessor
    from potstill.distill.data.chat import TokenMapper

    def tiny_id(token: str, raw: list[int] | None) -> int | None:
        return raw[0] if raw else tok.convert_tokens_to_ids(token)

    to_id = TokenMapper(tok) if real else tiny_id

    proc = KGWProcessor(
        radio.KEY, gamma=params.gamma, delta=params.delta, context_width=params.context_width
    )
    k = params.context_width
    green = total = 0.0
    for r in recs:
        ids: list[int] = []  # answer tokens so far (the first k have a template context: skipped)
        for entry in r["logprobs"] or []:
            if len(ids) >= k:
                ctx = tuple(ids[-k:])
                for token, lp, raw in entry["top"]:
                    t = to_id(token, raw)
                    if t is None:
                        continue
                    p = math.exp(lp)
                    total += p
                    green += p * proc.is_green(ctx, int(t))
            t = to_id(entry["token"], entry.get("bytes"))
            if t is None:  # an unmappable sampled token: this answer's contexts end here
                break
            ids.append(t)
    return green / total if total else float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
