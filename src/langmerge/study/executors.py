"""Running a plan's steps: in order on this machine, or as Ray tasks on a cluster.

Both run the same ``run_step`` function; a finished step (its folder has
``done.json``) is skipped, so a killed study resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence

from langmerge.errors import LangmergeError
from langmerge.study.steps import Context, Step, StepRecord, run_step

log = logging.getLogger(__name__)

Report = Callable[[int, int, Step, StepRecord], None]  # (index, total, step, done.json record)


def run_local(
    steps: Sequence[Step], ctx: Context, *, force: Collection[int] = frozenset(), report: Report | None = None
) -> list[StepRecord]:
    """Run ``steps`` (already in dependency order) one after another; ``force``: ids of steps to rerun."""
    records = []
    for i, step in enumerate(steps, 1):
        record = run_step(step, ctx, force=id(step) in force)
        records.append(record)
        if report:
            report(i, len(steps), step, record)
    return records


def _ray_step(step: Step, ctx: Context, force: bool, *deps_done) -> StepRecord:
    # deps_done: the records of the dependencies; passing them makes Ray wait for those tasks.
    return run_step(step, ctx, force=force)


def run_ray(
    steps: Sequence[Step],
    ctx: Context,
    *,
    force: Collection[int] = frozenset(),
    report: Report | None = None,
    address: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    init_kwargs: dict | None = None,
) -> list[StepRecord]:
    """Submit every step as a Ray task that waits for its dependencies' tasks; steps already done are not sent.

    Without ``address`` (and no Ray already initialised) a local Ray instance is started.
    Training steps ask for ``num_gpus`` GPUs; all steps ask for ``num_cpus`` CPUs.
    The cache folder must be on storage every node sees (a shared file system).
    """
    import ray  # an optional dependency (langmerge[study]), only for this executor

    started_here = False
    if not ray.is_initialized():
        ray.init(address=address, **(init_kwargs or {}))
        started_here = True
    try:
        remote = ray.remote(_ray_step)
        refs: dict[int, object] = {}
        pending = {}
        for step in steps:
            if step.done(ctx.cache) and id(step) not in force:
                continue
            deps = [refs[id(d)] for d in step.deps.values() if id(d) in refs]
            options = {"num_cpus": num_cpus, "num_gpus": num_gpus if step.training else 0, "max_retries": 0}
            ref = remote.options(**options).remote(step, ctx, id(step) in force, *deps)
            refs[id(step)] = ref
            pending[ref] = step
        records = {}
        total = len(steps)
        count = 0
        for step in steps:
            if id(step) not in refs:
                count += 1
                record = run_step(step, ctx)  # cached: returns its record at once
                records[id(step)] = record
                if report:
                    report(count, total, step, record)
        waiting = list(pending)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            for ref in ready:
                step = pending[ref]
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    # A bad-input error inside a step reads as it would locally; other errors keep Ray's traceback.
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, LangmergeError):
                        raise LangmergeError(f"step {step.label}: {cause}") from None
                    raise
                count += 1
                records[id(step)] = record
                if report:
                    report(count, total, step, record)
        return [records[id(s)] for s in steps]
    finally:
        if started_here:
            ray.shutdown()


def run_steps(
    steps: Sequence[Step],
    ctx: Context,
    *,
    executor: str = "local",
    force: Collection[int] = frozenset(),
    report: Report | None = None,
    **ray_options,
) -> list[StepRecord]:
    start = time.perf_counter()
    if executor == "ray":
        records = run_ray(steps, ctx, force=force, report=report, **ray_options)
    else:
        records = run_local(steps, ctx, force=force, report=report)
    log.info("%d steps in %.1fs", len(steps), time.perf_counter() - start)
    return records
