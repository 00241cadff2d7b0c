"""KD throughput and memory: potstill (online teacher, logit cache) side by side with TRL.

    python benchmarks/kd_throughput.py            # full CPU run (< 15 min on 2 cores)
    python benchmarks/kd_throughput.py --quick    # smoke run (~3 min quiet)
    python benchmarks/kd_throughput.py --device cuda --dtype bf16 --teacher DIR \\
        --student-layers 8 --student-width 768 --batch-size 16 --seq-len 1024   # accelerator

Everything is measured in ONE run on the same student init, teacher, batch, seq len and
dtype, and written to ``benchmarks/results/kd_throughput.json``:

* training tokens/s of ``potstill distill`` (its real loop, ``run_distill``) with the online
  teacher, with ``teacher.spec=cache:DIR`` and with CE alone, and of TRL's ``GKDTrainer``
  (lmbda=0, beta=0: forward KL on the data, no generation); steady state = median step time
  after ``--warmup`` steps (the mean is recorded too) (potstill: from metrics.jsonl; TRL: a step-begin/step-end
  callback). ``ROWS`` says what each row runs: ``speedup_online_vs_trl`` is like for like,
  ``cached_vs_plain_ce`` is the cache's bound, and ``speedup_cached_vs_trl`` compares two
  different algorithms (offline top-k KD against online full-vocabulary KD);
* MFU = model FLOP/s / measured peak (a big ``torch.matmul`` in fp32, and in the run dtype).
  Model FLOPs per step = ``6 * N_student * tokens`` (forward + backward) ``+ 2 * N_teacher *
  tokens`` (teacher forward, online runs only). ``N`` is the unique parameter count; the tied
  embedding counts once, which is exactly the lm-head matmul (the embedding lookup is free).
  Attention score FLOPs (``~12 * layers * T * width`` per token) and the softmax/loss are not
  counted (standard "6N" accounting). ``mfu_student`` times the student's training step
  alone (fwd + bwd + AdamW, the cached-teacher step) in fp32 against the fp32 peak;
* what limits ``speedup_online_vs_trl`` (``online_vs_trl_limits``): one online step of the real
  recipe under ``torch.profiler``, split into GEMM, attention and other self time, and TRL's
  step over the GEMM time alone and over the step's model FLOPs at the matmul peak;
* peak RSS (CPU: ``VmHWM`` of /proc/self/status; CUDA: ``max_memory_allocated``) of one KD loss step (student
  head + forward KL + backward) at ``V=49152``, ``B*T=4096``, plain vs
  ``fused_linear_kd_loss`` chunked, each in a fresh subprocess;
* cache bytes/token and KL(teacher || reconstruction from the cache) at k in {8,32,64,128};
* held-out KL(teacher || student) of the students trained online vs from the cache (same
  data, steps and init): the cache must not cost accuracy;
* with ``--liger`` on CUDA, potstill's fused linear KD loss against Liger-Kernel's
  (:mod:`_kd_liger`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_log, sync, write_result
from _kd_probes import matmul_peak, measure_peak, online_step_profile, rss_probe
from _kd_trl import run_trl
from _provenance import provenance

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "kd_throughput.json"


log = make_log("kd_throughput")

#: What each throughput row runs, and which rows compare like with like.
ROWS = {
    "online": "potstill, forward KL over the full vocabulary from the teacher run online: "
    "the objective of TRL's GKDTrainer at lmbda=0, beta=0 (like for like with 'trl')",
    "trl": "TRL GKDTrainer, lmbda=0 (no generation), beta=0 (forward KL), full vocabulary",
    "cached": "potstill, offline KD: forward KL on the teacher's top-64 logprobs (+ tail mass) "
    "read from a logit cache built once (DistillKit's offline mode is this algorithm; TRL has "
    "none): a different algorithm from 'trl'",
    "plain_ce": "potstill, the same loop, student and data with CE alone (no teacher): the "
    "bound of 'cached' (a cached teacher should cost almost nothing)",
}


# ----------------------------------------------------------------------------- data


def make_data(tmp: Path, tokenizer: Any, n_blocks: int, seq_len: int, quick: bool) -> str:
    """A .jsonl training file that packs into about ``n_blocks`` blocks (Shakespeare if
    cached locally, else synthetic text), so the cache covers only what is trained on."""
    from potstill.distill.data import load_texts

    try:
        texts = load_texts("shakespeare:train")
    except Exception:  # offline machine without the corpus: synthetic text
        texts = load_texts("synthetic:0:2000")
    out, tokens = [], 0
    for t in texts:
        for start in range(0, len(t), 4000):
            piece = t[start : start + 4000]
            out.append(piece)
            tokens += len(tokenizer(piece, add_special_tokens=False)["input_ids"]) + 1
            if tokens >= n_blocks * seq_len + seq_len:
                break
        if tokens >= n_blocks * seq_len + seq_len:
            break
    path = tmp / "train.jsonl"
    path.write_text("".join(json.dumps({"text": x}) + "\n" for x in out))
    return str(path)


def heldout_blocks(tokenizer: Any, seq_len: int, n: int) -> torch.Tensor:
    from potstill.distill.data import load_texts, pack_sequences, tokenize_texts

    try:
        texts = load_texts("shakespeare:heldout")
    except Exception:
        texts = load_texts("synthetic:7:200")
    return pack_sequences(tokenize_texts(texts[:2], tokenizer), seq_len)[:n]


# ----------------------------------------------------------------------------- potstill runs


def distill_cfg(a: argparse.Namespace, out: Path, data: str, teacher: str, **extra: Any) -> Any:
    from potstill.distill.config import DistillConfig, load_config

    items = {
        "out_dir": str(out),
        "teacher.spec": teacher,
        "teacher.dtype": "float32",
        "student.layers": a.student_layers,
        "student.width": a.student_width,
        "student.seed": 0,
        "loss.kind": "forward_kl",
        "loss.ce_weight": 0.0,
        "optim.lr": a.lr,
        "optim.warmup_steps": 0,
        "optim.min_lr_ratio": 1.0,  # constant LR, as the TRL run
        "data.train": data,
        "data.eval": None,
        "data.seq_len": a.seq_len,
        "train.steps": a.steps,
        "train.micro_batch_size": a.batch_size,
        "train.grad_accum": 1,
        "train.bf16": a.dtype == "bf16",
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.log_every": 1,
        "train.threads": a.threads,
        **extra,
    }
    return load_config(
        DistillConfig, None, [f"{k}={'null' if v is None else v}" for k, v in items.items()]
    )


def step_times_from_metrics(run: Path) -> list[float]:
    """Per-step wall times: metrics rows give cumulative tokens / (tokens per second)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    elapsed = [r["tokens"] / r["tok_per_s"] for r in rows]
    return [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]


