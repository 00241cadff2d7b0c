"""API policy switches and the monitor's gate against a real server (openai client, tiny:0)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("torch")

from potstill.core.errors import PotstillError  # noqa: E402
from potstill.core.models import load_model  # noqa: E402
from potstill.core.prompts import default_prompts  # noqa: E402
from potstill.defend.embed import load_embedder  # noqa: E402
from potstill.defend.monitor import ExtractionMonitor, simulated_calibration  # noqa: E402
from potstill.defend.policy import (  # noqa: E402
    APIPolicy,
    KeyPolicy,
    make_admission,
    parse_key_policy,
)
from potstill.serve.app import ServeSettings, create_app  # noqa: E402
from potstill.serve.auth import key_id  # noqa: E402
from potstill.serve.background import serve_in_background  # noqa: E402
from potstill.serve.engine import Engine  # noqa: E402

MODEL = "tiny:0"
KEY, STRICT, HARVEST, ADMIN = "sk-a", "sk-strict", "sk-harvest", "sk-admin"
W = 10


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, Any]]:
    model, tok = load_model(MODEL)
    emb = load_embedder("hash")
    cal = simulated_calibration(emb, window=W, fpr=0.05, n_windows=200, n_reference=128)
    monitor = ExtractionMonitor(cal, emb)
    default = KeyPolicy(max_top_logprobs=5, max_n=4, logit_bias="ignore")
    per_key = dict(
        [
            parse_key_policy(
                f"{STRICT}:max_top_logprobs=1,max_n=1,logit_bias=reject", default, [STRICT]
            )
        ]
    )
    settings = ServeSettings(
        api_keys=(KEY, STRICT, HARVEST, ADMIN),
        observer=monitor.observe,
        admit=make_admission(APIPolicy(default, per_key), monitor, "throttle"),
        monitor_view=monitor.snapshot,
        monitor_admin_keys=(ADMIN,),
    )
    engine = Engine(model, tok, model_name=MODEL, max_batch=8)
    with serve_in_background(create_app(engine, settings)) as url:
        yield {"url": url, "monitor": monitor}


def client(server: dict, key: str = KEY) -> Any:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0, timeout=30)


def complete(server: dict, key: str = KEY, **kw: Any) -> Any:
    return client(server, key).completions.create(model=MODEL, prompt="hi", max_tokens=1, **kw)


def test_caps_are_400_naming_the_limit(server: dict) -> None:
    assert len(complete(server, logprobs=5).choices[0].logprobs.top_logprobs[0]) == 5
    with pytest.raises(openai.BadRequestError) as e:
        complete(server, logprobs=6)
    assert "max_top_logprobs=5" in str(e.value) and e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        complete(server, n=5)
    assert "max_n=4" in str(e.value) and e.value.body["code"] == "policy_limit"
    assert len(complete(server, n=4).choices) == 4
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=6
        )
    assert e.value.body["param"] == "top_logprobs"
    # Per-key override: STRICT may only have 1 top logprob and n=1.
    with pytest.raises(openai.BadRequestError, match="max_top_logprobs=1"):
        complete(server, STRICT, logprobs=2)
    with pytest.raises(openai.BadRequestError, match="max_n=1"):
        complete(server, STRICT, n=2)


def test_logit_bias_ignored_or_rejected(server: dict) -> None:
    # ignore: accepted, and it changes nothing (greedy output equals the unbiased one).
    plain = complete(server, temperature=0, logprobs=1)
    biased = complete(server, temperature=0, logprobs=1, logit_bias={"50": 100})
    assert biased.choices[0].text == plain.choices[0].text
    assert biased.choices[0].logprobs.token_logprobs == plain.choices[0].logprobs.token_logprobs
    with pytest.raises(openai.BadRequestError) as e:
        complete(server, STRICT, logit_bias={"50": 100})
    assert e.value.body["param"] == "logit_bias"
    assert complete(server, STRICT, logit_bias={}).choices  # empty is harmless


def test_throttle_after_harvesting_window(server: dict) -> None:
    harvest = [p for p in default_prompts(400) if len(p) < 90][: 2 * W]
    c = client(server, HARVEST)
    served = 0
    with pytest.raises(openai.RateLimitError) as e:
        for p in harvest:
            c.completions.create(model=MODEL, prompt=p, max_tokens=1)
            served += 1
    assert served == W  # flagged at the end of its first full window, then refused
    assert int(e.value.response.headers["Retry-After"]) >= 1
    assert complete(server).choices  # other keys are not affected
    view = httpx.get(server["url"] + "/v1/monitor", headers={"Authorization": f"Bearer {ADMIN}"})
    assert view.status_code == 200
    keys = {k["key_id"]: k for k in view.json()["keys"]}
    assert keys[key_id(HARVEST)]["flagged"] and not keys[key_id(KEY)]["flagged"]
    other = httpx.get(server["url"] + "/v1/monitor", headers={"Authorization": f"Bearer {KEY}"})
    assert other.status_code == 403
    assert httpx.get(server["url"] + "/v1/monitor").status_code == 401


def test_key_policy_parsing() -> None:
    d = KeyPolicy()
    kid, pol = parse_key_policy("abcd1234:max_n=2", d)
    assert kid == "abcd1234" and pol == KeyPolicy(max_n=2)
    assert parse_key_policy("sk-x:max_n=2", d, ["sk-x"])[0] == key_id("sk-x")
    for bad in ("nokey", "k:max_n", "k:foo=1", "k:max_n=x", "k:max_n=99", "k:logit_bias=maybe"):
        with pytest.raises(PotstillError):
            parse_key_policy(bad, d)
    with pytest.raises(PotstillError):
        make_admission(None, None, "nuke")
