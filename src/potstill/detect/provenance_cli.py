"""``potstill audit provenance``: was the suspect trained on the teacher's outputs (no watermark)?"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_provenance", "cmd_provenance"]


def add_provenance(asub: argparse._SubParsersAction) -> None:
    p = asub.add_parser(
        "provenance",
        help="is a suspect closer to our teacher than independent controls? (no watermark needed)",
    )
    p.add_argument("--suspect", required=True, help="model spec or OpenAI-compatible URL")
    p.add_argument("--teacher", required=True, help="model spec of our teacher (run locally)")
    p.add_argument(
        "--controls",
        nargs="+",
        default=[],
        help="independent models of comparable capability (specs or URLs)",
    )
    p.add_argument(
        "--prompts", help="prompts FILE (plain text or JSONL); default: built-in prompts"
    )
    p.add_argument("--n-prompts", type=int, default=64, help="prompts to use (64)")
    p.add_argument(
        "--statistic",
        choices=("auto", "agreement", "teacher_ll", "model_ll"),
        default="auto",
        help="agreement (same tokenizer), teacher_ll (any; answers only) or model_ll (any; the "
        "models' own likelihood of the teacher's answers); auto picks agreement when it can",
    )
    p.add_argument(
        "--reference",
        help="an independent model R (not tested): teacher_ll scores ll_T - ll_R of each "
        "model's answers, model_ll each model's ll of T's answers minus its ll of R's",
    )
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (32)")
    p.add_argument("--alpha", type=float, default=0.01, help="family-wise level (0.01)")
    p.add_argument("--api-model", default="default", help="model name sent to URL models")
    p.add_argument("--out", help="also write the JSON result here")
    p.set_defaults(func=cmd_provenance)


def _load(spec: str, api_model: str) -> Any:
    from potstill.core.models import load_model
    from potstill.detect.provenance import Candidate, Endpoint

    if spec.startswith(("http://", "https://")):
        return Endpoint(spec, spec, model=api_model)
    model, tok = load_model(spec)
    return Candidate(spec, model, tok)


def _prompts(args: argparse.Namespace) -> list[str]:
    from potstill.core.errors import PotstillError

    if args.n_prompts < 1:
        raise PotstillError(f"--n-prompts must be >= 1, got {args.n_prompts}")
    if args.prompts:
        from potstill.detect.cli import read_texts

        texts = [s for r in read_texts(args.prompts) for s in r if s.strip()]
        if len(texts) < args.n_prompts:
            raise PotstillError(
                f"{args.prompts} holds {len(texts)} prompts, fewer than --n-prompts "
                f"{args.n_prompts}: give more prompts or lower --n-prompts"
            )
        return texts[: args.n_prompts]
    from potstill.core.prompts import default_prompts

    return default_prompts(args.n_prompts, seed=1)


def cmd_provenance(args: argparse.Namespace) -> int:
    import json
    import sys

    from potstill.core.errors import PotstillError
    from potstill.detect.provenance import Candidate, min_prompts, provenance_test

    if not args.controls:
        raise PotstillError(
            "--controls is empty: give independent models of comparable capability; without "
            "them closeness to the teacher means nothing"
        )
    if not 0.0 < args.alpha < 1.0:
        raise PotstillError(f"--alpha must be in (0, 1), got {args.alpha} (e.g. 0.01)")
    if args.n_prompts < min_prompts(len(args.controls), args.alpha):
        need = min_prompts(len(args.controls), args.alpha)
        raise PotstillError(
            f"--n-prompts {args.n_prompts} cannot reach α={args.alpha:g} over "
            f"{len(args.controls)} controls: use at least {need}"
        )
    if args.teacher.startswith(("http://", "https://")):
        raise PotstillError(
            "--teacher must be a local model spec: the teacher scores every answer "
            "(token probabilities an endpoint does not give)"
        )
    prompts = _prompts(args)
    teacher = _load(args.teacher, args.api_model)
    assert isinstance(teacher, Candidate)
    suspect = _load(args.suspect, args.api_model)
    controls = [_load(c, args.api_model) for c in args.controls]
    reference = None
    if args.reference:
        if args.reference.startswith(("http://", "https://")):
            raise PotstillError("--reference must be a local model spec: it scores every answer")
        reference = _load(args.reference, args.api_model)
    res = provenance_test(
        suspect, teacher, controls, prompts, statistic=args.statistic, alpha=args.alpha,
        new_tokens=args.new_tokens, reference=reference,
    )  # fmt: skip
    text = json.dumps(res.to_dict(), indent=2, ensure_ascii=False, allow_nan=True)
    print(text)
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(res.verdict(), file=sys.stderr)
    if args.out:
        from potstill.core.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0
