"""Provenance without a watermark: is the suspect closer to our teacher than independent models?

After Nikolic et al. 2025 ("Model Provenance Testing for LLMs"): a model trained on a
teacher's outputs agrees with that teacher more than models of comparable capability that
never saw them. Every model answers (or is scored on) the same prompts, so the test is
paired per prompt.

Statistics (a per-prompt number, higher = closer to the teacher):

Prompts are put in each model's chat template when it has one (answers harvested from a chat
API answer such prompts), raw otherwise.

- ``agreement`` (same tokenizer as the teacher): the teacher writes a greedy continuation of
  each prompt; the model is teacher-forced through prompt + continuation and scores the
  fraction of continuation positions where its argmax is the teacher's token.
- ``teacher_ll`` (any tokenizers): the model writes a greedy continuation; the teacher's
  log-likelihood of that text (re-tokenised by the teacher) given the prompt, in nats per byte.
  Fluent, repetitive text is likely under any competent model, so this alone can rank an
  independent model above a weaker derivative. With a ``reference`` model R (independent of
  the teacher and not under test) the value is ``ll_T - ll_R`` per byte: how much more the
  teacher likes the answer than R does, which cancels what makes a text easy for everyone.
- ``model_ll`` (grey-box, any tokenizers): the teacher writes a greedy continuation of each
  prompt; the model's own log-likelihood of it, in nats per byte. Distillation maximises
  exactly this, so it is the most direct trace; it needs the model's probabilities (weights,
  or an endpoint that echoes prompt logprobs). A better model likes any fluent text more, so
  a ``reference`` R is required and the value is ``ll_M(T's answer) - ll_M(R's answer)``: how much more
  the model prefers the teacher's answer to an independent model's answer to the same prompt.

Test. For suspect S, control c and prompt i, ``d_i = stat_i(S) - stat_i(c)``. H0_c: ``E d <= 0``
("the suspect is no closer to the teacher than control c"), one-sided paired t-test (prompts
are drawn independently, so the d_i are i.i.d.). The p-values are Holm-adjusted over the
controls, and the suspect is flagged only if H0_c is rejected for *every* control at the
family-wise level: one weak control cannot convict. H0 is composite, so the null p-values are
not uniform (they are conservative when the suspect is strictly farther than a control);
the false-flag rate is measured over independent models instead (``benchmarks/theft.py``).

What a control must be for this to mean anything: a model independent of the teacher (not
trained on its outputs, not a fine-tune of it) and of comparable capability on the prompts. A
stronger model agrees more with any competent teacher, so a suspect better than every control
can look close for that reason alone; the result warns when a control's prompt likelihood per
byte is below the suspect's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from potstill.core.errors import PotstillError
from potstill.detect.batched import length_batches, next_token_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

R = TypeVar("R")

__all__ = [
    "Candidate",
    "ControlComparison",
    "Endpoint",
    "ModelScores",
    "ProvenanceResult",
    "answer_ll",
    "compare",
    "min_prompts",
    "provenance_test",
    "score_models",
]

Statistic = Literal["agreement", "teacher_ll", "model_ll"]
STATISTICS = ("agreement", "teacher_ll", "model_ll")
CAPABILITY_MARGIN = 0.02  # nats/byte: a control this much worse than the suspect is "weaker"


@dataclass
class Candidate:
    """A local model under test: its display name, weights and tokenizer."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    def answers(self, prompts: Sequence[str], n_new: int) -> list[str]:
        """Greedy continuations of the prompts (in the model's chat template), decoded."""
        ids = [_encode(self.tokenizer, as_prompt(self.tokenizer, p)) for p in prompts]
        conts = greedy(self, ids, n_new)
        return [str(self.tokenizer.decode(c, skip_special_tokens=True)) for c in conts]


