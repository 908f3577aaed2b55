"""Tuning merge parameters on validation data (``langmerge tune``, docs/analysis.md).

Public API: ``tune(recipe, space, objective, search=..., trials=...)`` with an
objective ``score(model, tokenizer) -> float`` (higher is better), for example
``task_objective(tasks)``; ``InMemoryMerger`` merges candidates in memory.
"""

from langmerge.tuning.merger import InMemoryMerger
from langmerge.tuning.objective import task_objective
from langmerge.tuning.search import Trial, TuneResult, tune
from langmerge.tuning.space import Dimension, load_space

__all__ = ["Dimension", "InMemoryMerger", "Trial", "TuneResult", "load_space", "task_objective", "tune"]
