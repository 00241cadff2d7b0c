"""Served logprobs carry the defences; echo logprobs are chunked and budgeted.

Through the real openai client against tiny:0 with a KGW watermark: the reported logprobs are
those of the watermarked distribution (checked against a direct forward pass plus the green
bias), and ``--logprobs-source raw`` reports the clean model's. A long echo is computed in
bounded chunks that equal the one-pass result, and an over-budget request is a 400.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from potstill.core.models import load_model  # noqa: E402
from potstill.core.watermark.keys import WatermarkKey  # noqa: E402
from potstill.core.watermark.kgw import KGWProcessor  # noqa: E402
from potstill.core.watermark.params import WatermarkParams  # noqa: E402
from potstill.serve import engine as engine_mod  # noqa: E402
from potstill.serve.app import ServeSettings, create_app  # noqa: E402
from potstill.serve.background import serve_in_background  # noqa: E402
from potstill.serve.engine import Engine, Event, SamplingParams  # noqa: E402
from potstill.serve.watermarking import watermark_processors  # noqa: E402

MODEL = "tiny:0"
REAL_VOCAB = 260
WM_KEY = WatermarkKey(bytes(range(32)))
PARAMS = WatermarkParams("kgw", gamma=0.25, delta=3.0, context_width=1)
PROMPTS = ["hello there", "The cat", "a b c d", "watermarks!", "Once upon", "zz"]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Any]]:
    model, tok = load_model(MODEL)
    urls: dict[str, Any] = {"model": model, "tok": tok}
    with (
        serve_in_background(
            create_app(
                Engine(model, tok, model_name=MODEL, max_batch=8),
                ServeSettings(processors=watermark_processors(WM_KEY, PARAMS)),
            )
        ) as served,
        serve_in_background(
            create_app(
                Engine(model, tok, model_name=MODEL, max_batch=8),
                ServeSettings(
                    processors=watermark_processors(WM_KEY, PARAMS), logprobs_source="raw"
                ),
            )
        ) as raw,
    ):
        urls.update(served=served, raw=raw)
        yield urls


def _client(url: str) -> Any:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)


def _ids_of(tok: Any) -> dict[str, int]:
    from potstill.serve.sampling import TokenText

    text = TokenText(tok)
    return {text.get(i)[1]: i for i in range(REAL_VOCAB)}


def _green(ctx_last: int) -> torch.Tensor:
    proc = KGWProcessor(WM_KEY, gamma=PARAMS.gamma, delta=PARAMS.delta, context_width=1)
    vocab = torch.arange(REAL_VOCAB)
    return proc.green_mask(torch.full((REAL_VOCAB, 1), ctx_last), vocab)


def test_served_logprobs_are_the_watermarked_distribution(servers: dict[str, Any]) -> None:
    model, tok = servers["model"], servers["tok"]
    ids_of = _ids_of(tok)
    green_share = {"served": [], "raw": []}
    for source in ("served", "raw"):
        c = _client(servers[source])
        for prompt in PROMPTS:
            r = c.completions.create(
                model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=20
            )
            lp = r.choices[0].logprobs
            ctx = list(tok(prompt).input_ids)
            for token, top in zip(lp.tokens, lp.top_logprobs):
                with torch.no_grad():
                    z = model(input_ids=torch.tensor([ctx])).logits[0, -1, :REAL_VOCAB].double()
                green = _green(ctx[-1])
                if source == "served":
                    z = z + PARAMS.delta * green.double()
                ref = torch.log_softmax(z, -1)
                got = {ids_of[t]: v for t, v in top.items()}
                assert max(abs(v - float(ref[i])) for i, v in got.items()) < 1e-4, source
                mass = sum(math.exp(v) for v in got.values())
                green_share[source].append(
                    sum(math.exp(v) for i, v in got.items() if green[i]) / mass
                )
                ctx.append(ids_of[token])
    served = sum(green_share["served"]) / len(green_share["served"])
    raw = sum(green_share["raw"]) / len(green_share["raw"])
    # gamma = 0.25 of the vocabulary is green: raw top-k mass is near it, served far above
    assert served > raw + 0.3 and raw < 0.45, (served, raw)


def test_echo_logprobs_of_a_defended_model_are_refused(servers: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        _client(servers["served"]).completions.create(
            model=MODEL, prompt="hello", max_tokens=2, logprobs=3, echo=True
        )
    assert e.value.body["param"] == "echo" and "undefended" in e.value.body["message"]
    # echo without logprobs reveals nothing, and the raw server (its operator's choice) echoes
    assert (
        _client(servers["served"])
        .completions.create(model=MODEL, prompt="hello", max_tokens=2, echo=True)
        .choices[0]
        .text.startswith("hello")
    )
    r = _client(servers["raw"]).completions.create(
        model=MODEL, prompt="hello", max_tokens=2, logprobs=3, echo=True
    )
    assert r.choices[0].logprobs.token_logprobs[0] is None


def test_logprob_budget_is_a_400(servers: dict[str, Any]) -> None:
    model, tok = servers["model"], servers["tok"]
    settings = ServeSettings(max_logprob_entries=1000)
    with serve_in_background(create_app(Engine(model, tok, model_name=MODEL), settings)) as url:
        c = _client(url)
        assert len(tok("abcd").input_ids) == 4  # byte-level: one token per byte, no BOS
        # 2 choices x (4 echoed + 50 new) positions x (5 + 1) = 648 entries: under the budget
        assert len(c.completions.create(model=MODEL, prompt="abcd", max_tokens=50, n=2,
                                        logprobs=5, echo=True).choices) == 2  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:  # 2 x 54 x 11 = 1188
            c.completions.create(model=MODEL, prompt="abcd", max_tokens=50, n=2, logprobs=10,
                                 echo=True)  # fmt: skip
        assert e.value.body["code"] == "logprobs_limit" and "1188" in e.value.body["message"]


def _echo(engine: Engine, prompts: list[list[int]], k: int) -> list[list[Any]]:
    """Prompt logprobs of each prompt, all admitted in one prefill (left-padded)."""
    done = threading.Semaphore(0)
    out: list[list[Any]] = [[] for _ in prompts]

    def sink_for(j: int) -> Any:
        def sink(ev: Event) -> None:
            if ev.prompt_logprobs is not None:
                out[j] = ev.prompt_logprobs
            if ev.finish_reason or ev.error:
                assert ev.error is None, ev.error
                done.release()

        return sink

    with torch.inference_mode():  # as the worker thread runs it
        engine._admit(
            [
                engine_mod.RequestGroup(
                    p,
                    SamplingParams(max_tokens=1, logprobs=k, echo_logprobs=True),
                    [0],
                    sink_for(j),
                )
                for j, p in enumerate(prompts)
            ]
        )
    for _ in prompts:
        assert done.acquire(timeout=30)
    return out


def test_chunked_echo_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = load_model(MODEL)
    engine = Engine(model, tok, model_name=MODEL, max_batch=8)
    prompts = [tok(t).input_ids for t in ("a longer prompt of many bytes", "short", "mid one")]
    whole = _echo(engine, prompts, 4)
    engine._reset_batch()
    # 3 rows x 1 column x 260 logits x 4 bytes: every column is its own chunk
    monkeypatch.setattr(engine_mod, "ECHO_LOGITS_BYTES", 3 * 260 * 4)
    chunked = _echo(engine, prompts, 4)
    for p, a, b in zip(prompts, whole, chunked):
        assert [x.token_id for x in a] == p == [x.token_id for x in b]
        assert a[0].logprob is None and b[0].logprob is None
        for x, y in zip(a[1:], b[1:]):
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            assert abs(x.logprob - y.logprob) < 1e-4
    # ... and equal to a direct forward pass of each prompt alone
    for p, a in zip(prompts, chunked):
        with torch.no_grad():
            ref = torch.log_softmax(
                model(input_ids=torch.tensor([p])).logits[0, :, :REAL_VOCAB], -1
            )
        assert max(abs(a[t].logprob - float(ref[t - 1, p[t]])) for t in range(1, len(p))) < 1e-4


def test_gumbel_served_logprobs_are_json_safe() -> None:
    """Gumbel sampling is deterministic given the key: the served distribution is one-hot, so
    the chosen token has logprob 0 and every other the floor (-9999), never -inf."""
    model, tok = load_model(MODEL)
    gumbel = WatermarkParams("gumbel", context_width=1)
    settings = ServeSettings(processors=watermark_processors(WM_KEY, gumbel))
    with serve_in_background(create_app(Engine(model, tok, model_name=MODEL), settings)) as url:
        r = _client(url).completions.create(
            model=MODEL, prompt="hello", max_tokens=8, temperature=1.0, logprobs=3, seed=1
        )
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == [0.0] * len(lp.tokens)
    for top in lp.top_logprobs:
        assert sorted(top.values(), reverse=True)[0] == 0.0
        assert all(v == engine_mod.LOGPROB_FLOOR for v in sorted(top.values())[:-1])
