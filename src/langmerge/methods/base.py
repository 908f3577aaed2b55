"""The method interface: what a merge method is, how it is parameterised, and how one tensor's merge runs.

A method (docs/methods.md, "The method interface") is one object with

- a name, a one-line summary, a report label and a reference;
- a pydantic parameter model (``MethodParameters``): per-model fields (one
  value per input model) and global fields, with bounds, defaults and
  mergekit's names as aliases. The recipe resolves mergekit's scalar,
  gradient and conditional values per tensor before they reach the method;
- ``plan(params, tensor, kernel, generators)``: one tensor's merge as a
  ``TensorMerge``, which runs over chunks (``Block``: a flat range of the
  tensor, normally a block of whole rows): zero or more statistics passes
  (``Pass``: exact, mergeable reductions folded chunk by chunk), then the merge
  pass, which turns each chunk into its output chunk, in row order.

``methods.driver`` runs a ``TensorMerge`` given a reader and a writer; the
merge executor does the same with sources and the output file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from typing_extensions import TypeVar

Scope = Literal["model", "global"]
Kernel = Literal["fused", "reference"]
# What a method does with the recipe's base_model (mergekit's input contract):
#   required: the base is the origin of the task vectors and must be named;
#   optional: used as that origin where the recipe names one (nuslerp, multislerp);
#   input:    one more input model, after the listed ones unless listed (mergekit's "ignored": linear, karcher);
#   unused:   not read (layer_swap: both experts share it, nothing of it is merged).
BasePolicy = Literal["required", "optional", "input", "unused"]


class NonFiniteMerge(ArithmeticError):
    """The merged tensor holds NaN or Inf (an input does, or normalizing weights sum to zero)."""


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParameterSpec:
    """One recipe parameter as the recipe, ``check`` and ``tune`` see it (``MethodParameters.specs``)."""

    name: str  # the recipe's (mergekit's) name
    scope: Scope
    type: type
    default: object = None  # None means required (where it applies)
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""


def model_field(
    default: Any = PydanticUndefined,
    *,
    alias: str | None = None,
    ge: float | None = None,
    le: float | None = None,
    help: str = "",
    recipe: bool = True,
) -> Any:
    """A per-model field: a list with one value per input model; ``default`` is each model's default.

    ``recipe=False`` marks a field the recipe fills by other means (TIES-SV's
    ``protected``, from ``parameters.protect``), not a recipe parameter.
    """
    extra = {
        "scope": "model",
        "default": None if default is PydanticUndefined else default,
        "minimum": ge,
        "maximum": le,
        "recipe": recipe,
    }
    # The list's default is filled per model count by MethodParameters._fill_models.
    return Field(
        None if default is not PydanticUndefined else PydanticUndefined,
        alias=alias,
        description=help,
        json_schema_extra=extra,
    )


def global_field(
    default: Any = PydanticUndefined,
    *,
    alias: str | None = None,
    ge: float | None = None,
    le: float | None = None,
    help: str = "",
) -> Any:
    """A global field: one value for all models."""
    extra = {
        "scope": "global",
        "default": None if default is PydanticUndefined else default,
        "minimum": ge,
        "maximum": le,
        "recipe": True,
    }
    return Field(default, alias=alias, description=help, json_schema_extra=extra, ge=ge, le=le)


def _field_extra(f: FieldInfo) -> dict[str, Any]:
    """What ``model_field`` / ``global_field`` recorded about a field (its scope, default, bounds)."""
    extra = f.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


class MethodParameters(BaseModel):
    """A method's parameters, resolved for one tensor.

    Fields are made with ``model_field`` or ``global_field``; the recipe names
    them by alias (mergekit's name) or, where there is none, by field name.
    Per-model fields left out take their default for every model.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, arbitrary_types_allowed=True)

    @classmethod
    def _extras(cls) -> dict[str, dict[str, Any]]:
        return {name: _field_extra(f) for name, f in cls.model_fields.items()}

    @classmethod
    def recipe_name(cls, field: str) -> str:
        return cls.model_fields[field].alias or field

    @classmethod
    def specs(cls) -> dict[str, ParameterSpec]:
        """Every recipe parameter, by recipe name, in field order."""
        out = {}
        for name, f in cls.model_fields.items():
            extra = _field_extra(f)
            if not extra.get("recipe", True):
                continue
            kind: Any = f.annotation
            if extra.get("scope") == "model":
                kind = get_args(kind)[0] if get_args(kind) else float
            spec = ParameterSpec(
                cls.recipe_name(name),
                extra.get("scope", "global"),
                kind,
                extra.get("default"),
                extra.get("minimum"),
                extra.get("maximum"),
                f.description or "",
            )
            out[spec.name] = spec
        return out

    @model_validator(mode="before")
    @classmethod
    def _fill_models(cls, data: Any) -> Any:
        """Per-model fields left out (or None) become ``[default] * n_models``."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        per_model = {n: e for n, e in cls._extras().items() if e.get("scope") == "model"}
        keys = {n: (n if n in data else cls.recipe_name(n)) for n in per_model}
        lengths = {len(data[k]) for k in keys.values() if isinstance(data.get(k), (list, tuple))}
        if len(lengths) > 1:
            raise ValueError(f"per-model parameters have different lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        for name, extra in per_model.items():
            if data.get(keys[name]) is None and extra.get("default") is not None:
                data[keys[name]] = [extra["default"]] * n
        return data

    @model_validator(mode="after")
    def _bounds(self) -> MethodParameters:
        for name, extra in self._extras().items():
            if extra.get("scope") != "model":
                continue
            for v in getattr(self, name):
                lo, hi = extra.get("minimum"), extra.get("maximum")
                if (lo is not None and v < lo) or (hi is not None and v > hi):
                    raise ValueError(f"{self.recipe_name(name)}: {v!r} is outside [{lo}, {hi}]")
        return self

    @property
    def n_models(self) -> int:
        for name, extra in self._extras().items():
            if extra.get("scope") == "model":
                return len(getattr(self, name))
        return 0

    def restrict(self, models: list[int]) -> MethodParameters:
        """The same parameters for a subset of the input models (rows only some models have, docs/checkpoints.md)."""
        update = {
            name: [getattr(self, name)[i] for i in models]
            for name, extra in self._extras().items()
            if extra.get("scope") == "model"
        }
        return self.model_copy(update=update)


# ----------------------------------------------------------------------------- chunks and passes


@dataclass(frozen=True)
class TensorInfo:
    """What a method knows of a tensor when its merge is planned (headers only, no data)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the compute dtype: every block arrives in it
    device: torch.device = torch.device("cpu")
    layer: int | None = None  # the layer the tensor belongs to (from its name); None outside the layers
    num_layers: int | None = None  # the model's layer count (config.json, else the highest index + 1)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def row_numel(self) -> int:
        """Elements per row: a 2-D-or-more tensor's trailing dims; a 1-D or 0-D tensor's rows are single elements."""
        return self.numel // self.shape[0] if len(self.shape) >= 2 and self.shape[0] else 1