@dataclass
class Endpoint:
    """A model behind an OpenAI-compatible ``/v1/completions`` endpoint.

    ``teacher_ll`` uses its greedy answers; ``model_ll`` its echoed prompt logprobs (``echo``
    with ``logprobs``), which not every server returns. ``agreement`` and the capability check
    need the model's whole next-token distribution, which no endpoint gives.
    """

    name: str
    base_url: str
    model: str = "default"
    api_key: str | None = None
    timeout: float = 120.0
    client: Any = None  # an HTTPClient (core.openai_http); None: a SyncClient per batch

    def answers(self, prompts: Sequence[str], n_new: int) -> list[str]:
        bodies = [{"prompt": p, "max_tokens": n_new, "temperature": 0.0} for p in prompts]
        return [str(r["choices"][0]["text"]) for r in self._post(bodies, "choices[0].text")]

    def answer_ll(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Per prompt: the endpoint's log-likelihood of ``answers[i]`` after ``prompts[i]``
        (raw text, as ``answers`` sends it), nats per UTF-8 byte, from echoed logprobs.

        ``log P(prompt + answer) - log P(prompt)``, two echoed requests: servers derive
        ``text_offset`` by decoding tokens one at a time (a BOS token, SentencePiece spaces
        and split characters shift it), so offsets are never used to find the answer.
        """
        totals = self._echo_ll([p + a for p, a in zip(prompts, answers)])
        bases = self._echo_ll(list(prompts))
        return [
            (t - b) / len(a.encode()) if a.encode() else math.nan
            for t, b, a in zip(totals, bases, answers)
        ]

    def _echo_ll(self, texts: list[str]) -> list[float]:
        """Summed echoed logprobs of each text (the first token, which has none, adds 0)."""
        bodies = [
            {"prompt": t, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 0}
            for t in texts
        ]
        out = []
        for r in self._post(bodies, "echoed logprobs"):
            lp = r["choices"][0].get("logprobs")
            values = lp.get("token_logprobs") if isinstance(lp, dict) else None
            n_prompt = (r.get("usage") or {}).get("prompt_tokens")
            if not isinstance(values, list) or not values or not isinstance(n_prompt, int):
                raise PotstillError(
                    f"endpoint {self.name} returned no prompt logprobs (echo with logprobs, and "
                    "usage.prompt_tokens): --statistic model_ll needs them; use --statistic "
                    "teacher_ll, which needs only answers"
                )
            # the echoed prompt's entries; what follows is the generated token (if any)
            out.append(sum(float(x) for x in values[:n_prompt] if x is not None))
        return out

    def _post(self, bodies: list[dict[str, Any]], want: str) -> list[dict[str, Any]]:
        """Each completions request's response (``choices[0].text`` checked), with errors that
        name the endpoint."""
        from potstill.core.openai_http import open_client, post_json, route_url

        url = route_url(self.base_url, "completions")

        def check(data: Any) -> None:
            if not isinstance(data["choices"][0], dict) or "text" not in data["choices"][0]:
                raise KeyError("text")

        with open_client(self.client, self.timeout) as http:
            return [
                post_json(http, url, {"model": self.model, **body}, api_key=self.api_key,
                          api="completions", want=want, check=check,
                          on_response=self._refused_echo if body.get("echo") else None)
                for body in bodies
            ]  # fmt: skip

    def _refused_echo(self, resp: Any) -> None:
        if resp.status == 400:
            raise PotstillError(
                f"endpoint {self.name} refused echoed logprobs "
                f"({resp.body[:200].decode(errors='replace')}): "
                "--statistic model_ll needs them; use --statistic teacher_ll"
            )


Model = Candidate | Endpoint


@dataclass(frozen=True)
class ControlComparison:
    """Suspect vs one control: means of the per-prompt statistic, the paired test, Holm."""

    control: str
    suspect_mean: float
    control_mean: float
    mean_diff: float
    effect_size: float  # Cohen's d_z: mean difference / sd of the differences
    t: float
    p_value: float
    p_holm: float
    rejected: bool
    control_prompt_ll: float  # nats/byte on the prompts (capability proxy; NaN for an endpoint)


@dataclass(frozen=True)
class ProvenanceResult:
    """The whole test; ``flagged`` iff every control's Holm-adjusted p is below ``alpha``."""

    suspect: str
    teacher: str
    statistic: str
    n_prompts: int
    alpha: float
    comparisons: list[ControlComparison]
    flagged: bool
    p_value: float  # max Holm-adjusted p: the level at which every control is beaten
    suspect_prompt_ll: float
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def verdict(self) -> str:
        worst = max(self.comparisons, key=lambda c: c.p_holm)
        if self.flagged:
            return (
                f"flagged: {self.suspect} is closer to {self.teacher} than all "
                f"{len(self.comparisons)} controls (largest Holm p={self.p_value:.3g} < α={self.alpha:g})"
            )
        return (
            f"not flagged: {self.suspect} is not shown closer to {self.teacher} than control "
            f"{worst.control} (Holm p={worst.p_holm:.3g} ≥ α={self.alpha:g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"verdict": self.verdict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def min_prompts(n_controls: int, alpha: float) -> int:
    """Fewest prompts for which the test can reach ``alpha``: ``max(10, ceil(log2(m / alpha)) + 1)``.

    ``log2(m / alpha)`` is where even a distribution-free sign test could first reject at
    Holm's first step; below 10 prompts the t approximation is not trusted.
    """
    return max(10, math.ceil(math.log2(n_controls / alpha)) + 1)


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def greedy(
    cand: Candidate, prompts: Sequence[list[int]], n_new: int, batch: int = 32
) -> list[list[int]]:
    """The model's greedy continuation (``n_new`` ids, EOS allowed) of each prompt's ids.

    Prompts go in length-sorted batches of up to ``batch``: decoding is bound by reading the
    weights once per step, so a wider batch is nearly free, and sorting keeps left padding short.
    """
    import torch

    tok, out = cand.tokenizer, {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    lengths = [len(p) for p in prompts]
    # rows are the only limit here: a group of `batch` of the longest prompts always fits
    groups = length_batches(lengths, max_tokens=batch * max(lengths, default=1), max_rows=batch)
    for group in groups:
        width = max(len(prompts[i]) for i in group)
        ids = torch.full((len(group), width), pad, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(group):  # left padding: every row ends at the last column
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.no_grad():
            gen = cand.model.generate(  # type: ignore[operator]  # transformers' typing
                input_ids=ids.to(_device(cand.model)),
                attention_mask=mask.to(_device(cand.model)),
                max_new_tokens=n_new,
                do_sample=False,
                pad_token_id=pad,
            )
        eos = tok.eos_token_id
        for i, row in zip(group, gen[:, width:].tolist()):
            out[i] = row[: row.index(eos)] if eos is not None and eos in row else row
    return [out[i] for i in range(len(prompts))]


def _logprobs(
    cand: Candidate,
    seqs: Sequence[list[int]],
    reduce: Callable[[int, Any], R],
    normalise: bool = True,
) -> list[R]:
    """``reduce(i, lp_i)`` per sequence, ``lp_i [T, V]`` the fp32 next-token log-softmax over
    the logits that name real tokens (``V = len(tokenizer)``: padding rows of a head can never be
    emitted, and a server drops them too), from batched passes."""
    width = len(cand.tokenizer)
    return next_token_logprobs(cand.model, seqs, reduce, width=width, normalise=normalise)


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def as_prompt(tok: Any, text: str) -> str:
    """``text`` as one user turn in the tokenizer's chat template, or raw for a base model.

    Outputs harvested from a chat API answer chat-formatted prompts, so that is where a
    student's closeness to its teacher shows.
    """
    if getattr(tok, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return text


def prompt_ll_per_byte(cand: Candidate, prompts: Sequence[str]) -> float:
    """Mean log-likelihood (nats per UTF-8 byte) of the prompts: a capability proxy."""
    seqs = [_encode(cand.tokenizer, p) for p in prompts]

    def ll(i: int, lp: Any) -> float:
        return float(lp[:-1].gather(1, _col(seqs[i][1:])).sum())

    total = sum(v for s, v in zip(seqs, _logprobs(cand, seqs, ll)) if len(s) > 1)
    nbytes = sum(len(str(cand.tokenizer.decode(s[1:])).encode()) for s in seqs if len(s) > 1)
    return total / max(1, nbytes)


def _col(ids: list[int]) -> Any:
    import torch

    return torch.tensor(ids, dtype=torch.int64)[:, None]


def agreement_scores(
    cand: Candidate, prompts: Sequence[list[int]], conts: Sequence[list[int]]
) -> list[float]:
    """Per prompt: fraction of the teacher's continuation tokens that are the model's argmax."""

    def agree(i: int, lp: Any) -> float:
        p, c = prompts[i], conts[i]
        if not c:
            return float("nan")
        pred = lp[len(p) - 1 : len(p) + len(c) - 1].argmax(-1).tolist()
        return sum(int(a == b) for a, b in zip(pred, c)) / len(c)

    # an argmax needs no normalisation: the raw logits have the same one
    return _logprobs(cand, [p + c for p, c in zip(prompts, conts)], agree, normalise=False)


def answer_ll(model: Model, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
    """Per prompt: ``model``'s log-likelihood of ``answers[i]`` after ``prompts[i]`` (in its chat
    template), in nats per UTF-8 byte of the answer (bytes, not tokens, so that models with
    different tokenizers are on one scale; NaN for an empty answer)."""
    if isinstance(model, Endpoint):
        return model.answer_ll(prompts, answers)
    tok = model.tokenizer
    ps = [_encode(tok, as_prompt(tok, p)) for p in prompts]
    ans = [_encode(tok, a) for a in answers]

    def ll(i: int, lp: Any) -> float:
        p, a, n = ps[i], ans[i], len(answers[i].encode())
        if not a or not n:
            return float("nan")
        return float(lp[len(p) - 1 : len(p) + len(a) - 1].gather(1, _col(a)).sum()) / n

    return _logprobs(model, [p + a for p, a in zip(ps, ans)], ll)


def _paired(s: Sequence[float], c: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean diff, d_z, t, one-sided p) of ``s - c`` over prompts where both are defined."""
    import numpy as np
    from scipy import stats

    d = np.array([a - b for a, b in zip(s, c) if math.isfinite(a) and math.isfinite(b)])
    mean, sd = float(d.mean()), float(d.std(ddof=1)) if d.size > 1 else 0.0
    if sd == 0.0:  # no spread: only a sign test makes sense
        return mean, math.inf if mean > 0 else 0.0, math.nan, 0.5**d.size if mean > 0 else 1.0
    t = mean / (sd / math.sqrt(d.size))
    return mean, mean / sd, t, float(stats.t.sf(t, d.size - 1))


def _same_tokenizer(a: Model, b: Candidate) -> bool:
    from potstill.core.tokenizers import tokenizer_fingerprint

    if isinstance(a, Endpoint):
        return False
    return tokenizer_fingerprint(a.tokenizer) == tokenizer_fingerprint(b.tokenizer)


def per_prompt_statistic(
    statistic: Statistic,
    teacher: Candidate,
    models: Sequence[Model],
    prompts: Sequence[str],
    n_new: int,
    reference: Candidate | None = None,
) -> list[list[float]]:
    """``[model][prompt]`` values of ``statistic`` (see the module doc)."""
    if statistic == "agreement":
        bad = [m.name for m in models if not _same_tokenizer(m, teacher)]
        if bad:
            raise PotstillError(
                f"--statistic agreement needs the teacher's tokenizer and the model's token "
                f"probabilities; {', '.join(bad)} lack them (another tokenizer, or an endpoint): "
                "use --statistic teacher_ll, which works across tokenizers and endpoints"
            )
        ids = [_encode(teacher.tokenizer, as_prompt(teacher.tokenizer, p)) for p in prompts]
        conts = greedy(teacher, ids, n_new)
        return [agreement_scores(m, ids, conts) for m in models if isinstance(m, Candidate)]
    if statistic == "model_ll":
        if len({isinstance(m, Endpoint) for m in models}) > 1:
            raise PotstillError(
                "--statistic model_ll scores local models in their chat template and endpoints "
                "on raw text, so the two are not comparable: make every model local or every "
                "model an endpoint"
            )
        mine = teacher.answers(prompts, n_new)
        theirs = reference.answers(prompts, n_new) if reference is not None else None
        rows = []
        for m in models:
            v = answer_ll(m, prompts, mine)
            if theirs is not None:  # how much more the model prefers T's answer to R's
                v = [a - b for a, b in zip(v, answer_ll(m, prompts, theirs))]
            rows.append(v)
        return rows
    rows = []
    for m in models:
        answers = m.answers(prompts, n_new)
        t = answer_ll(teacher, prompts, answers)
        if reference is not None:  # how much more the teacher likes the answer than R does
            r = answer_ll(reference, prompts, answers)
            t = [a - b for a, b in zip(t, r)]
        rows.append(t)
    return rows


@dataclass(frozen=True)
class ModelScores:
    """One model's per-prompt statistic and its capability on the prompts (nats/byte)."""

    name: str
    values: list[float]
    prompt_ll: float


def _check(n_controls: int, n_prompts: int, alpha: float) -> None:
    if n_controls < 1:
        raise PotstillError(
            "provenance needs at least one control: independent models of comparable "
            "capability (--controls C1 C2 ...); without them closeness to the teacher means nothing"
        )
    if not 0.0 < alpha < 1.0:
        raise PotstillError(f"alpha must be in (0, 1), got {alpha} (e.g. 0.01)")
    need = min_prompts(n_controls, alpha)
    if n_prompts < need:
        raise PotstillError(
            f"{n_prompts} prompts cannot reach α={alpha:g} over {n_controls} controls: "
            f"give at least {need} (--n-prompts or a longer --prompts file)"
        )


def score_models(
    teacher: Candidate,
    models: Sequence[Model],
    prompts: Sequence[str],
    *,
    statistic: Statistic | Literal["auto"] = "auto",
    new_tokens: int = 32,
    reference: Candidate | None = None,
) -> tuple[Statistic, list[ModelScores]]:
    """Each model's per-prompt statistic (computed once; :func:`compare` reuses them)."""
    if statistic == "auto":
        same = all(_same_tokenizer(m, teacher) for m in models)
        statistic = "agreement" if same else "teacher_ll"
    if statistic not in STATISTICS:
        raise PotstillError(f"statistic must be one of {STATISTICS} or 'auto', got {statistic!r}")
    if reference is not None and statistic == "agreement":
        raise PotstillError("--reference applies to --statistic teacher_ll and model_ll only")
    if reference is None and statistic == "model_ll":
        # Without the contrast an independent model that is merely surer of any text beats the
        # others (tests/test_provenance.py shows one such tiny model).
        raise PotstillError(
            "--statistic model_ll needs --reference R (an independent model, not tested): "
            "without it a model that likes all text more looks closer to the teacher"
        )
    if reference is not None and any(reference.name == m.name for m in models):
        raise PotstillError(
            f"the reference {reference.name} is also tested: a model scores its own greedy "
            "answers too well; use a reference that is neither the suspect nor a control"
        )
    values = per_prompt_statistic(statistic, teacher, models, prompts, new_tokens, reference)
    return statistic, [
        ModelScores(
            m.name, v, prompt_ll_per_byte(m, prompts) if isinstance(m, Candidate) else math.nan
        )
        for m, v in zip(models, values)
    ]


def compare(
    suspect: ModelScores,
    controls: Sequence[ModelScores],
    *,
    teacher: str,
    statistic: str,
    alpha: float = 0.01,
    settings: dict[str, Any] | None = None,
) -> ProvenanceResult:
    """The paired tests of ``suspect`` against every control, Holm, and the verdict."""
    from potstill.detect.stats import holm_adjusted

    _check(len(controls), len(suspect.values), alpha)
    need = min_prompts(len(controls), alpha)
    n_ok = sum(math.isfinite(v) for v in suspect.values)
    if n_ok < need:
        raise PotstillError(
            f"{suspect.name} has a value on only {n_ok} of {len(suspect.values)} prompts (empty "
            f"answers give none), below the {need} needed for α={alpha:g}: give more prompts"
        )
    comparisons, warnings = [], []
    tests = []
    for c in controls:
        pairs = sum(math.isfinite(a) and math.isfinite(b) for a, b in zip(suspect.values, c.values))
        if pairs < need:  # no evidence against this control: it is not beaten
            warnings.append(f"control {c.name}: only {pairs} prompts with both values; not beaten")
            tests.append((math.nan, math.nan, math.nan, 1.0))
        else:
            tests.append(_paired(suspect.values, c.values))
    adjusted = holm_adjusted([t[3] for t in tests])
    cap_s = suspect.prompt_ll
    for c, (mean, dz, t, p), adj in zip(controls, tests, adjusted):
        comparisons.append(
            ControlComparison(
                control=c.name,
                suspect_mean=_nanmean(suspect.values),
                control_mean=_nanmean(c.values),
                mean_diff=mean,
                effect_size=dz,
                t=t,
                p_value=p,
                p_holm=adj,
                rejected=adj < alpha,
                control_prompt_ll=c.prompt_ll,
            )
        )
        if not (math.isfinite(c.prompt_ll) and math.isfinite(cap_s)):
            warnings.append(f"capability of {c.name} vs the suspect not checked (an endpoint)")
        elif c.prompt_ll < cap_s - CAPABILITY_MARGIN:
            warnings.append(
                f"control {c.name} is weaker than the suspect on these prompts ({c.prompt_ll:.3f} "
                f"vs {cap_s:.3f} nats/byte): a closer suspect may only be a better model"
            )
    p_all = max(adjusted)
    return ProvenanceResult(
        suspect=suspect.name,
        teacher=teacher,
        statistic=statistic,
        n_prompts=len(suspect.values),
        alpha=alpha,
        comparisons=comparisons,
        flagged=p_all < alpha,
        p_value=p_all,
        suspect_prompt_ll=cap_s,
        warnings=warnings,
        settings={"test": "one-sided paired t, Holm over controls", **(settings or {})},
    )


def provenance_test(
    suspect: Model,
    teacher: Candidate,
    controls: Sequence[Model],
    prompts: Sequence[str],
    *,
    statistic: Statistic | Literal["auto"] = "auto",
    alpha: float = 0.01,
    new_tokens: int = 32,
    reference: Candidate | None = None,
) -> ProvenanceResult:
    """Is ``suspect`` closer to ``teacher`` than every control? See the module doc."""
    _check(len(controls), len(prompts), alpha)
    stat, scores = score_models(
        teacher, [suspect, *controls], prompts, statistic=statistic, new_tokens=new_tokens,
        reference=reference,
    )  # fmt: skip
    return compare(
        scores[0], scores[1:], teacher=teacher.name, statistic=stat, alpha=alpha,
        settings={"new_tokens": new_tokens, "reference": reference.name if reference else None},
    )  # fmt: skip


def _nanmean(v: Sequence[float]) -> float:
    ok = [x for x in v if math.isfinite(x)]
    return sum(ok) / len(ok) if ok else math.nan
