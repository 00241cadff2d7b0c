"""``potstill serve --engine vllm``: potstill's front end over vLLM's engine (``make test-vllm``).

Through the real openai client against a gateway on a tiny Llama: the watermark vLLM applies
is detected under the key and not under another; the served logprobs are exactly the defended
distribution (a transformers forward pass plus the green bias, and plus antidistillation's
``lambda * delta`` from the same fit); auth, policy caps, the logprob rules, rate limits and
the audit log hold as with potstill's engine; a proxy with another tokenizer stops the server
before vLLM starts.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")

from potstill.core.watermark.detect import detect_segments  # noqa: E402
from potstill.core.watermark.keys import write_key  # noqa: E402
from potstill.core.watermark.kgw import KGWProcessor  # noqa: E402
from potstill.core.watermark.params import WatermarkParams  # noqa: E402

from .vllm_helpers import KEY, OTHER_KEY, V, free_port, potstill, server, tiny_dir  # noqa: E402

PARAMS = WatermarkParams("kgw", gamma=0.25, delta=4.0, context_width=1)
REAL_VOCAB = 260
PROMPTS = ["hello there", "The cat", "a b c d", "watermarks!"]


def _gateway(tmp: Path, model_dir: Path, *extra: str) -> Any:
    """``potstill serve --engine vllm`` with the KGW watermark under KEY, keys sk-a and sk-b."""
    key_file = write_key(tmp / "wm.key", KEY)
    port = free_port()
    args = ["-m", "potstill.cli", "serve", "--engine", "vllm", "--model", str(model_dir),
            "--port", str(port), "--enforce-eager", "--max-model-len", "512", "--dtype", "float32",
            "--api-key", "sk-a", "--api-key", "sk-b", "--audit-log", str(tmp / "audit.jsonl"),
            "--watermark", "kgw", "--watermark-key-file", str(key_file), "--gamma", "0.25",
            "--delta", "4", "--context-width", "1", *extra]  # fmt: skip
    return server(args, tmp / "gateway.log", port)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("gateway")
    model_dir = tiny_dir(tmp)
    with _gateway(tmp, model_dir, "--rpm", "30", "--max-top-logprobs", "5", "--max-n", "4") as url:
        yield {"url": url, "model_dir": model_dir, "audit": tmp / "audit.jsonl"}


def _client(url: str, key: str = "sk-a") -> Any:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def _ids(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def _greedy_steps(url: str, model: str, prompt_ids: list[int], k: int) -> Any:
    """6 greedy tokens with top-``k`` served logprobs: ``[(context ids, {id: logprob})]``."""
    r = _client(url).completions.create(
        model=model, prompt=prompt_ids, max_tokens=6, temperature=0, logprobs=k,
        extra_body={"return_tokens_as_token_ids": True},
    )  # fmt: skip
    lp = r.choices[0].logprobs
    ctx, steps = list(prompt_ids), []
    for tid, top in zip(_ids(lp.tokens), lp.top_logprobs, strict=True):
        steps.append((list(ctx), {int(t.removeprefix("token_id:")): v for t, v in top.items()}))
        ctx.append(tid)
    return steps


def _assert_served(steps: Any, model: Any, bias: Any) -> None:
    """Every served top-k logprob equals log_softmax(bias(context, raw logits)) over the
    tokenizer's vocabulary (vLLM never samples the padded logits)."""
    kgw = KGWProcessor(KEY, gamma=PARAMS.gamma, delta=PARAMS.delta, context_width=1)
    assert steps
    for ctx, got in steps:
        with torch.no_grad():
            z = model(input_ids=torch.tensor([ctx])).logits[0, -1:].float()
        z = bias(ctx, z)[:, :REAL_VOCAB]
        z = kgw.bias_(torch.tensor([ctx[-1:]]), z)
        ref = torch.log_softmax(z.double(), -1)[0]
        assert len(got) == 5
        assert max(abs(v - float(ref[i])) for i, v in got.items()) < 2e-4, (ctx, got)


def _tokenize(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(model_dir)(text).input_ids)


def test_gateway_text_is_detected_and_its_logprobs_are_watermarked(
    gateway: dict[str, Any],
) -> None:
    from transformers import LlamaForCausalLM

    url, model = gateway["url"], str(gateway["model_dir"])
    r = _client(url).completions.create(
        model=model, prompt="The watermark test: ", max_tokens=120, temperature=1.0, n=4,
        logprobs=0, extra_body={"return_tokens_as_token_ids": True, "min_tokens": 120},
    )  # fmt: skip
    texts = [_ids(c.logprobs.tokens) for c in r.choices]
    assert [len(t) for t in texts] == [120] * 4  # min_tokens reaches vLLM
    assert detect_segments(texts, KEY, PARAMS).p_value < 1e-6
    assert detect_segments(texts, OTHER_KEY, PARAMS).p_value > 1e-3
    lm = LlamaForCausalLM.from_pretrained(gateway["model_dir"]).eval()
    for prompt in PROMPTS[:2]:
        steps = _greedy_steps(url, model, _tokenize(gateway["model_dir"], prompt), 5)
        _assert_served(steps, lm, lambda ctx, z: z)


