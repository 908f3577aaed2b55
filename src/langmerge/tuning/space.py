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

The file is a ``SearchSpace``: each key's entry is a ``ValueList`` or a
``Range`` (a discriminated union: an entry with ``values`` is a list of
values, else a range). Errors name the file and key (``load_config``'s form).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from langmerge.errors import LangmergeError
from langmerge.input_files import ConfigError, read_config_document, validation_errors
from langmerge.merge.recipe import Recipe, Scalar, load_recipe

_MODEL_KEY = re.compile(r"^models\[([^\]]+)\]\.parameters\.([A-Za-z_][A-Za-z0-9_]*)$")
_GLOBAL_KEY = re.compile(r"^parameters\.([A-Za-z_][A-Za-z0-9_]*)$")
_RANGE_KEYS = {"low", "high", "step", "log"}
PROBE_TENSOR = "model.layers.0.self_attn.q_proj.weight"  # any name: tuned values are plain numbers


def _finite(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or math.isinf(value):
        raise ValueError(f"'{field}' must be a finite number, got {value!r}")
    return value


class ValueList(BaseModel):
    """``{values: [...]}``: the values a key may take (a grid tries each; TPE picks among them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["values"] = Field("values", exclude=True)
    values: list[Scalar]

    @field_validator("values", mode="before")
    @classmethod
    def _listed(cls, values: Any) -> Any:
        if not isinstance(values, list) or not values:
            raise ValueError("'values' is empty; list at least one value")
        if len(set(map(repr, values))) != len(values):
            raise ValueError("'values' lists a value twice")
        for v in values:
            if not isinstance(v, (bool, int, float, str)):
                raise ValueError(f"'values' lists {v!r}; a value is a number or true/false")
        return values


class Range(BaseModel):
    """``{low, high, step?, log?}``: numbers from ``low`` to ``high`` (a grid needs ``step``; ``log``: TPE only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["range"] = Field("range", exclude=True)
    low: int | float
    high: int | float
    step: int | float | None = None
    log: bool = False

    @field_validator("low", "high", "step", mode="before")
    @classmethod
    def _finite_bound(cls, value: Any, info: ValidationInfo) -> Any:
        return value if value is None and info.field_name == "step" else _finite(value, str(info.field_name))

    @field_validator("log", mode="before")
    @classmethod
    def _flag(cls, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError("'log' is true or false")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"empty range (low {self.low} is not below high {self.high})")
        if self.step is not None and (self.step <= 0 or self.step > self.high - self.low):
            raise ValueError("'step' must be > 0 and at most high - low")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("a log range needs low > 0 and no step")
        return self


def _entry_kind(entry: Any) -> str | None:
    if isinstance(entry, dict):
        return "values" if "values" in entry else "range"
    return entry.kind if isinstance(entry, (ValueList, Range)) else None


def _entry_shape(entry: Any) -> Any:
    """The faults of an entry's keys, named before the union picks a side (pydantic would name its alternatives)."""
    if isinstance(entry, (ValueList, Range)):
        return entry
    if not isinstance(entry, dict) or not entry:
        raise ValueError("expected {values: [...]} or {low: .., high: ..}")
    unknown = set(entry) - _RANGE_KEYS - {"values"}
    if unknown:
        raise ValueError(f"unknown field {sorted(unknown)[0]!r}; use values, or low/high/step/log")
    if "values" in entry and set(entry) != {"values"}:
        raise ValueError("give either 'values' or a range (low, high), not both")
    if "values" not in entry and ("low" not in entry or "high" not in entry):
        raise ValueError("a range needs both 'low' and 'high'")
    return entry


SpaceEntry = Annotated[
    Annotated[ValueList, Tag("values")] | Annotated[Range, Tag("range")],
    Discriminator(_entry_kind),
    BeforeValidator(_entry_shape),
]


class SearchSpace(RootModel[dict[str, SpaceEntry]]):
    """A search space file: recipe key -> a list of values or a range."""


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

    def _bounds(self) -> tuple[float, float]:
        """A range's low and high (a dimension without ``values`` is a range: it has both)."""
        assert self.low is not None and self.high is not None
        return self.low, self.high

    def grid(self) -> list:
        """Every value of a grid search: the listed values, or ``low, low + step, ..., high``."""
        if self.values is not None:
            return list(self.values)
        if self.step is None:
            raise LangmergeError(f"search space key {self.key!r}: a grid search needs 'values' or a 'step'")
        low, high = self._bounds()
        count = int(math.floor((high - low) / self.step + 1e-9)) + 1
        # Rounded so that the values (and the recipe written with them) read as typed: 0.3, not 0.30000000000000004.
        points = [round(low + k * self.step, 10) for k in range(count)]
        return [self.kind(v) for v in points]

    def suggest(self, trial) -> Any:
        """The value an Optuna trial proposes for this key."""
        if self.values is not None:
            return trial.suggest_categorical(self.key, list(self.values))
        low, high = self._bounds()
        if self.kind is int:
            return trial.suggest_int(self.key, int(low), int(high), step=int(self.step or 1), log=self.log)
        value = trial.suggest_float(self.key, low, high, step=self.step, log=self.log)
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
    models = [e.model for e in recipe.raw.models or []]  # load_space took a recipe of whole models
    if ref.isdigit():
        index = int(ref)
        if index >= len(models):
            raise LangmergeError(
                f"{where}: key {key!r}: the recipe lists {len(models)} models (indices 0-{len(models) - 1})"
            )
    else:
        hits = [i for i, m in enumerate(models) if ref in (m, Path(m.rstrip("/")).name)]
        if len(hits) != 1:
            raise LangmergeError(
                f"{where}: key {key!r}: {ref!r} names {'no' if not hits else 'more than one'} model of the recipe "
                f"({', '.join(models)})"
            )
        index = hits[0]
    if recipe.has_base and models[index] == recipe.base_model:
        raise LangmergeError(
            f"{where}: key {key!r}: {models[index]} is the base model; it has no parameters in a merge"
        )
    return index


def _dimension(recipe: Recipe, key: str, entry: ValueList | Range, where: str) -> Dimension:
    specs = recipe.method.parameters
    m, g = _MODEL_KEY.match(key), _GLOBAL_KEY.match(key)
    if m is not None:
        name = m.group(2)
    elif g is not None:
        name = g.group(1)
    else:
        raise LangmergeError(
            f"{where}: key {key!r}: not a recipe parameter key; use models[I].parameters.NAME or parameters.NAME"
        )
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
    kind = specs[name].type
    if isinstance(entry, ValueList):
        return Dimension(key, name, model_index, kind, values=tuple(entry.values))
    if kind is bool:
        raise LangmergeError(f"{where}: key {key!r}: {name} is true or false; use values: [true, false]")
    if kind is int and any(v is not None and int(v) != v for v in (entry.low, entry.high, entry.step)):
        raise LangmergeError(f"{where}: key {key!r}: {name} is a whole number; low, high and step must be too")
    return Dimension(key, name, model_index, kind, low=entry.low, high=entry.high, step=entry.step, log=entry.log)


def read_space(space: str | Path | dict | SearchSpace) -> tuple[SearchSpace, str]:
    """``(space, where)``: a search space file (YAML, or JSON for a ``.json`` file), mapping or model, validated;
    ``where`` names it in messages. Errors name the file and key (``key 'K': what was expected``)."""
    if isinstance(space, SearchSpace):
        return space, "search space"
    where = "search space"
    document: object = space
    if isinstance(space, (str, Path)):
        where = str(space)
        document = read_config_document(Path(space), "search space")
    if not isinstance(document, dict) or not document:
        raise LangmergeError(f"{where}: a search space is a non-empty mapping of recipe keys to ranges or values")
    try:
        return SearchSpace.model_validate({str(key): entry for key, entry in document.items()}), where
    except ValidationError as exc:
        # an entry's messages name its fields themselves: the key is the space's key (the location's first part)
        raise ConfigError(where, validation_errors(exc, key_depth=1), "search space") from None


def load_space(space: str | Path | dict | SearchSpace, recipe: Recipe) -> list[Dimension]:
    """Parse and check a search space against ``recipe`` (every bound and value is resolved as a recipe would be)."""
    recipe.require_whole_models("tune")
    space, where = read_space(space)
    dims = [_dimension(recipe, key, entry, where) for key, entry in space.root.items()]
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
