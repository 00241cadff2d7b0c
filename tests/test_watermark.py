"""Watermarks: exact tails, keys, KGW/Gumbel processors, single-text detection, null calibration."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import stat
from pathlib import Path

import pytest
import torch
from scipy import stats

from potstill.cli import main
from potstill.core.errors import PotstillError
from potstill.core.watermark import (
    GumbelProcessor,
    KGWProcessor,
    WatermarkKey,
    WatermarkParams,
    binomial_tail,
    detect_gumbel,
    detect_kgw,
    detect_text,
    gamma_tail,
    generate_ids,
    key_from_env,
    load_key,
    z_score,
)
from potstill.core.watermark.detect import text_tuples, tuple_scores
from potstill.core.watermark.prf import _fmix32

KEY = WatermarkKey(bytes(range(32)))
PRINTABLE = list(range(32, 127))  # printable ASCII = tiny-tokenizer ids: text round-trips


def rand_key(i: int) -> WatermarkKey:
    return WatermarkKey(random.Random(10_000 + i).randbytes(32))


def clean_ids(n: int, seed: int = 0) -> list[int]:
    """Key-independent 'clean' text: random printable bytes."""
    rng = random.Random(seed)
    return [rng.choice(PRINTABLE) for _ in range(n)]


def binom_interval(n: int, p: float, level: float = 0.99) -> tuple[int, int]:
    lo, hi = stats.binom.interval(level, n, p)
    return int(lo), int(hi)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    # The tiny models are latency-bound: extra threads only contend on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    from potstill.core.models import load_model

    return load_model("tiny:0")


# ---------------------------------------------------------------- exact tails


def test_binomial_tail_is_exact() -> None:
    cases = [(1, 0), (1, 1), (10, 0), (10, 3), (10, 10), (200, 50), (200, 120), (5000, 1400)]
    cases += [(n, s) for n in (7, 64, 513) for s in range(0, n + 1, max(1, n // 9))]
    for gamma in (0.1, 0.25, 0.5, 0.9):
        for n, s in cases:
            want = stats.binom.sf(s - 1, n, gamma)
            got = binomial_tail(s, n, gamma)
            assert got == pytest.approx(want, rel=1e-9, abs=1e-300), (n, s, gamma)
    assert binomial_tail(0, 50, 0.25) == 1.0
    assert binomial_tail(200, 200, 0.25) == pytest.approx(0.25**200, rel=1e-9)
    with pytest.raises(ValueError):
        binomial_tail(11, 10, 0.25)


def test_gamma_tail_is_exact() -> None:
    for n in (1, 2, 5, 50, 200, 3000):
        for s in (0.0, 0.5 * n, n - math.sqrt(n), float(n), n + 3 * math.sqrt(n), 3.0 * n):
            want = stats.gamma.sf(s, n)
            assert gamma_tail(s, n) == pytest.approx(want, rel=1e-9, abs=1e-300), (n, s)
    assert gamma_tail(0.0, 10) == 1.0
    assert gamma_tail(1.0, 1) == pytest.approx(math.exp(-1.0), rel=1e-12)


def test_z_score_formula() -> None:
    assert z_score(40, 100, 0.25) == pytest.approx(15 / math.sqrt(18.75), rel=1e-12)
    assert z_score(25, 100, 0.25) == 0.0
    assert z_score(0, 16, 0.5) == pytest.approx(-4.0)


# ---------------------------------------------------------------- keys


def test_key_file_hex_raw_and_errors(tmp_path: Path) -> None:
    secret = os.urandom(24)
    (tmp_path / "hex").write_text(secret.hex() + "\n")
    (tmp_path / "raw").write_bytes(b"\x00\xff" + secret)
    assert load_key(tmp_path / "hex") == WatermarkKey(secret)
    assert load_key(tmp_path / "raw") == WatermarkKey(b"\x00\xff" + secret)
    key = load_key(tmp_path / "hex")
    assert key.key_id == hashlib.sha256(secret).hexdigest()[:8]
    assert secret.hex() not in repr(key) and secret.hex() not in str(key)
    assert key.key_id in repr(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)

    (tmp_path / "short").write_text("00112233445566778899aabbccddee\n")  # 15 bytes
    with pytest.raises(PotstillError, match=r"short holds 15 key bytes, need >= 16"):
        load_key(tmp_path / "short")
    with pytest.raises(PotstillError, match=r"missing.*does not exist"):
        load_key(tmp_path / "missing")
    with pytest.raises(PotstillError, match="not a regular file"):
        load_key(tmp_path)


def test_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POTSTILL_WATERMARK_KEY", raising=False)
    assert key_from_env() is None
    monkeypatch.setenv("POTSTILL_WATERMARK_KEY", bytes(range(32)).hex())
    assert key_from_env() == KEY
    monkeypatch.setenv("POTSTILL_WATERMARK_KEY", "abcd")
    with pytest.raises(PotstillError, match="POTSTILL_WATERMARK_KEY holds 2 key bytes"):
        key_from_env()


def test_keygen_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "wm.key"
    assert main(["audit", "keygen", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = load_key(out)
    assert key.key_id in printed and out.read_text().strip() not in printed
    assert len(bytes.fromhex(out.read_text())) == 32
    assert [p.name for p in out.parent.iterdir()] == ["wm.key"]  # no temp file left
    assert main(["audit", "keygen", "--out", str(out)]) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().err
    assert load_key(out) == key
    assert main(["audit", "keygen", "--out", str(out), "--force"]) == 0
    assert load_key(out) != key


# ---------------------------------------------------------------- keyed hash and KGW


def _lowbias32(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_integer_hash_matches_reference_without_overflow() -> None:
    rng = random.Random(1)
    xs = [0, 1, 2**31 - 1, 2**31, 2**32 - 1] + [rng.getrandbits(32) for _ in range(5000)]
    assert _fmix32(torch.tensor(xs)).tolist() == [_lowbias32(x) for x in xs]


@pytest.mark.parametrize("form", ["hash32_below", "_below_wrapping", "_below_exact"])
@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.9])
def test_whole_green_lists_equal_the_reference_hash(form: str, gamma: float) -> None:
    """Both whole-vocabulary paths (wrapping int32, exact int64) and the dispatch between them
    give the bits of the pure-Python lowbias32 reference, for an odd number of seeds (a partial
    last chunk), edge words, a vocabulary with a scalar tail and thresholds either side of
    2^31 (the signed/unsigned boundary of the int32 compare)."""
    from potstill.core.watermark import prf

    rng = random.Random(2)
    words = [(0, 0), (2**32 - 1, 2**32 - 1), (2**31, 2**31 - 1)] + [
        (rng.getrandbits(32), rng.getrandbits(32)) for _ in range(2)
    ]
    vocab = 1013
    threshold = round(gamma * 2**32)
    w0 = torch.tensor([[a] for a, _ in words])
    w1 = torch.tensor([[b] for _, b in words])
    got = getattr(prf, form)(torch.arange(vocab)[None, :], w0, w1, threshold)
    m = 0xFFFFFFFF
    want = [
        [_lowbias32((_lowbias32((t + a) & m) + b) & m) < threshold for t in range(vocab)]
        for a, b in words
    ]
    assert got.tolist() == want


def test_green_lists_fall_back_to_int64_where_int32_does_not_wrap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A device whose probe fails (recorded in ``_WRAPS``) gets the exact int64 form."""
    from potstill.core.watermark import prf

    calls: list[str] = []
    monkeypatch.setitem(prf._WRAPS, "cpu", False)
    monkeypatch.setattr(prf, "_below_exact", lambda *a: calls.append("exact") or "x")
    monkeypatch.setattr(prf, "_below_wrapping", lambda *a: calls.append("wrap") or "y")
    w = torch.zeros((1, 1), dtype=torch.int64)
    assert prf.hash32_below(torch.arange(4)[None, :], w, w, 7) == "x"
    monkeypatch.setitem(prf._WRAPS, "cpu", True)
    assert prf.hash32_below(torch.arange(4)[None, :], w, w, 7) == "y"
    assert prf.hash32_below(torch.arange(4)[None, :], w, w, 2**32) == "x"  # beyond int32's compare
    assert calls == ["exact", "wrap", "exact"]


