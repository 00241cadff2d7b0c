"""potstill's one entry point: ``potstill <verb> ...``.

Bad input raises :class:`~potstill.core.errors.PotstillError`; :func:`main` prints
it as one line on stderr and exits with code 2 (argparse usage errors exit 2
as well). A run that diverges exits 1 with the path of its last good checkpoint.
Heavy imports happen inside each verb so ``potstill --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from potstill.core import __version__
from potstill.core.errors import PotstillError, TrainingDiverged


def _quiet_libraries() -> None:
    # transformers/accelerate chatter hides potstill's own output.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if (
        "transformers" in sys.modules
    ):  # already imported (in-process callers): switch its bars off too
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    import logging

    # Warnings are not silenced: a deprecation in our stack must reach the user who can act
    # on it. Only accelerate's INFO/WARNING chatter (per-process notices) is turned down.
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def cmd_distill(args: argparse.Namespace) -> int:
    from potstill.distill.config import DistillConfig, load_config
    from potstill.distill.train.recipe import run_distill

    cfg = load_config(DistillConfig, args.config, args.overrides)
    out = run_distill(cfg, resume=args.resume, show_progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # one line, not one per process
        print(f"student saved to {out / 'student'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from potstill.distill.evaluate.cli import run_eval

    result, table = run_eval(
        teacher=args.teacher,
        student=args.student,
        baseline=args.baseline,
        data=args.data,
        seq_len=args.seq_len,
        max_blocks=args.max_blocks,
        batch_size=args.batch_size,
    )
    if args.out:
        from potstill.core.io import atomic_write_json

        atomic_write_json(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from potstill.demo import DemoSettings, run_demo

    settings = DemoSettings(
        out_dir=Path(args.out),
        teacher=args.teacher,
        steps=args.steps,
        student_layers=args.student_layers,
        student_width=args.student_width,
        seq_len=args.seq_len,
        micro_batch_size=args.micro_batch_size,
        eval_blocks=args.eval_blocks,
        train=args.train_data,
        heldout=args.heldout_data,
        blackbox=not args.no_blackbox,
        blackbox_overrides=_blackbox_options(args.blackbox_option),
    )
    run_demo(settings)
    return 0


def _blackbox_options(items: list[str]) -> dict[str, object]:
    from potstill.demo_blackbox import BLACKBOX_DEFAULTS
    from potstill.distill.config import parse_overrides

    opts = parse_overrides(items)
    unknown = sorted(set(opts) - set(BLACKBOX_DEFAULTS))
    if unknown:
        raise PotstillError(
            f"unknown --blackbox-option {', '.join(unknown)}; known: {', '.join(BLACKBOX_DEFAULTS)}"
        )
    return opts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="potstill", description="LLM distillation: do it, detect it, defend against it."
    )
    p.add_argument("--version", action="version", version=f"potstill {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    d = sub.add_parser("distill", help="train a student from a teacher (white-box KD)")
    d.add_argument(
        "--config", required=False, help="YAML config (see configs/); defaults when omitted"
    )
    d.add_argument(
        "--resume", action="store_true", help="continue the run in out_dir from its last checkpoint"
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 loss.kind=reverse_kl"
    )
    d.set_defaults(func=cmd_distill)

    e = sub.add_parser("eval", help="NLL/perplexity, top-1 agreement, KL and teacher gap recovered")
    e.add_argument("--teacher", required=True, help="teacher model spec")
    e.add_argument("--student", required=True, help="student model spec (e.g. runs/x/student)")
    e.add_argument(
        "--baseline", help="same student trained without a teacher: enables gap recovered"
    )
    e.add_argument(
        "--data", required=True, help="held-out text source, e.g. shakespeare:heldout or FILE"
    )
    e.add_argument("--seq-len", type=int, default=256, help="tokens per evaluated sequence")
    e.add_argument("--max-blocks", type=int, default=64, help="at most this many sequences")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--out", help="also write the JSON result to this file")
    e.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("demo", help="distill SmolLM2-135M-Instruct into a small student and report")
    m.add_argument("--out", default="runs/demo", help="report folder")
    m.add_argument("--teacher", default="smollm2-135m-instruct", help="teacher model spec")
    m.add_argument("--steps", type=int, default=None, help="optimizer steps per student")
    m.add_argument("--student-layers", type=int, default=None)
    m.add_argument("--student-width", type=int, default=None)
    m.add_argument("--seq-len", type=int, default=None)
    m.add_argument("--micro-batch-size", type=int, default=None)
    m.add_argument("--eval-blocks", type=int, default=None)
    m.add_argument("--train-data", default=None, help="training text source")
    m.add_argument("--heldout-data", default=None, help="held-out text source")
    m.add_argument(
        "--no-blackbox",
        action="store_true",
        help="skip the serve -> harvest -> distill -> audit half",
    )
    m.add_argument(
        "--blackbox-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a black-box setting, e.g. train_prompts=64 (see potstill.demo_blackbox)",
    )
    m.set_defaults(func=cmd_demo)
    for module in PLUGINS:
        _register_plugin(sub, module)
    return p


# Verbs that live next to their code. Each module exposes `register(subparsers)`
# and must import only argparse-level things at module import.
PLUGINS = (
    "potstill.distill.teachers.cache_cli",
    "potstill.cli.serve",
    "potstill.harvest.cli",
    "potstill.detect.cli",
    "potstill.defend.cli",
    "potstill.cli.antidistill",
)


def _register_plugin(sub: argparse._SubParsersAction, module: str) -> None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            return  # that verb's package is not built yet
        raise
    mod.register(sub)


# Optional dependencies by import name -> the extra that installs them (pyproject.toml).
EXTRAS = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "starlette": "serve",
    "scipy": "detect",
    "pyarrow": "cache",
}


def missing_extra(exc: ModuleNotFoundError) -> PotstillError | None:
    """The error to show when a verb needs a package of an extra that is not installed."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return PotstillError(
        f"this needs the {top} package, which comes with potstill's [{extra}] extra; "
        f"install it with: pip install 'potstill[{extra}]'"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        try:
            return func(args)
        except ModuleNotFoundError as exc:
            raise missing_extra(exc) or exc from None
    except PotstillError as err:
        print(f"potstill {args.verb}: error: {err}", file=sys.stderr)
        return 1 if isinstance(err, TrainingDiverged) else 2
    except KeyboardInterrupt:
        print(f"potstill {args.verb}: interrupted", file=sys.stderr)
        return 130
