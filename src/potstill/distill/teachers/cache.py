"""An offline teacher logit cache: run the teacher once, train from its top-k many times.

Layout of a cache directory::

    DIR/manifest.json            what was cached and which shards are complete
    DIR/shards/shard_00000.arrow  Arrow IPC file, one row per training block
    ...

Shard ``i`` holds blocks ``[i * shard_blocks, min((i+1) * shard_blocks, n_blocks))`` in
the order :func:`potstill.distill.train.data.prepare_data` builds them (packed blocks of
``seq_len`` tokens), so a training row index maps to a shard and a row without any
search. Each shard row has three fixed-size binary columns for the ``T`` positions of
one block:

* ``ids``: the teacher's top-``K`` token ids, ``uint16`` (``uint32`` if ``V > 65536``);
* ``values``: the top-``K`` log-probabilities, compressed by the cache's *scheme*;
* ``mass``: ``log(sum of the top-K probabilities)`` per position (the tail mass is
  ``1 - exp(mass)``), so the reconstruction keeps the exact tail.

Schemes (``manifest["scheme"]``):

* ``u8`` (default): ``code_i = round((lp_0 - lp_i) / step)`` clipped to 255, one byte
  per entry, ``step = 1/16`` nat (range 15.9 nats below the top token), ``mass`` as
  float16. Decoding renormalises ``exp(-code * step)`` to the stored top-k mass, so a
  decoded log-prob is within ``step`` of the true one for codes < 255 (measured in
  tests/test_cache.py). At ``K = 64`` and ``V <= 65536``: 64*2 + 64 + 2 = 194 bytes/token.
* ``f32``: raw float32 log-probs and mass (lossless; for references and tests).

Shards are written to a temp file and renamed, so a shard file that exists is
complete; a killed run resumes at the first missing shard. Under ``accelerate
launch`` process ``r`` of ``P`` writes shards ``r, r+P, ...``; process 0 owns the
manifest. Readers memory-map the shard files and decode only the rows asked for.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from potstill.core.errors import PotstillError
from potstill.core.io import atomic_write_json
from potstill.core.tokenizers import logit_width

FORMAT = "potstill-logit-cache/1"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
U8_STEP = 1.0 / 16.0  # nats per code: max in-range decode error <= step (see module doc)
SCHEMES = ("u8", "f32")

__all__ = [
    "FORMAT",
    "SCHEMES",
    "U8_STEP",
    "CacheTargets",
    "LogitCache",
    "decode_values",
    "encode_values",
    "open_cache_targets",
    "read_manifest",
    "reconstruction_kl",
    "topk_logprobs",
    "write_cache",
]


# ----------------------------------------------------------------------------- codec


def topk_logprobs(logits: Tensor, k: int, *, chunk_rows: int = 2048) -> tuple[Tensor, Tensor]:
    """Top-``k`` ids ``[N, k]`` int64 and fp32 log-probs ``[N, k]`` of ``logits [N, V]``.

    Rows are processed ``chunk_rows`` at a time so the fp32 log-softmax never holds
    more than ``chunk_rows * V`` floats (teacher logits may be bf16).
    """
    ids_out, lp_out = [], []
    for part in logits.split(chunk_rows):
        lp = torch.log_softmax(part.float(), dim=-1)
        vals, ids = torch.topk(lp, k, dim=-1)
        ids_out.append(ids)
        lp_out.append(vals)
    return torch.cat(ids_out), torch.cat(lp_out)


def encode_values(logprobs: Tensor, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """Compress sorted (descending) top-k log-probs ``[N, K]`` fp32.

    Returns ``(values, mass)``: ``u8`` codes ``[N, K]`` and float16 ``log(top-k mass)``
    ``[N]`` for scheme ``u8``; float32 copies for ``f32``.
    """
    lp = logprobs.detach().float()
    mass = torch.logsumexp(lp, dim=-1).clamp_max(0.0)
    if scheme == "f32":
        return lp.cpu().numpy().astype(np.float32), mass.cpu().numpy().astype(np.float32)
    if scheme != "u8":
        raise PotstillError(f"unknown cache scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    delta = (lp[:, :1] - lp) / U8_STEP
    codes = torch.round(delta).clamp(0, 255).to(torch.uint8)
    return codes.cpu().numpy(), mass.cpu().numpy().astype(np.float16)


def decode_values(values: np.ndarray, mass: np.ndarray, scheme: str) -> Tensor:
    """Inverse of :func:`encode_values`: fp32 log-probs ``[..., K]`` from ``values [..., K]``
    and ``mass [...]``; for ``u8`` the decoded probabilities sum to ``exp(mass)``."""
    if scheme == "f32":
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    rel = -torch.from_numpy(values.astype(np.float32)) * U8_STEP
    m = torch.from_numpy(mass.astype(np.float32)).unsqueeze(-1)
    return rel - torch.logsumexp(rel, dim=-1, keepdim=True) + m


def reconstruction_kl(logits: Tensor, k: int, scheme: str | None = "u8") -> tuple[float, float]:
    """KL(p_teacher || q) in nats/token (mean, max) for ``logits [N, V]``.

    ``q`` is what a cache at ``k`` keeps: the top-k log-probs (decoded from ``scheme``;
    ``None`` = exact, to isolate the truncation error) and the tail mass spread
    uniformly over the other ``V - k`` tokens. Computed in float64.
    """
    logp = torch.log_softmax(logits.double(), dim=-1)
    vocab = logp.shape[-1]
    lp, ids = torch.topk(logp, k, dim=-1)
    if scheme is not None:
        v, m = encode_values(lp.float(), scheme)
        lp = decode_values(v, m, scheme).double()
    tail = (1.0 - lp.exp().sum(-1)).clamp_min(0.0)
    log_q = torch.full_like(logp, 0.0)
    log_q += (tail / max(vocab - k, 1)).clamp_min(1e-300).log().unsqueeze(-1)
    log_q.scatter_(-1, ids, lp)
    kl = (logp.exp() * (logp - log_q)).sum(-1)
    return float(kl.mean()), float(kl.max())


# ----------------------------------------------------------------------------- manifest


def _id_dtype(vocab: int) -> np.dtype[Any]:
    return np.dtype(np.uint16) if vocab <= 65536 else np.dtype(np.uint32)


def bytes_per_token(k: int, vocab: int, scheme: str) -> int:
    """Payload bytes per cached token (ids + values + mass), excluding file framing."""
    vbytes, mbytes = (1, 2) if scheme == "u8" else (4, 4)
    return k * (_id_dtype(vocab).itemsize + vbytes) + mbytes


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of cache directory ``path``; PotstillError if there is none."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise PotstillError(
            f"{path} is not a logit cache (no {MANIFEST}); build one with "
            "`potstill cache-logits --teacher T --data D --out DIR`"
        )
    man: dict[str, Any] = json.loads(p.read_text())
    if man.get("format") != FORMAT:
        raise PotstillError(
            f"{p} has format {man.get('format')!r}, expected {FORMAT!r}; rebuild the cache "
            "with this potstill version"
        )
    return man


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.arrow"


def _shard_range(i: int, shard_blocks: int, n_blocks: int) -> tuple[int, int]:
    return i * shard_blocks, min((i + 1) * shard_blocks, n_blocks)


# ----------------------------------------------------------------------------- writer

# Fields that must agree for a run to resume into an existing cache directory.
_HEADER_KEYS = (
    "format",
    "teacher",
    "tokenizer_fingerprint",
    "data",
    "data_fingerprint",
    "seq_len",
    "n_blocks",
    "k",
    "vocab_size",
    "scheme",
    "u8_step",
    "shard_blocks",
    "teacher_dtype",
)


@dataclass
class CacheJob:
    """What to cache; the header of the manifest is derived from it and the data."""

    teacher: str
    data: str
    out: Path
    k: int = 64
    seq_len: int = 256
    batch_size: int = 8
    shard_blocks: int = 256
    scheme: str = "u8"
    bf16: bool = False


def build_blocks(data: str, tokenizer: Any, seq_len: int) -> tuple[Tensor, str]:
    """Packed blocks ``[N, seq_len]`` of ``data`` exactly as prepare_data builds them, and
    their fingerprint (``BlockDataset(blocks, ones).fingerprint()``)."""
    from potstill.distill.data import BlockDataset, load_texts, pack_sequences, tokenize_texts

    blocks = pack_sequences(tokenize_texts(load_texts(data), tokenizer), seq_len)
    return blocks, BlockDataset(blocks, torch.ones_like(blocks)).fingerprint()


def _check_resume(out: Path, header: dict[str, Any]) -> None:
    if not (out / MANIFEST).is_file():
        if (out / SHARD_DIR).is_dir() and any((out / SHARD_DIR).glob("shard_*.arrow")):
            raise PotstillError(
                f"{out} holds shards but no manifest; remove the folder or pick another --out"
            )
        return
    old = json.loads((out / MANIFEST).read_text())
    diff = [k for k in _HEADER_KEYS if old.get(k) != header.get(k)]
    if diff:
        names = ", ".join(f"{k} ({old.get(k)!r} != {header.get(k)!r})" for k in diff[:3])
        raise PotstillError(
            f"{out} holds a logit cache made with other settings: {names}; "
            "pass the same settings to resume it, or choose a new --out"
        )


def _complete_shards(out: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    """The shard files on disk (each complete: they are renamed into place), in order."""
    n_shards = math.ceil(header["n_blocks"] / header["shard_blocks"])
    done = []
    for i in range(n_shards):
        f = out / SHARD_DIR / _shard_name(i)
        if f.is_file():
            start, stop = _shard_range(i, header["shard_blocks"], header["n_blocks"])
            done.append(
                {
                    "index": i,
                    "file": f"{SHARD_DIR}/{f.name}",
                    "start": start,
                    "stop": stop,
                    "bytes": f.stat().st_size,
                }
            )
    return done


def _write_manifest(out: Path, header: dict[str, Any], *, final: bool) -> dict[str, Any]:
    shards = _complete_shards(out, header)
    n_shards = math.ceil(header["n_blocks"] / header["shard_blocks"])
    man = {
        **header,
        "n_shards": n_shards,
        "complete": final and len(shards) == n_shards,
        "shards": shards,
        "payload_bytes_per_token": bytes_per_token(
            header["k"], header["vocab_size"], header["scheme"]
        ),
        "file_bytes_per_token": sum(s["bytes"] for s in shards)
        / max(1, sum(s["stop"] - s["start"] for s in shards) * header["seq_len"]),
    }
    atomic_write_json(out / MANIFEST, man)
    return man


def _write_shard(
    path: Path, ids: np.ndarray, values: np.ndarray, mass: np.ndarray, rows_per_batch: int
) -> None:
    """One Arrow IPC file, rows = blocks; ``ids``/``values`` ``[n, T, K]``, ``mass [n, T]``.
    Written to a temp file and renamed (a shard file that exists is complete)."""
    import pyarrow as pa

    n = ids.shape[0]
    cols = {"ids": ids, "values": values, "mass": mass}
    schema = pa.schema([(name, pa.binary(arr[0].nbytes)) for name, arr in cols.items()])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for s in range(0, n, rows_per_batch):
            arrays = [
                pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(arr[0].nbytes),
                    len(arr[s : s + rows_per_batch]),
                    [None, pa.py_buffer(np.ascontiguousarray(arr[s : s + rows_per_batch]))],
                )
                for arr in cols.values()
            ]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _teacher_rows(
    model: Any, blocks: Tensor, vocab: int, k: int, scheme: str, bf16: bool, device: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher top-k of a batch of blocks ``[b, T]`` -> ids/values ``[b,T,K]``, mass ``[b,T]``."""
    b, t = blocks.shape
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        logits = model(input_ids=blocks.to(device), use_cache=False).logits
    ids, lp = topk_logprobs(logits[..., :vocab].reshape(b * t, -1), k)
    values, mass = encode_values(lp, scheme)
    ids_np = ids.cpu().numpy().astype(_id_dtype(vocab))
    return ids_np.reshape(b, t, k), values.reshape(b, t, k), mass.reshape(b, t)


