"""Run reports: loss-curve figures and a markdown summary (matplotlib is imported lazily)."""

from __future__ import annotations

from potstill.distill.train.curves import plot_loss_curves, read_metrics
from potstill.report.plots import plot_pvalues, write_report

__all__ = ["plot_loss_curves", "plot_pvalues", "read_metrics", "write_report"]
