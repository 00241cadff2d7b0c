"""The antidistillation benchmark's analysis (the preregistered replicate test, the noise
floor, the verdict), its trade-off figure and its printed summary (``antidistill.py`` runs
the experiment)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# what an operating point reports (interpolated between sweep points where needed)
OP_KEYS = (
    "teacher_task_acc",
    "teacher_ref_nll",
    "student_task_acc",
    "student_task_acc_se",
    "student_gain_kept_fraction",
)


def kept_fraction(gain: float, ref_gain: float) -> float:
    """``gain / ref_gain``; NaN when the undefended student gained nothing (undefined)."""
    return gain / ref_gain if ref_gain > 0 else float("nan")


def fill_gains(curve: list[dict[str, Any]], baseline: float, ref_acc: float) -> None:
    """Add ``student_gain`` and ``student_gain_kept_fraction`` to every point (in place)."""
    for p in curve:
        p["student_gain"] = p["student_task_acc"] - baseline
        p["student_gain_kept_fraction"] = kept_fraction(p["student_gain"], ref_acc - baseline)


def antidistill_point(curve: list[dict[str, Any]], max_drop: float) -> dict[str, Any]:
    """The largest-lambda point whose teacher accuracy is at most ``max_drop`` below lam = 0."""
    base = curve[0]["teacher_task_acc"]
    ok = [p for p in curve if base - p["teacher_task_acc"] <= max_drop + 1e-12]
    best = max(ok, key=lambda p: p["setting"]["lambda"])
    return {"setting": best["setting"], **{k: best[k] for k in OP_KEYS}, "interpolated": False,
            "teacher_acc_drop_points": 100 * (base - best["teacher_task_acc"])}  # fmt: skip


def temperature_point(curve: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The temperature whose teacher accuracy is closest to, not above, ``target``.

    ``curve`` sorted by temperature. If a measured point has exactly ``target``, or the
    first point is already at or below it, that point; otherwise linear interpolation (in
    temperature, student accuracy, kept fraction and NLL) on the first segment whose
    accuracy crosses ``target``. If no point reaches it, the lowest-accuracy point, flagged.
    """
    base = curve[0]["teacher_task_acc"]
    out: dict[str, Any] = {"target_teacher_task_acc": target, "interpolated": False}
    pick: dict[str, Any] | None = None
    for lo, hi in zip([None, *curve[:-1]], curve):
        if hi["teacher_task_acc"] > target:
            continue
        if lo is None or hi["teacher_task_acc"] == target:
            pick = hi
        else:  # lo above target, hi at or below: interpolate between them
            w = (lo["teacher_task_acc"] - target) / (
                lo["teacher_task_acc"] - hi["teacher_task_acc"]
            )
            tau = (1 - w) * lo["setting"]["temperature"] + w * hi["setting"]["temperature"]
            pick = {"setting": {"temperature": tau}}
            pick.update({k: (1 - w) * lo[k] + w * hi[k] for k in OP_KEYS})
            out.update(interpolated=True, weight_on_upper=w,
                       between=[lo["setting"]["temperature"], hi["setting"]["temperature"]])  # fmt: skip
        break
    if pick is None:
        pick = min(curve, key=lambda p: p["teacher_task_acc"])
        out["target_not_reached"] = True
    out.update({"setting": pick["setting"], **{k: pick[k] for k in OP_KEYS}})
    out["teacher_acc_drop_points"] = 100 * (base - pick["teacher_task_acc"])
    return out


# The analysis of the replicate run, fixed before it ran (committed with this code): the
# operating point is the previous 3-replicate run's (bias 0.75 nats; temperature 1.1, the
# interpolated tau at the same -2.2-point teacher accuracy, rounded), the statistic is the
# per-replicate paired difference of student accuracies (temperature minus antidistill: > 0
# means antidistillation leaves the student worse off), the test a one-sided paired t-test
# (H1: mean difference > 0) at alpha 0.05, with a Wilcoxon signed-rank test as a check.
PREREGISTERED = {"bias_scale": 0.75, "temperature": 1.1, "alpha": 0.05}


