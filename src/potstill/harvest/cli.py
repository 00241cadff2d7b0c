"""``potstill harvest``: collect an endpoint's answers; ``harvest export``; ``harvest prompts``.

Forms::

    potstill harvest --endpoint URL --model NAME [--prompts FILE|default] --store S.sqlite
                     [--concurrency N] [--api-key K] [--top-logprobs k] [--max-tokens M]
                     [--temperature T] [--samples N] [--seed S] [--chat|--completions]
    potstill harvest run ...            (the same, as an explicit sub-verb)
    potstill harvest export --store S.sqlite --out F.jsonl|F.parquet
    potstill harvest prompts --out FILE [--n N] [--seed S]

Exit codes: 0 done, 2 bad input, 3 some (prompt, sample) pairs failed (a rerun retries them).
Only argparse is imported at module import; the work happens in :func:`cmd_harvest`.
"""

from __future__ import annotations

import argparse
import json
import os


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="model name sent to the endpoint")
    p.add_argument(
        "--prompts",
        default="default",
        help="JSONL (prompt|messages) or text file; 'default' = built-in set",
    )
    p.add_argument("--store", help="SQLite store to fill (created if missing; reruns resume)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument(
        "--top-logprobs", type=int, default=None, help="store the top-k logprobs of each token"
    )
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument(
        "--n", "--samples", dest="samples", type=int, default=1, help="samples per prompt"
    )
    p.add_argument("--seed", type=int, default=None, help="request seed (+ sample index)")
    p.add_argument("--max-retries", type=int, default=6)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--chat", dest="mode", action="store_const", const="chat", help="chat API (default)"
    )
    mode.add_argument("--completions", dest="mode", action="store_const", const="completions")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(mode="chat", func=cmd_harvest, harvest_verb="run")


def register(subparsers: argparse._SubParsersAction) -> None:
    h = subparsers.add_parser(
        "harvest", help="black-box: harvest answers from an OpenAI-compatible endpoint"
    )
    _add_run_args(h)
    sub = h.add_subparsers(dest="harvest_verb", metavar="{run,export,prompts}")
    _add_run_args(sub.add_parser("run", help="harvest (the default)"))
    e = sub.add_parser("export", help="store -> messages dataset (.jsonl or .parquet)")
    e.add_argument("--store", required=True)
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_harvest, harvest_verb="export")
    g = sub.add_parser("prompts", help="write potstill's default prompt set")
    g.add_argument("--out", required=True, help='.jsonl ({"prompt": ...} per line) or text')
    g.add_argument("--n", type=int, default=2000)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_harvest, harvest_verb="prompts")


def cmd_harvest(args: argparse.Namespace) -> int:
    from potstill.core.errors import PotstillError

    if args.harvest_verb == "export":
        from potstill.core.messages import export_store

        n = export_store(args.store, args.out)
        print(f"wrote {n} examples to {args.out}")
        return 0
    if args.harvest_verb == "prompts":
        from potstill.core.io import atomic_write_text
        from potstill.core.prompts import default_prompts

        prompts = default_prompts(args.n, args.seed)
        if args.out.endswith((".jsonl", ".json")):
            text = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts)
        else:  # plain text is one prompt per line: multi-line prompts need JSONL
            if any("\n" in p for p in prompts):
                raise PotstillError("some default prompts span several lines; use --out FILE.jsonl")
            text = "".join(p + "\n" for p in prompts)
        atomic_write_text(args.out, text)
        print(f"wrote {len(prompts)} prompts to {args.out}")
        return 0
    missing = [f"--{n}" for n in ("endpoint", "model", "store") if not getattr(args, n)]
    if missing:
        raise PotstillError(
            f"potstill harvest needs {', '.join(missing)}; see potstill harvest --help"
        )
    from potstill.core.prompts import read_prompts
    from potstill.harvest.client import GenParams, RetryPolicy, harvest

    params = GenParams(
        mode=args.mode, max_tokens=args.max_tokens, temperature=args.temperature,
        top_logprobs=args.top_logprobs, seed=args.seed,
    )  # fmt: skip
    stats = harvest(
        read_prompts(args.prompts),
        args.store,
        endpoint=args.endpoint,
        model=args.model,
        params=params,
        samples=args.samples,
        concurrency=args.concurrency,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        policy=RetryPolicy(max_retries=args.max_retries, timeout_s=args.timeout),
        progress=not args.no_progress,
    )
    if stats.duplicates:
        print(f"harvest: {stats.duplicates} repeated (prompt, sample) pairs requested once")
    print(
        f"harvest: {stats.done} new, {stats.skipped} already stored, {stats.failed} failed "
        f"(retried on the next run), {stats.errors} errors, {stats.rate:.1f} req/s -> {args.store}"
    )
    return 3 if stats.failed else 0  # 3: some prompts failed; a rerun retries them
