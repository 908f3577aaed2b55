"""What ``langmerge tune`` writes: best_recipe.yaml, leaderboard.csv/.md, tune.json and scores.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml

from langmerge.tuning.search import TuneResult


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def leaderboard_rows(result: TuneResult) -> list[dict[str, Any]]:
    rows = []
    for rank, t in enumerate(result.ranked(), start=1):
        row: dict[str, Any] = {"rank": rank, "trial": t.number}
        row.update({d.key: t.values[d.key] for d in result.dims})
        row.update({result.objective: t.score, "seconds": round(t.seconds, 3)})
        rows.append(row)
    return rows


def leaderboard_markdown(result: TuneResult, top: int = 20) -> str:
    rows = leaderboard_rows(result)
    header = list(rows[0])
    lines = [
        f"# Tuning leaderboard ({result.search}, {len(result.trials)} trials)",
        "",
        f"Objective (higher is better): {result.objective}. Recipe: {result.settings.recipe}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if h not in ("rank",) else "---" for h in header) + "|",
    ]
    for row in rows[:top]:
        lines.append("| " + " | ".join(_fmt(row[h]) for h in header) + " |")
    if len(rows) > top:
        lines.append(f"\n{len(rows) - top} more trials in leaderboard.csv.")
    return "\n".join(lines) + "\n"


def plot_scores(result: TuneResult, path: Path) -> Path:
    """The score against each searched parameter (best marked), and the best score so far by trial."""
    import matplotlib  # optional (the tune extra), imported only to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(result.dims) + 1
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.4), squeeze=False)
    best = result.best
    scores = [t.score for t in result.trials]
    for ax, d in zip(axes[0], result.dims):
        raw = [t.values[d.key] for t in result.trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
        if numeric:
            xs = raw
            bx = best.values[d.key]
        else:
            labels = sorted({repr(v) for v in raw})
            xs = [labels.index(repr(v)) for v in raw]
            bx = labels.index(repr(best.values[d.key]))
            ax.set_xticks(range(len(labels)), labels)
        ax.scatter(xs, scores, s=18, alpha=0.7)
        ax.scatter([bx], [best.score], s=70, marker="*", color="red", label="best")
        ax.set_xlabel(d.key, fontsize=8)
        ax.set_ylabel(result.objective, fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    running = [max(scores[: k + 1]) for k in range(len(scores))]
    ax.plot(range(len(scores)), scores, "o", markersize=3, alpha=0.6, label="trial")
    ax.plot(range(len(scores)), running, "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(result.objective, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(f"tune ({result.search}): best {best.score:.4g} at trial {best.number}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_tune_outputs(result: TuneResult, out: Path) -> None:
    (out / "best_recipe.yaml").write_text(
        f"# langmerge tune: best of {len(result.trials)} trials ({result.search}), "
        f"{result.objective} = {result.best.score!r}\n" + yaml.safe_dump(result.best_recipe(), sort_keys=False)
    )
    rows = leaderboard_rows(result)
    with (out / "leaderboard.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "leaderboard.md").write_text(leaderboard_markdown(result))
    doc = {
        "settings": result.settings.model_dump(),
        "objective": result.objective,
        "space": [
            {k: v for k, v in vars(d).items() if k not in ("kind",)} | {"type": d.kind.__name__} for d in result.dims
        ],
        "best": {"trial": result.best.number, "values": result.best.values, "score": result.best.score},
        "trials": [vars(t) for t in result.trials],
        "seconds": round(result.seconds, 3),
    }
    (out / "tune.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    plot_scores(result, out / "scores.png")