def run_potstill(cfg: Any, device: str) -> list[float]:
    from potstill.distill.train import recipe

    if device == "cuda":  # run_distill leaves an online teacher where it was loaded
        real = recipe.load_teacher

        def on_device(*args: Any, **kw: Any) -> Any:
            t = real(*args, **kw)
            return t.to("cuda") if t is not None else None

        recipe.load_teacher = on_device  # type: ignore[assignment]
    try:
        run = recipe.run_distill(cfg, show_progress=False)
    finally:
        if device == "cuda":
            recipe.load_teacher = real  # type: ignore[assignment]
    return step_times_from_metrics(run)


# ----------------------------------------------------------------------------- student MFU


def student_step_time(
    a: argparse.Namespace, cache_dir: Path, data: str, tokenizer: Any
) -> tuple[float, int, int]:
    """Mean time of the cached-teacher student step (fwd + bwd + AdamW) in fp32; returns
    (seconds per step, tokens per step, unique student params)."""
    from potstill.distill.train.data import prepare_data
    from potstill.distill.train.recipe import HiddenLM, make_optimizer, micro_loss
    from potstill.distill.train.student import build_student, count_params

    cfg = distill_cfg(a, Path(tempfile.mkdtemp()), data, f"cache:{cache_dir}")
    cfg.train.micro_batch_size = a.mfu_batch
    student = build_student(cfg.student, tokenizer, max_len=a.seq_len).to(a.device)
    model = HiddenLM(student)
    opt = make_optimizer(model, cfg)
    td = prepare_data(cfg, tokenizer, world_size=1)
    batches = [
        {k: v.to(a.device) for k, v in td.micro_batch(i % td.batches_per_epoch, 0).items()}
        for i in range(a.mfu_steps + 2)
    ]
    times = []
    for i, batch in enumerate(batches):
        sync(a.device)
        t0 = time.perf_counter()
        loss = micro_loss(model, None, batch, cfg).total / batch["labels"].numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(a.device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times), a.mfu_batch * a.seq_len, count_params(student)


