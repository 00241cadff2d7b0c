"""What an audit costs per scored token: the soft radioactivity test and the provenance test,
each against the compute bound of the forward passes it needs, in one run.

* soft open-mode radioactivity (``detect.soft.radioactivity_soft``, top-64, weighting
  "mean"): SmolLM2-135M-Instruct (fp32) teacher-forces held-out Shakespeare (``--tokens``
  tokens in blocks of ``--block`` tokens) and the corpus is scored under one random key (a
  clean model and a fresh key: a real test under H0, so its p-value is recorded, not judged).
  Rivals: the same batches through a plain ``inference_mode`` forward of the same model (what
  any scorer must spend), and the FLOP bound ``2 * params * tokens / peak`` at the measured
  fp32 matmul peak.
* the provenance test (``detect.provenance.provenance_test``, statistic ``auto``: agreement,
  as every model shares SmolLM2's tokenizer): suspect and teacher SmolLM2, 3 controls (random
  4 x 256 Llamas with SmolLM2's tokenizer; cheap stand-ins, since only the cost is measured
  here: the false-flag rate on real models is ``theft.py``'s), ``--prompts`` prompts x 32
  greedy tokens. Its bound: one forward pass of every model over every prompt + answer token
  at the matmul peak (greedy decoding re-reads weights per token, so the bound is loose).

    python benchmarks/detect_cost.py            # 24k tokens, 32 prompts (~3 min on 2 cores)
    python benchmarks/detect_cost.py --quick    # 4k tokens, 16 prompts

Writes ``benchmarks/results/detect_cost.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_log, write_result
from _kd_probes import matmul_peak
from _provenance import provenance

RESULTS = Path(__file__).resolve().parent / "results" / "detect_cost.json"
log = make_log("detect_cost")


def _texts(tok: Any, tokens: int, block: int) -> list[str]:
    """Held-out Shakespeare cut into ``tokens // block`` texts of ``block`` tokens."""
    from potstill.distill.data import load_texts

    try:
        source = load_texts("shakespeare:heldout")
    except Exception:  # no corpus on this machine: synthetic text
        source = load_texts("synthetic:7:400")
    ids = tok("\n".join(source), add_special_tokens=False)["input_ids"]
    n = min(tokens // block, len(ids) // block)
    return [tok.decode(ids[i * block : (i + 1) * block]) for i in range(n)]


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def soft_cost(model: Any, tok: Any, texts: list[str], block: int, peak: float) -> dict[str, Any]:
    from potstill.core.watermark.keys import generate_key
    from potstill.core.watermark.params import WatermarkParams
    from potstill.detect.soft import radioactivity_soft

    key, params = generate_key(), WatermarkParams("kgw", gamma=0.25, delta=2.0,
                                                              context_width=2)  # fmt: skip
    kw = {"top_k": 64, "batch_size": 4, "max_tokens": block, "weighting": "mean"}
    radioactivity_soft(model, tok, texts[:4], [key], params, **kw)  # warm-up
    t0 = time.perf_counter()
    res = radioactivity_soft(model, tok, texts, [key], params, **kw)[0]
    wall = time.perf_counter() - t0
    batches = [tok(texts[i : i + 4], return_tensors="pt", padding=True, add_special_tokens=False)
               for i in range(0, len(texts), 4)]  # fmt: skip
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            model(**b)
    plain = time.perf_counter() - t0
    bound = 2 * _params(model) * tokens / peak
    log(
        f"soft: {wall:.1f} s for {tokens} tokens (plain forward {plain:.1f} s, bound {bound:.1f} s)"
    )
    return {"tokens": tokens, "n_scored_windows": res.n_scored, "p_value": res.p_value,
            "seconds": wall, "seconds_per_token": wall / tokens, "plain_forward_s": plain,
            "flop_bound_s": bound, "overhead_vs_plain_forward": wall / plain,
            "fraction_of_flop_bound": bound / wall,
            "settings": {**kw, "watermark": params.to_dict(), "key": "random (fresh)"}}  # fmt: skip


def _control(tok: Any, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=2048, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def provenance_cost(model: Any, tok: Any, n_prompts: int, peak: float) -> dict[str, Any]:
    from potstill.core.prompts import default_prompts
    from potstill.detect.provenance import Candidate, as_prompt, provenance_test

    teacher = Candidate("teacher", model, tok)
    suspect = Candidate("suspect", model, tok)
    controls = [Candidate(f"control-{i}", _control(tok, i), tok) for i in range(3)]
    prompts = default_prompts(n_prompts, seed=3)
    t0 = time.perf_counter()
    res = provenance_test(suspect, teacher, controls, prompts, new_tokens=32)
    wall = time.perf_counter() - t0
    prompt_tokens = sum(len(tok(as_prompt(tok, p), add_special_tokens=False)["input_ids"])
                        for p in prompts)  # fmt: skip
    tokens = prompt_tokens + 32 * n_prompts
    flops = 2 * tokens * (2 * _params(model) + sum(_params(c.model) for c in controls))
    bound = flops / peak
    log(f"provenance: {wall:.1f} s, p {res.p_value:.3g} (bound {bound:.1f} s)")
    return {"n_prompts": res.n_prompts, "statistic": res.statistic, "p_value": res.p_value,
            "flagged": res.flagged, "seconds": wall, "seconds_per_prompt": wall / n_prompts,
            "tokens_per_model": tokens, "seconds_per_token_per_model": wall / (tokens * 5),
            "flop_bound_s": bound, "fraction_of_flop_bound": bound / wall,
            "models": ["teacher", "suspect", *(c.name for c in controls)], "new_tokens": 32}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=None, help="soft test corpus size")
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    started = time.time()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from potstill.core.models import load_model

    model, tok = load_model("smollm2-135m-instruct")
    model.eval()
    peak = matmul_peak("cpu", torch.float32, 2048)
    texts = _texts(tok, a.tokens or (4096 if a.quick else 24576), a.block)
    res: dict[str, Any] = {"model": "smollm2-135m-instruct (fp32)", "params": _params(model),
                           "matmul_peak_fp32_flops": peak,
                           "torch_threads": torch.get_num_threads()}  # fmt: skip
    res["soft_radioactivity"] = soft_cost(model, tok, texts, a.block, peak)
    res["provenance_test"] = provenance_cost(model, tok, a.prompts or (16 if a.quick else 32),
                                             peak)  # fmt: skip
    res["provenance"] = provenance(started)
    write_result(a.out, res)
    s, p = res["soft_radioactivity"], res["provenance_test"]
    print(f"soft: {s['seconds_per_token'] * 1e3:.2f} ms/token, {s['overhead_vs_plain_forward']:.2f}x a "
          f"plain forward, {s['fraction_of_flop_bound']:.0%} of the FLOP bound; provenance: "
          f"{p['seconds_per_prompt']:.2f} s/prompt, {p['fraction_of_flop_bound']:.0%} of its bound")  # fmt: skip


if __name__ == "__main__":
    main()
