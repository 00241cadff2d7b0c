"""potstill's watermark inside vLLM's v1 engine (``make test-vllm``: needs ``vllm`` installed).

The adapter must watermark exactly as potstill's own engine does: the same green lists for the
same (key, context), through vLLM's batch bookkeeping (slots added, removed, moved, swapped),
and text from a real vLLM engine must be detected by potstill's detector under the same key.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from potstill.core.watermark.keys import WatermarkKey, write_key  # noqa: E402
from potstill.core.watermark.params import WatermarkParams  # noqa: E402
from potstill.serve.sampling import DecodeRows  # noqa: E402
from potstill.serve.vllm_processors import PotstillWatermark, vllm_config_for  # noqa: E402
from potstill.serve.watermarking import watermark_processors  # noqa: E402

KEY = WatermarkKey(bytes(range(32)))
V = 320


def _processor(tmp_path: Path, params: WatermarkParams) -> PotstillWatermark:
    key_file = write_key(tmp_path / "wm.key", KEY)
    cfg = SimpleNamespace(additional_config=vllm_config_for(str(key_file), params))
    return PotstillWatermark(cfg, torch.device("cpu"), False)


def _native(params: WatermarkParams, contexts: list[list[int]], temps: list[float],
            logits: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """What potstill's engine does to the same rows."""
    out = logits.clone()
    for i, (ctx, t) in enumerate(zip(contexts, temps, strict=True)):
        rows = DecodeRows((i,), (ctx,), (t,))
        for proc in watermark_processors(KEY, params)({"temperature": t}):
            out[i : i + 1] = proc(rows, out[i : i + 1])
    return out


def _update(size: int, removed: Any = (), added: Any = (), moved: Any = ()) -> BatchUpdate:
    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


@pytest.mark.parametrize("context_width", [1, 3])
def test_kgw_follows_vllms_batch_and_matches_potstills_engine(
    tmp_path: Path, context_width: int
) -> None:
    params = WatermarkParams("kgw", gamma=0.25, delta=2.0, context_width=context_width)
    proc = _processor(tmp_path, params)
    sp = SimpleNamespace(temperature=1.0)
    outs: list[list[int]] = [[], [7], []]
    prompts = [[1, 2, 3, 4], [5, 6], [9]]  # the last is shorter than a width-3 context
    proc.update_state(_update(3, added=[(i, sp, prompts[i], outs[i]) for i in range(3)]))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=g)
    want = _native(params, [p + o for p, o in zip(prompts, outs, strict=True)], [1.0] * 3, logits)
    torch.testing.assert_close(proc.apply(logits.clone()), want, rtol=0, atol=0)
    # vLLM appends to the live output lists, drops slot 1 and condenses (2 -> 1), adds a new
    # request at 2, then swaps 0 and 2: each row must keep its own context.
    outs[0].extend([11, 12])
    outs[2].extend([13, 14, 15])
    new_out: list[int] = [21]
    proc.update_state(_update(2, removed=[1], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    proc.update_state(_update(3, added=[(2, sp, [30, 31, 32], new_out)]))
    proc.update_state(_update(3, moved=[(0, 2, MoveDirectionality.SWAP)]))
    contexts = [[30, 31, 32, 21], prompts[2] + outs[2], prompts[0] + outs[0]]
    logits = torch.randn(3, V, generator=g)
    want = _native(params, contexts, [1.0] * 3, logits)
    torch.testing.assert_close(proc.apply(logits.clone()), want, rtol=0, atol=0)
    assert proc.apply(torch.zeros(0, V)).shape == (0, V)


def test_gumbel_draws_the_keyed_choice_and_leaves_greedy_requests(tmp_path: Path) -> None:
    params = WatermarkParams("gumbel", context_width=2)
    proc = _processor(tmp_path, params)
    prompts = [[1, 2, 3], [4, 5, 6]]
    added = [(0, SimpleNamespace(temperature=0.7), prompts[0], []),
             (1, SimpleNamespace(temperature=0.0), prompts[1], [])]  # fmt: skip
    proc.update_state(_update(2, added=added))
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(1))
    got = proc.apply(logits.clone())
    torch.testing.assert_close(got, _native(params, prompts, [0.7, 0.0], logits), rtol=0, atol=0)
    assert int(torch.isfinite(got[0]).sum()) == 1  # one keyed choice on the sampled row
    torch.testing.assert_close(got[1], logits[1], rtol=0, atol=0)  # greedy: untouched


def test_missing_settings_name_the_fix() -> None:
    with pytest.raises(Exception, match="vllm_config_for"):
        PotstillWatermark(SimpleNamespace(additional_config={}), torch.device("cpu"), False)


def test_vllm_engine_output_is_detected_by_potstill(tmp_path: Path) -> None:
    """A real vLLM engine (CPU build, fp32, eager) serving a tiny Llama with the watermark:
    potstill's detector flags its text under the key, and not under another key."""
    from transformers import LlamaForCausalLM

    from potstill.core.tiny import build_tiny_tokenizer, tiny_config
    from potstill.core.watermark.detect import detect_segments

    # vLLM's CPU attention has kernels for head sizes 32 and up, not the tiny models' 16.
    config = tiny_config(2, 128, V)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 64
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    build_tiny_tokenizer().save_pretrained(model_dir)
    params = WatermarkParams("kgw", gamma=0.25, delta=4.0, context_width=1)
    key_file = write_key(tmp_path / "wm.key", KEY)
    llm = vllm.LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=512,
                   logits_processors=[PotstillWatermark], seed=0,
                   additional_config=vllm_config_for(str(key_file), params))  # fmt: skip
    sp = vllm.SamplingParams(temperature=1.0, max_tokens=200, min_tokens=200, seed=0)
    outs = llm.generate(["The watermark test: "] * 4, sp)
    texts = [list(o.outputs[0].token_ids) for o in outs]
    assert all(len(t) == 200 for t in texts)
    assert detect_segments(texts, KEY, params).p_value < 1e-6
    other = WatermarkKey(bytes(range(1, 33)))
    assert detect_segments(texts, other, params).p_value > 1e-3
