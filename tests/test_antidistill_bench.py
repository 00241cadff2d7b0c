"""The antidistillation benchmark's building blocks, and a microscopic end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from potstill.core.models import load_model  # noqa: E402
from potstill.defend.antidistill import (  # noqa: E402
    AntidistillPerturbation,
    fit_antidistill_grad,
)

from .conftest import load_benchmark  # noqa: E402

PROMPTS = ["7+8", "47+38", "123+456", "9+99"]  # different lengths: left padding is exercised


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("antidistill")


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def models(bench: ModuleType) -> tuple[Any, Any, AntidistillPerturbation]:
    teacher, tok = load_model("tiny:0")
    # A random tiny model answers "\n" in every context; larger random weights make its
    # greedy answers context-dependent, so the checks below can tell rows apart.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in teacher.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    proxy = load_model("tiny:1:1x32")[0]
    pairs = [(p, "1+2=3 =3") for p in PROMPTS]
    grads, stats = fit_antidistill_grad(proxy, bench.chat_batches(tok, pairs, 48, 2))
    return teacher.eval(), tok, AntidistillPerturbation(proxy, grads, 1e-2 / stats["grad_norm"])


def _stepwise(teacher: Any, tok: Any, prompt: str, n: int, pert: Any, lam: float) -> list[int]:
    """Greedy reference without cache, padding or batching: argmax(z + lam * delta)."""
    ids, _ = _encode(tok, prompt)
    out: list[int] = []
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    with torch.no_grad():
        for _ in range(n):
            ctx = torch.tensor([ids + out])
            z = teacher(input_ids=ctx).logits[0, -1, :260].float()
            if lam:
                z = z + lam * pert(ctx, vocab_size=260)[0][0]
            t = int(z.argmax())
            if t in stops:
                break
            out.append(t)
    return out


def _encode(tok: Any, prompt: str) -> tuple[list[int], str]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tok(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_batched_greedy_equals_stepwise_reference(
    bench: ModuleType, models: Any, lam: float
) -> None:
    teacher, tok, pert = models
    rows, n = bench.sample_batch(teacher, tok, PROMPTS, 10, seed=0, temperature=0.0,
                                 pert=pert, lam=lam)  # fmt: skip
    for p, r in zip(PROMPTS, rows):
        assert r == _stepwise(teacher, tok, p, 10, pert, lam)
    assert len({tuple(r) for r in rows}) == len(PROMPTS)
    # n counts the live rows' sampled tokens, a stop token included
    assert n == sum(min(len(r) + 1, 10) for r in rows)
    if lam == 0:
        assert min(map(len, rows)) < 10  # a row stopped early (and stayed stopped)
        other, _ = bench.sample_batch(teacher, tok, PROMPTS, 10, seed=0, temperature=0.0,
                                      pert=pert, lam=3.0)  # fmt: skip
        assert other != rows


def test_lambda_zero_samples_exactly_like_plain(bench: ModuleType, models: Any) -> None:
    teacher, tok, pert = models
    plain = bench.sample_batch(teacher, tok, PROMPTS, 12, seed=5)
    zero = bench.sample_batch(teacher, tok, PROMPTS, 12, seed=5, pert=pert, lam=0.0)
    other = bench.sample_batch(teacher, tok, PROMPTS, 12, seed=5, pert=pert, lam=50.0)
    assert plain == zero and plain != other


def test_ref_nll_is_the_nll_of_the_sampled_from_distribution(
    bench: ModuleType, models: Any
) -> None:
    teacher, tok, pert = models
    pairs = [("47+38", "7+8=15 =85"), ("9+9", "9+9=18 =18")]
    s = {"seq_len": 48, "batch": 1}
    for tau, lam in ((1.0, 0.0), (1.7, 0.0), (1.0, 2.0)):
        got = bench.ref_nll(s, teacher, tok, pairs, temperature=tau, pert=pert, lam=lam)
        total, n = 0.0, 0
        for prompt, out in pairs:
            prefix, _ = _encode(tok, prompt)
            target = tok(out, add_special_tokens=False)["input_ids"] + [
                tok.convert_tokens_to_ids("<|im_end|>")
            ]
            with torch.no_grad():
                for j, t in enumerate(target):
                    ctx = torch.tensor([prefix + target[:j]])
                    z = teacher(input_ids=ctx).logits[0, -1, :260].float()
                    if lam:
                        z = z + lam * pert(ctx, vocab_size=260)[0][0]
                    total -= float(torch.log_softmax(z / tau, -1)[t])
                    n += 1
        assert got == pytest.approx(total / n, rel=1e-4), (tau, lam)


def _pt(setting: dict[str, float], acc: float, student: float, nll: float = 0.1) -> dict:
    return {"setting": setting, "teacher_task_acc": acc, "teacher_ref_nll": nll,
            "student_task_acc": student, "student_task_acc_se": 0.01 + nll / 10}  # fmt: skip


def test_gains_and_operating_points_closed_form(bench: ModuleType) -> None:
    ad = [_pt({"lambda": 0.0}, 0.90, 0.60), _pt({"lambda": 1.0}, 0.86, 0.40),
          _pt({"lambda": 2.0}, 0.80, 0.20), _pt({"lambda": 3.0}, 0.855, 0.35)]  # fmt: skip
    temp = [_pt({"temperature": 1.0}, 0.90, 0.60, 0.1), _pt({"temperature": 1.5}, 0.87, 0.55, 0.2),
            _pt({"temperature": 2.0}, 0.83, 0.50, 0.4)]  # fmt: skip
    bench.fill_gains(ad, 0.10, 0.60)
    bench.fill_gains(temp, 0.10, 0.60)
    assert [p["student_gain_kept_fraction"] for p in ad] == pytest.approx([1.0, 0.6, 0.2, 0.5])
    op = bench.antidistill_point(ad, 0.05)
    # lam = 3 is the largest with drop <= 5 points (4.5), although lam = 2 (10 points) is not
    assert op["setting"]["lambda"] == 3.0 and op["teacher_acc_drop_points"] == pytest.approx(4.5)
    assert op["student_gain_kept_fraction"] == pytest.approx(0.5)
    t = bench.temperature_point(temp, 0.855)  # between 1.5 (0.87) and 2.0 (0.83)
    w = (0.87 - 0.855) / (0.87 - 0.83)
    assert t["interpolated"] and t["between"] == [1.5, 2.0]
    assert t["setting"]["temperature"] == pytest.approx(1.5 + 0.5 * w)
    assert t["teacher_task_acc"] == pytest.approx(0.855)
    assert t["student_task_acc"] == pytest.approx(0.55 - 0.05 * w)
    assert t["student_gain_kept_fraction"] == pytest.approx((0.45 - 0.05 * w) / 0.5)
    assert t["teacher_ref_nll"] == pytest.approx(0.2 + 0.2 * w)
    assert t["student_task_acc_se"] == pytest.approx(0.03 + 0.02 * w)  # interpolated too
    assert t["teacher_acc_drop_points"] == pytest.approx(4.5)
    exact = bench.temperature_point(temp, 0.87)
    assert not exact["interpolated"] and exact["setting"] == {"temperature": 1.5}
    first = bench.temperature_point(temp, 0.95)  # target above the whole curve: tau = 1
    assert first["setting"] == {"temperature": 1.0} and not first["interpolated"]
    low = bench.temperature_point(temp, 0.5)
    assert low["target_not_reached"] and low["setting"] == {"temperature": 2.0}
    assert math.isnan(bench.kept_fraction(0.3, 0.0))
    assert bench.verdict({**op, "setting": {"lambda": 3.0}}, t, 0.05).endswith(
        "antidistillation beats temperature at CPU scale"
    )
    assert bench.noise_floor(0.0, 0.5, 200) == pytest.approx(2 * math.sqrt(2 * 0.25 / 200))


def test_microscopic_end_to_end_writes_the_schema(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "ad.json"
    tiny = {"n_teacher_train": 40, "n_proxy_train": 16, "n_proxy_grad": 8, "n_distill": 16,
            "n_test": 12, "n_ref": 8, "max_new": 8, "gen_batch": 16, "batch": 8,
            "teacher": [1, 32, 0], "teacher_steps": 3, "proxy": [1, 16, 1], "proxy_steps": 2,
            "student": [1, 24, 2], "student_steps": 2, "bias_scales": [0.0, 1.0],
            "temperatures": [1.0, 1.5], "cost_prompts": 4, "cost_engine_prompts": 2,
            "cost_max_batch": 2}  # fmt: skip
    args = ["--quick", "--out", str(out), "--set"] + [
        f"{k}={json.dumps(v)}" for k, v in tiny.items()
    ]
    assert bench.main(args) == 0
    res = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert out.with_name("ad_tradeoff.png").stat().st_size > 1000
    for method in ("antidistill", "temperature"):
        r = res[method]
        assert {"teacher_acc_drop_points", "student_gain_kept_fraction", "curve"} <= set(r)
        for p in r["curve"]:
            assert {"setting", "teacher_task_acc", "teacher_ref_nll", "student_task_acc",
                    "student_gain_kept_fraction", "n_outputs", "tokens"} <= set(p)  # fmt: skip
            assert 0 <= p["teacher_task_acc"] <= 1 and 0 <= p["student_task_acc"] <= 1
            assert math.isfinite(p["teacher_ref_nll"]) and p["teacher_ref_nll"] > 0
            assert p["n_outputs"] == 16
    ad, temp = res["antidistill"]["curve"], res["temperature"]["curve"]
    assert ad[1]["setting"]["lambda"] == pytest.approx(1.0 / res["delta"]["sigma_delta"])
    # lam = 0 and tau = 1 are one point; its kept fraction is 1 (or undefined: no gain)
    assert temp[0]["student_task_acc"] == ad[0]["student_task_acc"]
    assert temp[0]["teacher_task_acc"] == ad[0]["teacher_task_acc"]
    gain = res["baseline"]["undefended_gain"]
    assert ad[0]["student_gain_kept_fraction"] == (1.0 if gain > 0 else None)
    # the sampled-from distribution at tau > 1 / lam > 0 is not the teacher's: other NLL
    assert temp[1]["teacher_ref_nll"] != temp[0]["teacher_ref_nll"]
    assert ad[1]["teacher_ref_nll"] != ad[0]["teacher_ref_nll"]
    c = res["cost"]
    for key in ("batched_ratio", "engine_ratio"):
        assert math.isfinite(c[key]) and c[key] > 0
    # Two extra (proxy) forward passes per token cannot make sampling cheaper than plain.
    assert c["batched_ratio"] > 1.0 and c["engine_ratio"] > 1.0, c
    assert isinstance(res["verdict"], str) and res["verdict"]
    assert res["settings"]["n_distill"] == 16 and res["total_seconds"] > 0


def test_preregistered_replicate_analysis_closed_form(bench: ModuleType) -> None:
    """The paired one-sided t-test by hand: t = mean(d) / (sd(d) / sqrt(n)), p = P(T_{n-1} > t)."""
    from scipy import stats

    def point(setting: dict[str, float], reps: list[float]) -> dict:
        return {"setting": setting, "student_task_acc_reps": reps, "replicates": len(reps),
                "teacher_task_acc": 0.9}  # fmt: skip

    undef = [0.60, 0.55, 0.70, 0.65, 0.50]
    ad_reps = [0.40, 0.45, 0.50, 0.52, 0.30]
    temp_reps = [0.50, 0.44, 0.62, 0.60, 0.41]
    ad = [point({"lambda": 0.0, "bias_scale": 0.0}, undef),
          point({"lambda": 0.01, "bias_scale": 0.75}, ad_reps)]  # fmt: skip
    temp = [point({"temperature": 1.0}, undef), point({"temperature": 1.1}, temp_reps)]
    r = bench.replicate_analysis(ad, temp, 0.10)
    d = [0.10, -0.01, 0.12, 0.08, 0.11]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    t = mean / (sd / math.sqrt(5))
    assert r["n_replicates"] == 5
    assert r["mean_difference_temperature_minus_antidistill"] == pytest.approx(mean)
    assert r["paired_t_pvalue_one_sided"] == pytest.approx(float(stats.t.sf(t, 4)), rel=1e-6)
    half = float(stats.t.ppf(0.975, 4)) * sd / math.sqrt(5)
    assert r["difference_ci95"] == pytest.approx([mean - half, mean + half])
    assert r["kept_fraction_reps"]["antidistill"][0] == pytest.approx(0.30 / 0.50)
    assert r["antidistill_better"] == (r["paired_t_pvalue_one_sided"] < 0.05)
    assert bench.replicate_analysis(ad[:1], temp, 0.1) == {}  # no pre-registered point
