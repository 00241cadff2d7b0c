"""`potstill audit provenance`: the paired test, Holm over controls, null false flags, bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from potstill.cli import main
from potstill.core.errors import PotstillError
from potstill.core.prompts import default_prompts
from potstill.detect.batched import length_batches
from potstill.detect.provenance import (
    Candidate,
    Endpoint,
    ModelScores,
    agreement_scores,
    answer_ll,
    as_prompt,
    compare,
    greedy,
    min_prompts,
    per_prompt_statistic,
    provenance_test,
)
from potstill.detect.stats import holm_adjusted

from .fake_openai import StubClient
from .test_cli import _tokenizer_mismatch_dir

PROMPTS = default_prompts(16, seed=3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int) -> Candidate:
    """A tiny random Llama whose layers are scaled up 10x.

    As built, a tiny model's residual stream is its input embedding, so every one of them
    greedily repeats the last token: all would "agree" with any teacher. Scaled layers give
    each seed its own continuations.
    """
    from potstill.core.models import load_model

    model, tok = load_model(f"tiny:{seed}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("norm.weight", "embed_tokens.weight")):
                p.mul_(10.0)
    return Candidate(f"tiny:{seed}", model, tok)


def derivative(base: Candidate, noise: float, seed: int) -> Candidate:
    """The base's weights plus Gaussian noise: a model that inherited the base's behaviour."""
    model = copy.deepcopy(base.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std().clamp_min(1e-3))
    return Candidate(f"{base.name}+noise{noise}", model, base.tokenizer)


@pytest.fixture(scope="module")
def teacher() -> Candidate:
    return tiny(0)


@pytest.fixture(scope="module")
def independents() -> list[Candidate]:
    return [tiny(s) for s in range(1, 6)]


def test_a_derivative_is_flagged_and_the_p_value_is_scipys(
    teacher: Candidate, independents: list[Candidate]
) -> None:
    suspect = derivative(teacher, 0.1, seed=1)
    res = provenance_test(suspect, teacher, independents[:2], PROMPTS, alpha=0.01, new_tokens=8)
    assert res.statistic == "agreement" and res.n_prompts == len(PROMPTS)
    assert res.flagged and res.p_value < 1e-3, res.verdict()
    assert "flagged" in res.verdict() and not res.verdict().startswith("not")
    # the per-prompt values, the one-sided paired t-test and Holm, checked against scipy
    values = per_prompt_statistic("agreement", teacher, [suspect, *independents[:2]], PROMPTS, 8)
    assert np.mean(values[0]) > 0.2 > max(np.mean(v) for v in values[1:])
    raw = [stats.ttest_rel(values[0], v, alternative="greater").pvalue for v in values[1:]]
    assert [c.p_value for c in res.comparisons] == pytest.approx(raw, rel=1e-9)
    assert [c.p_holm for c in res.comparisons] == pytest.approx(holm_adjusted(raw), rel=1e-9)
    assert res.comparisons[0].suspect_mean > res.comparisons[0].control_mean


def test_independent_models_are_not_flagged(
    teacher: Candidate, independents: list[Candidate]
) -> None:
    """Every independent model as the suspect against the other four: no false flag."""
    ps = []
    for i, suspect in enumerate(independents):
        others = independents[:i] + independents[i + 1 :]
        res = provenance_test(suspect, teacher, others, PROMPTS, alpha=0.01, new_tokens=8)
        assert not res.flagged, res.verdict()
        ps.append(res.p_value)
    assert min(ps) > 0.01


def test_one_control_that_is_also_a_derivative_blocks_the_flag(
    teacher: Candidate, independents: list[Candidate]
) -> None:
    """Flagged means closer than *every* control: a sibling derivative is not beaten."""
    suspect = derivative(teacher, 0.1, seed=1)
    sibling = derivative(teacher, 0.05, seed=2)
    res = provenance_test(
        suspect, teacher, [independents[0], sibling], PROMPTS, alpha=0.01, new_tokens=8
    )
    assert not res.flagged
    assert res.comparisons[0].rejected and not res.comparisons[1].rejected


def test_teacher_ll_works_across_tokenizers_and_endpoints(
    teacher: Candidate, independents: list[Candidate]
) -> None:
    """An endpoint answering with the teacher's own greedy text is flagged by teacher_ll."""
    answers = dict(zip(PROMPTS, teacher.answers(PROMPTS, 8)))

    def handler(path: str, body: Any) -> tuple[int, Any]:
        assert path == "/v1/completions" and body["temperature"] == 0.0
        return 200, {"choices": [{"text": answers[body["prompt"]]}]}

    api = Endpoint("api", "http://suspect", client=StubClient(handler))
    res = provenance_test(api, teacher, independents[:2], PROMPTS, statistic="auto", new_tokens=8)
    assert res.statistic == "teacher_ll" and res.flagged
    assert any("not checked" in w for w in res.warnings)
    with pytest.raises(PotstillError, match="teacher_ll"):
        provenance_test(api, teacher, independents[:2], PROMPTS, statistic="agreement")

    # ll_T - ll_R with R an independent model: still flagged, and R is recorded
    ref = provenance_test(api, teacher, independents[:2], PROMPTS, statistic="teacher_ll",
                          new_tokens=8, reference=independents[4])  # fmt: skip
    assert ref.flagged and ref.settings["reference"] == "tiny:5"
    # with the teacher as its own reference every value is exactly 0: no evidence at all
    same = provenance_test(api, teacher, independents[:2], PROMPTS, statistic="teacher_ll",
                           new_tokens=8, reference=Candidate("T", teacher.model, teacher.tokenizer))  # fmt: skip
    assert not same.flagged and all(c.mean_diff == 0.0 for c in same.comparisons)
    with pytest.raises(PotstillError, match="also tested"):
        provenance_test(api, teacher, independents[:2], PROMPTS, statistic="teacher_ll",
                        reference=independents[0])  # fmt: skip
    with pytest.raises(PotstillError, match="teacher_ll and model_ll only"):
        provenance_test(independents[2], teacher, independents[:2], PROMPTS,
                        statistic="agreement", reference=independents[4])  # fmt: skip

    bad = Endpoint("bad", "http://suspect", client=StubClient(lambda p, b: (200, {"id": "x"})))
    with pytest.raises(PotstillError, match="without choices"):
        provenance_test(bad, teacher, independents[:2], PROMPTS, new_tokens=8)


