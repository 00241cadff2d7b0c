"""The radioactivity benchmark's null QQ plot and printed summary (``radioactivity.py`` runs
the experiment and draws the power curves, which recompute p-values)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PAPER_RHO = 0.05  # Sander et al.: p < 1e-5 at 5% watermarked training text (open model)


def plot_qq(pvals: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for name, v in pvals.items():
        n = len(v)
        ax.plot([(i + 0.5) / n for i in range(n)], sorted(v), ".", ms=3, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("U(0,1) quantile")
    ax.set_ylabel("null p-value (random keys)")
    ax.legend(fontsize=7)
    ax.set_title("Open-mode null p-values, clean models")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(r: dict[str, Any]) -> None:
    p1, p2, ab = r["single_text"], r["radioactivity"], r["ablation"]
    mr = r["min_rho_detected_1e-5"]
    print(
        f"single text (SmolLM2, {p1['n_tokens_per_text']} tok): detected {p1['detection_rate_at_1e-4']:.0%} "
        f"at p<1e-4 (median p {p1['median_p']:.1e}); FPR@1e-4 clean {p1['fpr_at_1e-4_owner_key']:.3f}, "
        f"random keys {p1['fpr_at_1e-4_random_keys']:.4f}"
    )
    for rho, v in p2["per_rho"].items():
        print(
            f"rho={float(rho):>5.0%}: open p={v['open']['p']:.2e} (n={v['open']['n_scored']}), held-out "
            f"p={v['open_heldout']['p']:.2e}, closed p={v['closed']['p']:.2e} (n={v['closed']['n_scored']})"
        )
    print(f"min rho detected at p<1e-5 (open): {mr:g} = {mr / PAPER_RHO:.2f}x the paper's 5%")
    print(
        f"control p={r['p_control']:.3f}; null KS p={r['null_ks_pvalue']:.3f}, FPR@0.01="
        f"{r['null_fpr_at_0.01']:.4f} CI99 {r['null_fpr_at_0.01_ci99']}"
    )
    print(
        f"ablation dedup FPR@0.01 off/on: {ab['ablation_dedup_off_fpr_at_0.01']:.3f}/"
        f"{ab['ablation_dedup_on_fpr_at_0.01']:.3f}; prompt windows p off/on: "
        f"{ab['ablation_prompt_window_off_p']:.1e}/{ab['ablation_prompt_window_on_p']:.2f}"
    )
    print(f"total {r['total_seconds']:.0f}s")  # fmt: skip
