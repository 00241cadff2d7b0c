"""Peak memory of one long echo+logprobs request: chunked prefill against the one-pass prefill.

A 2,048-token prompt with ``echo`` and ``logprobs=20`` on a model with SmolLM2's vocabulary
(49,152 tokens). The one-pass prefill (what the engine did before) keeps fp32 logits at every
position, ``T x V x 4`` bytes = 384 MiB for one row; the chunked prefill keeps at most
``ECHO_LOGITS_BYTES`` of logits at a time. Both run in the same script, each in a fresh
process (peak RSS is a per-process high-water mark), on the same random model. The model is
small (2 layers, width 64) so that the logits, not the weights, are what is measured.

    python benchmarks/echo_memory.py [--tokens 2048] [--top 20]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance
from potstill.core.io import atomic_write_json

OUT = Path(__file__).resolve().parent / "results" / "echo_memory.json"
VOCAB = 49_152


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _model_and_tokenizer() -> tuple[Any, Any]:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<eos>": VOCAB - 1}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="t0")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=4096, eos_token_id=VOCAB - 1)  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), tok


def child(mode: str, tokens: int, top: int) -> dict[str, Any]:
    """One measurement in this process: peak RSS growth over one echo request."""
    import torch

    from potstill.serve import engine as eng

    torch.set_num_threads(1)
    model, tok = _model_and_tokenizer()
    if mode == "one_pass":  # one chunk holding every position: the old prefill
        eng.ECHO_LOGITS_BYTES = 1 << 62
    engine = eng.Engine(model, tok, model_name="echo-bench", max_batch=1)
    prompt = [
        int(i)
        for i in torch.randint(0, VOCAB - 1, (tokens,), generator=torch.Generator().manual_seed(1))
    ]
    done, got = threading.Event(), {}

    def sink(ev: Any) -> None:
        if ev.prompt_logprobs is not None:
            got["n"] = len(ev.prompt_logprobs)
        if ev.finish_reason or ev.error:
            got["error"] = ev.error
            done.set()

    params = eng.SamplingParams(max_tokens=1, logprobs=top, echo_logprobs=True, temperature=0.0)
    with torch.inference_mode():  # warm-up: allocator and kernels, on a short prompt
        engine._admit([eng.RequestGroup(prompt[:64], params, [0], lambda ev: None)])
        engine._reset_batch()
    before = _peak_mib()
    t0 = time.perf_counter()
    with torch.inference_mode():
        engine._admit([eng.RequestGroup(prompt, params, [0], sink)])
    seconds = time.perf_counter() - t0
    assert done.is_set() and got.get("error") is None and got["n"] == tokens, got
    return {"peak_extra_mib": _peak_mib() - before, "seconds": seconds, "positions": got["n"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--child", choices=("chunked", "one_pass"), default=None)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.top)))
        return 0
    started = time.time()
    from potstill.serve.engine import ECHO_LOGITS_BYTES

    runs = {}
    for mode in ("chunked", "one_pass"):
        cmd = [sys.executable, __file__, "--child", mode, "--tokens", str(args.tokens),
               "--top", str(args.top)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:9s} peak extra {runs[mode]['peak_extra_mib']:7.1f} MiB  "
              f"{runs[mode]['seconds']:.2f} s")  # fmt: skip
    logits_mib = args.tokens * VOCAB * 4 / 2**20
    result = {
        "benchmark": "echo_memory",
        "settings": {
            "prompt_tokens": args.tokens,
            "top_logprobs": args.top,
            "vocab": VOCAB,
            "model": "random Llama, 2 layers, width 64",
            "torch_threads": 1,
        },
        "chunked": runs["chunked"],
        "one_pass": runs["one_pass"],
        "one_pass_logits_mib": logits_mib,
        "echo_logits_bytes_mib": ECHO_LOGITS_BYTES / 2**20,
        "peak_ratio_chunked_vs_one_pass": runs["chunked"]["peak_extra_mib"]
        / runs["one_pass"]["peak_extra_mib"],
        "provenance": provenance(started),
    }
    atomic_write_json(args.out, result)
    print(f"chunked / one-pass peak: {result['peak_ratio_chunked_vs_one_pass']:.3f} "
          f"(one-pass logits alone: {logits_mib:.0f} MiB) -> {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
