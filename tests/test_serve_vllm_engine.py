"""``potstill serve --engine vllm`` without vLLM: its flag checks and the engine's mapping.

vLLM itself runs in ``make test-vllm`` (``tests/test_vllm_gateway.py``). Here, in the default
suite: the missing extra and misplaced flags are one-line errors with exit 2; the engine
reads the model's sizes from its directory, marks the defences vLLM applies per request (as
potstill's engine chooses its processors), refuses a processor it cannot run, and turns vLLM's
logprob entries and outputs into potstill's events as potstill's engine would send them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from potstill.cli import main  # noqa: E402
from potstill.core.tiny import build_tiny_tokenizer  # noqa: E402
from potstill.serve.events import SamplingParams  # noqa: E402
from potstill.serve.vllm_engine import (  # noqa: E402
    LOGPROB_FLOOR,
    VLLMEngine,
    VLLMSettings,
    _token_logprob,
    vllm_config_for,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err


def test_engine_vllm_without_the_extra_names_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    _one_line_error(capsys, ["serve", "--model", "tiny:0", "--engine", "vllm"], "potstill[vllm]")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--enforce-eager"], "--engine vllm"),
        (["--tensor-parallel-size", "2"], "--engine vllm"),
        (["--max-model-len", "64"], "--engine vllm"),
        (["--engine", "vllm", "--tensor-parallel-size", "0"], "--tensor-parallel-size"),
    ],
)
def test_vllm_flags_are_checked_before_anything_loads(
    capsys: pytest.CaptureFixture[str], flags: list[str], needle: str
) -> None:
    _one_line_error(capsys, ["serve", "--model", "tiny:0", *flags], needle)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config.json (320 logits, 64 positions) and the tiny tokenizer (260 tokens)."""
    import json

    d = tmp_path_factory.mktemp("m")
    (d / "config.json").write_text(json.dumps({"vocab_size": 320, "max_position_embeddings": 64}))
    build_tiny_tokenizer().save_pretrained(d)
    return d


def _engine(model_dir: Path, scheme: str | None, antidistill: bool = False, **kw: Any) -> Any:
    from potstill.core.watermark.params import WatermarkParams

    params = WatermarkParams(scheme) if scheme else None
    ad = {"proxy_dir": "ad", "lambda": 1.0, "eps": 1e-2} if antidistill else None
    defences = vllm_config_for("wm.key", params, antidistill=ad)["potstill"]
    settings = VLLMSettings(model_dir, defences=defences, **kw)
    return VLLMEngine(settings, build_tiny_tokenizer(), model_name="m")


def test_sizes_and_engine_arguments_come_from_the_model_directory(model_dir: Path) -> None:
    eng = _engine(model_dir, "kgw", max_model_len=32, logprobs_source="raw")
    assert (eng.vocab_size, eng.context_length) == (260, 32)
    assert eng._allowed == list(range(260))  # the padded logits are never sampled
    args = eng.settings.engine_args()
    assert args["logprobs_mode"] == "raw_logprobs" and args["max_model_len"] == 32
    assert args["logits_processors"] == ["potstill.defend.vllm_processors:PotstillDefences"]
    wm = args["additional_config"]["potstill"]["watermark"]
    assert wm["key_file"] == "wm.key" and wm["scheme"] == "kgw"
    assert "logits_processors" not in _engine(model_dir, None).settings.engine_args()
    served = _engine(model_dir, None).settings.engine_args()["logprobs_mode"]
    assert served == "processed_logprobs"


def test_request_markers_follow_potstills_engine(model_dir: Path) -> None:
    kgw, gumbel = _engine(model_dir, "kgw", antidistill=True), _engine(model_dir, "gumbel")
    assert [m.name for m in kgw.request_processors({"temperature": 0.0})] == ["antidistill", "kgw"]
    assert [m.name for m in gumbel.request_processors({"temperature": 0.7})] == ["gumbel"]
    assert gumbel.request_processors({"temperature": 0.0}) == []  # nothing to randomise
    assert _engine(model_dir, None).request_processors({"temperature": 1.0}) == []
    with pytest.raises(RuntimeError, match="inside vLLM"):
        kgw.request_processors({})[0](None, None)


def test_submit_refuses_what_vllm_would_not_apply(model_dir: Path) -> None:
    from potstill.core.watermark.keys import WatermarkKey
    from potstill.core.watermark.params import WatermarkParams
    from potstill.serve.watermarking import watermark_processors

    eng = _engine(model_dir, "kgw")
    native = watermark_processors(WatermarkKey(bytes(32)), WatermarkParams("kgw"))({})
    with pytest.raises(ValueError, match="not applied by vLLM"):
        eng.submit([1, 2], SamplingParams(4, processors=tuple(native)), [0], print)
    with pytest.raises(ValueError, match="logprobs_mode"):
        eng.submit([1, 2], SamplingParams(4, served_logprobs=False), [0], print)
    with pytest.raises(ValueError, match="token ids"):
        eng.submit([1, 260], SamplingParams(4), [0], print)
    with pytest.raises(RuntimeError, match="start"):
        eng.submit([1, 2], SamplingParams(4, processors=tuple(eng.request_processors({}))), [0],
                   print)  # fmt: skip


def _lp(logprob: float, rank: int) -> Any:
    return SimpleNamespace(logprob=logprob, rank=rank)


