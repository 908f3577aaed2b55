"""Objectives for ``langmerge tune``: a callable ``score(model, tokenizer) -> float``, higher is better.

``task_objective`` scores a loaded model on validation tasks with
``langmerge.evaluation.evaluate``: the mean over the tasks of one metric per
task. ``auto`` takes ``acc`` for multiple choice, ``exact_match`` for
generation and ``-bpc`` for bits per character (negated: lower bits are better).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from langmerge.errors import LangmergeError
from langmerge.evaluation import EvalOptions, evaluate, resolve_tasks
from langmerge.evaluation.metrics import MAIN_METRIC

Objective = Callable[[object, object], float]

AUTO_METRIC = MAIN_METRIC
LOWER_IS_BETTER = {"bpc"}
KNOWN_METRICS = {
    "multiple_choice": {"acc", "acc_norm"},
    "generation": {"exact_match", "chrf", "lang_share"},
    "bits_per_char": {"bpc"},
}


def task_objective(
    tasks: Sequence[str] | str,
    *,
    metric: str = "auto",
    options: EvalOptions = EvalOptions(),
) -> tuple[Objective, list[str]]:
    """An objective over validation tasks, resolved now (a missing task is an error before any merge); each model
    is evaluated with ``options`` (``limit``, ``batch_size``, ``few_shot``, ``seed``: the model is already placed)."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    if not [n for n in names if n]:
        raise LangmergeError("--tasks: no validation task given")
    resolved = resolve_tasks(names)
    metrics = {}
    for task in resolved:
        name = AUTO_METRIC[task.spec.kind] if metric == "auto" else metric
        if name not in KNOWN_METRICS[task.spec.kind]:
            raise LangmergeError(
                f"--metric {metric}: task {task.name} ({task.spec.kind}) reports "
                f"{', '.join(sorted(KNOWN_METRICS[task.spec.kind]))}"
            )
        metrics[task.name] = name

    def score(model, tokenizer) -> float:
        results = evaluate(
            model,
            resolved,
            tokenizer=tokenizer,
            options=options,
            progress=False,
        )
        values: list[float] = []
        for name, metric_name in metrics.items():
            value = results.tasks[name].metrics[metric_name]
            values.append(-value if metric_name in LOWER_IS_BETTER else value)
        return float(sum(values) / len(values))

    described = [f"{'-' if m in LOWER_IS_BETTER else ''}{m}({t})" for t, m in metrics.items()]
    return score, described
