"""potstill.distill.evaluate: NLL/PPL, agreement, KL, masks, vocab truncation, gap recovered."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from potstill.core.errors import PotstillError
from potstill.distill.evaluate import compare, evaluate_lm, gap_recovered, to_markdown

V = 48


def tiny(seed: int, vocab: int = V) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    # Sharper-than-init logits so KL/agreement are far from trivial values.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


@pytest.fixture(scope="module")
def blocks() -> torch.Tensor:
    return torch.randint(0, V, (7, 12), generator=torch.Generator().manual_seed(0))


def logits_of(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor | None = None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def test_nll_equals_cross_entropy(blocks: torch.Tensor) -> None:
    m = tiny(1)
    lg = logits_of(m, blocks)
    ref = F.cross_entropy(lg[:, :-1].reshape(-1, V), blocks[:, 1:].reshape(-1)).item()
    out = evaluate_lm(m, blocks, batch_size=3)
    assert out["n_tokens"] == 7 * 11
    assert out["nll"] == pytest.approx(ref, abs=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert set(out) == {"nll", "ppl", "n_tokens"}


def test_model_vs_itself(blocks: torch.Tensor) -> None:
    m = tiny(2)
    out = evaluate_lm(m, blocks, reference=copy.deepcopy(m), batch_size=4)
    assert out["top1_agreement"] == 1.0
    assert abs(out["kl_ref"]) < 1e-6


def test_agreement_and_kl_against_manual(blocks: torch.Tensor) -> None:
    # Student = teacher with a perturbed head, so agreement is strictly between 0 and 1.
    teacher = tiny(4)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        student.lm_head.weight.add_(torch.randn(student.lm_head.weight.shape, generator=g) * 0.5)
    out = evaluate_lm(student, blocks, reference=teacher, batch_size=2)
    ls = F.log_softmax(logits_of(student, blocks)[:, :-1], -1)
    lt = F.log_softmax(logits_of(teacher, blocks)[:, :-1], -1)
    kl = F.kl_div(ls, lt, log_target=True, reduction="sum").item() / (7 * 11)
    agr = (ls.argmax(-1) == lt.argmax(-1)).sum().item() / (7 * 11)
    assert out["kl_ref"] == pytest.approx(kl, rel=1e-5)
    assert out["kl_ref"] > 0.1  # non-trivial
    assert out["top1_agreement"] == pytest.approx(agr, abs=1e-12)
    assert 0.0 < out["top1_agreement"] < 1.0


def test_attention_mask_excludes_padding() -> None:
    m = tiny(5)
    g = torch.Generator().manual_seed(1)
    lengths = [12, 3, 7, 2, 9]
    ids = torch.randint(0, V, (5, 12), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    # Manual: sum of per-sequence CE over the real part only, token-weighted.
    total, count = 0.0, 0
    for i, n in enumerate(lengths):
        lg = logits_of(m, ids[i : i + 1, :n])[0]
        total += F.cross_entropy(lg[:-1], ids[i, 1:n], reduction="sum").item()
        count += n - 1
    out = evaluate_lm(m, ids, attention_mask=mask, batch_size=2)
    assert out["n_tokens"] == count == sum(lengths) - len(lengths)
    assert out["nll"] == pytest.approx(total / count, abs=1e-5)
    # Whatever sits in padded positions does not matter; neither does batch size
    # (token-weighted mean, not a mean of batch means).
    ids2 = ids.masked_fill(mask == 0, 7)
    out2 = evaluate_lm(m, ids2, attention_mask=mask, batch_size=5)
    out1 = evaluate_lm(m, ids, attention_mask=mask, batch_size=1)
    assert out2["nll"] == pytest.approx(out["nll"], abs=1e-5)
    assert out1["nll"] == pytest.approx(out["nll"], abs=1e-5)
    # Unmasked, the padding would count: clearly different.
    assert abs(evaluate_lm(m, ids, batch_size=5)["nll"] - out["nll"]) > 1e-3


def test_vocab_truncation(blocks: torch.Tensor) -> None:
    teacher, student = tiny(6, vocab=V + 16), tiny(7)  # teacher has a padded vocab
    with pytest.raises(PotstillError, match="vocab_size"):
        evaluate_lm(student, blocks, reference=teacher)
    out = evaluate_lm(student, blocks, reference=teacher, vocab_size=V)
    lt = F.log_softmax(logits_of(teacher, blocks)[:, :-1, :V], -1)
    ls = F.log_softmax(logits_of(student, blocks)[:, :-1], -1)
    kl = F.kl_div(ls, lt, log_target=True, reduction="sum").item() / (7 * 11)
    assert out["kl_ref"] == pytest.approx(kl, rel=1e-5)
    # NLL of the teacher alone on its truncated, renormalised vocab.
    tv = evaluate_lm(teacher, blocks, vocab_size=V)
    ref = F.cross_entropy(lt.reshape(-1, V), blocks[:, 1:].reshape(-1)).item()
    assert tv["nll"] == pytest.approx(ref, abs=1e-5)
    full = evaluate_lm(teacher, blocks)
    assert full["nll"] > tv["nll"]  # truncation renormalises: strictly more mass on targets
    with pytest.raises(PotstillError, match="vocab_size"):
        evaluate_lm(student, blocks, vocab_size=V + 1)
    with pytest.raises(PotstillError, match="token id"):
        evaluate_lm(student, blocks, vocab_size=4)


def test_training_mode_restored(blocks: torch.Tensor) -> None:
    m = tiny(8).train()
    evaluate_lm(m, blocks)
    assert m.training


def test_gap_recovered_closed_form() -> None:
    assert gap_recovered(10.0, 6.0, 5.0) == pytest.approx(0.8)
    assert gap_recovered(10.0, 10.0, 5.0) == 0.0
    assert gap_recovered(10.0, 5.0, 5.0) == 1.0
    assert gap_recovered(10.0, 12.0, 5.0) == pytest.approx(-0.4)
    assert gap_recovered(5.0, 4.0, 5.0) is None  # zero denominator
    assert gap_recovered(4.0, 4.5, 5.0) is None  # baseline beats teacher
    assert gap_recovered(math.inf, 4.0, 3.0) is None


def sample_from(model: LlamaForCausalLM, n: int, length: int, seed: int) -> torch.Tensor:
    """Ancestral samples of the model: data on which it is (near) the best model."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, 1), generator=g)
    for _ in range(length - 1):
        probs = F.softmax(logits_of(model, ids)[:, -1], -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return ids


def perturbed(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    out = copy.deepcopy(model)
    with torch.no_grad():
        w = out.lm_head.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) * scale)
    return out


