"""Search spaces for ``langmerge tune``: recipe keys and the values they may take.

A space is a YAML mapping from a recipe key to a range or a list of values::

    models[0].parameters.weight: {low: 0.2, high: 1.0, step: 0.2}   # a range (step: a grid)
    models[sft].parameters.density: {values: [0.3, 0.5, 0.7]}        # a list of values
    parameters.slack: {values: [0, 0.5, 1, 2]}
    parameters.lambda: {low: 0.5, high: 2.0, log: true}             # TPE only (no step)

``models[I]`` addresses the recipe's ``models`` list as written, by index, by
model reference or by folder name; ``parameters.NAME`` is a global parameter
(or the default of a per-model one). A tuned value replaces whatever the
recipe set at that key (a number, a gradient or conditional values).
Everything is checked against the recipe's method before any work starts.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langmerge.errors import LangmergeError
from langmerge.input_files import parse_yaml, read_input_text
from langmerge.merge.recipe import Recipe, load_recipe

_MODEL_KEY = re.compile(r"^models\[([^\]]+)\]\.parameters\.([A-Za-z_][A-Za-z0-9_]*)$")
_GLOBAL_KEY = re.compile(r"^parameters\.([A-Za-z_][A-Za-z0-9_]*)$")
_SPEC_KEYS = {"values", "low", "high", "step", "log"}
PROBE_TENSOR = "model.layers.0.self_attn.q_proj.weight"  # any name: tuned values are plain numbers


@dataclass(frozen=True)
class Dimension:
    """One searched recipe key."""

    key: str  # as written in the space file
    name: str  # the parameter's name
    model_index: int | None  # index into the recipe's ``models`` list; None for ``parameters.NAME``
    kind: type  # float, int or bool
    values: tuple | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    def grid(self) -> list:
        """Every value of a grid search: the listed values, or ``low, low + step, ..., high``."""
        if self.values is not None:
            return list(self.values)
        if self.step is None:
            raise LangmergeError(f"search space key {self.key!r}: a grid search needs 'values' or a 'step'")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        # Rounded so that the values (and the recipe written with them) read as typed: 0.3, not 0.30000000000000004.
        points = [round(self.low + k * self.step, 10) for k in range(count)]
        return [self.kind(v) for v in points]

    def suggest(self, trial) -> Any:
        """The value an Optuna trial proposes for this key."""
        if self.values is not None:
            return trial.suggest_categorical(self.key, list(self.values))
        if self.kind is int:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        value = trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)
        # Stepped values rounded as in ``grid``, so that 0.2 + 0.4 is written as 0.6.
        return round(value, 10) if self.step is not None else value


def apply_values(recipe_dict: dict, dims: list[Dimension], values: dict[str, Any]) -> dict:
    """A copy of the recipe dict with each dimension's key set to ``values[key]``."""
    out = copy.deepcopy(recipe_dict)
    for d in dims:
        if d.model_index is None:
            out.setdefault("parameters", {})[d.name] = values[d.key]
        else:
            out["models"][d.model_index].setdefault("parameters", {})[d.name] = values[d.key]
    return out


def _model_index(recipe: Recipe, ref: str, key: str, where: str) -> int:
    models = [e.model for e in recipe.raw.models]
    if ref.isdigit():
        index = int(ref)
        if index >= len(models):
            raise LangmergeError(f"{where}: key {key!r}: the recipe lists {len(models)} models (indices 0-{len(models) - 1})")
    else:
        hits = [i for i, m in enumerate(models) if ref in (m, Path(m.rstrip("/")).name)]
        if len(hits) != 1:
            raise LangmergeError(
                f"{where}: key {key!r}: {ref!r} names {'no' if not hits else 'more than one'} model of the recipe "
                f"({', '.join(models)})"
            )
        index = hits[0]
    if recipe.has_base and models[index] == recipe.base_model:
        raise LangmergeError(f"{where}: key {key!r}: {models[index]} is the base model; it has no parameters in a merge")
    return index