def test_model_ll_is_the_models_own_likelihood_and_flags_a_derivative(
    teacher: Candidate, independents: list[Candidate]
) -> None:
    """Grey-box: each model's likelihood of the teacher's greedy answers minus its likelihood
    of a reference model's answers, per byte.

    The likelihood is the model's summed log-probs of the answer tokens (checked against
    torch's cross-entropy); a derivative is flagged; no independent model is; and without the
    reference (refused) an independent model that is merely surer of all text would win.
    """
    prompts, ref = default_prompts(48, seed=3), independents[4]
    suspect = derivative(teacher, 0.1, seed=1)
    res = provenance_test(suspect, teacher, independents[:3], prompts, statistic="model_ll",
                          new_tokens=16, reference=ref)  # fmt: skip
    assert res.statistic == "model_ll" and res.flagged and res.p_value < 1e-3
    assert res.settings["reference"] == "tiny:5"
    for i, s in enumerate(independents[:4]):
        others = independents[:i] + independents[i + 1 : 4]
        r = provenance_test(s, teacher, others, prompts, statistic="model_ll", new_tokens=16,
                            reference=ref)  # fmt: skip
        assert not r.flagged, r.verdict()
    with pytest.raises(PotstillError, match="needs --reference"):
        provenance_test(suspect, teacher, independents[:3], prompts, statistic="model_ll")
    # why it is refused: without R, some independent model beats all the others
    rows = per_prompt_statistic("model_ll", teacher, independents[:4], prompts, 16)
    scores = [ModelScores(m.name, r, math.nan) for m, r in zip(independents, rows)]
    flags = [compare(x, scores[:i] + scores[i + 1 :], teacher="t", statistic="model_ll").flagged
             for i, x in enumerate(scores)]  # fmt: skip
    assert any(flags)
    answers = teacher.answers(PROMPTS[:4], 8)
    tok = suspect.tokenizer
    for p, a, got in zip(PROMPTS, answers, answer_ll(suspect, PROMPTS[:4], answers)):
        pi = tok(as_prompt(tok, p), add_special_tokens=False).input_ids
        ai = tok(a, add_special_tokens=False).input_ids
        with torch.no_grad():  # torch's CE over the real tokens' logits, summed over the answer
            logits = suspect.model(input_ids=torch.tensor([pi + ai])).logits[0, :, : len(tok)]
            ce = float(F.cross_entropy(logits[len(pi) - 1 : -1], torch.tensor(ai), reduction="sum"))
        assert got == pytest.approx(-ce / len(a.encode()), rel=1e-4)


