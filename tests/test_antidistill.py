"""Antidistillation sampling: the proxy gradient, the finite-difference perturbation, the
cached per-row processor, the server integration and the CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

import torch.nn.functional as F  # noqa: E402

from potstill.cli import main  # noqa: E402
from potstill.core.errors import PotstillError  # noqa: E402
from potstill.core.models import load_model  # noqa: E402
from potstill.core.tokenizers import tokenizer_fingerprint  # noqa: E402
from potstill.core.watermark.detect import detect_text  # noqa: E402
from potstill.core.watermark.keys import WatermarkKey, write_key  # noqa: E402
from potstill.core.watermark.params import WatermarkParams  # noqa: E402
from potstill.defend.antidistill import (  # noqa: E402
    GRAD_FILE,
    META_FILE,
    AntidistillPerturbation,
    delta_sigma,
    fit_antidistill_grad,
    load_antidistill,
    save_antidistill,
    suggested_eps,
    trainable_parameters,
)
from potstill.defend.antidistill_serve import (  # noqa: E402
    AntidistillProcessor,
    AntidistillSpec,
    antidistill_serving,
    compose_processor_builders,
    parse_antidistill_arg,
)
from potstill.distill.data import make_labels  # noqa: E402
from potstill.serve.app import ServeSettings, create_app  # noqa: E402
from potstill.serve.background import serve_in_background  # noqa: E402
from potstill.serve.engine import Engine  # noqa: E402
from potstill.serve.sampling import DecodeRows  # noqa: E402
from potstill.serve.watermarking import watermark_processors  # noqa: E402

PROXY = "tiny:1"
REAL_VOCAB = 260  # tiny tokenizer; the tiny models' heads are padded to 320
KEY = WatermarkKey(bytes(range(32)))


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _random_batch(seed: int, rows: int = 6, width: int = 16) -> tuple[Any, Any]:
    """Random ids and make_labels targets with ~30% of the labels dropped (uneven per row)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (rows, width), generator=gen)
    labels = make_labels(ids)
    drop = torch.rand((rows, width), generator=gen) < 0.3
    drop[0, 3:] = True  # a row with very few targets: batch means would weight it wrongly
    return ids, labels.masked_fill(drop, -100)


@pytest.fixture(scope="module")
def proxy() -> Any:
    return load_model(PROXY)[0]


@pytest.fixture(scope="module")
def grads(proxy: Any) -> dict[str, Any]:
    return fit_antidistill_grad(proxy, [_random_batch(0)])[0]


def _shifted_by_hand(proxy: Any, grads: dict[str, Any], step: float) -> Any:
    model = copy.deepcopy(proxy)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(p + step * grads[name])
    return model


def _uncached(pert: AntidistillPerturbation, ids: list[int]) -> Any:
    return pert(torch.tensor([ids]))[0][0]