def _number(value: Any, key: str, field: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or math.isinf(value):
        raise LangmergeError(f"{where}: key {key!r}: '{field}' must be a finite number, got {value!r}")
    return value


def _dimension(recipe: Recipe, key: str, spec: Any, where: str) -> Dimension:
    specs = recipe.method.parameters
    m, g = _MODEL_KEY.match(key), _GLOBAL_KEY.match(key)
    if not (m or g):
        raise LangmergeError(
            f"{where}: key {key!r}: not a recipe parameter key; use models[I].parameters.NAME or parameters.NAME"
        )
    name = m.group(2) if m else g.group(1)
    tunable = sorted(n for n in specs if n != "int8_mask")
    if name not in specs or name == "int8_mask":
        raise LangmergeError(
            f"{where}: key {key!r}: {name!r} is not a parameter of {recipe.method.name}; tunable: {', '.join(tunable)}"
        )
    model_index = None
    if m:
        if specs[name].scope != "model":
            raise LangmergeError(f"{where}: key {key!r}: {name} is a global parameter; use parameters.{name}")
        model_index = _model_index(recipe, m.group(1), key, where)
    elif specs[name].scope == "model" and all(name in e.parameters for e in recipe.inputs):
        raise LangmergeError(
            f"{where}: key {key!r}: every model sets its own {name}, so the global value has no effect; "
            f"tune models[I].parameters.{name}"
        )
    if not isinstance(spec, dict) or not spec:
        raise LangmergeError(f"{where}: key {key!r}: expected {{values: [...]}} or {{low: .., high: ..}}")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise LangmergeError(f"{where}: key {key!r}: unknown field {sorted(unknown)[0]!r}; use values, or low/high/step/log")
    kind = specs[name].type
    if "values" in spec:
        if set(spec) != {"values"}:
            raise LangmergeError(f"{where}: key {key!r}: give either 'values' or a range (low, high), not both")
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise LangmergeError(f"{where}: key {key!r}: 'values' is empty; list at least one value")
        if len(set(map(repr, values))) != len(values):
            raise LangmergeError(f"{where}: key {key!r}: 'values' lists a value twice")
        return Dimension(key, name, model_index, kind, values=tuple(values))
    if kind is bool:
        raise LangmergeError(f"{where}: key {key!r}: {name} is true or false; use values: [true, false]")
    if "low" not in spec or "high" not in spec:
        raise LangmergeError(f"{where}: key {key!r}: a range needs both 'low' and 'high'")
    low, high = _number(spec["low"], key, "low", where), _number(spec["high"], key, "high", where)
    if not low < high:
        raise LangmergeError(f"{where}: key {key!r}: empty range (low {low} is not below high {high})")
    step = spec.get("step")
    if step is not None and (_number(step, key, "step", where) <= 0 or step > high - low):
        raise LangmergeError(f"{where}: key {key!r}: 'step' must be > 0 and at most high - low")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise LangmergeError(f"{where}: key {key!r}: 'log' is true or false")
    if log and (low <= 0 or step is not None):
        raise LangmergeError(f"{where}: key {key!r}: a log range needs low > 0 and no step")
    if kind is int and any(v is not None and int(v) != v for v in (low, high, step)):
        raise LangmergeError(f"{where}: key {key!r}: {name} is a whole number; low, high and step must be too")
    return Dimension(key, name, model_index, kind, low=low, high=high, step=step, log=log)


def load_space(space: str | Path | dict, recipe: Recipe) -> list[Dimension]:
    """Parse and check a search space against ``recipe`` (every bound and value is resolved as a recipe would be)."""
    where = "search space"
    if isinstance(space, (str, Path)):
        where = str(space)
        space = parse_yaml(read_input_text(Path(space), "search space"), where, "search space")
    if not isinstance(space, dict) or not space:
        raise LangmergeError(f"{where}: a search space is a non-empty mapping of recipe keys to ranges or values")
    dims = [_dimension(recipe, str(key), spec, where) for key, spec in space.items()]
    seen: dict[tuple, str] = {}
    for d in dims:
        target = (d.model_index, d.name)
        if target in seen:
            raise LangmergeError(f"{where}: keys {seen[target]!r} and {d.key!r} set the same parameter")
        seen[target] = d.key
    base = recipe.to_dict()
    for d in dims:
        for value in d.values if d.values is not None else (d.low, d.high):
            candidate = apply_values(base, [d], {d.key: d.kind(value) if d.kind is not bool else value})
            try:
                load_recipe(candidate).tensor_parameters(PROBE_TENSOR, 0.0)
            except LangmergeError as exc:
                raise LangmergeError(f"{where}: key {d.key!r}: value {value!r}: {exc}") from None
    return dims