def replicate_analysis(ad: list[dict[str, Any]], temp: list[dict[str, Any]], base: float) -> dict:
    """The pre-registered paired comparison (:data:`PREREGISTERED`), or {} when the run lacks
    its points or has fewer than 2 replicates."""
    from scipy import stats

    a = next((p for p in ad if p["setting"].get("bias_scale") == PREREGISTERED["bias_scale"]), None)
    t = next(
        (p for p in temp if p["setting"].get("temperature") == PREREGISTERED["temperature"]), None
    )
    u = next((p for p in ad if p["setting"].get("lambda") == 0), None)
    if a is None or t is None or u is None or a["replicates"] < 2:
        return {}
    ra, rt, ru = (p["student_task_acc_reps"] for p in (a, t, u))
    diffs = [y - x for x, y in zip(ra, rt)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    kept = {name: [kept_fraction(x - base, g - base) for x, g in zip(r, ru)]
            for name, r in (("antidistill", ra), ("temperature", rt))}  # fmt: skip
    t_p = float(stats.ttest_rel(rt, ra, alternative="greater").pvalue) if sd > 0 else float("nan")
    w_p = float(stats.wilcoxon(diffs, alternative="greater").pvalue) if any(diffs) else float("nan")
    return {
        "preregistered": PREREGISTERED,
        "n_replicates": n,
        "student_acc_reps": {"undefended": ru, "antidistill": ra, "temperature": rt},
        "teacher_task_acc": {
            "antidistill": a["teacher_task_acc"],
            "temperature": t["teacher_task_acc"],
            "undefended": u["teacher_task_acc"],
        },
        "kept_fraction_reps": kept,
        "mean_difference_temperature_minus_antidistill": mean,
        "difference_ci95": [mean - half, mean + half],
        "paired_t_pvalue_one_sided": t_p,
        "wilcoxon_pvalue_one_sided": w_p,
        "antidistill_better": bool(t_p < PREREGISTERED["alpha"]),
    }


def noise_floor(replicate_diff: float, acc: float, n_test: int) -> float:
    """The smallest student-accuracy difference read as real: the larger of the replicate's
    |difference| and two binomial standard errors of a difference of two accuracies ``acc``
    measured on ``n_test`` prompts each."""
    return max(replicate_diff, 2 * math.sqrt(2 * acc * (1 - acc) / n_test))


def verdict(ad: dict[str, Any], temp: dict[str, Any], noise: float) -> str:
    """A sentence computed from the operating points; ``noise`` is :func:`noise_floor` in
    kept-fraction units (a difference must exceed it to count)."""
    a, t = ad["student_gain_kept_fraction"], temp["student_gain_kept_fraction"]
    if not (math.isfinite(a) and math.isfinite(t)):
        return "undefined: the undefended student gained nothing over its init"
    if ad["setting"]["lambda"] == 0:
        return "no antidistill lambda > 0 kept the teacher within 5 points: nothing to compare"
    head = (
        f"at matched teacher accuracy ({ad['teacher_task_acc']:.3f} antidistill, "
        f"{temp['teacher_task_acc']:.3f} temperature) the student kept {a:.2f} of its gain "
        f"under antidistill vs {t:.2f} under temperature (difference {t - a:+.2f}, noise "
        f"floor {noise:.2f})"
    )
    if t - a > noise:
        return head + ": antidistillation beats temperature at CPU scale"
    if a - t > noise:
        return head + ": temperature beats antidistillation at CPU scale"
    return head + ": no difference beyond noise at CPU scale"


def plot_tradeoff(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for (method, key, fmt), color in zip(
        (("antidistill", "bias_scale", "b={:g}"), ("temperature", "temperature", "T={:g}")),
        ("tab:red", "tab:blue"),
    ):
        curve, op = res[method]["curve"], res[method]
        for ax, xkey in zip(axes, ("teacher_task_acc", "teacher_ref_nll")):
            xs = [p[xkey] for p in curve]
            ys = [p["student_gain_kept_fraction"] for p in curve]
            ref_gain = res["baseline"]["undefended_gain"]
            err = [p.get("student_task_acc_se", 0.0) / ref_gain if ref_gain > 0 else 0.0
                   for p in curve]  # fmt: skip
            ax.errorbar(xs, ys, yerr=err, fmt="o-", color=color, capsize=3,
                        label=f"{method} (± 1 s.e. over paired replicates)")  # fmt: skip
            for p, x, y in zip(curve, xs, ys):
                ax.annotate(fmt.format(p["setting"][key]), (x, y), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
            ax.plot([op[xkey]], [op["student_gain_kept_fraction"]], "*", ms=14, color=color,
                    mec="k", label=f"{method} operating point")  # fmt: skip
    axes[0].set_xlabel("teacher task accuracy (exact match, sampled)")
    axes[1].set_xlabel("teacher NLL of held-out references (nats/token)")
    for ax in axes:
        ax.set_ylabel("student gain kept (vs undefended)")
        ax.axhline(1.0, ls="--", c="grey", lw=0.8)
        ax.legend(fontsize=7)
    axes[0].invert_xaxis()
    fig.suptitle("Antidistillation vs temperature: teacher utility vs student utility")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(r: dict[str, Any]) -> None:
    for method in ("antidistill", "temperature"):
        for p in r[method]["curve"]:
            print(f"{method:>11} {json.dumps(p['setting'])}: teacher acc {p['teacher_task_acc']:.3f}, "
                  f"ref NLL {p['teacher_ref_nll']:.3f}, student acc {p['student_task_acc']:.3f}, "
                  f"kept {p['student_gain_kept_fraction']:.2f}")  # fmt: skip
    for method in ("antidistill", "temperature"):
        op = r[method]
        print(f"{method} operating point {json.dumps(op['setting'])}: teacher drop "
              f"{op['teacher_acc_drop_points']:.1f} points, student gain kept "
              f"{op['student_gain_kept_fraction']:.2f}"
              f"{' (interpolated)' if op.get('interpolated') else ''}")  # fmt: skip
    c = r["cost"]
    print(f"cost per generated token, antidistill / plain: batched loop {c['batched_ratio']:.2f}x, "
          f"engine {c['engine_ratio']:.2f}x")  # fmt: skip
    print(f"verdict: {r['verdict']}")
    print(f"total {r['total_seconds']:.0f}s")