def test_kgw_bias_in_place_equals_the_copying_call() -> None:
    """``bias_`` writes ``__call__``'s exact result into the tensor it is given."""
    proc = KGWProcessor(KEY, gamma=0.25, delta=2.5, context_width=2)
    ids = torch.tensor([[5, 9, 1], [4, 4, 7], [0, 3, 3]])
    scores = torch.randn(3, 777)
    want = proc(ids, scores)
    inplace = scores.clone()
    assert proc.bias_(ids, inplace) is inplace
    assert torch.equal(inplace, want)
    assert not torch.equal(want, scores)  # the call itself left its input alone


def test_kgw_green_fraction_determinism_and_key_dependence() -> None:
    vocab = 49152
    proc = KGWProcessor(KEY, gamma=0.25, context_width=2)
    contexts = [[i, 7 * i + 1] for i in range(40)]
    masks = proc.vocab_mask(contexts, vocab)
    sd = math.sqrt(vocab * 0.25 * 0.75)
    counts = masks.sum(1).double()
    # Per context: Bin(V, gamma); 5 sd is a < 1e-6 miss per context.
    assert ((counts - 0.25 * vocab).abs() < 5 * sd).all(), counts
    assert abs(counts.mean().item() / vocab - 0.25) < 5 * sd / vocab / math.sqrt(40)
    again = KGWProcessor(WatermarkKey(bytes(range(32))), gamma=0.25, context_width=2)
    assert torch.equal(again.vocab_mask(contexts, vocab), masks)
    other = KGWProcessor(rand_key(0), gamma=0.25, context_width=2).vocab_mask(contexts, vocab)
    overlap = (masks & other).sum(1).double() / vocab  # independent lists: gamma^2
    assert (overlap - 0.0625).abs().max() < 0.01
    assert not torch.equal(masks[0], masks[1])  # lists change with the context
    # is_green / green_mask agree with the vocab mask.
    tok = torch.arange(0, vocab, 997)
    ctx = torch.tensor(contexts[3]).repeat(len(tok), 1)
    assert torch.equal(proc.green_mask(ctx, tok), masks[3, tok])
    assert proc.is_green((3, 22), 5) == bool(masks[3, 5])


