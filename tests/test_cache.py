"""The offline teacher logit cache: codec, manifest, resume, refusal, training, DDP writing;
and the recipe's memory-bounded (chunked) loss path against the plain one."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from potstill.core.errors import PotstillError
from potstill.core.models import load_tokenizer
from potstill.core.tiny import build_tiny_model, build_tiny_tokenizer
from potstill.core.tokenizers import tokenizer_fingerprint
from potstill.distill.config import DistillConfig, load_config
from potstill.distill.teachers import cache as cache_mod
from potstill.distill.teachers.cache import (
    U8_STEP,
    CacheJob,
    LogitCache,
    decode_values,
    encode_values,
    open_cache_targets,
    reconstruction_kl,
    topk_logprobs,
    write_cache,
)
from potstill.distill.train.data import prepare_data
from potstill.distill.train.models import load_student, load_teacher
from potstill.distill.train.recipe import HiddenLM, micro_loss, run_distill

from .conftest import REPO, tiny_overrides

TINY = REPO / "configs" / "tiny.yaml"
TEACHER = "tiny:0:2x64"
DATA = "synthetic:0:20"  # ~190 blocks of 32 tokens: a few seconds of teacher time
SEQ = 32


def _job(out: Path, **kw: object) -> CacheJob:
    args: dict[str, object] = {
        "teacher": TEACHER, "data": DATA, "out": out, "k": 16, "seq_len": SEQ,
        "batch_size": 16, "shard_blocks": 48,
    }  # fmt: skip
    args.update(kw)
    return CacheJob(**args)  # type: ignore[arg-type]


def _quiet(_msg: str) -> None:
    return None


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    write_cache(_job(out), log=_quiet)
    return out


def _blocks(data: str = DATA) -> torch.Tensor:
    from potstill.distill.teachers.cache import build_blocks

    return build_blocks(data, build_tiny_tokenizer(), SEQ)[0]


# ----------------------------------------------------------------------------- codec


def test_u8_round_trip_error_bound() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 1000, generator=g) * 4.0  # peaked and flat rows alike
    ids, lp = topk_logprobs(logits, 64)
    ref_ids = torch.topk(logits, 64).indices
    assert torch.equal(ids, ref_ids)
    values, mass = encode_values(lp, "u8")
    assert values.dtype == np.uint8 and mass.dtype == np.float16
    dec = decode_values(values, mass, "u8")
    in_range = torch.from_numpy(values < 255)
    err = (dec - lp).abs()[in_range]
    # Rounding moves a log-prob by <= step/2; renormalising to the stored mass by <= step/2.
    assert float(err.max()) <= U8_STEP
    # Decoded probabilities keep the true top-k mass (float16 log-mass).
    torch.testing.assert_close(dec.exp().sum(-1), lp.exp().sum(-1), rtol=2e-3, atol=1e-6)
    # KL(true top-k+tail || decoded): second order in the error, far below step^2.
    kl_exact, _ = reconstruction_kl(logits[:64], 64, None)
    kl_u8, _ = reconstruction_kl(logits[:64], 64, "u8")
    assert 0.0 <= kl_u8 - kl_exact < U8_STEP**2 / 4
    # f32 is lossless.
    v32, m32 = encode_values(lp, "f32")
    assert torch.equal(decode_values(v32, m32, "f32"), lp)


def test_reconstruction_kl_closed_form() -> None:
    # Uniform over V: top-k plus a uniform tail reconstructs it exactly (KL = 0);
    # a two-level distribution with k covering the high level is exact too.
    assert reconstruction_kl(torch.zeros(3, 50), 5, None)[0] == pytest.approx(0.0, abs=1e-12)
    logits = torch.zeros(2, 40)
    logits[:, :4] = 3.0
    assert reconstruction_kl(logits, 4, None)[0] == pytest.approx(0.0, abs=1e-12)
    # k=1 on [a, b, c]: KL = sum p log p/q with q = [p0, (p1+p2)/2, (p1+p2)/2].
    x = torch.tensor([[2.0, 1.0, -1.0]])
    p = torch.softmax(x.double(), -1)[0]
    t = (p[1] + p[2]) / 2
    want = float(p[1] * (p[1] / t).log() + p[2] * (p[2] / t).log())
    assert reconstruction_kl(x, 1, None)[0] == pytest.approx(want, rel=1e-9)


# ----------------------------------------------------------------------------- writer/reader


def test_manifest_and_contents_match_the_teacher(cache_dir: Path) -> None:
    from potstill.distill.data import BlockDataset

    man = json.loads((cache_dir / "manifest.json").read_text())
    tok = build_tiny_tokenizer()
    blocks = _blocks()
    assert man["teacher"] == TEACHER and man["k"] == 16 and man["scheme"] == "u8"
    assert man["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert man["data_fingerprint"] == BlockDataset(blocks, torch.ones_like(blocks)).fingerprint()
    assert man["complete"] and man["n_blocks"] == blocks.shape[0] and man["seq_len"] == SEQ
    spans = [(s["start"], s["stop"]) for s in man["shards"]]
    assert spans[0][0] == 0 and spans[-1][1] == blocks.shape[0]
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert man["payload_bytes_per_token"] == 16 * 3 + 2
    # Rows decoded from the cache = the teacher's own top-k on those blocks.
    rows = torch.tensor([0, 47, 48, blocks.shape[0] - 1])
    ids, lp = LogitCache(cache_dir).read(rows)
    model = build_tiny_model(TEACHER).eval()
    with torch.no_grad():
        logits = model(input_ids=blocks[rows]).logits
    ref_ids, ref_lp = topk_logprobs(logits.reshape(-1, logits.shape[-1]), 16)
    assert ids.shape == (4, SEQ, 16) and ids.dtype == torch.long
    assert torch.equal(ids.reshape(-1, 16), ref_ids)
    assert float((lp.reshape(-1, 16) - ref_lp).abs().max()) <= U8_STEP


def test_resume_rewrites_only_missing_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "c"
    man = write_cache(_job(out), log=_quiet)
    shards = sorted((out / "shards").glob("shard_*.arrow"))
    before = {p.name: p.read_bytes() for p in shards}
    # A kill mid-run: the last shard never got renamed into place, a temp file is left,
    # and the manifest says incomplete.
    shards[-1].unlink()
    (out / "shards" / f".{shards[-1].name}.999.tmp").write_bytes(b"torn")
    man["complete"] = False
    man["shards"] = man["shards"][:-1]
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(PotstillError, match="incomplete"):
        LogitCache(out)
    written: list[str] = []
    real = cache_mod._write_shard

    def counting(path: Path, *a: object) -> None:
        written.append(path.name)
        real(path, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_mod, "_write_shard", counting)
    man2 = write_cache(_job(out), log=_quiet)
    assert written == [shards[-1].name]
    assert man2["complete"] and len(man2["shards"]) == len(shards)
    assert not list((out / "shards").glob(".*.tmp"))
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("shard_*.arrow")} == before
    with pytest.raises(PotstillError, match="other settings"):
        write_cache(_job(out, k=8), log=_quiet)


def test_refuses_mismatched_data_tokenizer_or_seq_len(cache_dir: Path) -> None:
    from potstill.distill.data import BlockDataset

    tok = build_tiny_tokenizer()
    fp = json.loads((cache_dir / "manifest.json").read_text())["data_fingerprint"]
    targets = open_cache_targets(str(cache_dir), fingerprint=fp, tokenizer=tok, seq_len=SEQ)
    assert targets.lookup(torch.tensor([3]))[0].shape == (1, SEQ, 16)
    other = _blocks("synthetic:5:20")
    other_fp = BlockDataset(other, torch.ones_like(other)).fingerprint()
    with pytest.raises(PotstillError, match="other training blocks"):
        open_cache_targets(str(cache_dir), fingerprint=other_fp, tokenizer=tok, seq_len=SEQ)
    with pytest.raises(PotstillError, match="seq_len"):
        open_cache_targets(str(cache_dir), fingerprint=fp, tokenizer=tok, seq_len=64)
    tok2 = build_tiny_tokenizer()
    tok2.add_tokens(["<extra-token>"])
    with pytest.raises(PotstillError, match="tokenizer"):
        open_cache_targets(str(cache_dir), fingerprint=fp, tokenizer=tok2, seq_len=SEQ)
    with pytest.raises(PotstillError, match="not a logit cache"):
        open_cache_targets(str(cache_dir / "nope"), fingerprint=fp, tokenizer=tok, seq_len=SEQ)


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from potstill.cli import main

    argv = ["cache-logits", "--teacher", TEACHER, "--data", DATA, "--out", str(tmp_path / "x")]
    assert main([*argv, "--top-k", "100000", "--seq-len", str(SEQ)]) == 2
    assert "--top-k" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _cfg(out: Path, **extra: object) -> DistillConfig:
    items = {"data.train": DATA, "train.eval_every": 0, "train.save_every": 0, **extra}
    return load_config(DistillConfig, TINY, tiny_overrides(out, **items))


def test_distill_from_cache_trains(cache_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run", **{"teacher.spec": f"cache:{cache_dir}", "train.steps": 12})
    losses = _losses(run_distill(cfg, show_progress=False))
    assert len(losses) == 12 and losses[-1] < losses[0] * 0.9
    # The same run on other data is refused before anything is written.
    bad = _cfg(
        tmp_path / "bad", **{"teacher.spec": f"cache:{cache_dir}", "data.train": "synthetic:3:20"}
    )
    with pytest.raises(PotstillError, match="other training blocks"):
        run_distill(bad, show_progress=False)
    assert not (tmp_path / "bad").exists()


def test_temperature_on_sparse_targets_is_refused(
    cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Top-k targets are at T=1 and their tail cannot be tempered: T=2 is exit 2, one line,
    nothing written. The same T=2 with the online teacher (full logits) is a valid run."""
    from potstill.cli import main

    items = {"data.train": DATA, "train.steps": 2, "loss.ce_weight": 0.5, "loss.temperature": 2.0}
    argv = ["distill", "--config", str(TINY), "--no-progress"]
    sparse = tiny_overrides(tmp_path / "sparse", **items, **{"teacher.spec": f"cache:{cache_dir}"})
    assert main([*argv, *sparse]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss.temperature=2.0" in err[0] and "loss.temperature=1.0" in err[0]
    assert not (tmp_path / "sparse").exists()
    online = tiny_overrides(tmp_path / "online", **items, **{"teacher.spec": TEACHER})
    assert main([*argv, *online]) == 0


def test_full_vocab_cache_equals_online_forward_kl(tmp_path: Path) -> None:
    # k = V with lossless values: the sparse KD is the full forward KL, so the first steps of a
    # cached run log the online run's losses (the teacher pass is batched differently: fp32 noise).
    tok = build_tiny_tokenizer()
    from potstill.core.tiny import padded_vocab_size

    vocab = padded_vocab_size(len(tok))
    out = tmp_path / "full"
    write_cache(_job(out, k=vocab, scheme="f32", shard_blocks=200), log=_quiet)
    common = {"train.steps": 3, "loss.ce_weight": 0.25}
    cached = _losses(
        run_distill(
            _cfg(tmp_path / "a", **{"teacher.spec": f"cache:{out}"}, **common), show_progress=False
        )
    )
    online = _losses(run_distill(_cfg(tmp_path / "b", **common), show_progress=False))
    for a, b in zip(cached, online, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_process_cache_equals_one_process(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("accelerate")
    two = tmp_path / "two"
    cmd = [
        str(exe), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "potstill.cli", "cache-logits", "--teacher", TEACHER, "--data", DATA, "--out", str(two),
        "--top-k", "16", "--seq-len", str(SEQ), "--batch-size", "16", "--shard-blocks", "48",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The run was really split: rank 0 wrote every other shard (only rank 0 logs). Each
    # process alone would also write a complete cache, racing the other over the same files.
    assert "[rank 0] shard 1/4" in proc.stdout and "[rank 0] shard 3/4" in proc.stdout
    assert "shard 2/4" not in proc.stdout and "shard 4/4" not in proc.stdout, proc.stdout
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same kernels as the launched processes
    try:
        one = tmp_path / "one"
        write_cache(_job(one), log=_quiet)
    finally:
        torch.set_num_threads(threads)
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m2["complete"] and [s["start"] for s in m2["shards"]] == [
        s["start"] for s in m1["shards"]
    ]
    c1, c2 = LogitCache(one), LogitCache(two)
    rows = torch.arange(len(c1))
    ids1, lp1 = c1.read(rows)
    ids2, lp2 = c2.read(rows)
    assert torch.equal(ids1, ids2)
    torch.testing.assert_close(lp1, lp2, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- chunked path


def test_chunked_micro_loss_equals_unchunked(tmp_path: Path) -> None:
    """Recipe level: loss.chunk_tokens gives the plain path's loss and gradients."""

    results = []
    for chunk in (None, 13):
        cfg = _cfg(
            tmp_path / "c",
            **{
                "loss.chunk_tokens": chunk or "null",
                "loss.ce_weight": 0.3,
                "loss.temperature": 2.0,
            },
        )
        tok = load_tokenizer(TEACHER)
        data = prepare_data(cfg, tok, world_size=1)
        student = load_student(cfg, tok)
        teacher = load_teacher(cfg, tok, student.get_output_embeddings().weight.shape[0])
        model = HiddenLM(student)
        terms = micro_loss(model, teacher, data.micro_batch(0, 0), cfg)
        terms.total.backward()
        results.append((torch.stack([t.detach() for t in terms]),
                        {k: p.grad.clone() for k, p in model.named_parameters()}))  # fmt: skip
    (l0, g0), (l1, g1) = results
    # total, CE and KD each: the chunked path sums its terms over chunks as the loss itself
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)


def test_batch_topk_targets_win_over_the_online_teacher_when_chunked(tmp_path: Path) -> None:
    """The documented order holds with loss.chunk_tokens too: top-k targets carried by the
    batch are the teacher signal, not the online teacher's full logits (which the chunked
    path used to take whenever a teacher was loaded)."""

    losses = []
    for chunk, online in ((None, False), (13, True), (13, False)):
        cfg = _cfg(tmp_path / "k", **{"loss.chunk_tokens": chunk or "null", "loss.ce_weight": 0.3})
        tok = load_tokenizer(TEACHER)
        batch = dict(prepare_data(cfg, tok, world_size=1).micro_batch(0, 0))
        student = load_student(cfg, tok)
        teacher = load_teacher(cfg, tok, student.get_output_embeddings().weight.shape[0])
        with torch.no_grad():  # sparse targets: the teacher's own top 4, as a cache would hold
            lp = torch.log_softmax(
                teacher.logits(batch["input_ids"], batch["attention_mask"]).float(), -1
            )
        batch["topk_logprobs"], batch["topk_ids"] = lp.topk(4, dim=-1)
        terms = micro_loss(HiddenLM(student), teacher if online else None, batch, cfg)
        losses.append(torch.stack([t.detach() for t in terms]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[2], losses[0], rtol=1e-5, atol=1e-5)