def test_length_batches_sort_and_respect_both_limits() -> None:
    lengths = [5, 1, 9, 3, 3, 7, 2, 40]
    groups = length_batches(lengths, max_tokens=12, max_rows=3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths)
    for g in groups:  # a group pads to its longest; only a lone long sequence may exceed
        assert len(g) <= 3
        assert len(g) * max(lengths[i] for i in g) <= 12 or len(g) == 1
    assert [lengths[i] for i in groups[-1]] == [40]


def test_batched_scoring_equals_one_sequence_at_a_time(teacher: Candidate) -> None:
    """Length-sorted, right-padded batches give each sequence's lone-pass values: greedy
    continuations equal ``generate`` on one unpadded prompt, and agreement equals the argmax
    match computed from a batch-1 forward pass."""
    suspect, tok = tiny(7), teacher.tokenizer
    ids = [tok(as_prompt(tok, p), add_special_tokens=False).input_ids for p in PROMPTS]
    assert len({len(i) for i in ids}) > 3  # the batches really mix lengths
    conts = greedy(teacher, ids, 8, batch=5)
    got = agreement_scores(suspect, ids, conts)
    assert sum(len(c) == 8 for c in conts) > len(conts) // 2
    for p, c, g in zip(ids, conts, got):
        x = torch.tensor([p])
        with torch.no_grad():
            ref = teacher.model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                         max_new_tokens=8, do_sample=False,
                                         pad_token_id=tok.pad_token_id)[0, len(p):].tolist()  # fmt: skip
            logits = suspect.model(input_ids=torch.tensor([p + c])).logits[0, :, : len(tok)]
        eos = tok.eos_token_id
        assert c == (ref[: ref.index(eos)] if eos in ref else ref)
        if c:
            pred = logits[len(p) - 1 : len(p) + len(c) - 1].argmax(-1).tolist()
            assert g == sum(a == b for a, b in zip(pred, c)) / len(c)


