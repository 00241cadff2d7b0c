"""``potstill monitor`` and the defense flags of ``potstill serve``.

* ``potstill monitor --audit-log F --prompts-log F2 [--calibration C]``: replay a server's
  audit log through :class:`~potstill.defend.monitor.ExtractionMonitor`; one JSON object with
  every key's final score (and flagged keys on stderr). The audit log holds only prompt
  hashes (by design), so the texts come from F2, a JSONL of ``{"prompt_sha256", "text"}``
  written by ``potstill serve --monitor-log-prompts F2``; requests without a text are skipped.
* ``potstill monitor calibrate --out C``: thresholds for ``--fpr`` from simulated benign
  traffic, or from ``--benign-prompts FILE`` (your users' prompts; recommended).

Privacy: ``--monitor-log-prompts`` stores raw prompt text on disk, which the audit log
deliberately avoids. Leave it off unless offline review is needed, and protect and expire
the file; the online monitor (``--monitor``) keeps texts only in memory (last W per key).

Module import stays at argparse level.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["add_serve_args", "cmd_monitor", "register", "serve_hooks"]


def _add_scan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audit-log", help="the server's audit JSONL (potstill serve --audit-log)")
    p.add_argument(
        "--prompts-log", help="JSONL of {prompt_sha256, text} (serve --monitor-log-prompts)"
    )
    p.add_argument("--calibration", help="calibration JSON; default: simulated benign traffic")
    p.add_argument("--embedder", default="auto", choices=("auto", "minilm", "hash"))
    p.add_argument("--out", help="also write the JSON report here")
    p.set_defaults(func=cmd_monitor, monitor_verb="scan")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``monitor`` verb to ``subparsers``."""
    m = subparsers.add_parser(
        "monitor", help="score API keys for systematic extraction (from an audit log)"
    )
    _add_scan_args(m)
    sub = m.add_subparsers(dest="monitor_verb", metavar="{scan,calibrate}")
    _add_scan_args(sub.add_parser("scan", help="replay an audit log (the default)"))
    c = sub.add_parser("calibrate", help="thresholds for a target false-positive rate")
    c.add_argument("--out", required=True, help="calibration JSON to write")
    c.add_argument("--embedder", default="auto", choices=("auto", "minilm", "hash"))
    c.add_argument("--window", type=int, default=50, help="requests per key window")
    c.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate per window")
    c.add_argument("--n-windows", type=int, default=1500, help="benign windows to calibrate on")
    c.add_argument(
        "--benign-prompts", help="your benign prompts (.jsonl or text); default simulated"
    )
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_monitor)


def add_serve_args(s: argparse.ArgumentParser) -> None:
    """The defense flags of ``potstill serve``."""
    p = s.add_argument_group("API policy (per key; violations answer 400)")
    p.add_argument("--max-top-logprobs", type=int, default=20, help="cap on top_logprobs/logprobs")
    p.add_argument("--max-n", type=int, default=16, help="cap on n (choices per prompt)")
    p.add_argument(
        "--logit-bias",
        choices=("ignore", "reject"),
        default="ignore",
        help="ignore: accept and drop logit_bias (default); reject: 400 when one is sent",
    )
    p.add_argument(
        "--key-policy",
        action="append",
        default=[],
        metavar="KEYID:max_top_logprobs=5,max_n=1",
        help="per-key override (repeatable); KEYID: the audit log's key id, or the key itself",
    )
    m = s.add_argument_group("extraction monitor")
    m.add_argument("--monitor", action="store_true", help="score every key's recent prompts")
    m.add_argument(
        "--monitor-action",
        choices=("flag", "throttle", "block"),
        default="flag",
        help="flagged keys: flag (list on /v1/monitor), throttle (429), block (403)",
    )
    m.add_argument("--monitor-calibration", help="calibration JSON (`potstill monitor calibrate`)")
    m.add_argument("--monitor-embedder", default="auto", choices=("auto", "minilm", "hash"))
    m.add_argument(
        "--monitor-cooldown",
        type=float,
        default=None,
        help="seconds until a flag lifts (default never)",
    )
    m.add_argument(
        "--monitor-admin-key",
        action="append",
        default=[],
        help="key allowed to read /v1/monitor (repeatable; default: any accepted key)",
    )
    m.add_argument(
        "--monitor-log-prompts",
        default=None,
        metavar="PATH",
        help="write {prompt_sha256, text} JSONL for `potstill monitor` (stores prompt text!)",
    )


def _load_calibration(path: str | None, embedder: Any) -> Any:
    from potstill.defend.monitor import Calibration, simulated_calibration

    if path:
        return Calibration.load(path)
    print("calibrating the monitor on simulated benign traffic...", file=sys.stderr)
    return simulated_calibration(embedder)


def _prompt_logger(path: str) -> Any:
    lock = threading.Lock()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fh = Path(path).open("a", encoding="utf-8")  # noqa: SIM115 (open for the server lifetime)

    def log(record: dict[str, Any], text: str) -> None:
        line = json.dumps({"prompt_sha256": record.get("prompt_sha256"), "text": text})
        with lock:
            fh.write(line + "\n")
            fh.flush()

    return log