# ----------------------------------------------------------------------------- KL


@torch.no_grad()
def heldout_kl(
    student_dir: Path, t_logits: torch.Tensor, blocks: torch.Tensor, device: str
) -> float:
    """Mean KL(teacher || student) in nats/token over held-out blocks (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir).to(device).eval()
    total, n = 0.0, 0
    for i in range(blocks.shape[0]):
        s = model(input_ids=blocks[i : i + 1].to(device)).logits.float()[..., : t_logits.shape[-1]]
        lp_t = torch.log_softmax(t_logits[i : i + 1].to(device).float(), -1)
        lp_s = torch.log_softmax(s, -1)
        total += float((lp_t.exp() * (lp_t - lp_s)).sum())
        n += blocks.shape[1]
    return total / n


# ----------------------------------------------------------------------------- main


def steady(times: list[float], warmup: int, *, mean: bool = False) -> float:
    """Steady-state seconds per step: the median of the steps after ``warmup`` (``mean``: their
    mean). The median is the headline: on the shared 2-core VM single steps of every row
    spike to 1.5-2x (one run: cached 0.43 s steps with three of 0.69-0.80 s), and a mean
    over 14 steps moves with how many spikes a row happened to catch."""
    import statistics

    rest = times[warmup:] or times
    return sum(rest) / len(rest) if mean else statistics.median(rest)


def main() -> None:
    a = parse_args()
    if a.rss_probe:
        vocab, tokens = 49152, 4096
        probe = rss_probe(
            a.rss_probe, vocab, tokens, a.student_width, a.probe_teacher_width, a.device
        )
        print(json.dumps(probe))
        return
    _quiet(a)
    from potstill.core.models import load_model
    from potstill.distill.train.student import count_params

    t_start, started = time.perf_counter(), time.time()
    tmp = Path(tempfile.mkdtemp(prefix="kd_bench_"))
    teacher_model, tok = load_model(a.teacher)
    m: dict[str, Any] = {
        "tmp": tmp,
        "n_teacher": count_params(teacher_model),
        "vocab": int(teacher_model.get_output_embeddings().weight.shape[0]),
        "n_blocks": a.steps * a.batch_size,
    }
    m["data"] = make_data(tmp, tok, m["n_blocks"], a.seq_len, a.quick)
    m.update(_peaks(a))  # 1.
    m.update(_build_cache(a, m))  # 2.
    m.update(_throughput(a, m, tok))  # 3. and 4.
    # 5. Peak memory of the KD loss step, each variant in a fresh process.
    t_width = int(teacher_model.config.hidden_size)
    m["plain"], m["chunked"] = (
        measure_peak("plain", a, t_width),
        measure_peak("chunked", a, t_width),
    )
    log(f"peak MB plain {m['plain']['peak_mb']:.0f} chunked {m['chunked']['peak_mb']:.0f}")
    m.update(_kl(a, m, teacher_model, tok))  # 6. and 7.
    res = _result(a, m)
    if a.liger and a.device == "cuda":  # 8. the fused loss against Liger's, at the probe's shapes
        from _kd_liger import liger_vs_potstill

        res["liger_fused_loss"] = liger_vs_potstill(m["vocab"], 4096, a.student_width, t_width,
                                                    a.device)  # fmt: skip
    res["wall_s"] = time.perf_counter() - t_start
    res["provenance"] = provenance(started)
    out = Path(a.out)
    write_result(out, res)
    print_summary(res)
    log(f"wrote {out} in {res['wall_s']:.0f}s")


def _quiet(a: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")


def _peaks(a: argparse.Namespace) -> dict[str, Any]:
    """1. The matmul peaks (fp32, and the run's dtype): the MFU denominators."""
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    n = 8192 if a.device == "cuda" else 2048
    peak32 = matmul_peak(a.device, torch.float32, n)
    peak_run = matmul_peak(a.device, dt, n) if dt != torch.float32 else peak32
    log(f"matmul peak fp32 {peak32 / 1e9:.1f} GFLOP/s, {a.dtype} {peak_run / 1e9:.1f} GFLOP/s")
    return {"peak32": peak32, "peak_run": peak_run}


def _build_cache(a: argparse.Namespace, m: dict[str, Any]) -> dict[str, Any]:
    """2. The cache (timed: one teacher pass over the training data)."""
    from potstill.distill.teachers.cache import CacheJob, write_cache

    cache_dir = m["tmp"] / "cache"
    t0 = time.perf_counter()
    man = write_cache(
        CacheJob(teacher=a.teacher, data=m["data"], out=cache_dir, k=64, seq_len=a.seq_len,
                 batch_size=a.batch_size, shard_blocks=64, scheme="u8", bf16=a.dtype == "bf16"),
        log=lambda _m: None,
    )  # fmt: skip
    cache_s = time.perf_counter() - t0
    cached_tokens = man["n_blocks"] * a.seq_len
    log(
        f"cache: {cached_tokens} tokens in {cache_s:.1f}s, {man['file_bytes_per_token']:.1f} B/token"
    )
    return {"cache_dir": cache_dir, "man": man, "cache_s": cache_s, "cached_tokens": cached_tokens}


def _throughput(a: argparse.Namespace, m: dict[str, Any], tok: Any) -> dict[str, Any]:
    """3. Training throughput, same student init / teacher / batch / seq len / dtype; 4. MFU
    (documented in the module docstring)."""
    from potstill.distill.train.data import prepare_data
    from potstill.distill.train.student import build_student, count_params

    tmp, data = m["tmp"], m["data"]
    tokens_per_step = a.batch_size * a.seq_len
    online = run_potstill(distill_cfg(a, tmp / "online", data, a.teacher), a.device)
    log(f"potstill online: {tokens_per_step / steady(online, a.warmup):.0f} tok/s")
    cached_cfg = distill_cfg(a, tmp / "cached", data, f"cache:{m['cache_dir']}")
    cached = run_potstill(cached_cfg, a.device)
    log(f"potstill cached: {tokens_per_step / steady(cached, a.warmup):.0f} tok/s")
    # The bound of the cached row: the same loop, student and data, CE alone (no teacher)
    plain_ce = run_potstill(
        distill_cfg(a, tmp / "plain_ce", data, a.teacher, **{"loss.ce_weight": 1.0}), a.device
    )
    log(f"potstill plain CE: {tokens_per_step / steady(plain_ce, a.warmup):.0f} tok/s")
    blocks = prepare_data(distill_cfg(a, tmp / "x", data, a.teacher), tok, world_size=1).blocks
    trl = run_trl(a, tmp, tok, blocks[: m["n_blocks"]])
    log(f"TRL GKD: {tokens_per_step / steady(trl, a.warmup):.0f} tok/s")
    times = {"online": online, "cached": cached, "plain_ce": plain_ce, "trl": trl}
    tps = {k: tokens_per_step / steady(v, a.warmup) for k, v in times.items()}
    tps_mean = {k: tokens_per_step / steady(v, a.warmup, mean=True) for k, v in times.items()}
    student_cfg = distill_cfg(a, tmp / "y", data, a.teacher).student
    n_student = count_params(build_student(student_cfg, tok, max_len=a.seq_len))
    n_teacher = m["n_teacher"]
    flops_tok = {"online": 6 * n_student + 2 * n_teacher, "cached": 6 * n_student,
                 "plain_ce": 6 * n_student, "trl": 6 * n_student + 2 * n_teacher}  # fmt: skip
    profile = online_step_profile(distill_cfg(a, tmp / "z", data, a.teacher), tok, a.device)
    log(f"online step profiled: {profile['wall_s']:.2f}s, GEMMs {profile['gemm_s']:.2f}s")
    step_s, step_tokens, n_mfu = student_step_time(a, m["cache_dir"], data, tok)
    mfu_student = 6 * n_mfu * step_tokens / step_s / m["peak32"]
    log(
        f"student step ({n_mfu / 1e6:.1f}M params, {step_tokens} tokens, fp32): {step_s * 1e3:.0f} ms, MFU {mfu_student:.1%}"
    )
    return {
        "tokens_per_step": tokens_per_step,
        "times": times,
        "tps": tps,
        "tps_mean": tps_mean,
        "n_student": n_student,
        "mfu_runs": {k: tps[k] * flops_tok[k] / m["peak_run"] for k in tps},
        "mfu_student": mfu_student,
        "online_profile": profile,
        "flops_online_step": flops_tok["online"] * tokens_per_step,
        "mfu_detail": {
            "params": n_mfu,
            "tokens_per_step": step_tokens,
            "step_s": step_s,
            "dtype": "float32",
        },
    }


def _kl(a: argparse.Namespace, m: dict[str, Any], teacher_model: Any, tok: Any) -> dict[str, Any]:
    """6. Cache size and reconstruction KL at several k (teacher logits on held-out text);
    7. held-out KL to the teacher: student trained online vs from the cache."""
    from potstill.distill.teachers.cache import bytes_per_token, reconstruction_kl

    hb = heldout_blocks(tok, a.seq_len, a.kl_blocks)
    teacher_model = teacher_model.to(a.device).eval()
    with torch.no_grad():
        t_logits = torch.cat(
            [
                teacher_model(input_ids=hb[i : i + 1].to(a.device)).logits.float().cpu()
                for i in range(hb.shape[0])
            ]
        )
    recon = {}
    for k in (8, 32, 64, 128):
        flat = t_logits.reshape(-1, t_logits.shape[-1])
        kl_u8 = reconstruction_kl(flat, k, "u8")
        kl_exact = reconstruction_kl(flat, k, None)
        recon[str(k)] = {
            "payload_bytes_per_token": bytes_per_token(k, m["vocab"], "u8"),
            "kl_mean_u8": kl_u8[0],
            "kl_max_u8": kl_u8[1],
            "kl_mean_exact_topk": kl_exact[0],
            "kl_quantization_only": kl_u8[0] - kl_exact[0],
        }
        log(
            f"k={k}: {bytes_per_token(k, m['vocab'], 'u8')} B/token, KL(teacher||cache) {kl_u8[0]:.4g} nats"
        )
    kl_online = heldout_kl(m["tmp"] / "online" / "student", t_logits, hb, a.device)
    kl_cached = heldout_kl(m["tmp"] / "cached" / "student", t_logits, hb, a.device)
    log(f"held-out KL online {kl_online:.4f}, cached {kl_cached:.4f}")
    return {
        "recon": recon,
        "kl_online": kl_online,
        "kl_cached": kl_cached,
        "kl_blocks": int(hb.shape[0]),
    }


def _result(a: argparse.Namespace, m: dict[str, Any]) -> dict[str, Any]:
    """The results JSON (keys as before the split into steps)."""
    tps, plain, chunked, man = m["tps"], m["plain"], m["chunked"], m["man"]
    kl_online, kl_cached = m["kl_online"], m["kl_cached"]
    return {
        "settings": {k: v for k, v in vars(a).items() if k != "rss_probe"},
        "models": {
            "teacher": a.teacher,
            "teacher_params": m["n_teacher"],
            "student_params": m["n_student"],
            "student_layers": a.student_layers,
            "student_width": a.student_width,
            "vocab": m["vocab"],
            "real_smollm2_teacher": a.teacher == "smollm2-135m-instruct",
        },
        "tokens_per_step": m["tokens_per_step"],
        "tokens_per_s": tps,
        "tokens_per_s_of_mean_step": m["tps_mean"],
        "steady_state": "median step time after --warmup steps (tokens_per_s_of_mean_step: "
        "the mean step time)",
        "step_times_s": m["times"],
        "rows": ROWS,
        "speedup_online_vs_trl": tps["online"] / tps["trl"],
        "speedup_online_vs_trl_of_mean_step": m["tps_mean"]["online"] / m["tps_mean"]["trl"],
        "cached_vs_plain_ce": tps["cached"] / tps["plain_ce"],
        "cached_vs_plain_ce_of_mean_step": m["tps_mean"]["cached"] / m["tps_mean"]["plain_ce"],
        "speedup_cached_vs_trl": tps["cached"] / tps["trl"],
        "speedup_cached_vs_trl_note": "different algorithms: offline KD from a top-64 cache "
        "against TRL's online full-vocabulary KD (not like for like)",
        "matmul_peak_flops": {"fp32": m["peak32"], a.dtype: m["peak_run"]},
        "mfu_runs": m["mfu_runs"],
        "mfu_formula": "tokens/s * (6*N_student + 2*N_teacher [online only]) / matmul peak of the run dtype",
        "mfu_student": m["mfu_student"],
        "mfu_student_detail": m["mfu_detail"],
        "online_vs_trl_limits": _limits(a, m),
        "kd_loss_peak_mb": {"plain": plain, "chunked": chunked, "vocab": 49152, "tokens": 4096},
        "chunked_peak_ratio": chunked["peak_mb"] / plain["peak_mb"],
        "chunked_step_increment_ratio": (chunked["peak_mb"] - chunked["baseline_mb"])
        / max(1e-9, plain["peak_mb"] - plain["baseline_mb"]),
        "cache": {
            "k": 64,
            "scheme": "u8",
            "build_s": m["cache_s"],
            "build_tokens_per_s": m["cached_tokens"] / m["cache_s"],
            "file_bytes_per_token": man["file_bytes_per_token"],
            "reconstruction": m["recon"],
        },
        "cache_bytes_per_token_k64": man["file_bytes_per_token"],
        "heldout_kl": {
            "online": kl_online,
            "cached": kl_cached,
            "relative_diff": abs(kl_cached - kl_online) / kl_online,
            "steps": a.steps,
            "blocks": m["kl_blocks"],
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "device": torch.cuda.get_device_name()
            if a.device == "cuda"
            else platform.processor() or "cpu",
        },
    }


def _limits(a: argparse.Namespace, m: dict[str, Any]) -> dict[str, Any]:
    """What bounds ``speedup_online_vs_trl`` on this machine: TRL's step over (a) the online
    step's GEMM self time alone (every other op free, these kernels), and (b) its model FLOPs at
    the measured matmul peak; and the non-GEMM time a 2.5x step could afford."""
    trl_s, prof = steady(m["times"]["trl"], a.warmup), m["online_profile"]
    return {
        "profile": prof,
        "trl_step_s": trl_s,
        "speedup_if_only_gemms": trl_s / prof["gemm_s"],
        "speedup_at_matmul_peak": trl_s / (m["flops_online_step"] / m["peak_run"]),
        "non_gemm_s_allowed_at_2_5x": trl_s / 2.5 - prof["gemm_s"],
        "note": "profile: the online step (teacher forward, student step) under torch.profiler, "
        f"median of {prof['steps']}; gemm_s: the self time of aten::mm/addmm/bmm/baddbmm, attention_s: "
        "SDPA, other_s: every other op (elementwise, norms, casts, the loss, AdamW)",
    }


def print_summary(r: dict[str, Any]) -> None:
    t = r["tokens_per_s"]
    print(f"\ntokens/s   online {t['online']:.0f}   TRL GKD {t['trl']:.0f}   "
          f"cached {t['cached']:.0f}   plain CE {t['plain_ce']:.0f}")  # fmt: skip
    print(f"like for like   online/TRL {r['speedup_online_vs_trl']:.2f}x (target >= 2.5)")
    lim = r["online_vs_trl_limits"]
    print(f"  its limits    {lim['speedup_if_only_gemms']:.2f}x if only the GEMMs took time, "
          f"{lim['speedup_at_matmul_peak']:.2f}x at the matmul peak")  # fmt: skip
    print(f"bound           cached/plain CE {r['cached_vs_plain_ce']:.2f} (target >= 0.9)")
    print(f"different algorithms   cached/TRL {r['speedup_cached_vs_trl']:.2f}x")
    print(f"MFU        student step {r['mfu_student']:.1%} of fp32 matmul peak (target >= 65%)")
    print(f"memory     chunked/plain peak {r['chunked_peak_ratio']:.1%} (target <= 25%)")
    print(f"cache      {r['cache_bytes_per_token_k64']:.1f} bytes/token at k=64 (target <= 200)")
    kl = r["heldout_kl"]
    print(
        f"held-out   KL online {kl['online']:.4f} cached {kl['cached']:.4f} ({kl['relative_diff']:.2%}, target <= 2%)"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fast smoke run")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="run dtype (autocast)")
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--student-width", type=int, default=320)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training run")
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from the timing")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--mfu-batch", type=int, default=None, help="sequences in the MFU student step")
    p.add_argument("--mfu-steps", type=int, default=None)
    p.add_argument("--kl-blocks", type=int, default=None, help="held-out blocks for the KL figures")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--liger", action="store_true",
                   help="also time Liger-Kernel's fused linear JSD loss (CUDA only)")  # fmt: skip
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument(
        "--rss-probe", choices=("plain", "chunked"), default=None, help=argparse.SUPPRESS
    )
    p.add_argument("--probe-teacher-width", type=int, default=576, help=argparse.SUPPRESS)
    a = p.parse_args()
    quick = a.quick
    defaults = {
        "seq_len": 128 if quick else 256,
        "batch_size": 4,
        "steps": 5 if quick else 16,
        "mfu_batch": 4 if quick else 8,
        "mfu_steps": 2 if quick else 3,
        "kl_blocks": 2 if quick else 8,
    }
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


if __name__ == "__main__":
    main()
