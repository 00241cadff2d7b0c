"""Fuzzing the API policy: type-mutated values for every capped field never get past a cap.

pydantic coerces ``"5"`` and ``5.0`` to ``5``; caps checked on the raw JSON let such values
through (the bug this file guards against). Every request goes to a real server (tiny:0)
over HTTP with raw JSON bodies, since the openai client would not send most of them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("torch")

from potstill.core.models import load_model  # noqa: E402
from potstill.defend.policy import APIPolicy, KeyPolicy, make_admission  # noqa: E402
from potstill.serve.app import ServeSettings, create_app  # noqa: E402
from potstill.serve.auth import key_id  # noqa: E402
from potstill.serve.background import serve_in_background  # noqa: E402
from potstill.serve.engine import Engine  # noqa: E402

MODEL = "tiny:0"
LOOSE, STRICT = "sk-loose", "sk-strict"
CAPS = {
    LOOSE: KeyPolicy(max_top_logprobs=2, max_n=2, logit_bias="ignore"),
    STRICT: KeyPolicy(max_top_logprobs=1, max_n=1, logit_bias="reject"),
}
MISSING = object()

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def int_mutations(over: int) -> list[Any]:
    """Values of an integer field just over a cap, in every shape JSON can carry."""
    return [
        over, str(over), float(over), f"{over}.0", over + 0.5, f" {over} ", f"{over}e0",
        [over], {"value": over}, [[over]], None, True, False, "", "many", -1, 0,
        10**30, 1e308, MISSING,
    ]  # fmt: skip


BIAS_MUTATIONS: list[Any] = [
    {"50": 100}, {"50": "100"}, {"50": [100]}, {"50": {"v": 1}}, [["50", 100]], "50:100",
    {}, None, 5, MISSING,
]  # fmt: skip


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    model, tok = load_model(MODEL)
    policy = APIPolicy(CAPS[LOOSE], {key_id(STRICT): CAPS[STRICT]})
    settings = ServeSettings(api_keys=(LOOSE, STRICT), admit=make_admission(policy))
    engine = Engine(model, tok, model_name=MODEL, max_batch=8)
    with serve_in_background(create_app(engine, settings)) as u:
        yield u


def _bodies(rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    """(path, body) pairs: each capped field mutated alone, then random combinations."""
    fields = {
        "/v1/completions": {"n": 3, "logprobs": 3, "logit_bias": None},
        "/v1/chat/completions": {"n": 3, "top_logprobs": 3, "logit_bias": None},
    }
    base = {
        "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 2},
        "/v1/chat/completions": {
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        },
    }  # fmt: skip
    out: list[tuple[str, dict[str, Any]]] = []

    def values(name: str, over: int | None) -> list[Any]:
        return BIAS_MUTATIONS if over is None else int_mutations(over)

    for path, caps in fields.items():
        for name, over in caps.items():
            for v in values(name, over):
                body = dict(base[path])
                if v is not MISSING:
                    body[name] = v
                if path.startswith("/v1/chat") and name == "top_logprobs":
                    body["logprobs"] = rng.choice([True, "true", 1, "1", MISSING])
                out.append((path, body))
    while len(out) < 320:  # random combinations of mutated fields
        path = rng.choice(list(fields))
        body = dict(base[path])
        for name, over in fields[path].items():
            v = rng.choice(values(name, over))
            if v is not MISSING:
                body[name] = v
        if path.startswith("/v1/chat"):
            lp = rng.choice([True, "true", 1, "yes", None, MISSING])
            if lp is not MISSING:
                body["logprobs"] = lp
        out.append(
            (path, [body, {**body, "best_of": rng.choice([3, "3", 3.0])}][rng.random() < 0.2])
        )
    return [(p, {k: v for k, v in b.items() if v is not MISSING}) for p, b in out]


def _served(path: str, payload: dict[str, Any]) -> tuple[int, int]:
    """(choices served, the largest number of top logprobs of any token)."""
    choices = payload["choices"]
    widest = 0
    for c in choices:
        lp = c.get("logprobs")
        if not lp:
            continue
        if path == "/v1/completions":
            widest = max([widest, *(len(t or {}) for t in lp.get("top_logprobs") or [])])
        else:
            widest = max([widest, *(len(t["top_logprobs"]) for t in lp.get("content") or [])])
    return len(choices), widest


def test_no_mutated_value_gets_past_a_cap(url: str) -> None:
    rng = random.Random(20261201)
    cases = _bodies(rng)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=30) as http:  # a hang fails the test by timeout
        for key in (LOOSE, STRICT):
            cap = CAPS[key]
            for path, body in cases:
                r = http.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code < 500, (key, path, body, r.text)
                if r.status_code != 200:
                    err = r.json()["error"]
                    assert isinstance(err["message"], str) and err["message"], r.text
                    assert {"type", "param", "code"} <= set(err), r.text
                    continue
                n, widest = _served(path, r.json())
                assert n <= cap.max_n and widest <= cap.max_top_logprobs, (key, path, body)
                if cap.logit_bias == "reject":
                    assert not body.get("logit_bias"), (key, path, body)
    assert sum(statuses.values()) >= 600
    # Both outcomes happen: valid values under the cap are served, the rest refused.
    assert statuses.get(200, 0) > 50 and statuses.get(400, 0) > 300, statuses
