"""Watermarked serving: every sampled completion carries the keyed watermark."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastapi")

from potstill.core.models import load_model  # noqa: E402
from potstill.core.watermark.detect import detect_text  # noqa: E402
from potstill.core.watermark.keys import WatermarkKey  # noqa: E402
from potstill.core.watermark.params import WatermarkParams  # noqa: E402
from potstill.serve.engine import Engine, Event, SamplingParams  # noqa: E402
from potstill.serve.watermarking import watermark_processors, write_serve_metadata  # noqa: E402

KEY = WatermarkKey(bytes(range(32)))


def _generate(params: WatermarkParams | None, temperature: float, seeds: range) -> list[list[int]]:
    """Token ids of one 160-token completion per seed from tiny:0, through the engine."""
    model, tok = load_model("tiny:0")
    engine = Engine(model, tok, model_name="tiny:0", max_batch=8)
    build = watermark_processors(KEY, params) if params else None
    engine.start()
    try:
        done = threading.Semaphore(0)
        events: dict[int, list[Event]] = {s: [] for s in seeds}

        def sink_for(s: int) -> Any:
            def sink(ev: Event) -> None:
                events[s].append(ev)
                if ev.finish_reason or ev.error:
                    done.release()

            return sink

        prompt = tok.encode("The watermark test: ")
        ends = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]

        def no_end(rows: Any, logits: Any) -> Any:  # long texts from a random model
            logits = logits.clone()
            logits[:, ends] = float("-inf")
            return logits

        for s in seeds:
            procs = (no_end, *(build({"temperature": temperature}) if build else ()))
            sp = SamplingParams(
                max_tokens=160, temperature=temperature, seed=s, logprobs=0, processors=procs
            )
            engine.submit(prompt, sp, [0], sink_for(s))
        for _ in seeds:
            assert done.acquire(timeout=120)
    finally:
        engine.stop()
    out = []
    for s in seeds:
        assert not any(ev.error for ev in events[s]), events[s]
        out.append([lp.token_id for ev in events[s] for lp in ev.logprobs])
    return out


# Gumbel sampling is deterministic given the context, so a random tiny model loops
# unless the context is wide and the temperature high (dedup then scores little).
@pytest.mark.parametrize(("scheme", "width", "temperature"), [("kgw", 1, 1.5), ("gumbel", 4, 3.0)])
def test_served_completions_are_detected_and_clean_ones_are_not(
    scheme: str, width: int, temperature: float
) -> None:
    params = WatermarkParams(scheme, gamma=0.25, delta=4.0, context_width=width)  # type: ignore[arg-type]
    marked = _generate(params, temperature=temperature, seeds=range(4))
    clean = _generate(None, temperature=temperature, seeds=range(4))
    p_marked = [detect_text(ids, KEY, params).p_value for ids in marked]
    p_clean = [detect_text(ids, KEY, params).p_value for ids in clean]
    assert all(len(ids) == 160 for ids in marked + clean)
    assert max(p_marked) < 1e-4, p_marked
    assert min(p_clean) > 1e-3, p_clean
    other = WatermarkKey(bytes(range(1, 33)))  # the wrong key sees no watermark
    assert min(detect_text(ids, other, params).p_value for ids in marked) > 1e-3


def test_metadata_records_settings_but_never_the_key(tmp_path: Path) -> None:
    params = WatermarkParams("kgw", gamma=0.25, delta=2.0, context_width=2)
    path = write_serve_metadata(tmp_path / "meta.json", model="tiny:0", key=KEY, params=params)
    meta = json.loads(path.read_text())
    assert meta["watermark"] == {
        "scheme": "kgw",
        "gamma": 0.25,
        "delta": 2.0,
        "context_width": 2,
        "key_id": KEY.key_id,
    }
    assert bytes(range(32)).hex() not in path.read_text()


@pytest.mark.parametrize("scheme", ["kgw", "gumbel"])
def test_in_place_processing_equals_the_copying_call(scheme: str) -> None:
    """``apply_`` (what the vLLM adapter calls on vLLM's own logits) writes the served
    processor's result into the batch it is given, rows without a full context included."""
    import torch

    from potstill.serve.sampling import DecodeRows

    params = WatermarkParams(scheme, gamma=0.25, delta=2.0, context_width=2)
    (proc,) = watermark_processors(WatermarkKey(bytes(range(32))), params)({"temperature": 0.7})
    for contexts in ([[1, 2, 3], [9], [4, 5]], [[1, 2, 3], [8, 9], [4, 5]]):  # some, all full
        rows = DecodeRows((0, 1, 2), tuple(contexts), (0.7, 0.7, 0.7))
        scores = torch.randn(3, 300, generator=torch.Generator().manual_seed(len(contexts[1])))
        want = proc(rows, scores)
        got = scores.clone()
        assert proc.apply_(rows, got) is got
        assert torch.equal(got, want)
        assert not torch.equal(want, scores)