def test_gateway_keeps_auth_caps_limits_and_the_audit_log(gateway: dict[str, Any]) -> None:
    url, model = gateway["url"], str(gateway["model_dir"])
    with pytest.raises(openai.AuthenticationError):
        _client(url, "sk-wrong").completions.create(model=model, prompt="hi", max_tokens=2)
    c = _client(url)
    for kwargs, param in [({"logprobs": 10}, "logprobs"), ({"n": 8}, "n"),
                          ({"logprobs": 2, "echo": True}, "echo")]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=model, prompt="hi", max_tokens=2, **kwargs)
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="another-model", prompt="hi", max_tokens=2)
    stream = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True,
        stream_options={"include_usage": True}, extra_body={"min_tokens": 8},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 8
    b = _client(url, "sk-b")
    codes = []
    for _ in range(40):  # --rpm 30: the bucket of sk-b runs dry, sk-a's is its own
        try:
            b.completions.create(model=model, prompt="hi", max_tokens=1)
            codes.append(200)
        except openai.RateLimitError as err:
            codes.append(429)
            assert err.response.headers["retry-after"]
            break
    assert codes[-1] == 429 and 28 <= codes.count(200) <= 31, codes
    assert c.completions.create(model=model, prompt="hi", max_tokens=1).choices
    lines = [json.loads(x) for x in gateway["audit"].read_text().splitlines()]
    statuses = {(x["key_id"] is None, x["status"]) for x in lines}
    assert {(True, 401), (False, 400), (False, 404), (False, 429), (False, 200)} <= statuses
    assert not any("sk-a" in json.dumps(x) or "sk-b" in json.dumps(x) for x in lines)
    meta = json.loads(Path(f"{gateway['audit']}.meta.json").read_text())
    assert meta["engine"] == "vllm" and meta["watermark"]["key_id"] == KEY.key_id
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health") as r:
        health = json.loads(r.read())
    assert health["engine"] == "vllm" and health["worker_alive"]


@pytest.fixture(scope="module")
def fit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An antidistillation fit of proxy tiny:1 (the tiny tokenizer, 320 logits)."""
    tmp = tmp_path_factory.mktemp("fit")
    text = tmp / "heldout.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    potstill("defend", "fit-antidistill", "--proxy", "tiny:1", "--data", str(text), "--out",
             str(tmp / "ad"), "--seq-len", "32", "--batch-size", "3")  # fmt: skip
    return tmp / "ad"


def test_antidistillation_and_the_watermark_run_inside_vllm(fit_dir: Path, tmp_path: Path) -> None:
    """The served logprobs are log_softmax(KGW(raw + lambda * delta)): the proxy's delta from
    the same fit, computed here without a cache, equals what vLLM's engine process added."""
    from transformers import LlamaForCausalLM

    from potstill.defend.antidistill import load_antidistill
    from potstill.defend.antidistill_serve import antidistill_processors
    from potstill.serve.sampling import DecodeRows

    model_dir = tiny_dir(tmp_path)
    lam, eps = 3.0, 1e-2
    proc = antidistill_processors(load_antidistill(fit_dir), lam, eps)({})[0]
    ad = f"proxy={fit_dir},lambda={lam},eps={eps}"
    lm = LlamaForCausalLM.from_pretrained(model_dir).eval()
    with _gateway(tmp_path, model_dir, "--antidistill", ad) as url:
        steps = [_greedy_steps(url, str(model_dir), _tokenize(model_dir, p), 5) for p in PROMPTS]
    for s in steps:
        _assert_served(s, lm, lambda ctx, z: proc(DecodeRows.one(ctx, 0.0, key=len(ctx)), z))
    meta = json.loads((tmp_path / "audit.jsonl.meta.json").read_text())
    assert meta["antidistill"]["lambda"] == lam and meta["engine"] == "vllm"


def test_a_proxy_with_another_tokenizer_stops_the_server_before_vllm_starts(
    fit_dir: Path, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer, models
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from potstill.core.tiny import tiny_config

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "the", "cat"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    other = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
    config = tiny_config(1, 128, V)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 64
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    other.save_pretrained(tmp_path / "m")
    done = potstill("serve", "--engine", "vllm", "--model", str(tmp_path / "m"), "--antidistill",
                    f"proxy={fit_dir},lambda=1,eps=1e-2", code=2)  # fmt: skip
    assert "tokenizers differ" in done.stderr and "Traceback" not in done.stderr