def test_model_ll_reads_an_endpoints_echoed_logprobs_or_says_they_are_missing(
    teacher: Candidate,
) -> None:
    """Through ``potstill serve``: echoed prompt logprobs give the local value; a defended
    server refuses echo with logprobs, and the error names the statistic that needs them."""
    from potstill.core.watermark.keys import WatermarkKey
    from potstill.core.watermark.params import WatermarkParams
    from potstill.serve.app import ServeSettings, create_app
    from potstill.serve.background import serve_in_background
    from potstill.serve.engine import Engine
    from potstill.serve.watermarking import watermark_processors

    model, tok = teacher.model, teacher.tokenizer
    prompts = ["hello there", "The cat", "Once upon"]
    answers = [" a time", " sat down", " we went"]
    want = []
    for p, a in zip(prompts, answers):  # byte-level tokenizer: p + a splits at the boundary
        ids, n_p = tok(p + a, add_special_tokens=False).input_ids, len(p.encode())
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :, : len(tok)]  # real tokens
            lp = torch.log_softmax(logits.float(), -1)
        want.append(float(lp[n_p - 1 : -1].gather(1, torch.tensor(ids[n_p:])[:, None]).sum())
                    / len(a.encode()))  # fmt: skip
    wm = watermark_processors(WatermarkKey(bytes(range(32))), WatermarkParams("kgw"))
    with (
        serve_in_background(create_app(Engine(model, tok, model_name="t"), ServeSettings())) as url,
        serve_in_background(
            create_app(Engine(model, tok, model_name="t"), ServeSettings(processors=wm))
        ) as defended,
    ):
        got = Endpoint("api", url + "/v1", model="t").answer_ll(prompts, answers)
        assert got == pytest.approx(want, rel=1e-4)
        with pytest.raises(PotstillError, match="model_ll needs them"):
            Endpoint("wm", defended + "/v1", model="t").answer_ll(prompts, answers)


def test_endpoint_likelihood_never_trusts_text_offsets_and_mixing_is_refused(
    teacher: Candidate,
) -> None:
    """``log P(p + a) - log P(p)`` from two echoed requests, over ``usage.prompt_tokens``
    entries: a BOS entry (None), offsets that are wrong, and the generated token change
    nothing. An endpoint next to local models under model_ll is refused."""
    lps = {"Q: hi": [None, -1.0, -2.0], "Q: hi A: yo": [None, -1.0, -2.0, -0.5, -0.25]}

    def handler(path: str, body: Any) -> tuple[int, Any]:
        assert body["echo"] and body["logprobs"] == 0 and body["max_tokens"] == 1
        vals = lps[body["prompt"]]
        logprobs = {"token_logprobs": [*vals, -9.0], "text_offset": [0] * (len(vals) + 1)}
        return 200, {
            "choices": [{"text": body["prompt"] + "x", "logprobs": logprobs}],
            "usage": {"prompt_tokens": len(vals), "completion_tokens": 1},
        }

    api = Endpoint("api", "http://e", client=StubClient(handler))
    assert api.answer_ll(["Q: hi"], [" A: yo"]) == [pytest.approx(-0.75 / len(b" A: yo"))]
    with pytest.raises(PotstillError, match="not comparable"):
        per_prompt_statistic("model_ll", teacher, [api, teacher], ["Q: hi"], 4, reference=teacher)

    def no_usage(path: str, body: Any) -> tuple[int, Any]:
        lp = {"token_logprobs": [None, -1.0], "text_offset": [0, 1]}
        return 200, {"choices": [{"text": "x", "logprobs": lp}]}

    bare = Endpoint("bare", "http://e", client=StubClient(no_usage))
    with pytest.raises(PotstillError, match="model_ll needs them"):
        bare.answer_ll(["Q: hi"], [" A: yo"])


def test_prompts_without_values_are_no_evidence() -> None:
    """A p-value is never computed on too few prompts: a control with values on too few of
    them is not beaten (p = 1, warned); a suspect with too few values is refused."""
    n = 16
    suspect = ModelScores("s", [1.0 + 0.01 * i for i in range(n)], -1.0)
    good = ModelScores("c1", [0.0] * n, -1.0)
    holey = ModelScores("c2", [0.0] * 5 + [math.nan] * (n - 5), -1.0)
    res = compare(suspect, [good, holey], teacher="t", statistic="teacher_ll")
    assert res.comparisons[0].rejected and res.comparisons[1].p_value == 1.0
    assert not res.flagged and any("only 5 prompts" in w for w in res.warnings)
    empty = ModelScores("s", [1.0] * 4 + [math.nan] * (n - 4), -1.0)
    with pytest.raises(PotstillError, match="only 4 of 16"):
        compare(empty, [good], teacher="t", statistic="teacher_ll")