def test_kgw_processor_adds_delta_on_green_only() -> None:
    proc = KGWProcessor(KEY, gamma=0.3, delta=1.5, context_width=3)
    ids = torch.tensor([[5, 9, 1, 2, 3], [4, 4, 7, 8, 9]])
    scores = torch.randn(2, 320)
    out = proc(ids, scores)
    want = proc.vocab_mask([[1, 2, 3], [7, 8, 9]], 320).float() * 1.5
    assert torch.allclose(out - scores, want, atol=1e-6)
    short = torch.tensor([[1, 2]])  # fewer than k ids: no watermark
    assert torch.equal(proc(short, scores[:1]), scores[:1])
    with pytest.raises(PotstillError, match="gamma"):
        KGWProcessor(KEY, gamma=1.0)


def test_kgw_kept_green_lists_equal_fresh_hashes_and_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Green lists kept across steps (repeated contexts, evictions) equal the lists hashed
    anew by ``vocab_mask``; the store never holds more than its byte budget allows."""
    from potstill.core.watermark import kgw

    vocab = 500
    monkeypatch.setattr(kgw, "GREEN_CACHE_BYTES", 6 * vocab)  # room for 6 lists
    proc = KGWProcessor(KEY, gamma=0.25, delta=2.0, context_width=1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):  # 12 distinct contexts: hits, misses and evictions all happen
        ids = torch.randint(0, 12, (5, 3), generator=gen)
        scores = torch.randn(5, vocab, generator=gen)
        want = proc.vocab_mask(ids[:, -1:].tolist(), vocab).float() * 2.0
        assert torch.equal(proc(ids, scores), scores + want)
        assert len(proc._lists) <= 6
    assert len(proc._lists) == 6


def test_kgw_generation_is_detected(tiny: tuple[torch.nn.Module, object]) -> None:
    model, tok = tiny
    params = WatermarkParams("kgw", gamma=0.25, delta=4.0, context_width=2)
    proc = KGWProcessor(KEY, gamma=0.25, delta=4.0, context_width=2)
    prompt = torch.tensor([tok.encode(f"Prompt {i}:") for i in range(4)])
    gen = torch.Generator().manual_seed(0)
    kw = {"allowed_ids": PRINTABLE, "temperature": 2.0, "generator": gen}
    marked = generate_ids(model, prompt, 200, processor=proc, **kw)
    clean = generate_ids(model, prompt, 200, **kw)
    rates = []
    for row_m, row_c in zip(marked.tolist(), clean.tolist()):
        rm, rc = detect_text(row_m, KEY, params), detect_text(row_c, KEY, params)
        rates.append((round(rm.statistic, 3), f"{rm.p_value:.1e}", round(rc.statistic, 3)))
        assert rm.n_tokens == 200 and rm.n_scored <= 198
        assert rm.p_value < 1e-4 and rm.z is not None and rm.z > 4
        assert rc.p_value > 1e-3  # the clean text does not depend on the key
        # The decoded text re-encodes to the same ids: detection works from strings.
        assert tok.encode(tok.decode(row_m)) == row_m
    print("KGW delta=4 k=2 (green rate, p, clean green rate):", rates)


def test_transformers_generate_accepts_the_processor(tiny: tuple[torch.nn.Module, object]) -> None:
    from transformers import LogitsProcessorList

    model, tok = tiny
    proc = KGWProcessor(KEY, gamma=0.25, delta=10.0, context_width=1)
    prompt = torch.tensor([tok.encode("Hello")])
    torch.manual_seed(0)
    out = model.generate(
        prompt,
        logits_processor=LogitsProcessorList([proc]),
        do_sample=True,
        max_new_tokens=40,
        temperature=2.0,
        top_k=0,
        pad_token_id=257,
    )
    res = detect_kgw(out[0, 5:].tolist(), KEY, gamma=0.25, context_width=1, prompt_ids=[111])
    assert res.statistic > 0.9 and res.p_value < 1e-6


def test_prompt_prefix_scores_the_first_k_tokens() -> None:
    ids = clean_ids(50)
    base = detect_kgw(ids, KEY, context_width=3, dedup=False)
    with_prompt = detect_kgw(ids, KEY, context_width=3, prompt_ids=[1, 2, 3], dedup=False)
    assert base.n_scored == 47 and with_prompt.n_scored == 50
    with pytest.raises(PotstillError, match="nothing to score"):
        detect_kgw(ids[:3], KEY, context_width=3)


# ---------------------------------------------------------------- Gumbel


def test_gumbel_processor_picks_argmax_r_pow_inv_p() -> None:
    proc = GumbelProcessor(KEY, context_width=2)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    scores = torch.randn(2, 50) * 2
    out = proc(ids, scores)
    assert ((out == 0).sum(1) == 1).all() and (out[out != 0] == float("-inf")).all()
    ctx = torch.tensor([[2, 3], [5, 6]])
    for b in range(2):
        r = proc.uniforms(ctx[b].repeat(50, 1), torch.arange(50))
        p = torch.softmax(scores[b].double(), -1)
        assert int(out[b].argmax()) == int(torch.argmax(r ** (1 / p)))


def test_gumbel_sampling_is_unbiased_over_keys() -> None:
    """Over random keys the keyed choice is an exact sample of p (Gumbel-max trick)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = torch.softmax(logits, -1)[0].numpy()
    n = 3000
    picks = [
        int(GumbelProcessor(rand_key(i), context_width=1).choose(torch.tensor([[7]]), logits)[0])
        for i in range(n)
    ]
    counts = [picks.count(v) for v in range(6)]
    chi = stats.chisquare(counts, p * n)
    assert chi.pvalue > 1e-3, (counts, p * n)


