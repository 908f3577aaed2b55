"""``tune``: search recipe parameters for the best validation score, merging candidates in memory."""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from langmerge.errors import LangmergeError
from langmerge.io.output import atomic_output_dir, check_output_free
from langmerge.io.sources import recipe_input_paths
from langmerge.merge.recipe import load_recipe
from langmerge.progress import Reporter
from langmerge.tuning.merger import InMemoryMerger
from langmerge.tuning.objective import Objective
from langmerge.tuning.space import Dimension, apply_values, load_space

log = logging.getLogger(__name__)

SEARCHES = ("grid", "tpe")
DEFAULT_TPE_TRIALS = 30


@dataclass(frozen=True)
class Trial:
    number: int
    values: dict[str, Any]  # space key -> value
    score: float
    seconds: float


class SearchSettings(BaseModel):
    """How a search ran (``tune.json``'s ``settings``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    recipe: str  # where the starting recipe came from (its file, or <recipe>)
    search: str
    trials: int
    seed: int


@dataclass
class TuneResult:
    """What ``tune`` returns: every trial, and the best recipe."""

    recipe: dict  # the recipe as given, Hub ids pinned to their commits
    dims: list[Dimension]
    trials: list[Trial]
    search: str
    objective: str
    seconds: float
    settings: SearchSettings

    @property
    def best(self) -> Trial:
        # The first trial among those with the top score: ties go to the earlier candidate.
        return max(self.trials, key=lambda t: (t.score, -t.number))

    def best_recipe(self) -> dict:
        return apply_values(self.recipe, self.dims, self.best.values)

    def ranked(self) -> list[Trial]:
        return sorted(self.trials, key=lambda t: (-t.score, t.number))


def grid_points(dims: list[Dimension]) -> list[dict[str, Any]]:
    return [dict(zip([d.key for d in dims], combo)) for combo in itertools.product(*(d.grid() for d in dims))]


def check_search(search: str, dims: list[Dimension], trials: int | None) -> int:
    """The number of trials to run; bad settings are errors before any work."""
    if search not in SEARCHES:
        raise LangmergeError(f"--search {search!r}: choose one of {', '.join(SEARCHES)}")
    if trials is not None and trials < 1:
        raise LangmergeError(f"--trials must be at least 1, got {trials}")
    if search == "grid":
        size = math.prod(len(d.grid()) for d in dims)
        if trials is not None and trials < size:
            raise LangmergeError(
                f"--trials {trials}: the grid has {size} points; raise --trials, shrink the space or use --search tpe"
            )
        return size
    try:
        import optuna  # noqa: F401  (optional: the tune extra)
    except ImportError:
        raise LangmergeError("--search tpe needs optuna: pip install 'langmerge[tune]'") from None
    return trials or DEFAULT_TPE_TRIALS


def tune(
    recipe,
    space,
    objective: Objective,
    *,
    search: str = "grid",
    trials: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    force: bool = False,
    device: str = "cpu",
    progress: bool = True,
    reporter: Reporter | None = None,
    allow_pickle: bool = False,
    objective_name: str = "score",
) -> TuneResult:
    """Search ``space`` for the recipe maximising ``objective(model, tokenizer)``.

    The inputs are loaded once (``InMemoryMerger``); every candidate is merged
    in memory, loaded into one model and scored. Identical candidates (TPE may
    propose one twice) are scored once. With ``out_dir``, writes the best
    recipe, the leaderboard and plots there (see ``tuning.report``).
    ``reporter`` hears the trials (one unit each); ``progress`` shows
    huggingface_hub's download bars (models named by Hub id).
    """
    recipe = load_recipe(recipe)
    recipe.require_whole_models("tune")
    dims = load_space(space, recipe)
    n_trials = check_search(search, dims, trials)
    if out_dir is not None:
        check_output_free(
            out_dir, force, [*recipe_input_paths(recipe), space if isinstance(space, (str, Path)) else None]
        )
    start = time.perf_counter()
    merger = InMemoryMerger(recipe, device=device, allow_pickle=allow_pickle, progress=progress)
    log.info("loaded the task vectors in memory (%.2f GB)", merger.nbytes / 1e9)
    # Hub ids pinned to the commit they resolved to: the best recipe merges exactly the models tuned.
    base_dict = recipe.to_dict({ref: m.pinned for ref, m in merger.models.items()})
    done: list[Trial] = []
    cache: dict[tuple, float] = {}
    if reporter is not None:
        reporter.start(n_trials)

    def evaluate(values: dict[str, Any]) -> float:
        key = tuple(repr(values[d.key]) for d in dims)
        t0 = time.perf_counter()
        if key in cache:
            score = cache[key]
        else:
            candidate = load_recipe(apply_values(base_dict, dims, values))
            model = merger.model(candidate)
            score = float(objective(model, merger.tokenizer))
            if score != score:
                raise LangmergeError(f"the objective returned NaN for {values}")
            cache[key] = score
        done.append(Trial(len(done), dict(values), score, time.perf_counter() - t0))
        log.info("trial %d: %s = %.6g (best %.6g)", len(done) - 1, objective_name, score, max(t.score for t in done))
        if reporter is not None:
            reporter.advance(1)
        return score

    try:
        if search == "grid":
            for values in grid_points(dims):
                evaluate(values)
        else:
            import optuna  # optional (the tune extra)

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
            study.optimize(lambda trial: evaluate({d.key: d.suggest(trial) for d in dims}), n_trials=n_trials, catch=())
    finally:
        if reporter is not None:
            reporter.close()
    result = TuneResult(
        base_dict,
        dims,
        done,
        search,
        objective_name,
        time.perf_counter() - start,
        settings=SearchSettings(recipe=recipe.source, search=search, trials=n_trials, seed=seed),
    )
    if out_dir is not None:
        from langmerge.tuning.report import write_tune_outputs  # here: report imports this module

        with atomic_output_dir(out_dir, force=force) as tmp:
            write_tune_outputs(result, tmp)
    return result