# ----------------------------------------------------------------------------- the gradient
def test_grad_matches_autograd_reference_and_ignores_batching(proxy: Any) -> None:
    ids, labels = _random_batch(1)
    grads, stats = fit_antidistill_grad(proxy, [(ids, labels)])
    ref = copy.deepcopy(proxy)
    logits = ref(input_ids=ids).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    names = [n for n, _ in ref.named_parameters()]
    assert set(grads) == set(names) and "lm_head.weight" not in grads  # tied head listed once
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5)
    n = int((labels != -100).sum())
    assert stats["n_tokens"] == n
    assert stats["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ref.parameters()))
    assert stats["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert all(p.grad is None for p in proxy.parameters())  # the caller's model is untouched
    # Uneven batches (1, 3, 2 rows; row 0 has few targets): the token mean is unchanged.
    split = [(ids[a:b], labels[a:b]) for a, b in ((0, 1), (1, 4), (4, 6))]
    grads2, stats2 = fit_antidistill_grad(proxy, split)
    assert stats2["n_tokens"] == n
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- the perturbation
@pytest.mark.parametrize("eps", [1.0, 0.3])
def test_perturbation_equals_hand_shifted_finite_difference(
    proxy: Any, grads: dict[str, Any], eps: float
) -> None:
    ctx = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(2))
    pert = AntidistillPerturbation(proxy, grads, eps)
    delta, _ = pert(ctx)
    with torch.no_grad():
        plus = _shifted_by_hand(proxy, grads, eps)(input_ids=ctx).logits[:, -1]
        minus = _shifted_by_hand(proxy, grads, -eps)(input_ids=ctx).logits[:, -1]
    ref = (plus - minus) / (2 * eps)
    assert delta.shape == (3, 320) and delta.dtype == torch.float32
    assert (delta - ref).abs().max() <= 1e-5
    assert ref.abs().max() > 0.1  # not a vacuous comparison
    cut, _ = pert(ctx, vocab_size=REAL_VOCAB)
    assert torch.equal(cut, delta[:, :REAL_VOCAB])
    with pytest.raises(PotstillError, match="logits"):
        pert(ctx, vocab_size=321)


def test_perturbation_converges_to_the_jvp(proxy: Any, grads: dict[str, Any]) -> None:
    """Central differences approach the directional derivative <d logits / d theta, g>
    (forward-mode AD) with error O(eps^2)."""
    from torch.func import functional_call, jvp

    ctx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    ref_model = copy.deepcopy(proxy)
    ref_model.set_attn_implementation("eager")  # CPU SDPA kernels have no forward-mode AD
    params = {n: p.detach() for n, p in trainable_parameters(ref_model).items()}

    def last_logits(pr: dict[str, Any]) -> Any:
        return functional_call(ref_model, pr, (ctx,)).logits[:, -1]

    _, exact = jvp(last_logits, (params,), ({n: grads[n] for n in params},))
    errs = {
        eps: float((AntidistillPerturbation(proxy, grads, eps)(ctx)[0] - exact).abs().max())
        for eps in (0.3, 0.1, 0.03)
    }
    assert 5.0 < errs[0.3] / errs[0.1] < 13.0, errs  # second order: x9 for eps x3
    assert errs[0.03] < 2e-4 * float(exact.abs().max()), errs


@pytest.fixture(scope="module")
def pert(proxy: Any, grads: dict[str, Any]) -> AntidistillPerturbation:
    # eps 0.1: fp32 logit rounding (~1e-6) / (2 eps) stays ~1e-5 between compute paths.
    return AntidistillPerturbation(proxy, grads, 0.1)


def test_incremental_left_padded_batch_equals_uncached(pert: AntidistillPerturbation) -> None:
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 256, (7,), generator=gen).tolist(), [5, 6, 7]]
    ids = torch.zeros((2, 7), dtype=torch.long)
    mask = torch.zeros((2, 7), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, 7 - len(s) :], mask[r, 7 - len(s) :] = torch.tensor(s), 1
    delta, past = pert(ids, mask)
    worst = 0.0
    for step in range(21):
        for r, s in enumerate(seqs):
            worst = max(worst, float((delta[r] - _uncached(pert, s)).abs().max()))
        if step == 20:
            break
        new = torch.randint(0, 256, (2, 1), generator=gen)
        mask = torch.cat([mask, torch.ones((2, 1), dtype=torch.long)], dim=1)
        delta, past = pert(new, mask, past)
        for r in range(2):
            seqs[r].append(int(new[r, 0]))
    assert worst < 5e-5, worst


def test_batched_processor_equals_uncached_as_rows_join_and_leave(
    pert: AntidistillPerturbation,
) -> None:
    """The engine's pattern: rows of different lengths join at different steps (two share a
    prompt), advance one token per step, leave; one call per step covers all live rows, and
    every row's output equals logits + lam * delta of its own context computed alone."""
    proc = AntidistillProcessor(pert, 2.0)
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 256, (6,), generator=gen).tolist()
    contexts: dict[int, list[int]] = {}
    joins = {0: [(0, list(prompt)), (1, list(prompt))], 3: [(2, [7, 8, 9])], 6: [(3, [1] * 11)]}
    leaves = {5: [0], 9: [2]}
    worst = 0.0
    for step in range(12):
        for key, ctx in joins.get(step, []):
            contexts[key] = ctx
        for key in leaves.get(step, []):
            del contexts[key]
        keys = tuple(sorted(contexts))
        rows = DecodeRows(keys, tuple(list(contexts[k]) for k in keys), (1.0,) * len(keys))
        logits = torch.randn(len(keys), REAL_VOCAB, generator=gen)
        out = proc(rows, logits)
        for r, k in enumerate(keys):
            ref = logits[r] + 2.0 * _uncached(pert, contexts[k])[:REAL_VOCAB]
            worst = max(worst, float((out[r] - ref).abs().max()))
            contexts[k].append(int(torch.randint(0, 256, (), generator=gen)))
    assert worst < 1e-4, worst
    assert contexts[1][:6] == prompt and contexts[1] != contexts[3]
    # each row prefilled once, when it joined; every later step one batched pass
    assert proc.stats == {"steps": 11, "prefilled_rows": 4}
    # a repeated call (the engine's retry after a failure) re-prefills and stays right
    keys = tuple(sorted(contexts))
    rows = DecodeRows(keys, tuple(list(contexts[k]) for k in keys), (1.0,) * len(keys))
    zero = torch.zeros(len(keys), REAL_VOCAB)
    first, again = proc(rows, zero), proc(rows, zero)
    assert torch.allclose(first, again, atol=1e-5)


