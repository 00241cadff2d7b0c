"""``potstill defend fit-antidistill``: the proxy gradient that ``serve --antidistill`` uses.

``potstill defend fit-antidistill --proxy SPEC --data SRC --out DIR`` computes ``g``, the
gradient of the proxy's token-mean cross-entropy on ``SRC`` (held-out teacher outputs), and
writes ``DIR/antidistill_grad.safetensors`` + ``DIR/antidistill.json``
(:func:`potstill.defend.antidistill.save_antidistill`). ``SRC``: any
:func:`potstill.distill.data.load_texts` source (packed into ``--seq-len`` blocks, every token
scored) or ``messages:FILE.jsonl|.parquet`` / ``harvest:STORE.sqlite`` chat data (loss on
assistant tokens only, one right-padded sequence per conversation).

Module-level imports are argparse-only: the CLI imports this to register the verb.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["antidistill_data", "cmd_fit_antidistill", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``defend`` verb (``defend fit-antidistill``) to ``subparsers``."""
    d = subparsers.add_parser("defend", help="prepare server-side defences (antidistillation)")
    sub = d.add_subparsers(dest="defend_verb", metavar="{fit-antidistill}", required=True)
    f = sub.add_parser(
        "fit-antidistill",
        help="proxy-student gradient for `potstill serve --antidistill`",
        description=(
            "Gradient of a proxy student's token-mean cross-entropy on held-out teacher "
            "outputs (Savani et al. 2025), for `potstill serve --antidistill proxy=OUT,...`."
        ),
    )
    f.add_argument(
        "--proxy", required=True, help="proxy model spec (tiny:0, DIR, FILE.gguf, alias)"
    )
    f.add_argument(
        "--data",
        required=True,
        help="held-out teacher outputs: a text source (FILE.txt, FILE.jsonl, DIR, synthetic:0, "
        "shakespeare:heldout) or messages:FILE.jsonl / harvest:STORE.sqlite",
    )
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    f.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    f.add_argument("--max-tokens", type=int, default=None, help="score at most N tokens")
    f.add_argument("--seed", type=int, default=0, help="which sequences --max-tokens keeps")
    f.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)"
    )
    f.set_defaults(func=cmd_fit_antidistill)


def antidistill_data(
    source: str, tokenizer: Any, *, seq_len: int, max_tokens: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``(input_ids [N, seq_len], labels [N, seq_len])`` for :func:`fit_antidistill_grad`.

    Text sources are packed (every position scored but each block's last); chat sources are
    right-padded with labels on assistant tokens (:mod:`potstill.distill.data.chat`). With
    ``max_tokens`` the sequences are shuffled with ``seed`` and kept until ``max_tokens``
    labels are scored (the last kept row's extra labels are masked to -100).
    """
    import torch

    from potstill.core.specs import ChatSource, parse_data_source

    parsed = parse_data_source(source)
    if isinstance(parsed, ChatSource):
        from potstill.distill.data.chat import load_chat_data

        chat = load_chat_data(parsed, tokenizer, seq_len=seq_len, with_logprobs=False)
        blocks, labels = chat.blocks, chat.labels
    else:
        from potstill.distill.data import load_texts, make_labels, pack_sequences, tokenize_texts

        blocks = pack_sequences(tokenize_texts(load_texts(parsed), tokenizer), seq_len)
        labels = make_labels(blocks)
    if max_tokens is not None:
        perm = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
        blocks, labels = blocks[perm], labels[perm].clone()
        scored = (labels != -100).cumsum(-1) + torch.cat(
            [torch.zeros(1, dtype=torch.long), (labels != -100).sum(-1).cumsum(0)[:-1]]
        )[:, None]  # running count of scored labels, in row-major order
        labels[scored > max_tokens] = -100
        keep = (labels != -100).any(-1)
        blocks, labels = blocks[keep], labels[keep]
    return blocks, labels


def _progress(total: int) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    return Progress(
        TextColumn("fit-antidistill"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def _canonical_spec(spec: str) -> str:
    """Paths become absolute (the fit dir is read later from another cwd); others as given."""
    from potstill.core.specs import GgufModel, HFDirModel, parse_model_spec

    parsed = parse_model_spec(spec)
    if isinstance(parsed, HFDirModel | GgufModel) and parsed.path.exists():
        return str(parsed.path.resolve())
    return str(parsed)


def cmd_fit_antidistill(args: argparse.Namespace) -> int:
    from potstill.core.errors import PotstillError

    for flag, value, low in (("--seq-len", args.seq_len, 2), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise PotstillError(f"{flag} must be >= {low}, got {value}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise PotstillError(f"--max-tokens must be >= 1, got {args.max_tokens} (omit it for all)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise PotstillError(f"--out {out} is a file: pass a directory")
    import torch

    from potstill.core.models import load_model
    from potstill.core.tokenizers import tokenizer_fingerprint
    from potstill.defend.antidistill import (
        AntidistillPerturbation,
        delta_sigma,
        fit_antidistill_grad,
        save_antidistill,
        suggested_eps,
    )

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    proxy, tok = load_model(args.proxy)
    proxy = proxy.to(device)
    ids, labels = antidistill_data(
        args.data, tok, seq_len=args.seq_len, max_tokens=args.max_tokens, seed=args.seed
    )
    b = args.batch_size
    batches = ((ids[i : i + b], labels[i : i + b]) for i in range(0, ids.shape[0], b))
    with _progress(int((labels != -100).sum())) as bar:
        task = bar.add_task("fit", total=int((labels != -100).sum()))
        grads, stats = fit_antidistill_grad(proxy, batches, on_batch=lambda n: bar.advance(task, n))
    # The scale of delta, so that `serve --antidistill bias=B` means a logit shift of B nats:
    # measured on the first 32 sequences, two at a time (full-vocabulary logits are large).
    eps = suggested_eps(stats["grad_norm"])
    pert = AntidistillPerturbation(proxy, grads, eps, device=device)
    n_seq = min(32, ids.shape[0])
    sigma = delta_sigma(pert, ((ids[i : i + 2], labels[i : i + 2]) for i in range(0, n_seq, 2)))
    del pert
    meta = {
        "proxy": _canonical_spec(args.proxy),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "data": args.data,
        "seq_len": args.seq_len,
        "batch_size": b,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        **stats,
        "suggested_eps": eps,
        "delta_sigma": sigma,
        "delta_sigma_sequences": n_seq,
    }
    save_antidistill(out, grads, meta)
    print(
        f"wrote {out}: {stats['n_tokens']} tokens, proxy loss {stats['loss']:.4f} nats/token, "
        f"|g| = {stats['grad_norm']:.4g}; suggested eps {eps:.3g}, delta spread {sigma:.4g} "
        f"(serve --antidistill proxy={out},bias=B: lambda = B / {sigma:.4g})",
        file=sys.stdout,
    )
    return 0