def _process_state() -> Any:
    """This launch's process (index, count, device). PartialState, unlike Accelerator, does
    not read ACCELERATE_USE_CPU itself: without it, CPU processes under `accelerate launch`
    each ran alone, wrote every shard and raced over the same files."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def write_cache(job: CacheJob, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the teacher over ``job.data`` once and write the cache; returns the manifest.

    Resumes an interrupted run in ``job.out`` shard by shard (same settings required).
    Under ``accelerate launch`` every process writes its own shards.
    """
    from potstill.core.models import load_model
    from potstill.core.tiny import padded_vocab_size
    from potstill.core.tokenizers import tokenizer_fingerprint

    if job.scheme not in SCHEMES:
        raise PotstillError(f"unknown --values {job.scheme!r}; use one of {', '.join(SCHEMES)}")
    state = _process_state()
    model, tok = load_model(job.teacher)
    model = model.eval().requires_grad_(False).to(state.device)
    model_vocab = logit_width(model)
    # Cut to the width a scratch student built from this tokenizer has, so cached ids
    # always index the student's logits (real models: equal to len(tokenizer) or more).
    vocab = min(model_vocab, padded_vocab_size(len(tok)))
    if not 1 <= job.k <= vocab:
        raise PotstillError(f"--top-k {job.k} must be in 1..{vocab} (the teacher's vocabulary)")
    blocks, fp = build_blocks(job.data, tok, job.seq_len)
    header: dict[str, Any] = {
        "format": FORMAT,
        "teacher": job.teacher,
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "data": job.data,
        "data_fingerprint": fp,
        "seq_len": job.seq_len,
        "n_blocks": int(blocks.shape[0]),
        "k": job.k,
        "vocab_size": vocab,
        "scheme": job.scheme,
        "u8_step": U8_STEP if job.scheme == "u8" else None,
        "id_dtype": _id_dtype(vocab).name,
        "shard_blocks": job.shard_blocks,
        "teacher_dtype": "bf16-autocast" if job.bf16 else "float32",
    }
    out = job.out
    _check_resume(out, header)  # every process checks before anyone writes
    state.wait_for_everyone()
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        for stale in (out / SHARD_DIR).glob(".shard_*.tmp"):  # left by a killed run
            stale.unlink(missing_ok=True)
        _write_manifest(out, header, final=False)
    state.wait_for_everyone()
    n_shards = math.ceil(header["n_blocks"] / job.shard_blocks)
    mine = range(state.process_index, n_shards, state.num_processes)
    for i in mine:
        path = out / SHARD_DIR / _shard_name(i)
        if path.is_file():
            continue  # done by an earlier (killed) run
        start, stop = _shard_range(i, job.shard_blocks, header["n_blocks"])
        parts = [
            _teacher_rows(
                model,
                blocks[s : min(s + job.batch_size, stop)],
                vocab,
                job.k,
                job.scheme,
                job.bf16,
                state.device,
            )
            for s in range(start, stop, job.batch_size)
        ]
        ids, values, mass = (np.concatenate(x) for x in zip(*parts, strict=True))
        _write_shard(path, ids, values, mass, job.batch_size)
        if state.is_main_process:
            _write_manifest(out, header, final=False)
        log(f"[rank {state.process_index}] shard {i + 1}/{n_shards}: blocks {start}..{stop}")
    state.wait_for_everyone()
    man = json.loads((out / MANIFEST).read_text())
    if state.is_main_process:
        man = _write_manifest(out, header, final=True)
    state.wait_for_everyone()
    return man


