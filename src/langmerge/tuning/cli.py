"""``langmerge tune``: choose merge weights, densities, lambda and slack on validation tasks."""

from __future__ import annotations

from pathlib import Path

from langmerge.cli_options import ALLOW_PICKLE, BATCH_SIZE, DEVICE, FEW_SHOT, FORCE, LIMIT, NO_PROGRESS
from langmerge.io.output import check_output_free
from langmerge.io.sources import recipe_input_paths
from langmerge.merge.recipe import load_recipe
from langmerge.progress import TqdmReporter
from langmerge.tuning.objective import task_objective
from langmerge.tuning.search import check_search, tune
from langmerge.tuning.space import load_space


def run_tune(args) -> int:
    # Every input is checked before the models are loaded: recipe, space, search settings, tasks, output.
    recipe = load_recipe(args.recipe)
    dims = load_space(args.space, recipe)
    check_search(args.search, dims, args.trials)
    objective, described = task_objective(
        args.tasks,
        metric=args.metric,
        limit=args.limit,
        batch_size=args.batch_size,
        few_shot=args.few_shot,
        seed=args.seed,
    )
    check_output_free(args.out, args.force, [*recipe_input_paths(recipe), args.space, *args.tasks.split(",")])
    name = "mean of " + ", ".join(described)
    result = tune(
        recipe,
        args.space,
        objective,
        search=args.search,
        trials=args.trials,
        seed=args.seed,
        out_dir=args.out,
        force=args.force,
        device=args.device,
        progress=not args.no_progress,
        reporter=None if args.no_progress else TqdmReporter(f"tune ({args.search})", unit="trial"),
        allow_pickle=args.allow_pickle,
        objective_name=name,
    )
    best = result.best
    print(f"best {name} = {best.score:.6g} (trial {best.number} of {len(result.trials)}):")
    for key, value in best.values.items():
        print(f"  {key}: {value}")
    print(f"wrote {Path(args.out) / 'best_recipe.yaml'}, leaderboard.csv, leaderboard.md, tune.json, scores.png")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("tune", help="search merge weights, densities, lambda and slack on validation tasks")
    p.add_argument("recipe", help="recipe YAML file (the starting point; its models are kept)")
    p.add_argument("--space", required=True, help="search space YAML (see docs/analysis.md)")
    p.add_argument(
        "--tasks", required=True, help="validation tasks: built-in names, patterns or task YAML paths, comma-separated"
    )
    p.add_argument(
        "-o", "--out", required=True, help="output folder: best_recipe.yaml, leaderboard.csv/.md, scores.png"
    )
    p.add_argument("--search", default="grid", choices=["grid", "tpe"], help="grid (every point) or tpe (Optuna)")
    p.add_argument("--trials", type=int, default=None, help="trial budget (tpe: default 30; grid: at least its size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler and of few-shot example choice")
    p.add_argument(
        "--metric",
        default="auto",
        help="metric per task: auto (acc / exact_match / -bpc), acc, acc_norm, exact_match, chrf, bpc",
    )
    LIMIT.add(p)
    FEW_SHOT.add(p, "override every task's few-shot count")
    BATCH_SIZE.add(p)
    DEVICE.add(p)
    FORCE.add(p)
    NO_PROGRESS.add(p)
    ALLOW_PICKLE.add(p)
    p.set_defaults(handler=run_tune)