def test_lambda_zero_is_the_identity() -> None:
    proc = AntidistillProcessor(None, 0.0)
    logits = torch.randn(1, REAL_VOCAB)
    assert proc(DecodeRows.one([1, 2, 3]), logits) is logits
    with pytest.raises(PotstillError, match="lambda"):
        AntidistillProcessor(None, -1.0)


# ----------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def fit_dir(tmp_path_factory: pytest.TempPathFactory, proxy: Any) -> Path:
    text = tmp_path_factory.mktemp("data") / "heldout.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    out = tmp_path_factory.mktemp("fit") / "ad"
    args = ["defend", "fit-antidistill", "--proxy", PROXY, "--data", str(text), "--out", str(out)]
    assert main([*args, "--seq-len", "32", "--batch-size", "3"]) == 0
    return out


def test_fit_cli_writes_both_files(
    fit_dir: Path, proxy: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sorted(p.name for p in fit_dir.iterdir()) == sorted([GRAD_FILE, META_FILE])  # no temp
    fit = load_antidistill(fit_dir, proxy)
    meta = json.loads((fit_dir / META_FILE).read_text())
    from potstill.distill.data import load_texts

    n_blocks = (len(load_texts(meta["data"])[0].encode()) + 1) // 32  # bytes + eos, packed
    assert meta["proxy"] == PROXY and meta["n_tokens"] == n_blocks * 31  # last label unscored
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(load_model(PROXY)[1])
    assert meta["grad_norm"] == pytest.approx(
        math.sqrt(sum(float(g.double().pow(2).sum()) for g in fit.grads.values())), rel=1e-6
    )
    # The same data in one batch, through the library: the same g (batching is irrelevant).
    from potstill.cli.antidistill import antidistill_data

    ids, labels = antidistill_data(meta["data"], load_model(PROXY)[1], seq_len=32)
    ref, _ = fit_antidistill_grad(proxy, [(ids, labels)])
    for n in ref:
        torch.testing.assert_close(fit.grads[n], ref[n], atol=1e-6, rtol=1e-5)
    # A rerun into the same directory (other batch size) replaces both files: the same g.
    argv = ["defend", "fit-antidistill", "--proxy", PROXY, "--data", meta["data"]]
    assert main([*argv, "--out", str(fit_dir), "--seq-len", "32", "--batch-size", "5"]) == 0
    again = load_antidistill(fit_dir, proxy)
    assert again.meta["batch_size"] == 5 and again.meta["n_tokens"] == meta["n_tokens"]
    for n in ref:
        torch.testing.assert_close(again.grads[n], ref[n], atol=1e-6, rtol=1e-5)
    assert sorted(p.name for p in fit_dir.iterdir()) == sorted([GRAD_FILE, META_FILE])
    with pytest.raises(SystemExit) as e:
        main(["defend", "fit-antidistill", "--help"])
    assert e.value.code == 0
    assert "--max-tokens" in capsys.readouterr().out


def test_fit_cli_chat_data_scores_assistant_tokens_only(tmp_path: Path) -> None:
    msgs = tmp_path / "m.jsonl"
    ex = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok!"}]}
    msgs.write_text(json.dumps(ex) + "\n")
    out = tmp_path / "ad"
    args = ["defend", "fit-antidistill", "--proxy", PROXY, "--data", f"messages:{msgs}"]
    assert main([*args, "--out", str(out), "--max-tokens", "100"]) == 0
    # "ok!" + <|im_end|>: 4 targets (the template's trailing newline is not trained).
    assert json.loads((out / META_FILE).read_text())["n_tokens"] == 4


def test_interrupted_rewrite_is_detected(
    fit_dir: Path, tmp_path: Path, grads: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import potstill.core.io

    d = tmp_path / "ad"
    meta = json.loads((fit_dir / META_FILE).read_text())
    save_antidistill(d, grads, meta)
    assert load_antidistill(d).grads.keys() == grads.keys()

    def crash(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(potstill.core.io, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):  # dies between the two renames
        save_antidistill(d, {n: g * 2 for n, g in grads.items()}, meta)
    with pytest.raises(PotstillError, match="sha256"):
        load_antidistill(d)


def test_bad_dirs_and_mismatched_proxy(fit_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PotstillError, match="fit-antidistill"):
        load_antidistill(tmp_path / "nope")
    with pytest.raises(PotstillError, match="lacks"):
        load_antidistill(tmp_path)
    other = load_model("tiny:1:1x32")[0]
    with pytest.raises(PotstillError, match="refit"):
        load_antidistill(fit_dir, other)


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--proxy", "tiny:zero"], "tiny:zero"),
        (["--data", "/no/such/file.txt"], "/no/such/file.txt"),
        (["--seq-len", "1"], "--seq-len"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--data", "messages:/no/such.jsonl"], "/no/such.jsonl"),
    ],
)
def test_fit_cli_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], needle: str
) -> None:
    text = tmp_path / "t.txt"
    text.write_text("some text " * 20)
    base = {"--proxy": PROXY, "--data": str(text), "--out": str(tmp_path / "ad")}
    for flag, value in zip(extra[::2], extra[1::2]):
        base[flag] = value
    _one_line_error(capsys, ["defend", "fit-antidistill", *sum(base.items(), ())], needle)
    assert not (tmp_path / "ad").exists()


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("proxy={d},lambda=-1,eps=1e-3", "lambda must be >= 0"),
        ("proxy={d},lambda=1,eps=0", "eps must be > 0"),
        ("proxy={d},lambda=1,bias=1", "exactly one of lambda= and bias="),
        ("proxy={d},eps=1e-3", "exactly one of lambda= and bias="),
        ("lambda=1", "lacks proxy"),
        ("proxy={d},bias=-1", "bias must be >= 0"),
        ("proxy={d},lambda=1,eps=1e-3,temp=2", "unknown --antidistill field 'temp'"),
        ("proxy={d},lambda=x,eps=1e-3", "not a number"),
        ("proxy=/no/such/dir,lambda=1,eps=1e-3", "not a fit-antidistill output"),
    ],
)
def test_serve_flag_bad_input(
    capsys: pytest.CaptureFixture[str], fit_dir: Path, value: str, needle: str
) -> None:
    _one_line_error(
        capsys, ["serve", "--model", "tiny:0", "--antidistill", value.format(d=fit_dir)], needle
    )