# ----------------------------------------------------------------------------- reader


class LogitCache:
    """Read access to a complete cache: rows are decoded on demand from memory-mapped
    shard files, so the cache is never loaded into memory as a whole."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = man = read_manifest(path)
        if not man.get("complete"):
            done, total = len(man.get("shards", [])), man.get("n_shards")
            raise PotstillError(
                f"logit cache {path} is incomplete ({done}/{total} shards); rerun the same "
                "`potstill cache-logits` command to resume it"
            )
        self.k = int(man["k"])
        self.seq_len = int(man["seq_len"])
        self.scheme = str(man["scheme"])
        self.id_dtype = np.dtype(man["id_dtype"])
        self._starts = [int(s["start"]) for s in man["shards"]]
        self._readers: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.manifest["n_blocks"])

    def _reader(self, shard: int) -> tuple[Any, list[int]]:
        if shard not in self._readers:
            import pyarrow as pa

            f = self.path / self.manifest["shards"][shard]["file"]
            if not f.is_file():
                raise PotstillError(f"logit cache shard {f} is missing; rebuild the cache")
            reader = pa.ipc.open_file(pa.memory_map(str(f), "r"))
            sizes = [reader.get_batch(b).num_rows for b in range(reader.num_record_batches)]
            self._readers[shard] = (reader, np.cumsum([0, *sizes]).tolist())
        return self._readers[shard]

    def _row(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for a cache of {len(self)} blocks")
        shard = bisect.bisect_right(self._starts, row) - 1
        reader, offsets = self._reader(shard)
        local = row - self._starts[shard]
        b = bisect.bisect_right(offsets, local) - 1
        batch = reader.get_batch(b)  # zero-copy view into the memory map
        i = local - offsets[b]
        t, k = self.seq_len, self.k
        vdt = np.uint8 if self.scheme == "u8" else np.float32
        mdt = np.float16 if self.scheme == "u8" else np.float32
        return (
            _fixed(batch.column("ids"), i, self.id_dtype).reshape(t, k),
            _fixed(batch.column("values"), i, vdt).reshape(t, k),
            _fixed(batch.column("mass"), i, mdt).reshape(t),
        )

    def read(self, rows: Tensor | list[int]) -> tuple[Tensor, Tensor]:
        """rows ``[b]`` -> (ids ``[b,T,K]`` int64, log-probs ``[b,T,K]`` float32)."""
        parts = [self._row(int(r)) for r in rows]
        ids = np.stack([p[0] for p in parts]).astype(np.int64)
        values = np.stack([p[1] for p in parts])
        mass = np.stack([p[2] for p in parts])
        return torch.from_numpy(ids), decode_values(values, mass, self.scheme)


def _fixed(col: Any, i: int, dtype: Any) -> np.ndarray:
    """Row ``i`` of a FixedSizeBinary column as a numpy view (no copy of the column)."""
    width = col.type.byte_width
    buf = col.buffers()[1]
    start = (col.offset + i) * width
    return np.frombuffer(buf, dtype=np.uint8, count=width, offset=start).view(dtype)


class CacheTargets:
    """The :class:`potstill.distill.train.data.SparseTargets` of a logit cache."""

    def __init__(self, cache: LogitCache) -> None:
        self.cache = cache

    def lookup(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.read(rows)


def open_cache_targets(
    path: str | Path, *, fingerprint: str, tokenizer: Any, seq_len: int
) -> CacheTargets:
    """Open the cache at ``path`` for a run whose blocks have ``fingerprint``.

    PotstillError when the cache is incomplete or was made with another tokenizer,
    another ``seq_len`` or other data than the run's.
    """
    from potstill.core.tokenizers import tokenizer_fingerprint

    cache = LogitCache(path)
    man = cache.manifest
    if man["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise PotstillError(
            f"logit cache {path} was made with the tokenizer of {man['teacher']!r}, which differs "
            "from the run's tokenizer; drop student.tokenizer (it defaults to the cache's teacher) "
            "or rebuild the cache with the run's tokenizer"
        )
    if int(man["seq_len"]) != seq_len:
        raise PotstillError(
            f"logit cache {path} has seq_len={man['seq_len']} but data.seq_len={seq_len}; "
            f"set data.seq_len={man['seq_len']} or rebuild the cache with --seq-len {seq_len}"
        )
    if man["data_fingerprint"] != fingerprint:
        raise PotstillError(
            f"logit cache {path} covers other training blocks (data {man['data']!r}, fingerprint "
            f"{man['data_fingerprint'][:12]}…) than data.train (fingerprint {fingerprint[:12]}…); "
            f"set data.train={man['data']} with data.packing=true, or rebuild the cache for this data"
        )
    return CacheTargets(cache)