@dataclass(frozen=True)
class ChunkRule:
    """Constraints a merge puts on the chunk layout (``driver.chunk_ranges``).

    ``multiple_of``: every chunk boundary is a multiple of this many elements
    (a method whose statistics reproduce a reduction done in fixed segments).
    ``whole_rows``: chunks hold whole rows, at least one even where a row
    exceeds the chunk size (a method with per-row statistics that need the
    row at once); its memory is then bounded by the largest row.
    ``whole_tensor``: one chunk, the whole tensor; memory (inputs + 2) x the
    tensor. For methods that need a whole-tensor torch reduction bit for bit.
    """

    multiple_of: int = 1
    whole_rows: bool = False
    whole_tensor: bool = False


def required_base(base: torch.Tensor | None) -> torch.Tensor:
    """``base``, for a merge relative to the base (the recipe's base policy makes sure there is one)."""
    if base is None:
        raise ValueError("this merge needs the base model's values")
    return base


@dataclass
class Block:
    """One chunk of a tensor: elements ``start .. start + numel`` of the flattened (row-major) tensor.

    ``base`` and ``inputs`` are 1-D, in the compute dtype, on the merge's
    device. They are valid for the duration of the call they are passed to,
    and must not be written to: the executor may hand the same blocks to
    several passes (a tensor held in memory between them).
    """

    start: int
    base: torch.Tensor | None
    inputs: list[torch.Tensor]

    @property
    def numel(self) -> int:
        return (self.base if self.base is not None else self.inputs[0]).numel()

    @property
    def required_base(self) -> torch.Tensor:
        """``base``, for a merge relative to the base (the recipe's base policy makes sure there is one)."""
        return required_base(self.base)

    @property
    def stop(self) -> int:
        return self.start + self.numel


