"""What each kind of step does: train, tune, evaluate, analyse (the functions executors call)."""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from langmerge.analysis import analyze
from langmerge.errors import LangmergeError
from langmerge.evaluation import EvalOptions, evaluate, load_model, resolve_tasks, write_results
from langmerge.evaluation.metrics import MAIN_METRIC
from langmerge.evaluation.runner import EvalResult, autocast
from langmerge.evaluation.tasks import Task
from langmerge.io.hub import resolve_model
from langmerge.io.reader import pretrained_options, read_config
from langmerge.merge.recipe import load_recipe
from langmerge.progress import TqdmReporter
from langmerge.study.config import StudyTrainOptions
from langmerge.study.miniature import build_base
from langmerge.study.sources import write_source
from langmerge.study.steps import (
    BaseSettings,
    Context,
    CTSettings,
    EvalSettings,
    FileSettings,
    GivenSettings,
    Runner,
    SFTSettings,
    SourceSettings,
    Step,
    TaskSettings,
    TuneSettings,
    method_recipe,
    space_for_recipe,
)
from langmerge.training import train_ct, train_sft
from langmerge.training.data import format_token_count
from langmerge.tuning import InMemoryMerger, tune
from langmerge.tuning.objective import task_objective

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- where inputs are


def folder_fingerprint(path: Path) -> list:
    """Names, sizes and modification times of a model folder's files: cheap, and changes when it is rewritten."""
    path = Path(path)
    return sorted(
        [str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in path.rglob("*") if p.is_file()
    )


def data_path(ctx: Context, step: Step) -> Path:
    """The file a ``file`` or ``source`` step stands for."""
    if step.kind == "file":
        return Path(step.settings_as(FileSettings).path)
    if step.kind == "source":
        out = ctx.out(step)
        return next(p for p in (out / "data.txt", out / "data.jsonl") if p.is_file())
    raise LangmergeError(f"step {step.label} is not a data step")


def model_path(ctx: Context, step: Step, budget: int | None = None) -> Path:
    """The model folder a step produced (for a CT step: the checkpoint of ``budget``).

    A given Hub model is its snapshot in the Hugging Face cache of the machine that asks,
    downloaded there at the planned commit if it is not cached (io/hub.py).
    """
    if step.kind == "given":
        given = step.settings_as(GivenSettings)
        if given.hub is not None:
            return resolve_model(
                f"{given.hub}@{given.commit}", allow_pickle=ctx.allow_pickle, progress=ctx.progress
            ).folder
        return Path(str(given.path))
    out = ctx.out(step) / "model"
    if step.kind == "ct":
        if budget is None:
            raise LangmergeError(f"step {step.label}: which budget's checkpoint?")
        return (
            out if budget == max(step.settings_as(CTSettings).budgets) else out / f"tokens-{format_token_count(budget)}"
        )
    return out


def _inputs(ctx: Context, step: Step, prefix: str) -> list[Path]:
    names = sorted((n for n in step.deps if n.startswith(prefix)), key=lambda n: int(n[len(prefix) :]))
    return [data_path(ctx, step.deps[n]) for n in names]


def _options(step: Step) -> StudyTrainOptions:
    training = step.settings.training if isinstance(step.settings, (CTSettings, SFTSettings)) else None
    if training is None:
        raise TypeError(f"step {step.label} trains nothing")
    return training


# ----------------------------------------------------------------------------- tasks


def study_tasks(settings: TaskSettings, part: str):
    """The Task objects of a step: resolved by name or path, then split (even examples validate, odd test)."""
    tasks = resolve_tasks(list(settings.tasks))
    if settings.split == "none":
        return tasks
    first = 0 if part == "validation" else 1
    out = []
    for t in tasks:
        examples = t.examples[first::2]
        few = min(t.spec.few_shot, max(len(examples) - 1, 0))
        out.append(Task(t.spec.model_copy(update={"few_shot": few}), examples, t.source))
    return out


def task_score(results: EvalResult, score_tasks: list[str] | None = None) -> dict:
    """Main metric per task, and ``score``: the mean of the task-solving metrics (accuracy, exact match)
    of the tasks matching ``score_tasks`` (every task-solving task when empty).

    Each task also keeps its per-example outcomes (1 right, 0 wrong; bits and characters of each
    text for bits per character), in example order, for the report's intervals and paired tests.
    """
    per_task: dict[str, dict[str, Any]] = {}
    for name, r in results.tasks.items():
        metric = MAIN_METRIC[r.kind]
        per_task[name] = {"metric": metric, "value": r.metrics[metric], "kind": r.kind, "n": r.n}
        samples = results.samples[name]
        if r.kind == "bits_per_char":
            per_task[name]["bits"] = [x["bits"] for x in samples]
            per_task[name]["characters"] = [x["characters"] for x in samples]
        else:
            per_task[name]["outcomes"] = [x["correct"] for x in samples]
        if r.kind == "generation" and "lang_share" in r.metrics:
            per_task[name]["lang_share"] = r.metrics["lang_share"]
    chosen = [
        n
        for n, v in per_task.items()
        if v["kind"] != "bits_per_char" and (not score_tasks or any(fnmatch.fnmatchcase(n, p) for p in score_tasks))
    ]
    solving = [per_task[n]["value"] for n in chosen]
    return {"score": sum(solving) / len(solving) if solving else None, "score_tasks": chosen, "tasks": per_task}


# ----------------------------------------------------------------------------- runners


def run_file(step: Step, ctx: Context, out: Path) -> dict:
    return {"path": step.settings_as(FileSettings).path}


def run_given(step: Step, ctx: Context, out: Path) -> dict:
    path = model_path(ctx, step)
    if not path.is_dir() or read_config(path) is None:
        raise LangmergeError(f"{step.label}: {path} is not a model folder (no config.json)")
    pretrained_options(path, allow_pickle=ctx.allow_pickle)  # its files and weights, before any step uses it
    return {"path": str(path)}


def run_source(step: Step, ctx: Context, out: Path) -> dict:
    return write_source(step.settings_as(SourceSettings).builtin, out)


def run_base(step: Step, ctx: Context, out: Path) -> dict:
    texts = _inputs(ctx, step, "vocab")
    return build_base(step.settings_as(BaseSettings), texts, out / "model", progress=ctx.progress)


def run_ct(step: Step, ctx: Context, out: Path) -> dict:
    s = step.settings_as(CTSettings)
    budgets = s.budgets
    result = train_ct(
        model_path(ctx, step.deps["base"]),
        _inputs(ctx, step, "text"),
        max(budgets),
        out / "model",
        save_at=budgets[:-1],
        replay=_inputs(ctx, step, "replay"),
        replay_ratio=s.replay_ratio,
        repeat=s.repeat,
        options=_options(step),
        allow_pickle=ctx.allow_pickle,
        progress=ctx.progress,
    )
    return {
        "steps": result.steps,
        "target_tokens": result.target_tokens,
        "replay_tokens": result.replay_tokens,
        "final_loss": result.final_loss,
        "train_seconds": result.seconds,
    }


def run_sft(step: Step, ctx: Context, out: Path) -> dict:
    base = step.deps["base"]
    s = step.settings_as(SFTSettings)
    result = train_sft(
        model_path(ctx, base, s.budget),
        data_path(ctx, step.deps["data"]),
        out / "model",
        epochs=s.epochs,
        options=_options(step),
        allow_pickle=ctx.allow_pickle,
        progress=ctx.progress,
    )
    return {
        "steps": result.steps,
        "target_tokens": result.target_tokens,
        "trained_tokens": result.trained_tokens,
        "final_loss": result.final_loss,
        "train_seconds": result.seconds,
    }


def _recipe(ctx: Context, step: Step) -> dict:
    s = step.settings_as(TuneSettings)
    return method_recipe(
        s.method,
        str(model_path(ctx, step.deps["base"])),
        str(model_path(ctx, step.deps["ct"], s.budget)),
        str(model_path(ctx, step.deps["sft"])),
        s.dtype,
    )


def run_tune(step: Step, ctx: Context, out: Path) -> dict:
    s = step.settings_as(TuneSettings)
    recipe = _recipe(ctx, step)
    space = space_for_recipe(s.method.space)
    tasks = study_tasks(s.tasks, "validation")
    t = s.tuning
    # The mean task-solving metric on the validation halves, bits per character negated.
    objective, _ = task_objective(tasks, options=EvalOptions(limit=t.limit, batch_size=s.batch_size, seed=t.seed))

    def score(model, tokenizer) -> float:
        with autocast(next(model.parameters()).device, s.precision):
            return objective(model, tokenizer)

    if not space:
        # Nothing to tune; the validation score still ranks it among the merges (finding 1).
        (out / "best_recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        loaded = load_recipe(recipe)
        merger = InMemoryMerger(loaded, device=s.device)
        return {"trials": 0, "best": {}, "validation_score": score(merger.model(loaded), merger.tokenizer)}
    result = tune(
        recipe,
        space,
        score,
        search=t.search,
        trials=t.trials,
        seed=t.seed,
        out_dir=out / "tune",
        device=s.device,
        progress=ctx.progress,
        objective_name="validation score",
        reporter=TqdmReporter(f"tune ({t.search})", unit="trial") if ctx.progress else None,
        allow_pickle=ctx.allow_pickle,
    )
    (out / "best_recipe.yaml").write_text(yaml.safe_dump(result.best_recipe(), sort_keys=False))
    return {"trials": len(result.trials), "best": result.best.values, "validation_score": result.best.score}


def run_eval(step: Step, ctx: Context, out: Path) -> dict:
    s = step.settings_as(EvalSettings)
    tasks = study_tasks(s.tasks, "test")
    if "tune" in step.deps:
        # The merge in memory: the same bits `langmerge merge best_recipe.yaml` writes.
        recipe = load_recipe(ctx.out(step.deps["tune"]) / "best_recipe.yaml")
        merger = InMemoryMerger(recipe, device=s.device, allow_pickle=ctx.allow_pickle)
        model, tokenizer = merger.model(recipe), merger.tokenizer
        name = f"{s.method_name} ({recipe.method.name})"
    else:
        path = model_path(ctx, step.deps["model"], s.budget)
        model, tokenizer = load_model(path, device=s.device, allow_pickle=ctx.allow_pickle)
        name = str(path)
    results = evaluate(
        model,
        tasks,
        tokenizer=tokenizer,
        options=EvalOptions(limit=s.limit, batch_size=s.batch_size, device=s.device, precision=s.precision),
        progress=ctx.progress,
        lm_eval_tasks=s.lm_eval,
    )
    results.model = name
    write_results(results, out / "results")
    summary = task_score(results, s.score_tasks)
    (out / "score.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {"score": summary["score"]}


def run_analyze(step: Step, ctx: Context, out: Path) -> dict:
    doc = {}
    for role in ("ties", "ties_sv"):
        recipe = load_recipe(ctx.out(step.deps[role]) / "best_recipe.yaml")
        models = recipe.raw.models
        assert models is not None  # a study's recipe lists its models (method_recipe), it has no slices
        sft = models[1].model
        report = analyze(recipe, protect=[sft], progress=ctx.progress, allow_pickle=ctx.allow_pickle)
        rate = report.total.loss_rate()[0]
        mass = report.total.mass_loss()[0]
        doc[role] = {
            "method": recipe.method.name,
            "slack": report.slack_labels[0],
            "sft_loss_rate": float(rate[1]),
            "ct_loss_rate": float(rate[0]),
            "sft_mass_loss": float(mass[1]),
            "sft_kept": int(report.total.kept[1]),
            "sft_lost": int(report.total.lost[0, 1]),
        }
    (out / "analysis.json").write_text(json.dumps(doc, indent=1) + "\n")
    return {role: v["sft_loss_rate"] for role, v in doc.items()}


RUNNERS: dict[str, Runner] = {
    "file": run_file,
    "given": run_given,
    "source": run_source,
    "base": run_base,
    "ct": run_ct,
    "sft": run_sft,
    "ct_sft": run_sft,
    "tune": run_tune,
    "eval": run_eval,
    "analyze": run_analyze,
}