def serve_hooks(args: argparse.Namespace, api_keys: tuple[str, ...]) -> dict[str, Any]:
    """``ServeSettings`` keyword arguments for the defense flags in ``args``."""
    from potstill.defend.policy import APIPolicy, KeyPolicy, make_admission, parse_key_policy

    default = KeyPolicy(args.max_top_logprobs, args.max_n, args.logit_bias)
    per_key = dict(parse_key_policy(s, default, api_keys) for s in args.key_policy)
    policy = APIPolicy(default, per_key)
    out: dict[str, Any] = {"monitor_admin_keys": tuple(args.monitor_admin_key)}
    observers = []
    monitor = None
    if args.monitor:
        from potstill.defend.embed import load_embedder
        from potstill.defend.monitor import ExtractionMonitor

        embedder = load_embedder(args.monitor_embedder)
        cal = _load_calibration(args.monitor_calibration, embedder)
        monitor = ExtractionMonitor(cal, embedder, cooldown_s=args.monitor_cooldown)
        observers.append(monitor.observe)
        out["monitor_view"] = monitor.snapshot
    if args.monitor_log_prompts:
        observers.append(_prompt_logger(args.monitor_log_prompts))
    if observers:
        from potstill.defend.background import BackgroundObserver

        def observe(record: dict[str, Any], text: str) -> None:
            for ob in observers:
                ob(record, text)

        # Embedding runs in a worker thread: on the event loop it would stall every stream.
        background = BackgroundObserver(observe)
        out["observer"] = background
        if monitor is not None:
            snapshot = monitor.snapshot
            out["monitor_view"] = lambda: {**snapshot(), "observer": background.stats()}
    out["admit"] = make_admission(policy, monitor, args.monitor_action)
    return out


def _read_prompt_texts(path: str | None) -> dict[str, str]:
    from potstill.core.errors import PotstillError

    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise PotstillError(
            f"--prompts-log {p} not found: write it with serve --monitor-log-prompts"
        )
    out = {}
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                obj = json.loads(line)
                out[obj["prompt_sha256"]] = obj["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise PotstillError(f"{p}:{i}: expected {{prompt_sha256, text}} ({exc})") from exc
    return out


def _scan(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from potstill.core.errors import PotstillError
    from potstill.defend.embed import load_embedder
    from potstill.defend.monitor import ExtractionMonitor

    if not args.audit_log or not Path(args.audit_log).is_file():
        raise PotstillError(
            f"--audit-log {args.audit_log} not found: pass the server's audit JSONL"
        )
    texts = _read_prompt_texts(args.prompts_log)
    embedder = load_embedder(args.embedder)
    monitor = ExtractionMonitor(_load_calibration(args.calibration, embedder), embedder)
    seen = skipped = 0
    for line in Path(args.audit_log).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("status") != 200 or rec.get("prompt_sha256") is None:
            continue
        text = texts.get(rec["prompt_sha256"])
        if text is None:
            skipped += 1
            continue
        seen += 1
        monitor.observe(rec, text)
    report = {**monitor.snapshot(), "requests_scored": seen, "requests_without_text": skipped}
    for k in report["keys"]:
        if k["flagged"]:
            print(f"FLAGGED key {k['key_id']}: {', '.join(k['flagged_by'])}", file=sys.stderr)
    if args.out:
        from potstill.core.io import atomic_write_json

        atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2, default=lambda o: asdict(o)))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import random

    from potstill.core.errors import PotstillError
    from potstill.defend.embed import load_embedder
    from potstill.defend.monitor import calibrate, simulated_calibration

    if args.window < 2 or args.n_windows < 1:
        raise PotstillError("--window must be >= 2 and --n-windows >= 1")
    embedder = load_embedder(args.embedder)
    if args.benign_prompts:
        from potstill.core.prompts import read_prompts

        prompts = [
            "\n".join(m["content"] for m in msgs) for msgs in read_prompts(args.benign_prompts)
        ]
        if len(prompts) < 3 * args.window:
            raise PotstillError(f"need >= {3 * args.window} benign prompts, got {len(prompts)}")
        rng = random.Random(args.seed)
        rng.shuffle(prompts)
        third = len(prompts) // 3
        rest = prompts[2 * third :]
        windows = [rng.sample(rest, min(args.window, len(rest))) for _ in range(args.n_windows)]
        cal = calibrate(
            embedder, prompts[:third], prompts[third : 2 * third], windows, fpr=args.fpr
        )
    else:
        cal = simulated_calibration(
            embedder, window=args.window, fpr=args.fpr, n_windows=args.n_windows, seed=args.seed
        )
    cal.save(args.out)
    print(f"wrote {args.out}: thresholds {cal.thresholds} ({cal.embedder})")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    return _calibrate(args) if args.monitor_verb == "calibrate" else _scan(args)
