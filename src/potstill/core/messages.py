"""Harvest store <-> conversational ``messages`` datasets (JSONL or Parquet).

One example per record::

    {"messages": [...prompt messages..., {"role": "assistant", "content": completion}],
     "logprobs": [per generated token: {"token", "logprob", "bytes", "top": [[tok, lp, bytes]]}]
                 or null,
     "metadata": {"key", "prompt_id", "prompt_idx", "sample", "model", "params",
                  "finish_reason", "usage", "latency_s"}}

In Parquet, ``messages`` is a native ``list<struct<role, content>>`` column (what Hugging Face
``datasets`` and TRL expect); ``logprobs`` and ``metadata`` are JSON strings (their nesting is
ragged). Examples are in the store's deterministic order (prompt_idx, sample, key), so reading
the store or its export gives the same training data. Files are written atomically.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from potstill.core import store as st
from potstill.core.errors import PotstillError
from potstill.core.io import atomic_write_bytes, atomic_write_text, jsonl_records

META_FIELDS = (
    "key",
    "prompt_id",
    "prompt_idx",
    "sample",
    "model",
    "params",
    "finish_reason",
    "usage",
    "latency_s",
)


def store_examples(store_path: str | Path) -> Iterator[dict[str, Any]]:
    """The store's records as ``messages`` examples (see module docstring)."""
    conn = st.connect(store_path, readonly=True)
    try:
        for r in st.iter_records(conn):
            yield {
                "messages": [*r["messages"], {"role": "assistant", "content": r["completion"]}],
                "logprobs": r["logprobs"],
                "metadata": {k: r[k] for k in META_FIELDS},
            }
    finally:
        conn.close()


def export_store(store_path: str | Path, out: str | Path) -> int:
    """Write the store as ``out`` (``.jsonl`` or ``.parquet``, chosen by suffix); returns #examples."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise PotstillError(f"--out {out}: use a .jsonl or .parquet file name")
    examples = list(store_examples(store_path))
    if suffix == ".jsonl":
        text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
        atomic_write_text(out, text)
        return len(examples)
    import pyarrow as pa
    import pyarrow.parquet as pq

    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table(
        {
            "messages": pa.array([e["messages"] for e in examples], type=msg_type),
            "logprobs": pa.array(
                [None if e["logprobs"] is None else json.dumps(e["logprobs"]) for e in examples],
                type=pa.string(),
            ),
            "metadata": pa.array([json.dumps(e["metadata"]) for e in examples], type=pa.string()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(out, buf.getvalue())
    return len(examples)


def _check_example(obj: Any, where: str) -> dict[str, Any]:
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    ok = (
        isinstance(msgs, list)
        and bool(msgs)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in msgs
        )
    )
    if not ok:
        raise PotstillError(
            f'{where}: no valid "messages" list; each example needs "messages": '
            '[{"role": ..., "content": ...}, ...] ending with an assistant turn'
        )
    lp = obj.get("logprobs")
    if isinstance(lp, str):
        lp = json.loads(lp)
    meta = obj.get("metadata")
    if isinstance(meta, str):
        meta = json.loads(meta)
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs or []]
    return {"messages": msgs, "logprobs": lp, "metadata": meta or {}}


def read_examples(path: str | Path) -> list[dict[str, Any]]:
    """Examples from a ``messages`` JSONL or Parquet file (an export, or any such dataset)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PotstillError(
            f"messages file {path} not found; export one with `potstill harvest export`"
        )
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return [_check_example(r, f"{path}: row {i}") for i, r in enumerate(rows)]
    if path.suffix.lower() != ".jsonl":
        raise PotstillError(f"messages file {path}: use a .jsonl or .parquet file")
    text = path.read_text(encoding="utf-8")
    return [
        _check_example(obj, f"{path}:{n}")
        for n, obj in jsonl_records(path, text, hint="one example per line")
    ]


__all__ = ["export_store", "read_examples", "store_examples"]
