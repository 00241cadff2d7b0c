"""The serving engine's CPU speed-ups change no number: prepacked bf16 linears give the plain
bf16 logits bit for bit, and the in-place KV cache attends to the same keys and values as
transformers' concatenating one."""

from __future__ import annotations

import threading
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastapi")

from transformers import DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

from potstill.core.kvcache import cache_kw  # noqa: E402
from potstill.core.models import load_model  # noqa: E402
from potstill.serve.engine import Engine, Event, SamplingParams  # noqa: E402
from potstill.serve.kv_slack import MIN_SLACK, SlackLayer, slack_cache  # noqa: E402
from potstill.serve.packed import PackedLinear, can_pack, pack_linears  # noqa: E402


def _bf16(spec: str) -> Any:
    model, tok = load_model(spec, dtype=torch.bfloat16)
    return model.eval(), tok


def _decode(model: Any, ids: Any, steps: int, cache: Any) -> Any:
    """Greedy: prefill ``ids`` [B, T], then ``steps`` one-token steps; all logits, stacked."""
    outs, kw = [], {cache_kw(model): cache, "use_cache": True}
    with torch.inference_mode():
        outs.append(model(input_ids=ids, **kw).logits[:, -1])
        for _ in range(steps):
            outs.append(model(input_ids=outs[-1].argmax(-1, keepdim=True), **kw).logits[:, -1])
    return torch.stack(outs)


needs_pack = pytest.mark.skipif(
    not can_pack(torch.nn.Linear(2, 2).to(torch.bfloat16)), reason="no oneDNN in this torch"
)


@needs_pack
def test_packed_model_gives_the_plain_bf16_logits_bit_for_bit() -> None:
    plain, _ = _bf16("tiny:5")
    packed, _ = _bf16("tiny:5")
    n = pack_linears(packed, rows_hint=4)
    layers = plain.config.num_hidden_layers
    assert n == 7 * layers + 1  # q k v o gate up down per layer, and the head
    assert isinstance(packed.get_output_embeddings(), PackedLinear)
    ids = torch.randint(0, 250, (3, 9), generator=torch.Generator().manual_seed(0))
    a = _decode(plain, ids, 6, DynamicCache(config=plain.config))
    b = _decode(packed, ids, 6, DynamicCache(config=packed.config))
    assert torch.equal(a, b)


@needs_pack
def test_pack_refuses_fp32_and_from_spec_packs_only_bf16() -> None:
    model, _ = load_model("tiny:5")
    assert not can_pack(model)
    with pytest.raises(ValueError, match="bf16"):
        pack_linears(model)
    bf16 = Engine.from_spec("tiny:5", dtype="bfloat16")
    fp32 = Engine.from_spec("tiny:5", dtype="float32")
    assert isinstance(bf16.model.get_output_embeddings(), PackedLinear)
    assert not any(isinstance(m, PackedLinear) for m in fp32.model.modules())
    off = Engine.from_spec("tiny:5", dtype="bfloat16", pack=False)
    assert not any(isinstance(m, PackedLinear) for m in off.model.modules())


def _greedy_texts(engine: Engine, prompts: list[list[int]]) -> list[str]:
    done = threading.Semaphore(0)
    texts = [""] * len(prompts)

    def sink_for(k: int) -> Any:
        def sink(ev: Event) -> None:
            texts[k] += ev.text
            if ev.finish_reason or ev.error:
                assert ev.error is None, ev.error
                done.release()

        return sink

    engine.start()
    try:
        for k, p in enumerate(prompts):
            engine.submit(p, SamplingParams(max_tokens=12, temperature=0.0), [0], sink_for(k))
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    return texts


@needs_pack
def test_packed_engine_serves_the_unpacked_engines_tokens() -> None:
    """Through the whole engine (batch merges, trims, the in-place cache): the same text."""
    prompts = [[5, 6, 7], [9] * 11, [3, 4], [100, 101, 102, 103, 104]]
    a = _greedy_texts(Engine.from_spec("tiny:5", dtype="bfloat16", max_batch=3), prompts)
    b = _greedy_texts(
        Engine.from_spec("tiny:5", dtype="bfloat16", max_batch=3, pack=False), prompts
    )
    assert a == b and all(a)


def test_slack_cache_attends_like_the_concatenating_cache() -> None:
    model, _ = load_model("tiny:5")
    ids = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(1))
    cache = slack_cache(model.config)
    assert all(type(ly) is SlackLayer for ly in cache.layers)
    steps = MIN_SLACK + 10  # at least one reallocation after the prefill's buffer fills
    a = _decode(model, ids, steps, DynamicCache(config=model.config))
    b = _decode(model, ids, steps, cache)
    assert torch.equal(a, b)
    assert cache.get_seq_length() == 7 + steps


def test_slack_layer_writes_in_place_and_keeps_keys_and_values_apart() -> None:
    g = torch.Generator().manual_seed(2)

    def kv(n: int) -> tuple[Any, Any]:
        return torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 5, generator=g)

    slack, ref = SlackLayer(), DynamicLayer()
    k, v = kv(5)
    slack.update(k, v), ref.update(k, v)
    ptr = slack._buf["keys"].data_ptr()  # type: ignore[union-attr]
    for _ in range(MIN_SLACK):  # the first buffer has MIN_SLACK spare columns
        k, v = kv(1)
        ks, vs = slack.update(k, v)
        kr, vr = ref.update(k, v)
        assert torch.equal(ks, kr) and torch.equal(vs, vr)
    assert slack._buf["keys"].data_ptr() == ptr  # type: ignore[union-attr]
    k, v = kv(1)
    slack.update(k, v), ref.update(k, v)  # full: one reallocation, the contents kept
    assert slack._buf["keys"].data_ptr() != ptr  # type: ignore[union-attr]
    assert torch.equal(slack.keys, ref.keys) and torch.equal(slack.values, ref.values)
    # The engine's batch edits: assign keys, then read values to compute theirs.
    keep = torch.tensor([1])
    slack.keys = slack.keys.index_select(0, keep)[:, :, 3:]
    slack.values = slack.values.index_select(0, keep)[:, :, 3:]
    ref.keys = ref.keys.index_select(0, keep)[:, :, 3:]
    ref.values = ref.values.index_select(0, keep)[:, :, 3:]
    assert torch.equal(slack.keys, ref.keys) and torch.equal(slack.values, ref.values)
    k, v = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 5)
    ks, vs = slack.update(k, v)
    kr, vr = ref.update(k, v)
    assert torch.equal(ks, kr) and torch.equal(vs, vr)
    assert slack.get_seq_length() == ref.get_seq_length()