def test_compare() -> None:
    teacher = tiny(9)
    data = sample_from(teacher, 6, 12, seed=0)
    student, baseline = perturbed(teacher, 0.3, 1), tiny(11)
    res = compare(teacher, student, data, baseline=baseline, batch_size=4)
    t, s, b = (evaluate_lm(x, data) for x in (teacher, student, baseline))
    assert res["teacher"]["nll"] == pytest.approx(t["nll"], abs=1e-6)
    assert res["student"]["nll"] == pytest.approx(s["nll"], abs=1e-6)
    assert res["baseline"]["nll"] == pytest.approx(b["nll"], abs=1e-6)
    vs = evaluate_lm(student, data, reference=teacher)
    assert res["student"]["kl_teacher_student"] == pytest.approx(vs["kl_ref"], rel=1e-6)
    assert res["student"]["top1_agreement"] == vs["top1_agreement"]
    vb = evaluate_lm(baseline, data, reference=teacher)
    assert res["baseline"]["kl_teacher_student"] == pytest.approx(vb["kl_ref"], rel=1e-6)
    assert res["baseline"]["top1_agreement"] == vb["top1_agreement"]
    assert res["n_tokens"] == 6 * 11
    # On its own samples the teacher is best; the perturbed copy sits in between.
    tp, sp, bp = t["ppl"], s["ppl"], b["ppl"]
    assert tp < sp < bp
    assert res["gap_recovered"] == pytest.approx((bp - sp) / (bp - tp), rel=1e-5)
    assert 0.0 < res["gap_recovered"] < 1.0
    assert "gap_recovered_warning" not in res

    # Baseline == teacher: zero denominator -> None plus a warning.
    res2 = compare(teacher, student, data, baseline=copy.deepcopy(teacher))
    assert res2["gap_recovered"] is None
    assert "no gap" in res2["gap_recovered_warning"]
    res3 = compare(teacher, student, data)
    assert res3["gap_recovered"] is None and "baseline" not in res3


def test_to_markdown() -> None:
    res = {
        "teacher": {"nll": 2.0, "ppl": math.exp(2.0), "n_tokens": 100},
        "student": {"nll": 2.5, "ppl": math.exp(2.5), "n_tokens": 100,
                    "top1_agreement": 0.625, "kl_teacher_student": 0.25},
        "baseline": {"nll": 3.0, "ppl": math.exp(3.0), "n_tokens": 100,
                     "top1_agreement": 0.5, "kl_teacher_student": 0.75},
        "gap_recovered": 0.75, "n_tokens": 100,
    }  # fmt: skip
    md = to_markdown(res)
    lines = md.splitlines()
    assert lines[0].startswith("| model | NLL")
    assert "top-1 agr." in lines[0] and "KL(T‖·)" in lines[0]
    assert lines[2] == "| teacher | 2.0000 | 7.389 | — | — |"
    assert lines[3] == "| student | 2.5000 | 12.182 | 62.5% | 0.2500 |"
    assert lines[4] == "| baseline | 3.0000 | 20.086 | 50.0% | 0.7500 |"
    assert "Gap recovered (perplexity): 75.0%" in md
    res["gap_recovered"] = None
    res["gap_recovered_warning"] = "undefined: x"
    assert "n/a (undefined: x)" in to_markdown(res)
    single = to_markdown({"nll": 1.0, "ppl": math.e, "n_tokens": 5})
    assert "| model | 1.0000 | 2.718 | — | — |" in single