def test_vllm_logprob_entries_become_potstills() -> None:
    # the chosen token (7) ranked 9th: reported, but not among the top 2; -inf is the floor
    entry = {7: _lp(-5.0, 9), 3: _lp(-0.5, 1), 4: _lp(-float("inf"), 2)}
    got = _token_logprob(7, entry, 2, offset=11)
    assert (got.token_id, got.logprob, got.offset) == (7, -5.0, 11)
    assert got.top == [(3, -0.5), (4, LOGPROB_FLOOR)]
    assert _token_logprob(3, entry, 0, 0).top == [] and math.isfinite(
        _token_logprob(4, entry, 1, 0).logprob
    )


def test_outputs_become_events_as_potstills_engine_sends_them(model_dir: Path) -> None:
    """Text deltas, logprob offsets into the choice's text, the token count at the end, and
    the end-of-sequence token's logprob dropped (potstill's engine never reports it)."""
    from potstill.serve.vllm_engine import _Choice, _Group

    eng = _engine(model_dir, None)
    group = _Group([1, 2], SamplingParams(8, logprobs=1), [5, 6], print)
    state = _Choice()
    a, b = eng.tokenizer.convert_tokens_to_ids(["a", "b"])
    step = SimpleNamespace(index=1, text="ab", token_ids=[a, b], finish_reason=None,
                           stop_reason=None,
                           logprobs=[{a: _lp(-1.0, 1)}, {b: _lp(-2.0, 1)}])  # fmt: skip
    ev = eng._event(group, step, state, None)
    assert (ev.index, ev.text, ev.finish_reason) == (6, "ab", None)
    assert [x.offset for x in ev.logprobs] == [0, 1]
    eos = int(eng.tokenizer.eos_token_id)
    last = SimpleNamespace(index=1, text="", token_ids=[eos], finish_reason="stop",
                           stop_reason=None, logprobs=[{eos: _lp(-0.1, 1)}])  # fmt: skip
    ev = eng._event(group, last, state, None)
    assert (ev.finish_reason, ev.completion_tokens, ev.logprobs) == ("stop", 3, [])


def _out(index: int, text: str, ids: list[int], lps: list[dict[int, Any]] | None = None,
         finish: str | None = None, stop: Any = None) -> Any:  # fmt: skip
    return SimpleNamespace(index=index, text=text, token_ids=ids, logprobs=lps,
                           finish_reason=finish, stop_reason=stop)  # fmt: skip


def test_a_stop_string_cut_drops_the_logprobs_past_it_and_errors_are_errors(
    model_dir: Path,
) -> None:
    """vLLM holds text back while it may be a stop string: a token's logprob waits for the
    text it starts in, and at the cut the tokens past it are dropped. "abort" is an error."""
    from potstill.serve.vllm_engine import _Choice, _Group

    eng = _engine(model_dir, None)
    a, b, c = eng.tokenizer.convert_tokens_to_ids(["a", "b", "c"])
    group = _Group([1, 2], SamplingParams(8, logprobs=0, stop=("bc",)), [0], print)
    state = _Choice()
    held = eng._event(group, _out(0, "a", [a, b], [{a: _lp(-1.0, 1)}, {b: _lp(-1.0, 1)}]),
                      state, None)  # fmt: skip
    assert held.text == "a" and [x.token_id for x in held.logprobs] == [a]  # "b" may be a stop
    cut = eng._event(group, _out(0, "", [c], [{c: _lp(-1.0, 1)}], "stop", "bc"), state, None)
    assert (cut.finish_reason, cut.logprobs, cut.completion_tokens) == ("stop", [], 3)
    aborted = eng._event(group, _out(0, "", [], None, "abort"), _Choice(), None)
    assert aborted.error and "abort" in aborted.error


def test_every_choice_gets_the_prompt_logprobs_and_an_open_choice_an_error(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With n = 2 vLLM's first output may hold one child only: each choice's first event
    carries the echoed prompt logprobs. A stream that ends with a choice open answers it."""
    eng = _engine(model_dir, None)
    a = eng.tokenizer.convert_tokens_to_ids("a")
    prompt = [
        SimpleNamespace(prompt_logprobs=[None, {2: _lp(-0.5, 1)}], outputs=[_out(0, "a", [a])])
    ]
    later = [
        SimpleNamespace(prompt_logprobs=None, outputs=[_out(1, "a", [a], finish="length")]),
        SimpleNamespace(prompt_logprobs=None, outputs=[_out(0, "a", [a], finish="length")]),
    ]

    class FakeLLM:
        def __init__(self, outputs: list[Any]) -> None:
            self.outputs = outputs

        async def generate(self, *args: Any) -> Any:
            for out in self.outputs:
                yield out

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "vllm.inputs", SimpleNamespace(TokensPrompt=dict))
    monkeypatch.setattr(eng, "_vllm_params", lambda p, n: None)
    params = SamplingParams(4, logprobs=0, echo_logprobs=True)

    async def run(outputs: list[Any]) -> list[Any]:
        events: list[Any] = []
        eng._engine = FakeLLM(outputs)
        await eng.submit([1, 2], params, [3, 4], events.append).task  # type: ignore[union-attr]
        return events

    events = asyncio.run(run(prompt + later))
    firsts = {ev.index: ev for ev in reversed(events)}
    assert [len(firsts[i].prompt_logprobs or []) for i in (3, 4)] == [2, 2]
    assert [ev.finish_reason for ev in events[1:]] == ["length", "length"]
    cut_short = asyncio.run(run(prompt))
    assert [ev.index for ev in cut_short if ev.error] == [3, 4]