def test_gumbel_generation_detected_and_null_scores_exponential(
    tiny: tuple[torch.nn.Module, object],
) -> None:
    model, tok = tiny
    proc = GumbelProcessor(KEY, context_width=4)
    prompt = torch.tensor([tok.encode(f"Q{i:02d}?") for i in range(3)])
    marked = generate_ids(
        model, prompt, 200, processor=proc, allowed_ids=PRINTABLE, temperature=3.0
    )
    for row in marked.tolist():
        res = detect_gumbel(row, KEY, context_width=4)
        assert res.n_scored > 100 and res.p_value < 1e-10, res
    # H0: per-token scores of key-independent text are Exp(1).
    tuples = list(dict.fromkeys(text_tuples(clean_ids(400), 4)))
    params = WatermarkParams("gumbel", context_width=4)
    scores = torch.cat([tuple_scores(tuples, rand_key(i), params) for i in range(10)])
    assert stats.kstest(scores.numpy(), "expon").pvalue > 0.01
    assert scores.mean().item() == pytest.approx(1.0, abs=4 / math.sqrt(len(scores)))


# ---------------------------------------------------------------- null calibration


def _null_pvalues(ids: list[int], params: WatermarkParams, n_keys: int, dedup: bool) -> list[float]:
    return [detect_text(ids, rand_key(i), params, dedup=dedup).p_value for i in range(n_keys)]


def _assert_calibrated(pvals: list[float], alpha: float = 0.01) -> tuple[float, int]:
    ks = stats.kstest(pvals, "uniform").pvalue
    fp = sum(p < alpha for p in pvals)
    lo, hi = binom_interval(len(pvals), alpha)
    assert ks > 0.01, ks
    assert lo <= fp <= hi, (fp, lo, hi)
    return ks, fp


@pytest.mark.parametrize("scheme", ["kgw", "gumbel"])
def test_null_calibration_single_text(scheme: str) -> None:
    params = WatermarkParams(scheme, gamma=0.25, context_width=2)  # type: ignore[arg-type]
    ids = clean_ids(2000)
    ks, fp = _assert_calibrated(_null_pvalues(ids, params, 200, dedup=True))
    print(f"{scheme} single-text null: KS p={ks:.3f}, {fp}/200 below 0.01")


