"""``langmerge analyze``: what a TIES-family merge keeps and loses, without writing the merge."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from langmerge.analysis.diagnostics import (
    AnalysisReport,
    analyze,
    check_analyzable,
    model_labels,
    percent,
    resolve_protected,
)
from langmerge.analysis.plots import plot_loss_by_layer, plot_loss_vs_slack, plot_loss_vs_tokens
from langmerge.cli_options import ALLOW_PICKLE, DEVICE, FORCE, NO_PROGRESS
from langmerge.errors import LangmergeError
from langmerge.io.files import folder_file, read_json
from langmerge.io.hub import resolve_model
from langmerge.io.metadata import TRAINING_METADATA
from langmerge.io.output import atomic_output_dir, check_output_free
from langmerge.io.sources import recipe_input_paths
from langmerge.merge.recipe import Recipe, load_recipe
from langmerge.progress import TqdmReporter

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_slacks(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        try:
            v = float(part)
        except ValueError:
            raise LangmergeError(f"--slack: {part.strip()!r} is not a number (example: --slack 0,0.5,1,2)") from None
        if v != v or v < 0 or v == float("inf"):
            raise LangmergeError(f"--slack: {part.strip()!r} is not a finite number >= 0")
        values.append(v)
    return values


def parse_tokens(text: str) -> list[int]:
    """Token counts like ``1M,2.5M,1B,3e6``."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMbBgGtT]?)\s*", part)
        try:
            value = float(m.group(1)) * _SUFFIX[m.group(2).upper()] if m else None
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise LangmergeError(f"--tokens: {part.strip()!r} is not a token count (examples: 500K, 1M, 2.5B)")
        out.append(int(value))
    return out


def training_tokens(model: str) -> int:
    """Target-language tokens a CT model was trained on, from its ``langmerge_training.json``."""
    path = folder_file(resolve_model(model).folder, TRAINING_METADATA)
    if path is None:
        raise LangmergeError(
            f"{model}: no {TRAINING_METADATA} to read its CT token count from; pass --tokens, one per recipe"
        )
    document: Any = read_json(path)  # any JSON: a document without tokens.target is the error below
    try:
        tokens = document["tokens"]["target"]
    except (KeyError, TypeError) as exc:
        raise LangmergeError(f"{path}: no tokens.target field ({exc}); pass --tokens, one per recipe") from None
    if not isinstance(tokens, int) or tokens <= 0:
        raise LangmergeError(f"{path}: tokens.target is {tokens!r}, not a positive count; pass --tokens")
    return tokens


def _tracked_and_tokens(
    recipes: list[Recipe], protected: list[list[bool]], tokens_arg: str | None
) -> tuple[list[int], list[int]]:
    """Per recipe: the tracked (protected, SFT) model's index and the CT token count; checked before any work."""
    tracked = []
    for recipe, prot in zip(recipes, protected):
        if not any(prot):
            raise LangmergeError(
                f"{recipe.source}: several recipes are compared on the SFT model's loss; name it with --protect"
            )
        tracked.append(prot.index(True))
    if tokens_arg is not None:
        tokens = parse_tokens(tokens_arg)
        if len(tokens) != len(recipes):
            raise LangmergeError(f"--tokens: {len(tokens)} values for {len(recipes)} recipes; give one per recipe")
        return tracked, tokens
    tokens = []
    for recipe, prot in zip(recipes, protected):
        ct = [e.model for e, p in zip(recipe.inputs, prot) if not p]
        if len(ct) != 1:
            raise LangmergeError(
                f"{recipe.source}: cannot tell which model is the CT model ({len(ct)} unprotected models); "
                "pass --tokens"
            )
        tokens.append(training_tokens(ct[0]))
    return tracked, tokens


