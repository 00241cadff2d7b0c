"""The theft benchmark's result: the acceptance keys from every test's p-values, the power
plot against N, and the printed summary (``theft.py`` runs the experiment)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def assemble(
    s: dict[str, Any],
    closed_tests: dict[str, dict[str, Any]],
    prov: dict[str, Any],
    null: list[dict[str, Any]],
    independent: list[str],
    harvest: dict[str, Any],
    t: dict[str, float],
    texts: dict[str, list[str]],
) -> dict[str, Any]:
    from scipy import stats

    top, a = max(s["n_grid"]), s["alpha"]

    def min_n(test: dict[str, Any], prefix: str, key: str, thr: float) -> Any:
        hits = [
            m
            for m in s["n_grid"]
            if test.get(f"{prefix}_n{m}") and test[f"{prefix}_n{m}"][key] < thr
        ]
        return min(hits) if hits else None

    radio_ctrl = ["gemma_base", f"gemma_ctrl_n{top}"] + [
        c for c in independent if c.startswith("tiny_")
    ]
    closed, served = closed_tests["fresh"], closed_tests["served"]
    flagged_radio = [c for c in radio_ctrl if closed[c]["p"] < a]
    flagged_served = [c for c in radio_ctrl if served[c]["p"] < a]
    flagged_prov = [r["suspect"] for r in null if r["flagged"]]
    fp = len(flagged_prov)
    ci = stats.binomtest(fp, len(null)).proportion_ci(confidence_level=0.99, method="exact")
    n_tok = sum(h["tokens"] for hs in harvest.values() for h in hs.values())
    uses = s["prov_statistics"]  # model_ll scores two answers (T's and R's) per prompt
    queries = s["audit_prompts"] + s["served_prompts"] + s["prov_prompts"] * ("teacher_ll" in uses)
    queries += 2 * s["model_ll_prompts"] * ("model_ll" in uses)
    return {
        "thief_b_n_answers": top,
        "thief_b_closed_p_watermarked": closed[f"thief_wm_n{top}"]["p"],
        "thief_b_closed_p_paraphrased": closed[f"thief_para_n{top}"]["p"],
        "thief_b_closed_p_unwatermarked": closed[f"thief_clean_n{top}"]["p"],
        "thief_b_closed_served_p_watermarked": served[f"thief_wm_n{top}"]["p"],
        "thief_b_closed_served_p_paraphrased": served[f"thief_para_n{top}"]["p"],
        "thief_b_closed_served_p_unwatermarked": served[f"thief_clean_n{top}"]["p"],
        "thief_b_provenance_p_unwatermarked": prov[f"thief_clean_n{top}"]["p_value"],
        "thief_b_provenance_p_paraphrased": prov[f"thief_para_n{top}"]["p_value"],
        "thief_b_provenance_p_watermarked": prov[f"thief_wm_n{top}"]["p_value"],
        "n_controls": len(set(radio_ctrl) | set(independent)),
        "controls_flagged": sorted(set(flagged_radio) | set(flagged_served) | set(flagged_prov)),
        "controls_flagged_radioactivity": flagged_radio,
        "controls_flagged_radioactivity_served": flagged_served,
        "controls_flagged_provenance": flagged_prov,
        "provenance_null_fpr": fp / len(null),
        "provenance_null_fpr_ci99": [float(ci.low), float(ci.high)],
        "provenance_null_configurations": len(null),
        "min_n_convicted": {
            "closed_radioactivity_1e-6": min_n(closed, "thief_wm", "p", 1e-6),
            "closed_radioactivity_alpha": min_n(closed, "thief_wm", "p", a),
            "closed_served_radioactivity_1e-6": min_n(served, "thief_wm", "p", 1e-6),
            "closed_served_radioactivity_alpha": min_n(served, "thief_wm", "p", a),
            "provenance_alpha": min_n(prov, "thief_clean", "p_value", a),
        },
        "cost": {
            "teacher_queries": sum(h["done"] for hs in harvest.values() for h in hs.values()),
            "teacher_completion_tokens": n_tok,
            "audit_queries_per_model": queries,
        },
        "closed": closed,
        "closed_served": served,
        "provenance_tests": prov,  # "provenance" is the run's origin (commit, command, ...)
        "provenance_null": null,
        "harvest": harvest,
        "timings_s": t,
        "sample_answers": {k: v[:2] for k, v in texts.items()},
    }


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = res["settings"]["n_grid"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, src, prefix, key in (("closed radioactivity, fresh prompts, watermarked", res["closed"], "thief_wm", "p"),
                                    ("closed radioactivity, served prompts, watermarked", res["closed_served"], "thief_wm", "p"),
                                    ("provenance, unwatermarked", res["provenance_tests"], "thief_clean", "p_value")):  # fmt: skip
        ys = [
            math.log10(max(src[f"{prefix}_n{m}"][key], 1e-300))
            if f"{prefix}_n{m}" in src
            else float("nan")
            for m in grid
        ]
        ax.plot(grid, ys, "o-", label=label)
    ax.axhline(math.log10(res["settings"]["alpha"]), ls=":", c="grey", lw=0.8)
    ax.axhline(-6, ls="--", c="grey", lw=0.8)
    ax.set_xlabel("harvested answers the thief trained on (N)")
    ax.set_ylabel("log10 p")
    ax.set_title("Gemma-3-270M thief of SmolLM2: evidence against N")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(r: dict[str, Any]) -> None:
    print(f"thief B (N={r['thief_b_n_answers']}): closed p watermarked {r['thief_b_closed_p_watermarked']:.3g}, "
          f"paraphrased {r['thief_b_closed_p_paraphrased']:.3g}, unwatermarked {r['thief_b_closed_p_unwatermarked']:.3g}")  # fmt: skip
    print(f"closed on served prompts: watermarked {r['thief_b_closed_served_p_watermarked']:.3g}, paraphrased "
          f"{r['thief_b_closed_served_p_paraphrased']:.3g}, unwatermarked {r['thief_b_closed_served_p_unwatermarked']:.3g}")  # fmt: skip
    print(f"provenance p unwatermarked {r['thief_b_provenance_p_unwatermarked']:.3g}, paraphrased "
          f"{r['thief_b_provenance_p_paraphrased']:.3g}; controls {r['n_controls']}, flagged {r['controls_flagged']}")  # fmt: skip
    print(
        f"provenance null FPR {r['provenance_null_fpr']:.3f} {r['provenance_null_fpr_ci99']}; min N {r['min_n_convicted']}"
    )
