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

    python benchmarks/served_logprobs.py [--n 200] [--steps 600]
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
from potstill.io import atomic_write_json

OUT = Path(__file__).resolve().parent / "results" / "served_logprobs.json"


def harvest_from_server(source: str, prompts: list[str], store: Path, s: dict[str, Any]) -> dict:
    """Serve the watermarked teacher with ``logprobs_source=source`` and harvest ``prompts``."""
    from potstill.harvest.client import GenParams, harvest
    from potstill.serve.app import ServeSettings, create_app
    from potstill.serve.background import serve_in_background
    from potstill.serve.engine import Engine
    from potstill.serve.watermarking import ServedKGW
    from potstill.teachers import load_model
    from potstill.watermark import KGWProcessor

    model, tok = load_model(s["radio_teacher"])
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
    wm = ServedKGW(kgw)
    allow = radio.AllowOnly(radio.ALPHABET)  # ignores its first argument: batch-ready as is
    chain = [allow, wm]
    settings = ServeSettings(processors=lambda rec: chain, logprobs_source=source)  # type: ignore[arg-type]
    engine = Engine(model, tok, model_name="teacher", max_batch=16)
    params = GenParams(mode="chat", max_tokens=s["radio_answer_tokens"],
                       temperature=2.0, top_logprobs=5, seed=3)  # fmt: skip
    msgs = [[{"role": "user", "content": p}] for p in prompts]
    with serve_in_background(create_app(engine, settings)) as url:
        stats = harvest(msgs, store, endpoint=url + "/v1", model="teacher", params=params,
                        concurrency=16)  # fmt: skip
    return {"done": stats.done, "failed": stats.failed, "seconds": stats.elapsed_s}


