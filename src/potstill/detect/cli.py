"""``potstill audit``: keyed watermark detection and radioactivity tests.

- ``potstill audit keygen --out KEYFILE``: a new random key (hex, mode 0600).
- ``potstill audit text --model M --input FILE --key-file KEYFILE``: one JSON line per
  text with its exact p-value. ``M`` only supplies the tokenizer.
- ``potstill audit radioactivity --mode open|closed --suspect S --watermarked FILE
  --key-file KEYFILE``: did the suspect learn from our watermarked text? JSON on
  stdout, one verdict line per (suspect, key) on stderr; several suspects/keys are
  corrected with Holm–Bonferroni.

Keys never appear in any output: only their id (first 8 hex of sha256). Module import
stays at argparse level; the work happens inside the command functions.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from potstill.core.watermark.keys import WatermarkKey
    from potstill.core.watermark.params import WatermarkParams

__all__ = ["read_texts", "register"]


def _add_watermark_args(p: argparse.ArgumentParser, *, multi_key: bool = False) -> None:
    p.add_argument("--watermark", choices=("kgw", "gumbel"), default="kgw", help="scheme")
    if multi_key:
        p.add_argument(
            "--key-file",
            action="append",
            default=None,
            help="key file (repeatable); default: $POTSTILL_WATERMARK_KEY",
        )
    else:
        p.add_argument("--key-file", help="key file; default: $POTSTILL_WATERMARK_KEY")
    p.add_argument("--gamma", type=float, default=0.25, help="KGW green fraction (0.25)")
    p.add_argument(
        "--delta",
        type=float,
        default=2.0,
        help="KGW logit bias (generation only: detection ignores it)",
    )
    p.add_argument("--context-width", type=int, default=2, help="tokens seeding the hash (2)")
    p.add_argument(
        "--no-dedup", action="store_true", help="score repeated (context, token) tuples again"
    )


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser(
        "audit", help="watermark keys, detection, radioactivity and provenance tests"
    )
    asub = a.add_subparsers(dest="audit_verb", required=True, metavar="AUDIT_VERB")

    k = asub.add_parser("keygen", help="write a new random watermark key (hex, mode 0600)")
    k.add_argument("--out", required=True, help="key file to create")
    k.add_argument("--force", action="store_true", help="replace an existing file")
    k.set_defaults(func=cmd_keygen)

    t = asub.add_parser("text", help="test each text of a file for our watermark")
    t.add_argument("--model", required=True, help="model spec whose tokenizer made the text")
    t.add_argument(
        "--input",
        required=True,
        help="texts: plain text (blank-line separated) or JSONL with text or messages",
    )
    _add_watermark_args(t)
    t.set_defaults(func=cmd_text)

    r = asub.add_parser("radioactivity", help="did a suspect model train on watermarked text?")
    r.add_argument("--mode", choices=("open", "closed"), required=True)
    r.add_argument(
        "--suspect",
        action="append",
        required=True,
        help="open: model spec; closed: its generations FILE or an OpenAI-compatible URL "
        "(repeatable)",
    )
    r.add_argument("--watermarked", help="our watermarked texts (required in open mode)")
    r.add_argument("--prompts", help="prompts (their windows are excluded; sent to a URL suspect)")
    r.add_argument("--filter", action="store_true", help="score only windows in --watermarked")
    r.add_argument(
        "--tokenizer",
        help="model spec of the watermarking model; its tokenizer must be the suspect's in "
        "open mode, and it splits the suspect's text in closed mode (required)",
    )
    r.add_argument(
        "--score",
        choices=("soft", "argmax"),
        help="open mode: the suspect's green probability mass (soft; default for KGW) or its "
        "top-1 prediction (argmax; the only choice for Gumbel and closed mode)",
    )
    r.add_argument(
        "--weighting",
        choices=("sum", "mean"),
        default="sum",
        help="soft: a repeated window's mass summed over its occurrences (sum) or averaged",
    )
    r.add_argument("--top-k", type=int, default=64, help="soft: tokens kept per position (64)")
    r.add_argument("--alpha", type=float, default=0.01, help="significance level (0.01)")
    r.add_argument("--no-prompt-exclusion", action="store_true", help="keep prompt windows")
    r.add_argument(
        "--keep-copies",
        action="store_true",
        help="open mode: also score predictions that copy an earlier continuation",
    )
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--max-tokens", type=int, default=512, help="open mode: tokens per text")
    r.add_argument("--api-model", default="default", help="model name sent to a URL suspect")
    r.add_argument("--api-max-tokens", type=int, default=256, help="tokens per URL answer")
    r.add_argument("--out", help="also write the JSON result here")
    _add_watermark_args(r, multi_key=True)
    r.set_defaults(func=cmd_radioactivity)

    from potstill.detect.provenance_cli import add_provenance

    add_provenance(asub)


def read_texts(path: str | Path) -> list[list[str]]:
    """Records of a text file, each a list of segments to score together.

    JSONL (``.jsonl`` or first character ``{``): ``{"text": ...}`` is one segment;
    ``{"messages": [...]}`` gives its assistant turns. Otherwise plain text: records are
    separated by blank lines. PotstillError for a missing/unreadable/empty file.
    """
    import re
    from pathlib import Path

    from potstill.core.errors import PotstillError
    from potstill.core.io import jsonl_records

    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PotstillError(f"input file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PotstillError(f"cannot read {path} as UTF-8 text: {e}") from None
    records: list[list[str]] = []
    if path.suffix == ".jsonl" or raw.lstrip().startswith("{"):
        hint = 'one object per line, {"text": ...} or {"messages": [...]}'
        for n, obj in jsonl_records(path, raw, hint=hint):
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                records.append([obj["text"]])
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                turns = [
                    str(m.get("content", ""))
                    for m in obj["messages"]
                    if isinstance(m, dict) and m.get("role") == "assistant"
                ]
                records.append(turns)
            else:
                raise PotstillError(
                    f"{path}:{n}: expected an object with a 'text' string or a 'messages' list"
                )
    else:
        records = [[b.strip("\n")] for b in re.split(r"\n[ \t]*\n", raw) if b.strip()]
    records = [r for r in records if any(s.strip() for s in r)]
    if not records:
        raise PotstillError(f"no texts in {path}: the file is empty (or has only blank records)")
    return records


def _params(args: argparse.Namespace) -> WatermarkParams:
    from potstill.core.watermark.params import WatermarkParams

    return WatermarkParams(
        args.watermark, gamma=args.gamma, delta=args.delta, context_width=args.context_width
    )


def cmd_keygen(args: argparse.Namespace) -> int:
    from potstill.core.watermark.keys import generate_key, write_key

    key = generate_key()
    path = write_key(args.out, key, overwrite=args.force)
    print(f"wrote watermark key {key.key_id} to {path} (mode 600; keep it secret)")
    return 0


def cmd_text(args: argparse.Namespace) -> int:
    import json

    from potstill.core.errors import PotstillError
    from potstill.core.models import load_tokenizer
    from potstill.core.watermark.detect import detect_segments
    from potstill.core.watermark.keys import resolve_key

    params = _params(args)
    key = resolve_key(args.key_file)
    records = read_texts(args.input)
    tok = load_tokenizer(args.model)
    n_ok = 0
    for i, segments in enumerate(records):
        ids = [tok(s, add_special_tokens=False)["input_ids"] for s in segments]
        try:
            res = detect_segments(ids, key, params, dedup=not args.no_dedup)
        except PotstillError as e:
            line: dict[str, Any] = {"index": i, "n_tokens": sum(map(len, ids)), "n_scored": 0}
            print(json.dumps({**line, "p_value": None, "error": str(e)}))
            continue
        n_ok += 1
        print(json.dumps({"index": i, **res.to_dict()}))
    if n_ok == 0:
        raise PotstillError(
            f"no text in {args.input} is long enough to score (each needs more than "
            f"{params.context_width} tokens)"
        )
    return 0


def _keys(paths: list[str] | None) -> list[WatermarkKey]:
    from potstill.core.watermark.keys import resolve_key

    return [resolve_key(p) for p in paths] if paths else [resolve_key(None)]


def _flat(records: list[list[str]]) -> list[str]:
    return [s for r in records for s in r if s.strip()]


def _suspect_texts(args: argparse.Namespace, suspect: str, prompts: list[str] | None) -> list[str]:
    """Closed mode: the suspect's generations, from a file or its endpoint."""
    from potstill.core.errors import PotstillError

    if suspect.startswith(("http://", "https://")):
        from potstill.detect.radioactivity import collect_generations

        if not prompts:
            raise PotstillError(
                f"suspect {suspect} is an endpoint: pass --prompts FILE to query it with"
            )
        return collect_generations(
            suspect, prompts, model=args.api_model, max_tokens=args.api_max_tokens
        )
    return _flat(read_texts(suspect))


def _tokenizer_check(wm_tok: Any, wm_spec: str, sus_tok: Any, sus_spec: str) -> None:
    from potstill.core.errors import PotstillError
    from potstill.core.tokenizers import tokenizer_fingerprint

    fa, fb = tokenizer_fingerprint(wm_tok), tokenizer_fingerprint(sus_tok)
    if fa != fb:
        raise PotstillError(
            f"tokenizers differ: watermarking model {wm_spec!r} (fingerprint {fa[:12]}…) vs "
            f"suspect {sus_spec!r} (fingerprint {fb[:12]}…); token-level radioactivity needs "
            "the same tokenizer: use closed mode on the suspect's text instead"
        )


def _run_one(
    args: argparse.Namespace,
    suspect: str,
    keys: list[WatermarkKey],
    params: WatermarkParams,
    watermarked: list[str] | None,
    prompts: list[str] | None,
) -> list[Any]:
    """Results of one suspect under every key (the suspect is read/run once per key)."""
    from potstill.core.errors import PotstillError
    from potstill.core.models import load_model, load_tokenizer
    from potstill.detect.radioactivity import radioactivity_closed, radioactivity_open_keys

    common: dict[str, Any] = {
        "prompts": prompts,
        "filter_texts": watermarked if args.filter else None,
        "exclude_prompt_windows": not args.no_prompt_exclusion,
    }
    if args.mode == "open":
        assert watermarked is not None
        model, tok = load_model(suspect)
        _tokenizer_check(load_tokenizer(args.tokenizer), args.tokenizer, tok, suspect)
        if args.score == "soft":
            from potstill.detect.soft import radioactivity_soft

            return list(
                radioactivity_soft(
                    model,
                    tok,
                    watermarked,
                    keys,
                    params,
                    weighting=args.weighting,
                    top_k=args.top_k,
                    batch_size=max(1, args.batch_size // 2),  # [B, T, V] fp32 logits
                    max_tokens=args.max_tokens,
                    **common,
                )
            )
        common["dedup"] = not args.no_dedup
        return radioactivity_open_keys(
            model,
            tok,
            watermarked,
            keys,
            params,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            exclude_copies=not args.keep_copies,
            **common,
        )
    if not args.tokenizer:
        raise PotstillError(
            "closed mode needs --tokenizer SPEC: the watermarking model whose tokenizer "
            "splits the suspect's text"
        )
    tok = load_tokenizer(args.tokenizer)
    texts = _suspect_texts(args, suspect, prompts)
    common["dedup"] = not args.no_dedup
    return [radioactivity_closed(texts, tok, key, params, **common) for key in keys]


def _resolve_score(args: argparse.Namespace, params: WatermarkParams) -> None:
    """Default ``--score`` (soft where it is valid) and refuse combinations that are not."""
    from potstill.core.errors import PotstillError

    if args.mode == "open" and not args.tokenizer:
        raise PotstillError(
            "open mode needs --tokenizer SPEC: the watermarking model, whose tokenizer must be "
            "the suspect's (token-level scores mean nothing across tokenizers)"
        )
    soft_ok = args.mode == "open" and params.scheme == "kgw"
    if args.score is None:
        args.score = "soft" if soft_ok else "argmax"
    elif args.score == "soft" and not soft_ok:
        raise PotstillError(
            "--score soft needs open mode and a KGW watermark (green lists over the suspect's "
            "distribution): use --score argmax"
        )
    if args.top_k < 1:
        raise PotstillError(f"--top-k must be >= 1, got {args.top_k} (e.g. 64)")
    if args.score == "soft" and args.no_dedup:
        raise PotstillError(
            "--no-dedup applies to --score argmax and closed mode; the soft test merges a "
            "window's occurrences exactly (choose how with --weighting)"
        )


def cmd_radioactivity(args: argparse.Namespace) -> int:
    import json
    import sys

    from potstill.core.errors import PotstillError
    from potstill.detect.stats import holm_adjusted

    if not 0.0 < args.alpha < 1.0:
        raise PotstillError(f"--alpha must be in (0, 1), got {args.alpha} (e.g. 0.01)")
    params = _params(args)
    keys = _keys(args.key_file)
    if args.mode == "open" and not args.watermarked:
        raise PotstillError("open mode needs --watermarked FILE: our watermarked texts")
    if args.filter and not args.watermarked:
        raise PotstillError("--filter needs --watermarked FILE (the windows to keep)")
    _resolve_score(args, params)
    watermarked = _flat(read_texts(args.watermarked)) if args.watermarked else None
    prompts = _flat(read_texts(args.prompts)) if args.prompts else None
    rows: list[dict[str, Any]] = []
    for suspect in args.suspect:
        for key, res in zip(keys, _run_one(args, suspect, keys, params, watermarked, prompts)):
            rows.append({"suspect": suspect, "key_id": key.key_id, **res.to_dict()})
    adjusted = holm_adjusted([r["p_value"] for r in rows]) if len(rows) > 1 else None
    for i, row in enumerate(rows):
        p = row["p_value"] if adjusted is None else adjusted[i]
        row["p_holm"] = None if adjusted is None else p
        row["flagged"] = p < args.alpha
        name = "p" if adjusted is None else "p_holm"
        word = f"flagged: {name}={p:.3g} < α={args.alpha:g}"
        if not row["flagged"]:
            word = f"not flagged: {name}={p:.3g} ≥ α={args.alpha:g}"
        row["verdict"] = word
    out: dict[str, Any] = {
        "alpha": args.alpha,
        "correction": "holm" if adjusted is not None else None,
        "results": rows,
    }
    text = json.dumps(out, indent=2, ensure_ascii=False)
    print(text)
    for row in rows:
        print(f"{row['suspect']} [key {row['key_id']}]: {row['verdict']}", file=sys.stderr)
    if args.out:
        from potstill.core.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0
