"""PNG plots of merge diagnostics (matplotlib, Agg backend; imported only when plotting)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from langmerge.analysis.diagnostics import AnalysisReport


def _pyplot():
    import matplotlib  # optional (the tune extra), imported only to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def recipe_label(report: AnalysisReport) -> str:
    return Path(report.recipe).stem


def _slack_text(s) -> str:
    return f"slack {s}" if isinstance(s, str) else f"slack {s:g}"


def plot_loss_by_layer(reports: list[AnalysisReport], path: Path) -> Path:
    """Loss rate per layer: one line per recipe, model and slack."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for report in reports:
        layers = [k for k in report.by_layer if k != "other"]
        if not layers:
            continue
        x = [int(k) for k in layers]
        for i, label in enumerate(report.labels):
            for s, slack in enumerate(report.slack_labels):
                y = [report.by_layer[k].loss_rate()[s, i] for k in layers]
                name = f"{label}, {_slack_text(slack)}"
                if len(reports) > 1:
                    name = f"{recipe_label(report)}: {name}"
                ax.plot(x, y, marker="o", markersize=3, label=name, linestyle="-" if report.protected[i] else "--")
    ax.set_xlabel("layer")
    ax.set_ylabel("loss rate (kept entries lost to the sign vote)")
    ax.set_title("What the merge loses, by layer")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss_vs_slack(reports: list[AnalysisReport], path: Path) -> Path:
    """Total loss rate of each model against slack: one line per recipe and model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for report in reports:
        numeric = [(s, x) for s, x in enumerate(report.slack_labels) if not isinstance(x, str)]
        rate = report.total.loss_rate()
        for i, label in enumerate(report.labels):
            name = label + (" (protected)" if report.protected[i] else "")
            if len(reports) > 1:
                name = f"{recipe_label(report)}: {name}"
            ax.plot([x for _, x in numeric], [rate[s, i] for s, _ in numeric], marker="o", label=name)
    ax.set_xlabel("slack s (protected models vote with weight 1 + s)")
    ax.set_ylabel("loss rate")
    ax.set_title("Loss rate against slack")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss_vs_tokens(reports: list[AnalysisReport], tokens: list[int], tracked: list[int], path: Path) -> Path:
    """The paper's analysis figure: the tracked (SFT) model's loss rate against CT tokens, one line per slack."""
    plt = _pyplot()
    order = np.argsort(tokens)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    slack_labels = reports[0].slack_labels
    for s, slack in enumerate(slack_labels):
        xs = [tokens[k] for k in order]
        ys = [reports[k].total.loss_rate()[s, tracked[k]] for k in order]
        ax.plot(xs, ys, marker="o", label=_slack_text(slack))
    model = reports[0].labels[tracked[0]]
    ax.set_xscale("log")
    ax.set_xlabel("CT tokens")
    ax.set_ylabel(f"loss rate of {model}")
    ax.set_title(f"{model}'s kept entries lost to the vote as CT data grows")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
