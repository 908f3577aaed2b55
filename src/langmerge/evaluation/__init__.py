"""Evaluation in the target language: offline tasks, lm-evaluation-harness, a language check.

Public API: ``evaluate(model, tasks, tokenizer=..., options=EvalOptions(...))`` (a model folder or an
already-loaded model and tokenizer) returns an ``EvalResult``;
``write_results(results, out_dir)`` writes results.json, results.md and a plot.
"""

from langmerge.evaluation.options import EvalOptions
from langmerge.evaluation.runner import EvalResult, TaskResult, evaluate, load_model, results_markdown, write_results
from langmerge.evaluation.tasks import Task, TaskSpec, load_task, resolve_tasks

__all__ = [
    "EvalOptions",
    "EvalResult",
    "TaskResult",
    "evaluate",
    "load_model",
    "results_markdown",
    "write_results",
    "Task",
    "TaskSpec",
    "load_task",
    "resolve_tasks",
]
