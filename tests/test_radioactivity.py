"""Radioactivity (corpus-level watermark evidence), Holm–Bonferroni and `potstill audit radioactivity`."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

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
    generate_ids,
)
from potstill.detect import (
    collect_generations,
    collect_open_tuples,
    holm_adjusted,
    holm_bonferroni,
    radioactivity_closed,
    radioactivity_open,
    score_corpus,
)

from .fake_openai import StubClient
from .test_cli import _tokenizer_mismatch_dir

KEY = WatermarkKey(bytes(range(32)))
KEY_HEX = bytes(range(32)).hex()
PRINTABLE = list(range(32, 127))


def rand_key(i: int) -> WatermarkKey:
    return WatermarkKey(random.Random(50_000 + i).randbytes(32))


def clean_text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(chr(rng.choice(PRINTABLE)) for _ in range(n))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher() -> tuple[Any, Any]:
    from potstill.core.models import load_model

    return load_model("tiny:0")


def generate_texts(
    teacher: tuple[Any, Any], n: int, length: int, processor: Any = None, seed: int = 0, **kw: Any
) -> list[str]:
    model, tok = teacher
    prompt = torch.tensor([tok.encode(f"P{seed:02d}{i:03d}") for i in range(n)])
    gen = torch.Generator().manual_seed(seed)
    kw = {"temperature": 2.0, **kw}
    ids = generate_ids(
        model, prompt, length, processor=processor, allowed_ids=PRINTABLE, generator=gen, **kw
    )
    return [tok.decode(r) for r in ids.tolist()]


# ---------------------------------------------------------------- Holm


def test_holm_hand_example_and_properties() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: .005*4=.02, .01*3=.03, .03*2=.06, max(.06, .04*1)=.06
    assert holm_adjusted(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_bonferroni(p, 0.05) == [True, False, False, True]
    assert holm_bonferroni(p, 0.025) == [False, False, False, True]
    rng = random.Random(0)
    for _ in range(200):
        ps = [rng.random() ** 3 for _ in range(rng.randint(1, 8))]
        adj = holm_adjusted(ps)
        assert holm_bonferroni(ps, 0.05) == [a < 0.05 for a in adj]
        assert all(a >= q for a, q in zip(adj, ps)) and max(adj) <= 1.0
    assert holm_bonferroni([0.001], 0.01) == [True]  # one test: plain comparison


# ---------------------------------------------------------------- the positive case


def _finetune(data: torch.Tensor, steps: int = 40) -> Any:
    from potstill.core.models import load_model

    student, _ = load_model("tiny:1")
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for step in range(steps):
        idx = torch.randint(0, len(data), (8,), generator=torch.Generator().manual_seed(step))
        loss = student(input_ids=data[idx], labels=data[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.eval()


def test_student_trained_on_watermarked_text_is_radioactive(teacher: tuple[Any, Any]) -> None:
    """A tiny student fine-tuned 40 steps on KGW text vs one on clean text, same teacher."""
    _, tok = teacher
    params = WatermarkParams("kgw", gamma=0.25, delta=6.0, context_width=1)
    proc = KGWProcessor(KEY, gamma=0.25, delta=6.0, context_width=1)
    marked = generate_texts(teacher, 24, 128, proc, seed=1)
    clean = generate_texts(teacher, 16, 128, seed=2)
    as_ids = lambda texts: torch.tensor([tok.encode(t) for t in texts])  # noqa: E731
    radioactive = _finetune(as_ids(marked[:16]))
    control = _finetune(as_ids(clean))
    probe = marked[16:]  # held-out watermarked texts: never seen by either student
    hot = radioactivity_open(radioactive, tok, probe, KEY, params)
    cold = radioactivity_open(control, tok, probe, KEY, params)
    print(
        f"radioactive: green {hot.statistic:.3f} of {hot.n_scored}, p={hot.p_value:.1e}; "
        f"control: green {cold.statistic:.3f} of {cold.n_scored}, p={cold.p_value:.2f}"
    )
    assert hot.p_value < 1e-12 and hot.flagged(0.01)
    assert cold.p_value > 0.01 and not cold.flagged(0.01)
    assert hot.settings["key_id"] == KEY.key_id and KEY_HEX not in hot.to_json()
    assert hot.verdict(0.01).startswith("flagged: p=") and "< α=0.01" in hot.verdict(0.01)
    assert cold.verdict(0.01).startswith("not flagged")


# ---------------------------------------------------------------- null calibration


def _calibrated(pvals: list[float], alpha: float = 0.01) -> tuple[float, int]:
    ks = stats.kstest(pvals, "uniform").pvalue
    fp = sum(p < alpha for p in pvals)
    lo, hi = stats.binom.interval(0.99, len(pvals), alpha)
    assert ks > 0.01 and lo <= fp <= hi, (ks, fp, lo, hi)
    return ks, fp


@pytest.mark.parametrize("scheme", ["kgw", "gumbel"])
def test_open_mode_null_calibration(scheme: str) -> None:
    from potstill.core.models import load_model

    suspect, tok = load_model("tiny:1")
    params = WatermarkParams(scheme, gamma=0.25, context_width=2)  # type: ignore[arg-type]
    texts = [clean_text(500, seed=s) for s in range(4)]
    tuples, n_tok, n_copies = collect_open_tuples(suspect, tok, texts, 2)
    assert n_tok == 2000 and len(tuples) + n_copies == 4 * 499

    def corpus_p(key: WatermarkKey, dedup: bool, tup: Any = tuples) -> float:
        res = score_corpus(
            tup,
            key,
            params,
            mode="open",
            n_texts=4,
            n_tokens=n_tok,
            dedup=dedup,
            n_excluded_copies=n_copies,
        )
        return res.p_value

    ks, fp = _calibrated([corpus_p(rand_key(i), True) for i in range(200)])
    print(f"open-mode {scheme} null: KS p={ks:.3f}, {fp}/200 below 0.01")
    # The public entry point gives the same test as the two-stage path.
    assert radioactivity_open(suspect, tok, texts, rand_key(0), params).p_value == corpus_p(
        rand_key(0), True
    )
    if scheme != "kgw":
        return
    # Repetitive probe texts without dedup: the null breaks.
    # (>= 1500 distinct tuples: with far fewer, the binomial's discreteness alone makes
    # the conservative p-values fail a KS test against U(0, 1))
    phrase = clean_text(30, seed=10)
    rep = [clean_text(500, seed=s) for s in (11, 12, 13)] + [phrase * 16, phrase * 16]
    rep_tuples, _, _ = collect_open_tuples(suspect, tok, rep, 2)
    pvals = [corpus_p(rand_key(i), False, rep_tuples) for i in range(200)]
    assert stats.kstest(pvals, "uniform").pvalue < 1e-4
    assert sum(p < 0.01 for p in pvals) > stats.binom.interval(0.99, 200, 0.01)[1]
    _calibrated([corpus_p(rand_key(i), True, rep_tuples) for i in range(200)])


def _bigram_texts(
    logits: torch.Tensor, n: int, length: int, seed: int, wm: Any = None
) -> list[list[int]]:
    """``n`` texts of ``length`` ids sampled from a bigram model ``logits [V, V]``, each step
    through the watermark processor ``wm`` if given (the owner's served answers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 16, (n, 1), generator=g)
    for _ in range(length - 1):
        scores = logits[x[:, -1]]
        if wm is not None:
            scores = wm(x, scores)
        x = torch.cat([x, torch.multinomial(scores.softmax(-1), 1, generator=g)], 1)
    return x.tolist()


def test_closed_mode_filter_keeps_the_null_when_the_owner_data_is_regenerated_per_key() -> None:
    """The filter is built from the owner's watermarked answers, so it depends on the key.
    Its null: over keys, an independent suspect's p-values stay uniform (the owner's data is
    regenerated under each key, as it would be). A filter on whole (window, token) tuples of
    the owner's data, which selects green tuples, must break the same check."""
    v, k = 256, 1
    params = WatermarkParams("kgw", gamma=0.25, delta=3.0, context_width=k)
    zipf = -1.1 * torch.log(torch.arange(1, v + 1, dtype=torch.float32))
    g = torch.Generator().manual_seed(0)
    owner_lm = zipf + 2.0 * torch.randn(v, v, generator=g)
    suspect_lm = zipf + 2.0 * torch.randn(v, v, generator=g)
    suspect = _bigram_texts(suspect_lm, 48, 48, seed=1)
    tuples = [((a,), b) for row in suspect for a, b in itertools.pairwise(row)]
    windows_p, tuples_p = [], []
    for i in range(300):
        key = rand_key(i)
        wm = KGWProcessor(key, gamma=0.25, delta=3.0, context_width=k)
        owner = _bigram_texts(owner_lm, 48, 48, seed=100 + i, wm=wm)
        seen = {((a,), b) for row in owner for a, b in itertools.pairwise(row)}
        windows = {w for w, _ in seen}
        run = dict(mode="closed", n_texts=len(suspect), n_tokens=48 * 48)
        windows_p.append(score_corpus(tuples, key, params, filter_windows=windows, **run).p_value)
        picked = [t for t in tuples if t in seen]  # the biased filter, for contrast
        tuples_p.append(score_corpus(picked, key, params, **run).p_value)
    ks, fp = _calibrated(windows_p, alpha=0.05)
    print(f"closed-mode window filter null: KS p={ks:.3f}, {fp}/300 below 0.05")
    assert stats.kstest(tuples_p, "uniform").pvalue < 1e-6


# ---------------------------------------------------------------- prompt exclusion, filter


def test_prompt_exclusion_ablation(teacher: tuple[Any, Any]) -> None:
    """Watermarked prompts + a clean suspect that copies them: flagged only without exclusion."""
    _, tok = teacher
    params = WatermarkParams("kgw", gamma=0.25, delta=6.0, context_width=3)
    proc = KGWProcessor(KEY, gamma=0.25, delta=6.0, context_width=3)
    prompts = generate_texts(teacher, 8, 120, proc, seed=3)
    fresh = generate_texts(teacher, 8, 80, seed=4)  # the suspect's own, unwatermarked words
    answers = [p[:100] + f for p, f in zip(prompts, fresh)]  # quotes the prompt, then goes on
    naive = radioactivity_closed(
        answers, tok, KEY, params, prompts=prompts, exclude_prompt_windows=False
    )
    fair = radioactivity_closed(answers, tok, KEY, params, prompts=prompts)
    print(f"prompt exclusion: without p={naive.p_value:.1e}, with p={fair.p_value:.2f}")
    assert naive.flagged(0.01) and naive.p_value < 1e-10
    assert not fair.flagged(0.01)
    assert fair.n_excluded_prompt >= 8 * 97  # every copied window
    assert fair.n_scored > 300
    # A suspect that only copies has nothing left to score: an error, not a p-value.
    with pytest.raises(PotstillError, match="nothing to score"):
        radioactivity_closed([p[:100] for p in prompts], tok, KEY, params, prompts=prompts)


class InductionModel(torch.nn.Module):
    """A clean 'model' that only copies: after window w it predicts the token that followed
    w earlier in the same input (else a space). It knows nothing of any key."""

    def __init__(self, k: int, vocab: int = 320) -> None:
        super().__init__()
        self.k, self.vocab = k, vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> Any:
        from types import SimpleNamespace

        b_size, t_len = input_ids.shape
        logits = torch.zeros(b_size, t_len, self.vocab)
        for b, ids in enumerate(input_ids.tolist()):
            follow: dict[tuple[int, ...], int] = {}
            for j in range(t_len):
                if j >= self.k:
                    follow[tuple(ids[j - self.k : j])] = ids[j]
                logits[b, j, follow.get(tuple(ids[j - self.k + 1 : j + 1]), 32)] = 1.0
        return SimpleNamespace(logits=logits)


def test_open_mode_copy_exclusion(teacher: tuple[Any, Any]) -> None:
    """Watermarked texts that repeat themselves + a clean copying suspect: looks radioactive
    unless predictions that copy an earlier continuation are excluded."""
    _, tok = teacher
    params = WatermarkParams("kgw", gamma=0.25, delta=6.0, context_width=2)
    proc = KGWProcessor(KEY, gamma=0.25, delta=6.0, context_width=2)
    texts = [t + t for t in generate_texts(teacher, 6, 100, proc, seed=6)]
    suspect = InductionModel(k=2)
    naive = radioactivity_open(suspect, tok, texts, KEY, params, exclude_copies=False)
    fair = radioactivity_open(suspect, tok, texts, KEY, params)
    print(f"copy exclusion: without p={naive.p_value:.1e}, with p={fair.p_value:.2f}")
    assert naive.p_value < 1e-10 and naive.n_excluded_copies == 0
    assert not fair.flagged(0.01) and fair.n_excluded_copies > 6 * 90
    assert fair.n_candidates == naive.n_candidates


def test_filter_keeps_only_windows_of_the_watermarked_data(teacher: tuple[Any, Any]) -> None:
    _, tok = teacher
    params = WatermarkParams("kgw", context_width=3)
    texts = ["abcdefgh", "zzzz abcd"]
    res = radioactivity_closed(texts, tok, KEY, params, filter_texts=["xabcdx"], dedup=False)
    # scored windows (each followed by a token): abc bcd cde def efg | zzz zzz "zz " "z a" " ab" abc
    # = 11; of these the filter's windows (xab abc bcd cdx) keep abc, bcd, abc
    assert res.n_candidates == 11 and res.n_scored == 3 and res.n_filtered_out == 8
    assert res.settings["filter"] is True and res.settings["dedup"] is False


def test_gumbel_closed_mode_detects_watermarked_generations(teacher: tuple[Any, Any]) -> None:
    _, tok = teacher
    params = WatermarkParams("gumbel", context_width=4)
    marked = generate_texts(teacher, 3, 120, GumbelProcessor(KEY, context_width=4), temperature=3.0)
    res = radioactivity_closed(marked, tok, KEY, params)
    assert res.p_value < 1e-10 and res.score_sum is not None and res.n_green is None
    other = radioactivity_closed(marked, tok, rand_key(1), params)
    assert other.p_value > 1e-3


def test_library_bad_input(teacher: tuple[Any, Any]) -> None:
    model, tok = teacher
    params = WatermarkParams("kgw", context_width=2)
    with pytest.raises(PotstillError, match="suspect's corpus is empty"):
        radioactivity_closed([], tok, KEY, params)
    with pytest.raises(PotstillError, match="watermarked corpus is empty"):
        radioactivity_open(model, tok, ["", "  "], KEY, params)
    with pytest.raises(PotstillError, match="nothing to score"):
        radioactivity_closed(["ab", "c"], tok, KEY, params)


# ---------------------------------------------------------------- endpoint helper


def test_collect_generations_from_openai_compatible_endpoint() -> None:
    seen: list[dict[str, Any]] = []

    def handler(path: str, body: Any) -> tuple[int, Any]:
        assert path == "/v1/chat/completions"
        seen.append(body)
        reply = body["messages"][0]["content"].upper()
        return 200, {"choices": [{"message": {"content": reply}}]}

    client = StubClient(handler)
    out = collect_generations("http://suspect/v1", ["hi", "yo"], client=client, max_tokens=7)
    assert out == ["HI", "YO"] and seen[0]["max_tokens"] == 7
    bad = StubClient(lambda p, b: (500, b"boom"))
    with pytest.raises(PotstillError, match=r"suspect endpoint .* failed"):
        collect_generations("http://suspect", ["hi"], client=bad)
    odd = StubClient(lambda p, b: (200, {}))
    with pytest.raises(PotstillError, match="OpenAI-compatible"):
        collect_generations("http://suspect", ["hi"], client=odd)


# ---------------------------------------------------------------- CLI


def _files(tmp_path: Path, teacher: tuple[Any, Any]) -> dict[str, Path]:
    proc = KGWProcessor(KEY, gamma=0.25, delta=6.0, context_width=2)
    marked = generate_texts(teacher, 4, 100, proc, seed=5)
    f = {
        "key": tmp_path / "key",
        "other": tmp_path / "other",
        "marked": tmp_path / "marked.jsonl",
        "empty": tmp_path / "empty.txt",
    }
    f["key"].write_text(KEY_HEX + "\n")
    f["other"].write_text(random.Random(1).randbytes(32).hex())
    f["marked"].write_text("".join(json.dumps({"text": t}) + "\n" for t in marked))
    f["empty"].write_text("\n")
    return f


def test_audit_radioactivity_cli_closed_two_keys_holm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], teacher: tuple[Any, Any]
) -> None:
    f = _files(tmp_path, teacher)
    out_json = tmp_path / "res.json"
    argv = ["audit", "radioactivity", "--mode", "closed", "--suspect", str(f["marked"])]
    argv += ["--tokenizer", "tiny:0", "--context-width", "2", "--out", str(out_json)]
    argv += ["--key-file", str(f["key"]), "--key-file", str(f["other"])]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert res["correction"] == "holm" and json.loads(out_json.read_text()) == res
    right, wrong = res["results"]
    assert right["flagged"] and not wrong["flagged"]
    assert right["p_holm"] == pytest.approx(min(1.0, 2 * right["p_value"]))
    assert "flagged: p_holm=" in err and "not flagged" in err
    text = out + err + out_json.read_text()
    assert KEY_HEX not in text and f["other"].read_text() not in text