def test_serve_cli_composes_and_records_metadata(
    fit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`potstill serve --antidistill ... --watermark kgw` up to uvicorn.run: antidistill first,
    the watermark last, and the settings in the metadata file."""
    import uvicorn

    import potstill.serve.app as app_mod

    seen: dict[str, Any] = {}
    real_create = app_mod.create_app

    def create_app(engine: Any, settings: Any) -> Any:
        seen["s"] = settings
        return real_create(engine, settings)

    monkeypatch.setattr(app_mod, "create_app", create_app)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    key_file = write_key(tmp_path / "wm.key", KEY)
    meta_path = tmp_path / "meta.json"
    argv = ["serve", "--model", "tiny:0", "--device", "cpu", "--metadata", str(meta_path)]
    argv += ["--antidistill", f"proxy={fit_dir},lambda=0.5,eps=0.01"]
    assert main([*argv, "--watermark", "kgw", "--watermark-key-file", str(key_file)]) == 0
    chain = seen["s"].processors({"temperature": 1.0})
    assert [type(p).__name__ for p in chain] == ["AntidistillProcessor", "ServedKGW"]
    meta = json.loads(meta_path.read_text())
    fit_meta = json.loads((fit_dir / META_FILE).read_text())
    assert meta["antidistill"] == {
        "proxy": PROXY,
        "proxy_dir": str(fit_dir),
        "lambda": 0.5,
        "eps": 0.01,
        "grad_sha256": fit_meta["grad_sha256"],
        "grad_norm": fit_meta["grad_norm"],
        "bias": None,
        "delta_sigma": fit_meta["delta_sigma"],
    }
    assert meta["watermark"]["key_id"] == KEY.key_id


def test_serving_rejects_another_tokenizer(fit_dir: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "the", "cat"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    other = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
    with pytest.raises(PotstillError, match="tokenizers differ"):
        antidistill_serving(AntidistillSpec(fit_dir, 1.0, 0.01), other, vocab_size=4)
    spec = parse_antidistill_arg(f"proxy={fit_dir},lambda=1,eps=1e-2")
    assert (spec.lam, spec.eps) == (1.0, 0.01)


def test_bias_is_in_units_of_the_fits_delta_spread(fit_dir: Path) -> None:
    """``bias=B`` serves lambda = B / delta_sigma with the fit's suggested eps (both recorded
    by fit-antidistill); ``lambda=`` and ``eps=`` given explicitly win."""
    meta = json.loads((fit_dir / META_FILE).read_text())
    assert meta["suggested_eps"] * meta["grad_norm"] == pytest.approx(1e-2)
    assert meta["delta_sigma"] > 0 and meta["delta_sigma_sequences"] >= 1
    tok = load_model(PROXY)[1]
    _, rec = antidistill_serving(
        parse_antidistill_arg(f"proxy={fit_dir},bias=0.5"), tok, vocab_size=REAL_VOCAB
    )
    assert rec["lambda"] == pytest.approx(0.5 / meta["delta_sigma"])
    assert rec["eps"] == meta["suggested_eps"] and rec["bias"] == 0.5
    _, rec = antidistill_serving(
        parse_antidistill_arg(f"proxy={fit_dir},lambda=2,eps=0.1"), tok, vocab_size=REAL_VOCAB
    )
    assert (rec["lambda"], rec["eps"], rec["bias"]) == (2.0, 0.1, None)
    old = {k: v for k, v in meta.items() if k not in ("suggested_eps", "delta_sigma")}
    with pytest.raises(PotstillError, match="pass eps=E or refit"):
        AntidistillSpec(fit_dir, None, None, 0.5).resolve(old)
    with pytest.raises(PotstillError, match="pass lambda=L or refit"):
        AntidistillSpec(fit_dir, None, 0.1, 0.5).resolve(old)


def test_delta_sigma_matches_the_exact_directional_derivative(
    proxy: Any, grads: dict[str, Any]
) -> None:
    """delta_sigma (finite differences at the suggested eps) equals the same spread computed
    from forward-mode AD: RMS over scored positions of std over the proxy's top-k tokens of
    <d logits / d theta, g>; and it is linear in g."""
    from torch.func import functional_call, jvp

    ids, labels = _random_batch(5, rows=3, width=12)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    eps = suggested_eps(norm)
    assert eps * norm == pytest.approx(1e-2)
    with pytest.raises(PotstillError, match="zero or not finite"):
        suggested_eps(0.0)
    got = delta_sigma(AntidistillPerturbation(proxy, grads, eps), [(ids, labels)], top_k=16)
    ref_model = copy.deepcopy(proxy)
    ref_model.set_attn_implementation("eager")
    params = {n: p.detach() for n, p in trainable_parameters(ref_model).items()}
    logits, exact = jvp(
        lambda pr: functional_call(ref_model, pr, (ids,)).logits,
        (params,),
        ({n: grads[n] for n in params},),
    )
    scored = labels != -100
    top = logits[scored].topk(16, dim=-1).indices
    want = float(exact[scored].gather(-1, top).std(dim=-1).pow(2).mean().sqrt())
    assert got == pytest.approx(want, rel=1e-2)
    doubled = {n: 2 * g for n, g in grads.items()}
    got2 = delta_sigma(AntidistillPerturbation(proxy, doubled, eps / 2), [(ids, labels)], top_k=16)
    assert got2 == pytest.approx(2 * got, rel=1e-2)


# ----------------------------------------------------------------------------- the server
def _ascii_only(rec: dict[str, Any]) -> list[Any]:
    """Test guard: ASCII bytes only (no eos), so texts are long and re-encode to the same ids."""

    def proc(rows: Any, logits: Any) -> Any:
        out = logits.clone()
        out[:, 128:] = float("-inf")
        return out

    return [proc]


def _served(builder: Any, *, seeds: range, n: int, max_tokens: int, temperature: float) -> list:
    model, tok = load_model("tiny:0")
    engine = Engine(model, tok, model_name="tiny:0", max_batch=8)
    with serve_in_background(create_app(engine, ServeSettings(processors=builder))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        texts = []
        for seed in seeds:
            r = client.completions.create(
                model="tiny:0", prompt="Antidistill: ", max_tokens=max_tokens,
                temperature=temperature, seed=seed, n=n,
            )  # fmt: skip
            texts += [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    return texts


def test_served_lambda_zero_is_undefended_and_lambda_changes_output(fit_dir: Path) -> None:
    tok = load_model("tiny:0")[1]
    kw = {"seeds": range(3), "n": 2, "max_tokens": 16, "temperature": 1.0}
    clean = _served(None, **kw)
    off, meta = antidistill_serving(AntidistillSpec(fit_dir, 0.0, 0.01), tok, vocab_size=REAL_VOCAB)
    assert meta["lambda"] == 0.0
    assert _served(off, **kw) == clean
    on, _ = antidistill_serving(AntidistillSpec(fit_dir, 1.0, 0.01), tok, vocab_size=REAL_VOCAB)
    defended = _served(on, **kw)
    assert sum(a != b for a, b in zip(defended, clean)) >= 4, (defended, clean)


def test_served_greedy_follows_the_biased_logits(fit_dir: Path) -> None:
    """A greedy defended completion is argmax(logits + lam * delta) step by step."""
    model, tok = load_model("tiny:0")
    fit = load_antidistill(fit_dir)
    pert = AntidistillPerturbation(load_model(PROXY)[0], fit.grads, 0.01)
    lam = 4.0
    builder, _ = antidistill_serving(AntidistillSpec(fit_dir, lam, 0.01), tok, vocab_size=260)
    text = _served(compose_processor_builders(_ascii_only, builder), seeds=range(1), n=1,
                   max_tokens=12, temperature=0.0)[0]  # fmt: skip
    ids = tok("Antidistill: ", add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(12):
            ctx = torch.tensor([ids + out])
            logits = model(input_ids=ctx).logits[0, -1, :REAL_VOCAB]
            logits[128:] = float("-inf")
            out.append(int(torch.argmax(logits + lam * pert(ctx, vocab_size=REAL_VOCAB)[0][0])))
    assert text == tok.decode(out)


def test_watermark_survives_antidistillation(fit_dir: Path) -> None:
    """KGW applied after the antidistillation bias is still detected. (lam 0.25: this random
    proxy's delta reaches ~14 on some tokens, and a much larger bias makes the random tiny
    teacher loop on one token, leaving too few distinct tuples to score.)"""
    tok = load_model("tiny:0")[1]
    params = WatermarkParams("kgw", gamma=0.25, delta=4.0, context_width=2)
    ad, _ = antidistill_serving(AntidistillSpec(fit_dir, 0.25, 0.01), tok, vocab_size=REAL_VOCAB)
    wm = watermark_processors(KEY, params)
    kw = {"seeds": range(2), "n": 1, "max_tokens": 80, "temperature": 2.0}
    both = _served(compose_processor_builders(_ascii_only, ad, wm), **kw)
    only_wm = _served(compose_processor_builders(_ascii_only, wm), **kw)
    assert all(a != b for a, b in zip(both, only_wm))  # the antidistillation bias acted
    for text in both:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 80 and tok.decode(ids) == text
        assert detect_text(ids, KEY, params).p_value < 1e-6
        assert detect_text(ids, WatermarkKey(bytes(range(1, 33))), params).p_value > 1e-3