def distill(store: Path, work: Path, s: dict[str, Any], steps: int) -> Any:
    from transformers import AutoModelForCausalLM

    from potstill.config import DistillConfig
    from potstill.train.recipe import run_distill

    cfg = DistillConfig.model_validate(
        {
            "out_dir": str(work),
            "teacher": {"spec": "none"},
            "student": {"init": "scratch", "layers": s["student_layers"], "width": s["student_width"],
                        "seed": 0, "tokenizer": s["radio_teacher"]},
            "loss": {"ce_weight": 0.0},
            "optim": {"lr": s["student_lr"], "warmup_steps": 10, "weight_decay": 0.0},
            "data": {"train": f"harvest:{store}", "eval": None, "seq_len": 320},
            "train": {"steps": steps, "micro_batch_size": s["student_batch"], "threads": s["threads"],
                      "save_every": 0, "eval_every": 0, "log_every": 10, "seed": 0},
        }
    )  # fmt: skip
    out = run_distill(cfg, show_progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("split") == "train"][-1]
    return AutoModelForCausalLM.from_pretrained(out / "student").eval(), last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="harvested answers per run")
    ap.add_argument("--heldout", type=int, default=24, help="held-out watermarked answers")
    ap.add_argument("--steps", type=int, default=600, help="student optimizer steps")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    started = time.time()
    s = radio.settings_for(False)
    torch.set_num_threads(s["threads"])
    from potstill.forensics import collect_open_tuples, collect_soft, score_corpus, score_soft
    from potstill.forensics.radioactivity import windows_of
    from potstill.harvest import store as st
    from potstill.teachers import load_tokenizer
    from potstill.watermark import WatermarkParams

    params = WatermarkParams(
        "kgw", gamma=s["gamma"], delta=s["delta"], context_width=s["context_width"]
    )
    tok = load_tokenizer(s["radio_teacher"])
    prompts = radio.radio_prompts(args.n + args.heldout)
    train_p, held_p = prompts[: args.n], prompts[args.n :]
    k = s["context_width"]
    excl = windows_of([tok(p, add_special_tokens=False)["input_ids"] for p in prompts], k)
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="potstill-served-lp-") as tmp:
        work = Path(tmp)
        held_store = work / "heldout.sqlite"
        harvest_from_server("served", held_p, held_store, s)
        conn = st.connect(held_store, readonly=True)
        heldout = [r["completion"] for r in st.iter_records(conn)]
        conn.close()
        for source in ("raw", "served"):
            t0 = time.perf_counter()
            store = work / f"{source}.sqlite"
            h = harvest_from_server(source, train_p, store, s)
            conn = st.connect(store, readonly=True)
            recs = list(st.iter_records(conn))
            conn.close()
            texts = [r["completion"] for r in recs]
            green_mass = _green_top_mass(recs, tok, params)
            model, last = distill(store, work / f"run_{source}", s, args.steps)
            audit = {}
            for name, pool in (("open", texts), ("open_heldout", heldout)):
                tuples, n_tok, n_cp = collect_open_tuples(model, tok, pool, k, batch_size=16)
                r = score_corpus(tuples, radio.KEY, params, mode="open", n_texts=len(pool),
                                 n_tokens=n_tok, prompt_windows=excl, n_excluded_copies=n_cp)  # fmt: skip
                audit[name] = {"p": r.p_value, "n_scored": r.n_scored, "green_rate": r.statistic}
                soft = score_soft(collect_soft(model, tok, pool, k, prompt_windows=excl),
                                  radio.KEY, params, weighting="sum")  # fmt: skip
                audit[f"{name}_soft"] = {"p": soft.p_value, "log10_p": soft.log10_p,
                                         "p_bound": soft.p_bound, "n_scored": soft.n_scored,
                                         "green_share": soft.statistic}  # fmt: skip
            runs[source] = {"harvest": h, "top5_green_mass_share": green_mass,
                            "final_train_kd": last.get("kd"), "audit": audit,
                            "seconds": time.perf_counter() - t0}  # fmt: skip
            print(f"{source:6s} top-5 green share {green_mass:.3f}  open p {audit['open']['p']:.3g}  "
                  f"held-out p {audit['open_heldout']['p']:.3g}  soft open p "
                  f"{audit['open_soft']['p']:.3g}  soft held-out p "
                  f"{audit['open_heldout_soft']['p']:.3g}")  # fmt: skip
    result = {
        "benchmark": "served_logprobs",
        "settings": {
            "n_answers": args.n,
            "heldout_answers": args.heldout,
            "student_steps": args.steps,
            "top_logprobs": 5,
            "loss": "pure top-k KD (ce_weight 0)",
            "teacher": s["radio_teacher"],
            "temperature": s["radio_temperature"],
            "watermark": params.to_dict(),
            "student": [s["student_layers"], s["student_width"]],
        },
        "raw": runs["raw"],
        "served": runs["served"],
        "p_open_raw": runs["raw"]["audit"]["open"]["p"],
        "p_open_served": runs["served"]["audit"]["open"]["p"],
        "p_heldout_raw": runs["raw"]["audit"]["open_heldout"]["p"],
        "p_heldout_served": runs["served"]["audit"]["open_heldout"]["p"],
        "p_open_soft_raw": runs["raw"]["audit"]["open_soft"]["p"],
        "p_open_soft_served": runs["served"]["audit"]["open_soft"]["p"],
        "p_heldout_soft_raw": runs["raw"]["audit"]["open_heldout_soft"]["p"],
        "p_heldout_soft_served": runs["served"]["audit"]["open_heldout_soft"]["p"],
        "provenance": provenance(started),
    }
    atomic_write_json(args.out, result)
    print(f"-> {args.out}")
    return 0


def _green_top_mass(recs: list[dict], tok: Any, params: Any) -> float:
    """Share of the harvested top-5 probability mass on green tokens (under the owner's key)."""
    import math

    from potstill.watermark.kgw import KGWProcessor

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
                    t = raw[0] if raw else tok.convert_tokens_to_ids(token)
                    p = math.exp(lp)
                    total += p
                    green += p * proc.is_green(ctx, int(t))
            tb = entry.get("bytes")
            ids.append(tb[0] if tb else tok.convert_tokens_to_ids(entry["token"]))
    return green / total if total else float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