class Pass(ABC):
    """A statistics pass: every chunk of the tensor is folded in, in row order, then ``finish``.

    The state must not depend on where chunks begin and end (exact counts,
    histograms, exact sums, per-row or per-segment values), so a chunked merge
    gives the bits of an unchunked one.
    """

    @abstractmethod
    def update(self, block: Block) -> None: ...

    def finish(self) -> None:
        return None


class TensorMerge(ABC):
    """One tensor's planned merge: ``statistics()`` passes, then ``merge`` of every chunk in row order.

    ``statistics`` is a generator: each pass it yields is run over all chunks
    (and finished) before the next is asked for, so a later pass may depend on
    an earlier one (radix selection level by level, iterations). ``merge`` may
    carry state from one chunk to the next (a random stream, the position of
    ties at a trim boundary), which is why chunks come in order. Its result may
    live in a buffer reused by the next call: consume it before then.
    """

    chunk_rule: ChunkRule = ChunkRule()
    result_dtype: torch.dtype | None = None  # the merged values' dtype where it is not the compute dtype (mergekit's)

    def statistics(self) -> Iterator[Pass]:
        return iter(())

    @abstractmethod
    def merge(self, block: Block) -> torch.Tensor:
        """The merged values of ``block`` (1-D, compute dtype); raises ``NonFiniteMerge`` on NaN or Inf."""


# A method's parameter model; a plain ``Method`` takes the base class.
P = TypeVar("P", bound=MethodParameters, default=MethodParameters)


class Method(ABC, Generic[P]):
    """A merge method (see the module doc). Register one with ``registry.register_method``."""

    name: str
    summary: str
    label: str  # the report's name for it ("TIES-SV")
    reference: str = ""
    min_models: int = 1  # input models besides the base (a joining base counts as an input)
    max_models: int | None = None

    # The properties below are read-only for callers; a method sets them as class attributes, or overrides
    # them with properties of its own (the task-vector family derives them from its composition).

    @property
    def parameter_model(self) -> type[P]:
        raise NotImplementedError(f"{type(self).__name__} has no parameter_model")

    @property
    def base_policy(self) -> BasePolicy:
        return "required"

    # What the rest of langmerge asks of a method; these come from the method, never from lists elsewhere.
    @property
    def has_sign_vote(self) -> bool:
        """analyze's loss diagnostic applies."""
        return False

    @property
    def sparsifier(self) -> str | None:
        """The sparsification of its task vectors, if any."""
        return None

    @property
    def randomized(self) -> bool:
        """Needs one seeded torch.Generator per input model."""
        return False

    @property
    def takes_protect(self) -> bool:
        """Accepts ``parameters.protect`` (a list of model references)."""
        return False

    @property
    def adds_to_base(self) -> bool:
        """The merge is ``base + f(x_i - base)``, f of the task vectors alone, bit for bit: the in-memory tuner
        then merges candidates from task vectors computed once."""
        return False

    # Global parameters whose values are model references (one, or a list), resolved by the recipe to one bool
    # per input model and passed to ``tensor_parameters`` under that name; each maps to the study's model
    # ("ct" or "sft") it names by default.
    reference_parameters: dict[str, str] = {}

    @property
    def uses_base(self) -> bool:
        """The method always merges relative to a base (``base_policy == "required"``)."""
        return self.base_policy == "required"

    @property
    def parameters(self) -> dict[str, ParameterSpec]:
        """The recipe parameters of this method, by recipe name."""
        return self.parameter_model.specs()

    def tensor_parameters(self, values: dict[str, Any], protected: list[bool] | None = None) -> P:
        """Build the parameters of one tensor from resolved recipe values (by recipe name)."""
        return self.parameter_model.model_validate(values)

    def kernels(self, params: P, dtype: torch.dtype, device: torch.device) -> tuple[Kernel, ...]:
        """The kernels that can merge a tensor with these parameters, the fastest first."""
        return ("reference",)

    def check(self, params: P, tensor: TensorInfo) -> None:
        """Refuse, with a ``LangmergeError`` naming the tensor and parameter, what ``plan`` could not merge.

        Called when a merge is planned (headers only), so bad parameters fail before any output exists.
        """
        return None

    def describe(self, tensors: list[tuple[TensorInfo, P]]) -> list[str]:
        """Notes for ``langmerge check`` on what the merge will do with these tensors (none by default)."""
        return []

    @abstractmethod
    def plan(
        self,
        params: P,
        tensor: TensorInfo,
        kernel: Kernel = "reference",
        generators: list[torch.Generator] | None = None,
    ) -> TensorMerge:
        """One tensor's merge; ``generators`` (one per input model) when ``randomized``."""