def test_audit_radioactivity_cli_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], teacher: tuple[Any, Any]
) -> None:
    f = _files(tmp_path, teacher)
    argv = ["audit", "radioactivity", "--mode", "open", "--suspect", "tiny:1", "--filter"]
    argv += [
        "--watermarked",
        str(f["marked"]),
        "--key-file",
        str(f["key"]),
        "--tokenizer",
        "tiny:0",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    (row,) = json.loads(out)["results"]
    assert row["mode"] == "open" and row["settings"]["filter"] and row["n_scored"] > 0
    assert row["settings"]["score"] == "soft" and row["settings"]["weighting"] == "sum"
    assert row["p_bound"] >= row["p_value"] and row["p_holm"] is None
    assert err.startswith("tiny:1 [key ")
    assert KEY_HEX not in out + err
    assert main([*argv, "--score", "argmax"]) == 0
    (hard,) = json.loads(capsys.readouterr().out)["results"]
    assert "score" not in hard["settings"] and hard["n_scored"] > 0 and "p_bound" not in hard


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("wrong_key", "does not exist"),
        ("empty_suspect", "no texts in"),
        ("tokenizer_mismatch", "tokenizers differ"),
        ("open_without_watermarked", "needs --watermarked"),
        ("url_without_prompts", "pass --prompts"),
        ("closed_without_tokenizer", "needs --tokenizer"),
        ("all_excluded", "nothing to score"),
        ("bad_alpha", "--alpha"),
        ("open_without_tokenizer", "open mode needs --tokenizer"),
        ("soft_closed", "--score soft needs open mode"),
        ("soft_gumbel", "--score soft needs open mode and a KGW"),
        ("soft_no_dedup", "--no-dedup applies to"),
    ],
)
def test_audit_radioactivity_bad_input(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    teacher: tuple[Any, Any],
    case: str,
    needle: str,
) -> None:
    f = _files(tmp_path, teacher)
    mode, suspect, extra = "closed", str(f["marked"]), ["--tokenizer", "tiny:0"]
    key = str(f["key"])
    if case == "wrong_key":
        key = str(tmp_path / "nokey")
    elif case == "empty_suspect":
        suspect = str(f["empty"])
    elif case == "tokenizer_mismatch":
        (tmp_path / "m").mkdir()
        mode, suspect = "open", str(_tokenizer_mismatch_dir(tmp_path / "m"))
        extra += ["--watermarked", str(f["marked"])]
    elif case == "open_without_watermarked":
        mode, suspect = "open", "tiny:1"
    elif case == "url_without_prompts":
        suspect = "http://127.0.0.1:9/v1"
    elif case == "closed_without_tokenizer":
        extra = []
    elif case == "all_excluded":
        extra += ["--prompts", str(f["marked"])]
    elif case == "bad_alpha":
        extra += ["--alpha", "1.5"]
    elif case == "open_without_tokenizer":
        mode, suspect, extra = "open", "tiny:1", ["--watermarked", str(f["marked"])]
    elif case == "soft_closed":
        extra += ["--score", "soft"]
    elif case in ("soft_gumbel", "soft_no_dedup"):
        mode, suspect = "open", "tiny:1"
        extra += ["--watermarked", str(f["marked"])]
        extra += (
            ["--watermark", "gumbel", "--score", "soft"]
            if case == "soft_gumbel"
            else ["--no-dedup"]
        )
    argv = ["audit", "radioactivity", "--mode", mode, "--suspect", suspect, "--key-file", key]
    code = main([*argv, *extra])
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err
    assert KEY_HEX not in out + err
