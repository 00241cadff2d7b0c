"""The verifiable addition task: references, scoring, splits."""

from __future__ import annotations

import random
import re

import pytest

from potstill.core.errors import PotstillError
from potstill.distill.evaluate.tasks import (
    TEST_FRACTION,
    TaskExample,
    accuracy,
    is_correct,
    make_examples,
    n_valid_traces,
    parse_prompt,
    reference_output,
)


def _check_trace(example: TaskExample, output: str) -> None:
    """Independent check of a reference trace: each step's terms are the column digits plus
    the previous carry (in some order), its sum is right, and the answer is a + b."""
    a, b = parse_prompt(example.prompt)
    *steps, final = output.split(" ")
    assert final == f"={a + b}"
    xs, ys = str(a)[::-1], str(b)[::-1]
    assert len(steps) == max(len(xs), len(ys))
    carry = 0
    for i, step in enumerate(steps):
        m = re.fullmatch(r"(\d(?:\+\d)+)=(\d+)", step)
        assert m is not None, step
        terms = sorted(int(t) for t in m.group(1).split("+"))
        want = sorted([int(xs[i]), int(ys[i])] + ([1] if carry else []))
        assert terms == want, (step, want)
        assert int(m.group(2)) == sum(want)
        carry = sum(want) // 10


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_every_reference_output_is_a_correct_trace(digits: int) -> None:
    rng = random.Random(0)
    examples = make_examples(60, seed=digits, digits=digits) + make_examples(
        10, seed=digits, digits=digits, split="test"
    )
    for e in examples:
        a, b = parse_prompt(e.prompt)
        assert len(str(a)) == len(str(b)) == digits and e.answer == str(a + b)
        for _ in range(3):
            out = reference_output(e, rng)
            _check_trace(e, out)
            assert is_correct(e, out) and is_correct(e, f"  {out}\n")


def test_traces_vary_and_cover_every_order() -> None:
    rng = random.Random(1)
    e = TaskExample("47+38", "85")  # 7+8 (2 orders), 4+3+1 (6 orders)
    seen = {reference_output(e, rng) for _ in range(400)}
    assert n_valid_traces(e) == 12 and len(seen) == 12
    assert "7+8=15 4+3+1=8 =85" in seen and "8+7=15 1+3+4=8 =85" in seen
    assert n_valid_traces(TaskExample("44+44", "88")) == 1  # equal digits: one order each
    assert n_valid_traces(TaskExample("44+11", "55")) == 4
    assert n_valid_traces(TaskExample("55+55", "110")) == 1 * 3  # 5+5; 5+5+1 has 3 orders
    same = TaskExample("55+55", "110")
    assert {reference_output(same, rng) for _ in range(200)} == {
        "5+5=10 5+5+1=11 =110",
        "5+5=10 5+1+5=11 =110",
        "5+5=10 1+5+5=11 =110",
    }
    # deterministic given the rng
    assert [reference_output(e, random.Random(3)) for _ in range(2)] == [
        reference_output(e, random.Random(3))
    ] * 2


def test_wrong_answers_are_rejected() -> None:
    e = TaskExample("47+38", "85")
    assert is_correct(e, "7+8=15 4+3+1=8 =85")
    for bad in ("7+8=15 4+3+1=8 =86", "7+8=15 4+3+1=8 =085", "7+8=15 4+3+1=9 =95", "=58"):
        assert not is_correct(e, bad), bad
    # only the final answer is scored: a wrong step with the right answer passes
    assert is_correct(e, "7+8=14 4+3+1=8 =85")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "85",
        "=",
        "7+8=15 4+3+1=8 85",
        "7+8=15 4+3+1=8 =85=",
        "7+8=15  4+3+1=8 =85",
        "7+8=15 4+3+1=8 = 85",
        "7+8=15 4+3+1=8 =8 5",
        "7+=15 =85",
        "7=7 =85",
        "7+8=15 4+3+1=8 =85 extra",
        "7+8=15 4+3+1=8 =+85",
        "=85 =85x",
    ],
)
def test_malformed_outputs_are_rejected(bad: str) -> None:
    assert not is_correct(TaskExample("47+38", "85"), bad)


def test_splits_are_disjoint_deterministic_and_distinct() -> None:
    def key(e: TaskExample) -> tuple[int, int]:
        a, b = parse_prompt(e.prompt)
        return min(a, b), max(a, b)

    train = [make_examples(2000, seed=s) for s in range(3)]
    test = [make_examples(500, seed=s, split="test") for s in range(3)]
    train_keys = {key(e) for t in train for e in t}
    test_keys = {key(e) for t in test for e in t}
    assert not train_keys & test_keys  # unordered pairs: b+a never leaks a test a+b
    for t in train + test:
        assert len({e.prompt for e in t}) == len(t)
    assert make_examples(50, seed=7) == make_examples(50, seed=7)
    assert make_examples(50, seed=7) != make_examples(50, seed=8)
    assert make_examples(0, seed=0) == []
    # split sizes: every ordered pair is in exactly one split; ~TEST_FRACTION are test
    assert _split_size(1, "train") + _split_size(1, "test") == 81
    assert _split_size(2, "train") + _split_size(2, "test") == 8100
    assert abs(_split_size(2, "test") / 8100 - TEST_FRACTION) < 0.03
    everything = make_examples(_split_size(1, "test"), seed=0, digits=1, split="test")
    assert len({e.prompt for e in everything}) == _split_size(1, "test")


def _split_size(digits: int, split: str) -> int:
    """Size of a split, found by asking for too many (the error names the size)."""
    with pytest.raises(PotstillError) as err:
        make_examples(10**6, seed=0, digits=digits, split=split)  # type: ignore[arg-type]
    m = re.search(r"has (\d+) problems", str(err.value))
    assert m is not None
    return int(m.group(1))


def test_bad_arguments_and_accuracy() -> None:
    with pytest.raises(PotstillError, match="digits"):
        make_examples(3, seed=0, digits=0)
    with pytest.raises(PotstillError, match="split"):
        make_examples(3, seed=0, split="dev")  # type: ignore[arg-type]
    with pytest.raises(PotstillError, match="addition prompt"):
        parse_prompt("47-38")
    ex = [TaskExample("47+38", "85"), TaskExample("10+10", "20"), TaskExample("99+99", "198")]
    outs = ["7+8=15 4+3+1=8 =85", "0+0=0 1+1=2 =21", "9+9=18 9+9+1=19 =198"]
    assert accuracy(ex, outs) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="completions"):
        accuracy(ex, outs[:2])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])


def test_task_import_is_light_and_evaluate_exports_resolve() -> None:
    import subprocess
    import sys

    import potstill.distill.evaluate as evaluate

    code = "import sys, potstill.distill.evaluate.tasks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]
    assert sorted(evaluate.__all__) == sorted(evaluate._EXPORTS)
    assert all(callable(getattr(evaluate, name)) for name in evaluate.__all__)