def test_weaker_controls_are_warned_about(
    teacher: Candidate, independents: list[Candidate]
) -> None:
    """A control much worse on the prompts than the suspect: the result says so."""
    from potstill.core.models import load_model

    model, tok = load_model("tiny:9")
    with torch.no_grad():  # confidently wrong: repeats each input token with ~all its mass
        model.get_input_embeddings().weight.mul_(4.0)
    strong = derivative(teacher, 0.1, seed=1)
    res = provenance_test(strong, teacher, [Candidate("small", model, tok), independents[0]],
                          PROMPTS, new_tokens=4)  # fmt: skip
    small, peer = res.comparisons
    assert small.control_prompt_ll < res.suspect_prompt_ll - 0.02
    assert next(w for w in res.warnings if "weaker" in w).startswith("control small is weaker")
    if peer.control_prompt_ll >= res.suspect_prompt_ll - 0.02:
        assert not any("control tiny:1" in w for w in res.warnings)


def test_bad_input_is_refused(
    teacher: Candidate, independents: list[Candidate], tmp_path: Path
) -> None:
    with pytest.raises(PotstillError, match="at least one control"):
        provenance_test(independents[0], teacher, [], PROMPTS)
    assert min_prompts(20, 0.01) == 12 and min_prompts(1, 0.05) == 10
    with pytest.raises(PotstillError, match="at least 10"):
        provenance_test(independents[0], teacher, independents[1:3], PROMPTS[:5])
    from potstill.core.models import load_model

    model, tok = load_model(str(_tokenizer_mismatch_dir(tmp_path)))
    other = Candidate("other-tokenizer", model, tok)
    with pytest.raises(PotstillError, match="teacher_ll"):
        provenance_test(other, teacher, independents[1:3], PROMPTS, statistic="agreement")


def test_cli_writes_json_and_refuses_bad_input(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    teacher: Candidate,
    independents: list[Candidate],
) -> None:
    dirs = {}
    models = [("teacher", teacher), ("suspect", derivative(teacher, 0.1, seed=1)),
              ("c1", independents[0]), ("c2", independents[1])]  # fmt: skip
    for name, cand in models:
        dirs[name] = tmp_path / name
        cand.model.save_pretrained(dirs[name])
        cand.tokenizer.save_pretrained(dirs[name])
    out = tmp_path / "prov.json"
    argv = ["audit", "provenance", "--suspect", str(dirs["suspect"]), "--teacher",
            str(dirs["teacher"]), "--controls", str(dirs["c1"]), str(dirs["c2"]),
            "--n-prompts", "16", "--new-tokens", "8", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed, err = capsys.readouterr()
    res = json.loads(out.read_text())
    assert json.loads(printed) == res
    assert res["flagged"] and res["statistic"] == "agreement" and len(res["comparisons"]) == 2
    assert err.strip().splitlines()[-1].startswith("flagged:")
    base = ["audit", "provenance", "--suspect", "tiny:0", "--teacher", "tiny:0"]
    assert main(base) == 2
    assert "--controls is empty" in capsys.readouterr().err
    assert main([*base, "--controls", "tiny:1", "--n-prompts", "4"]) == 2
    assert "use at least 10" in capsys.readouterr().err
    assert main([*base, "--controls", "tiny:1", "--teacher", "http://x"]) == 2
    assert "local model" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n\ntwo\n")
    assert (
        main([*base, "--controls", "tiny:1", "--prompts", str(prompts), "--n-prompts", "10"]) == 2
    )
    assert "fewer than --n-prompts" in capsys.readouterr().err
    assert (
        main([*base, "--controls", "tiny:1", "--statistic", "model_ll", "--n-prompts", "12"]) == 2
    )
    assert "needs --reference" in capsys.readouterr().err