def summary_markdown(reports: list[AnalysisReport], tokens: list[int] | None) -> str:
    lines = [
        "# Merge diagnostics",
        "",
        "Loss rate: the model's entries kept after trimming that lose the sign vote; mass loss: their share of",
        "the kept magnitude (docs/methods.md, the loss diagnostic).",
        "",
    ]
    lines.append("| recipe | CT tokens | model | slack | kept | lost | loss rate | mass loss | task-vector norm |")
    lines.append("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for k, r in enumerate(reports):
        rate, mass = r.total.loss_rate(), r.total.mass_loss()
        for i, label in enumerate(r.labels):
            for s, slack in enumerate(r.slack_labels):
                cells = [
                    Path(r.recipe).name,
                    f"{tokens[k]:,}" if tokens else "",
                    label + (" (protected)" if r.protected[i] else ""),
                    str(slack),
                    f"{r.total.kept[i]:,}",
                    f"{r.total.lost[s, i]:,}",
                    percent(rate[s, i]),
                    percent(mass[s, i]),
                    f"{float(r.total.squared_norm[i]) ** 0.5:.4g}",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in reports:
        conflict = r.total.conflict_rate()
        for k, (i, j) in enumerate(r.total.pairs):
            lines.append(
                f"- {Path(r.recipe).name}: sign conflicts {r.labels[i]} vs {r.labels[j]}: "
                f"{percent(conflict[k])} of the entries both keep"
            )
    return "\n".join(lines) + "\n"


def run_analyze(args: argparse.Namespace) -> int:
    slacks = parse_slacks(args.slack) if args.slack is not None else None
    protect = [p.strip() for p in args.protect.split(",") if p.strip()] if args.protect else None
    recipes = [load_recipe(r) for r in args.recipes]
    protected = [resolve_protected(r, protect) for r in recipes]
    for recipe, prot in zip(recipes, protected):
        check_analyzable(recipe, prot, [None] if slacks is None else slacks)
    tracked: list[int] | None = None
    tokens: list[int] | None = None
    if len(recipes) > 1:
        tracked, tokens = _tracked_and_tokens(recipes, protected, args.tokens)
        labels = [model_labels([e.model for e in r.inputs])[t] for r, t in zip(recipes, tracked)]
        if len(set(labels)) > 1:
            raise LangmergeError(f"the protected (SFT) model differs between recipes: {', '.join(labels)}")
    elif args.tokens is not None:
        raise LangmergeError("--tokens: compare CT budgets with several recipes, one per budget")
    check_output_free(args.out, args.force, [p for r in recipes for p in recipe_input_paths(r)])

    reports = []
    for recipe in recipes:
        reporter = None if args.no_progress else TqdmReporter(f"analyze ({recipe.method.name})")
        reports.append(
            analyze(
                recipe,
                slacks=slacks,
                protect=protect,
                device=args.device,
                progress=not args.no_progress,
                reporter=reporter,
                allow_pickle=args.allow_pickle,
            )
        )
    with atomic_output_dir(args.out, force=args.force) as tmp:
        doc: dict[str, Any] = {"runs": [r.to_dict() for r in reports]}
        if tokens is not None:
            doc["ct_tokens"] = tokens
        (tmp / "analysis.json").write_text(json.dumps(doc, indent=1) + "\n")
        (tmp / "summary.md").write_text(summary_markdown(reports, tokens))
        plot_loss_by_layer(reports, tmp / "loss_by_layer.png")
        if sum(not isinstance(s, str) for s in reports[0].slack_labels) > 1:
            plot_loss_vs_slack(reports, tmp / "loss_vs_slack.png")
        if tokens is not None and tracked is not None:  # given together, by several recipes
            plot_loss_vs_tokens(reports, tokens, tracked, tmp / "loss_vs_tokens.png")
    for k, r in enumerate(reports):
        print(r.table() if tokens is None else f"[CT tokens {tokens[k]:,}] " + r.table())
    print(f"wrote {Path(args.out) / 'analysis.json'}, summary.md and plots")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "analyze",
        help="report what a TIES-family merge keeps and loses per tensor, layer and module (no merge written)",
    )
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe YAML file(s); several: one per CT budget")
    p.add_argument("-o", "--out", required=True, help="output folder: analysis.json, summary.md, PNG plots")
    p.add_argument(
        "--slack", default=None, help="slack values analysed in one pass, e.g. 0,0.5,1,2 (default: the recipe's)"
    )
    p.add_argument(
        "--protect",
        default=None,
        help="model(s) voting with weight 1 + slack (the SFT model), by path or folder name; "
        "default: the recipe's 'protect'",
    )
    p.add_argument(
        "--tokens",
        default=None,
        help="CT tokens per recipe, e.g. 1M,2M,4M (default: read from the CT model's langmerge_training.json)",
    )
    DEVICE.add(p)
    FORCE.add(p)
    NO_PROGRESS.add(p)
    ALLOW_PICKLE.add(p)
    p.set_defaults(handler=run_analyze)
