"""``potstill cache-logits``: run a teacher once and store its top-k log-probs.

    potstill cache-logits --teacher smollm2-135m-instruct --data shakespeare:train \\
        --out caches/smol-k64 --top-k 64 --seq-len 256

    # data-parallel: each process writes its own shards
    accelerate launch --num_processes 2 -m potstill.cli cache-logits ...

Then ``potstill distill ... teacher.spec=cache:caches/smol-k64`` trains from it (same
data.train and data.seq_len). A killed run resumes when the same command is rerun.
"""

from __future__ import annotations

import argparse


def cmd_cache_logits(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from potstill.core.errors import PotstillError
    from potstill.distill.teachers.cache import CacheJob, write_cache

    for name in ("top_k", "seq_len", "batch_size", "shard_blocks"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise PotstillError(f"{flag} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < 2:
        raise PotstillError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    job = CacheJob(
        teacher=args.teacher,
        data=args.data,
        out=Path(args.out),
        k=args.top_k,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        shard_blocks=args.shard_blocks,
        scheme=args.values,
        bf16=args.bf16,
    )
    quiet = args.quiet or int(os.environ.get("RANK", "0")) != 0
    man = write_cache(job, log=(lambda _msg: None) if quiet else print)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"cached {man['n_blocks']} blocks x {man['seq_len']} tokens, top-{man['k']} "
            f"({man['scheme']}, {man['file_bytes_per_token']:.1f} bytes/token) in {args.out}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cache-logits", help="run a teacher once over the training data and store its top-k"
    )
    p.add_argument("--teacher", required=True, help="teacher model spec")
    p.add_argument(
        "--data", required=True, help="training text source (same as data.train of the run)"
    )
    p.add_argument("--out", required=True, help="cache directory (rerun to resume)")
    p.add_argument("--top-k", type=int, default=64, help="tokens kept per position")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (= data.seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per teacher forward pass")
    p.add_argument("--shard-blocks", type=int, default=256, help="blocks per shard file")
    p.add_argument(
        "--values",
        choices=("u8", "f32"),
        default="u8",
        help="u8: 1-byte log-prob codes (default); f32: lossless",
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the teacher forward")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--quiet", action="store_true", help="no per-shard lines")
    p.set_defaults(func=cmd_cache_logits)
