"""The radioactivity benchmark's building blocks, on tiny models (seconds)."""

from __future__ import annotations

import math
from types import ModuleType

import pytest
from scipy import stats

from potstill.core.watermark import KGWProcessor, WatermarkParams, detect_text

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("radioactivity")


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_batched_generator_watermarks_only_marked_rows(bench: ModuleType) -> None:
    from potstill.core.models import load_model

    model, tok = load_model("tiny:0")
    params = WatermarkParams("kgw", gamma=0.25, delta=4.0, context_width=2)
    proc = KGWProcessor(bench.KEY, gamma=0.25, delta=4.0, context_width=2)
    prompts = bench.radio_prompts(6)
    assert len(set(map(len, prompts))) > 1  # different lengths: left padding is exercised
    marked = [True, False, True, False, True, False]
    rows = bench.generate(
        model, tok, prompts, 150, processors=[bench.AllowOnly(bench.PRINTABLE)], seed=0,
        temperature=2.0, marked=marked, watermark=proc,
    )  # fmt: skip
    assert [len(r) for r in rows] == [150] * 6
    assert all(32 <= t < 127 for r in rows for t in r)  # printable only, EOS never drawn
    ps = [detect_text(r, bench.KEY, params).p_value for r in rows]
    assert all(p < 1e-4 for p, m in zip(ps, marked) if m), ps
    assert all(p > 1e-3 for p, m in zip(ps, marked) if not m), ps
    # The same row alone (no padding) gives the same first token distribution: the
    # left-padded batch is deterministic given the seed.
    again = bench.generate(
        model, tok, prompts, 150, processors=[bench.AllowOnly(bench.PRINTABLE)], seed=0,
        temperature=2.0, marked=marked, watermark=proc,
    )  # fmt: skip
    assert again == rows


def test_calibration_counts_and_clopper_pearson(bench: ModuleType) -> None:
    pvals = [(i + 0.5) / 400 for i in range(400)]  # exactly uniform grid
    c = bench.calibration(pvals)
    assert c["n"] == 400 and c["fpr_at_0.01"] == 4 / 400 and c["fpr_at_0.05"] == 20 / 400
    lo, hi = c["fpr_at_0.01_ci99"]
    ref = stats.binomtest(4, 400).proportion_ci(confidence_level=0.99, method="exact")
    assert math.isclose(lo, ref.low) and math.isclose(hi, ref.high) and c["fpr_at_0.01_in_ci"]
    assert c["ks_pvalue"] > 0.99
    bad = bench.calibration([1e-3] * 50 + [0.5] * 50)
    assert bad["fpr_at_0.01"] == 0.5 and not bad["fpr_at_0.01_in_ci"] and bad["ks_pvalue"] < 1e-6


def test_null_pvalues_of_random_tuples_are_uniform(bench: ModuleType) -> None:
    import random

    rng = random.Random(0)
    tuples = [((rng.randrange(300), rng.randrange(300)), rng.randrange(300)) for _ in range(1500)]
    params = WatermarkParams("kgw", gamma=0.25, context_width=2)
    pvals = bench.null_pvalues(tuples, params, 100)
    assert len(set(pvals)) > 20
    assert stats.kstest(pvals, "uniform").pvalue > 0.001
    # Each key's p-value is the binomial tail P(X >= green count) over the distinct tuples,
    # checked against scipy's binomial distribution, not potstill's own tail.
    from potstill.core.watermark.detect import tuple_scores

    distinct = sorted(set(tuples))
    s = int(tuple_scores(distinct, bench.null_key(0), params).sum())
    assert pvals[0] == pytest.approx(stats.binom.sf(s - 1, len(distinct), 0.25), rel=1e-9)
