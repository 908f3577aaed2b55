"""``run_study``: prepare the data and base, check the budgets, run every step, write the report."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from langmerge.errors import LangmergeError
from langmerge.io.output import check_disjoint, remove_dead_partials
from langmerge.study.config import Study
from langmerge.study.executors import Report, run_steps
from langmerge.study.plan import Plan, build_plan, check_budgets
from langmerge.study.report import write_report
from langmerge.study.steps import Context, Step, StepRecord

log = logging.getLogger(__name__)


@dataclass
class StudyResult:
    plan: Plan
    records: list[StepRecord]
    report_dir: Path | None
    token_counts: dict

    @property
    def ran(self) -> list[str]:
        return [r.label for r in self.records if not r.cached]


def cache_dir(study: Study) -> Path:
    return study.out / "cache"


def matching(plan: Plan, patterns: Sequence[str]) -> list[Step]:
    """Steps whose label or kind matches one of the shell patterns."""
    hits = []
    for pattern in patterns:
        found = [s for s in plan.steps if fnmatch.fnmatchcase(s.label, pattern) or fnmatch.fnmatchcase(s.kind, pattern)]
        if not found:
            raise LangmergeError(f"--only {pattern!r} matches no step (see `langmerge study --dry-run`)")
        hits += found
    return hits


def select(plan: Plan, patterns: Sequence[str]) -> list[Step]:
    """Steps matching the patterns, with everything they need, in order."""
    chosen: set[int] = set()

    def take(step: Step) -> None:
        if id(step) not in chosen:
            chosen.add(id(step))
            for dep in step.deps.values():
                take(dep)

    for s in matching(plan, patterns):
        take(s)
    return [s for s in plan.steps if id(s) in chosen]


def run_study(
    study: Study,
    *,
    only: Sequence[str] = (),
    force: bool = False,
    executor: str | None = None,
    progress: bool = True,
    report: Report | None = None,
    write: bool = True,
    allow_pickle: bool = False,
) -> StudyResult:
    """Run the study's steps (cached) and write ``OUT/report``.

    ``only``: run the steps matching these patterns and what they need; ``force`` reruns the
    matching steps (every step without ``only``), never the cached steps they merely need.
    ``allow_pickle``: given models with only pickle (.bin) weights may load (``weights_only=True``).
    """
    check_disjoint([study.out], study.input_paths())  # before any work: the study writes OUT/cache and OUT/report
    plan = build_plan(study)
    device = study.spec.evaluation.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LangmergeError(
                f"{study.source}: evaluation.device: {device}, but there is no CUDA device here "
                "(the config checks out; it runs where a GPU is present)"
            )
    cache = cache_dir(study)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LangmergeError(
            f"{study.source}: out {study.out}: cannot create {cache} ({exc.strerror or exc})"
        ) from None
    remove_dead_partials(cache)  # the half-written step folders of killed runs (a live run's are left alone)
    ctx = Context(cache.resolve(), progress, allow_pickle)
    steps = select(plan, only) if only else list(plan.steps)
    forced = {id(s) for s in (matching(plan, only) if only else steps)} if force else set()
    prepare = [s for s in steps if any(s is p for p in plan.prepare)]
    rest = [s for s in steps if not any(s is p for p in plan.prepare)]
    records = run_steps(prepare, ctx, force=forced, report=report)
    # Budgets against the text, with the base tokenizer: before any training starts.
    counts = check_budgets(plan, ctx) if any(s.kind == "ct" and not s.done(ctx.cache) for s in rest) else {}
    spec = study.spec.executor
    kind = executor or spec.kind
    ray_options = (
        {"address": spec.address, "num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus} if kind == "ray" else {}
    )
    offset = len(records)

    def shifted(i, total, step, record):
        if report:
            report(offset + i, offset + total, step, record)

    records += run_steps(rest, ctx, executor=kind, force=forced, report=shifted, **ray_options)
    report_dir = None
    if write:
        report_dir = write_report(plan, ctx, records, study.out / "report")
    return StudyResult(plan, records, report_dir, counts)