def test_dedup_matters_on_repetitive_text() -> None:
    params = WatermarkParams("kgw", gamma=0.25, context_width=2)
    phrase = clean_ids(40, seed=5)
    ids = clean_ids(1500, seed=6) + phrase * 40
    pvals = _null_pvalues(ids, params, 200, dedup=False)
    ks = stats.kstest(pvals, "uniform").pvalue
    fp = sum(p < 0.01 for p in pvals)
    assert ks < 1e-6 and fp > binom_interval(200, 0.01)[1], (ks, fp)  # miscalibrated
    ks_d, fp_d = _assert_calibrated(_null_pvalues(ids, params, 200, dedup=True))
    print(f"repetitive text: no dedup KS p={ks:.1e} FP={fp}/200; dedup KS p={ks_d:.3f} FP={fp_d}")


def test_repeated_phrase_inflates_significance_without_dedup() -> None:
    params = WatermarkParams("kgw", gamma=0.25, context_width=2)
    # A phrase that is green under KEY (as if copied from a watermarked source), repeated.
    proc = KGWProcessor(KEY, gamma=0.25, context_width=2)
    phrase = [72, 105]
    while len(phrase) < 24:
        ctx = tuple(phrase[-2:])
        phrase.append(next(t for t in PRINTABLE[::7] if proc.is_green(ctx, t)))
    ids = clean_ids(300, seed=3) + phrase * 10
    with_dedup = detect_text(ids, KEY, params)
    without = detect_text(ids, KEY, params, dedup=False)
    assert with_dedup.n_duplicates > 200 and without.n_duplicates == 0
    assert without.p_value < 1e-30 < with_dedup.p_value
    assert without.p_value < with_dedup.p_value * 1e-20


# ---------------------------------------------------------------- CLI


def _write_marked(path: Path, tok: object, model: torch.nn.Module, n: int = 3) -> list[str]:
    proc = KGWProcessor(KEY, gamma=0.25, delta=4.0, context_width=2)
    prompt = torch.tensor([tok.encode(f"P{i}") for i in range(n)])  # type: ignore[attr-defined]
    ids = generate_ids(model, prompt, 150, processor=proc, allowed_ids=PRINTABLE, temperature=2.0)
    texts = [tok.decode(r) for r in ids.tolist()]  # type: ignore[attr-defined]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    return texts


def test_audit_text_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny: tuple[torch.nn.Module, object]
) -> None:
    model, tok = tiny
    keyfile = tmp_path / "k"
    keyfile.write_text(bytes(range(32)).hex())
    data = tmp_path / "marked.jsonl"
    texts = _write_marked(data, tok, model)
    plain = tmp_path / "clean.txt"
    plain.write_text("The quick brown fox jumps over the lazy dog again.\n\n\nok\n")
    chat = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": texts[0]}]
    chat.write_text(json.dumps({"messages": msgs}) + "\n")
    base = ["audit", "text", "--model", "tiny:0", "--key-file", str(keyfile)]
    assert main([*base, "--input", str(data)]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3 and all(r["p_value"] < 1e-4 for r in rows)
    assert rows[0]["settings"]["key_id"] == KEY.key_id
    assert bytes(range(32)).hex() not in out + err
    assert main([*base, "--input", str(chat)]) == 0
    (row,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert row["n_tokens"] == len(texts[0]) and row["p_value"] < 1e-4
    assert main([*base, "--input", str(plain), "--watermark", "gumbel"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rows[0]["p_value"] > 1e-3 and rows[1]["p_value"] is None and "error" in rows[1]


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("missing_key", "does not exist"),
        ("short_key", "need >= 16"),
        ("empty_input", "no texts in"),
        ("missing_input", "does not exist"),
        ("bad_jsonl", "not valid JSON"),
        ("too_short", "long enough"),
    ],
)
def test_audit_text_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, needle: str
) -> None:
    key = tmp_path / "k"
    key.write_text(bytes(range(32)).hex())
    inp = tmp_path / "in.txt"
    inp.write_text("some perfectly fine text to score\n")
    if setup == "missing_key":
        key = tmp_path / "nokey"
    elif setup == "short_key":
        key.write_text("abcdef")
    elif setup == "empty_input":
        inp.write_text("\n\n  \n")
    elif setup == "missing_input":
        inp = tmp_path / "nope.txt"
    elif setup == "bad_jsonl":
        inp = tmp_path / "x.jsonl"
        inp.write_text('{"text": "a"}\n{oops\n')
    elif setup == "too_short":
        inp.write_text("ab\n")
    argv = ["audit", "text", "--model", "tiny:0", "--key-file", str(key), "--input", str(inp)]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err
    assert bytes(range(32)).hex() not in out + err
