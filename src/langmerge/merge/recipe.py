"""Merge recipes: mergekit's YAML format for the methods langmerge shares with it.

A recipe is validated in two steps. ``load_recipe`` checks its shape (keys,
types, method, parameter names, model references; a parameter's value is one
of mergekit's shapes, ``ParameterSetting``); ``Recipe.tensor_parameters``
resolves the per-tensor values (conditional ``filter`` values and layer
gradients) and checks their ranges. Every error names the recipe key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeAlias

import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypeIs

from langmerge.errors import LangmergeError
from langmerge.input_files import (
    ConfigError,
    check_structure,
    parse_yaml,
    parse_yaml_documents,
    read_config_document,
    read_input_text,
    validation_errors,
)
from langmerge.io.tensor_source import TensorSource
from langmerge.merge.tokenizer_block import TokenizerSettings, check_chat_template
from langmerge.methods.base import Method, MethodParameters, ParameterSpec
from langmerge.methods.registry import get_method

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}

# mergekit keys that langmerge does not implement: refused by name rather than ignored.
UNSUPPORTED_KEYS = {
    "modules": "multi-module merges are not supported",
}


# ----------------------------------------------------------------------------- parameter values
# mergekit's value union (docs/merging.md, "Recipes"): a parameter is set to a scalar, a gradient (a list
# of scalars interpolated over the layers), or conditional values ({filter, value}, one or a list, whose value is a
# scalar or a gradient). The shapes are checked here, with one message per fault; types and bounds per method
# are checked once the method is known (``_check_scalar``).

Scalar: TypeAlias = StrictBool | StrictInt | StrictFloat | StrictStr
Gradient: TypeAlias = list[Scalar]


class ConditionalValue(BaseModel):
    """``{filter, value}``: ``value`` where the tensor name contains ``filter`` (absent or ``*``: every tensor)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: StrictStr | None = None
    value: Scalar | Gradient


def _shape_error(message: str, at: str = "") -> PydanticCustomError:
    # ``at``: where inside the value the fault is (``[1].value``); validation_errors appends it to the key path
    return PydanticCustomError("parameter_setting", "{message}", {"message": message, "at": at})


def _check_scalar_shape(value: Any, at: str) -> None:
    if not isinstance(value, (bool, int, float, str)):
        raise _shape_error(f"expected a number or true/false, got {value!r}", at)


def _check_leaves(values: list[Any], at: str) -> None:
    if not values:
        raise _shape_error("empty list", at)
    if any(isinstance(v, dict) for v in values):
        raise _shape_error("mixes conditional values with plain values", at)
    if any(isinstance(v, list) for v in values):
        raise _shape_error("a gradient is a list of numbers (lists do not nest)", at)
    for i, v in enumerate(values):
        _check_scalar_shape(v, f"{at}[{i}]")


def _check_shape(value: Any) -> Any:
    """Refuse a value of none of mergekit's shapes, naming the fault (pydantic's own union errors name every
    alternative tried)."""
    conditionals = [value] if isinstance(value, (dict, ConditionalValue)) else value
    if isinstance(conditionals, list) and conditionals and all(isinstance(c, ConditionalValue) for c in conditionals):
        return value  # already typed (a recipe built from another's parts)
    if isinstance(conditionals, list) and conditionals and all(isinstance(c, dict) for c in conditionals):
        for i, cond in enumerate(conditionals):
            at = f"[{i}]" if isinstance(value, list) else ""
            if set(cond) - {"filter", "value"} or "value" not in cond:
                raise _shape_error("a conditional value needs 'value' and an optional 'filter'", at)
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise _shape_error("expected a string", f"{at}.filter")
            inner = cond["value"]
            if isinstance(inner, dict) or (isinstance(inner, list) and any(isinstance(v, dict) for v in inner)):
                raise _shape_error(
                    "conditional values do not nest; a conditional value is a number or a gradient", f"{at}.value"
                )
            if isinstance(inner, list):
                _check_leaves(inner, f"{at}.value")
            else:
                _check_scalar_shape(inner, f"{at}.value")
    elif isinstance(value, list):
        _check_leaves(value, "")
    else:
        _check_scalar_shape(value, "")
    return value


ParameterSetting: TypeAlias = Annotated[
    ConditionalValue | list[ConditionalValue] | Scalar | Gradient,
    Field(union_mode="left_to_right"),
    BeforeValidator(_check_shape),
]
Parameters: TypeAlias = dict[str, ParameterSetting]
_SETTING = TypeAdapter(ParameterSetting)


def parse_setting(value: Any) -> ParameterSetting:
    """A parameter value as written (YAML's plain data) in its typed form; pydantic's ValidationError if it has
    none of the shapes."""
    return _SETTING.validate_python(value)


def _are_conditionals(values: object) -> TypeIs[list[ConditionalValue]]:
    """Whether ``values`` is a (non-empty) list of conditional values."""
    return isinstance(values, list) and bool(values) and all(isinstance(c, ConditionalValue) for c in values)


def _scalars(setting: ParameterSetting) -> list[tuple[Any, str]]:
    """Every scalar of a setting with where it is inside it (``""``, ``[1]``, ``[0].value[2]``)."""
    conditionals = [setting] if isinstance(setting, ConditionalValue) else setting
    if _are_conditionals(conditionals):
        out = []
        for i, cond in enumerate(conditionals):
            at = f"[{i}].value" if isinstance(setting, list) else ".value"
            out += [(v, at + sub) for v, sub in _scalars(cond.value)]
        return out
    if isinstance(setting, list):
        return [(v, f"[{i}]") for i, v in enumerate(setting)]
    return [(setting, "")]


# ----------------------------------------------------------------------------- the recipe document


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Parameters = Field(default_factory=dict)


class SliceSource(BaseModel):
    """One model's layers ``layer_range[0] .. layer_range[1] - 1`` in a slice (mergekit's InputSliceDefinition)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = Field(default_factory=dict)


class SliceEntry(BaseModel):
    """Output layers merged from the same number of layers of each source (mergekit's OutputSliceDefinition)."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters = Field(default_factory=dict)


class RecipeFile(BaseModel):
    """The YAML document as written: whole ``models``, or ``slices`` of layers (exactly one of them)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None  # a document's name in a multi-document recipe (merge.multi)
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = Field(default=None, min_length=1)
    slices: list[SliceEntry] | None = Field(default=None, min_length=1)
    parameters: Parameters = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None


def _dtype(value: str | None, key: str) -> torch.dtype | None:
    if value is None:
        return None
    try:
        return DTYPES[value.removeprefix("torch.")]
    except KeyError:
        raise LangmergeError(
            f"recipe key {key!r}: unknown dtype {value!r}; use one of float32, float16, bfloat16"
        ) from None


def model_key(ref: str) -> str:
    """What identifies a model reference: an existing local path's resolved form (so ``fx/ct``, ``fx/./ct`` and a
    symlink to it are one model), else the reference itself (a Hub id such as ``org/name``)."""
    try:
        path = Path(ref)
        return str(path.resolve()) if path.exists() else ref
    except (OSError, ValueError):  # a name too long for a path, a NUL byte
        return ref


def _check_scalar(spec: ParameterSpec, value: Any, key: str) -> Any:
    if spec.type is bool:
        if not isinstance(value, bool):
            raise LangmergeError(f"recipe key {key!r}: expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LangmergeError(f"recipe key {key!r}: expected a number, got {value!r}")
    try:
        float(value)
    except OverflowError:
        raise LangmergeError(f"recipe key {key!r}: a {len(str(abs(value)))}-digit number is out of range") from None
    if spec.type is int:
        if int(value) != value:
            raise LangmergeError(f"recipe key {key!r}: expected a whole number, got {value!r}")
        value = int(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise LangmergeError(f"recipe key {key!r}: expected a finite number, got {value!r}")
    if spec.minimum is not None and value < spec.minimum:
        raise LangmergeError(f"recipe key {key!r}: {value!r} is below the minimum {spec.minimum}")
    if spec.maximum is not None and value > spec.maximum:
        raise LangmergeError(f"recipe key {key!r}: {value!r} is above the maximum {spec.maximum}")
    return value


def _check_setting(spec: ParameterSpec, setting: ParameterSetting, key: str) -> None:
    """Check every scalar of a setting (a scalar, a gradient, conditional values) against the parameter's type
    and bounds."""
    for value, at in _scalars(setting):
        _check_scalar(spec, value, key + at)


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to, from its name (``model.layers.3.mlp...`` -> 3); None outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def with_layer_index(name: str, index: int) -> str:
    """``name`` with its layer number replaced (``model.layers.3.mlp...``, 5 -> ``model.layers.5.mlp...``)."""
    m = _LAYER.search(name)
    if m is None:
        raise ValueError(f"{name!r} is not a layer tensor")
    return name[: m.start(1)] + str(index) + name[m.end(1) :]


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's ``t`` for gradients: layer i of n at i/(n-1) (1 when n == 1); tensors outside layers at 0."""
    index = layer_index(name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate_setting(setting: ParameterSetting, tensor_name: str, t: float) -> Any:
    """mergekit's resolution of one setting for one tensor.

    A list of numbers is a gradient interpolated at ``t`` (the layer's
    position in [0, 1]); other plain lists pick ``int(t * (n - 1))``; conditional
    values take the first whose filter is absent, ``*``, or a substring of the
    tensor name (None when none matches).
    """
    if isinstance(setting, ConditionalValue):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if _are_conditionals(setting):
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                return evaluate_setting(cond.value, tensor_name, t)
        return None
    numbers = [e for e in setting if isinstance(e, (int, float)) and not isinstance(e, bool)]
    if len(numbers) == len(setting):  # every one a number: a gradient
        scaled = t * (len(numbers) - 1)
        i0 = int(scaled)
        i1 = min(len(numbers) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * numbers[i0] + frac * numbers[i1]
    return setting[int(t * (len(setting) - 1))]


def _collect(errors: list[str], check: Callable[..., object], *args: Any) -> None:
    """Run one check, adding its LangmergeError's message to ``errors`` (so a recipe's errors are reported together)."""
    try:
        check(*args)
    except LangmergeError as exc:
        errors.append(str(exc))


class Recipe:
    """A validated recipe with model references resolved to input positions."""

    def __init__(self, raw: RecipeFile, source: str = "<recipe>"):
        self.raw = raw
        self.source = source
        errors: list[str] = []
        self.dtype = self.out_dtype = None
        try:
            self.dtype = _dtype(raw.dtype, "dtype")
        except LangmergeError as exc:
            errors.append(str(exc))
        try:
            self.out_dtype = _dtype(raw.out_dtype, "out_dtype")
        except LangmergeError as exc:
            errors.append(str(exc))
        if raw.tokenizer_source is not None and raw.tokenizer is not None:
            errors.append("recipe keys 'tokenizer_source' and 'tokenizer' both given; keep one")
        self.tokenizer_source = raw.tokenizer.source if raw.tokenizer else (raw.tokenizer_source or "base")
        if raw.chat_template is not None:
            _collect(errors, check_chat_template, raw.chat_template)
        try:
            self.method: Method = get_method(raw.merge_method)
        except LangmergeError as exc:
            raise RecipeError(source, [*errors, str(exc)]) from None

        self.parameter_layers: list[Parameters] = [raw.parameters]  # after a model's own: slices add theirs
        self.slices = None
        if raw.models is not None and raw.slices is not None:
            raise RecipeError(source, [*errors, "recipe keys 'models' and 'slices' both given; keep one"])
        slice_bases = raw.slices is not None and all(s.base_model is not None for s in raw.slices)
        policy = self.method.base_policy
        if policy == "required" and raw.base_model is None and not slice_bases:
            raise RecipeError(
                source, [*errors, f"recipe key 'base_model' is required by merge_method {self.method.name!r}"]
            )
        self.base_model = raw.base_model
        # Whether the merge reads a base (the origin of the task vectors): docs/methods.md, "The method interface".
        self.has_base = policy == "required" or (policy == "optional" and raw.base_model is not None)
        entries = raw.models or []  # neither models nor slices: no model, refused below
        if raw.slices is not None:
            from langmerge.merge.slices import slice_models  # here: slices imports this module

            entries = slice_models(raw)
        # Inputs that contribute a task vector (or, for linear, a weighted term).
        # As in mergekit, a base model listed under 'models' is not a task vector; for a method that takes the
        # base as one more input (mergekit's "ignored" base), a base not listed joins after the models.
        # References compare by model_key: one folder spelt two ways is one model.
        base = raw.base_model
        base_key = model_key(base) if base is not None else None
        if self.has_base and base_key is not None:
            self.inputs = [e for e in entries if model_key(e.model) != base_key]
        elif policy == "input" and base is not None and all(model_key(e.model) != base_key for e in entries):
            self.inputs = [*entries, ModelEntry(model=base)]
        else:
            self.inputs = list(entries)
        if not self.inputs:
            raise RecipeError(source, [*errors, "recipe key 'models': no model to merge besides the base"])
        low, high = self.method.min_models, self.method.max_models
        # a slices recipe counts its models slice by slice (each SliceRecipe checks its own sources)
        if raw.slices is None and (len(self.inputs) < low or (high is not None and len(self.inputs) > high)):
            count = f"exactly {low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
            besides = (
                " besides the base"
                if self.has_base
                else (" (a base_model not listed counts)" if policy == "input" else "")
            )
            errors.append(
                f"recipe key 'models': merge_method {self.method.name!r} merges {count} "
                f"model{'s' if high != 1 else ''}{besides}; the recipe gives {len(self.inputs)}"
            )
        seen: dict[str, str] = {}
        for i, e in enumerate(self.inputs):
            key = model_key(e.model)
            if key in seen:
                same = "" if seen[key] == e.model else f" (the same model as {seen[key]!r})"
                errors.append(f"recipe key 'models[{i}].model': {e.model!r} is listed twice{same}")
            seen[key] = e.model

        specs = self.method.parameters
        self.check_parameters(raw.parameters, "parameters", errors)
        for i, e in enumerate(raw.models or []):
            for key, value in e.parameters.items():
                where = f"models[{i}].parameters.{key}"
                if key not in specs:
                    errors.append(f"recipe key {where!r}: not a parameter of {self.method.name}")
                elif specs[key].scope != "model":
                    errors.append(f"recipe key {where!r}: {key} is a global parameter; set it under 'parameters'")
                else:
                    _collect(errors, _check_setting, specs[key], value, where)
        _collect(errors, self._set_protected)
        if raw.slices is not None and not errors:
            from langmerge.merge.slices import slice_recipes  # here: slices imports this module

            self.slices = slice_recipes(self, errors)
        if errors:
            raise RecipeError(source, errors)

    def check_parameters(self, parameters: Parameters, where: str, errors: list[str]) -> None:
        """Check recipe-wide settings (``parameters``, a slice's ``parameters``), adding each problem to ``errors``."""
        specs = self.method.parameters
        references = (["protect"] if self.method.takes_protect else []) + list(self.method.reference_parameters)
        for key, value in parameters.items():
            if key in references:
                continue
            if key not in specs:
                errors.append(
                    f"recipe key '{where}.{key}': not a parameter of {self.method.name}; "
                    f"known: {', '.join(sorted(specs) + references)}"
                )
                continue
            _collect(errors, _check_setting, specs[key], value, f"{where}.{key}")

    def model_references(self) -> list[str]:
        """Every model reference the recipe names: the base, then each model (or each slice's base and sources)."""
        refs = [self.base_model] if self.base_model is not None else []
        for entry in self.raw.models or []:
            refs.append(entry.model)
        for piece in self.raw.slices or []:
            refs += ([piece.base_model] if piece.base_model else []) + [s.model for s in piece.sources]
        return list(dict.fromkeys(refs))

    def require_whole_models(self, command: str) -> None:
        """Refuse a ``slices`` recipe for a command that takes whole models (tune, analyze)."""
        if self.slices is not None:
            raise LangmergeError(f"{self.source}: langmerge {command} takes recipes of whole 'models', not 'slices'")

    def view_source(self, index: int | None, source: TensorSource) -> TensorSource:
        """The source a plan reads for input ``index`` (None: the base); a slice shows only its layers."""
        return source

    def _set_protected(self) -> None:
        self.protected = self._models_named("protect") if self.method.takes_protect else [False] * len(self.inputs)
        # the method's reference parameters, one bool per input model (layer_swap's language_expert)
        self.references = {name: self._models_named(name) for name in self.method.reference_parameters}

    def _models_named(self, key: str) -> list[bool]:
        """Which inputs the model references at ``parameters.KEY`` name (one reference or a list)."""
        setting = self.raw.parameters.get(key, [])
        given = [setting] if isinstance(setting, str) else setting
        if not isinstance(given, list) or not all(isinstance(r, str) for r in given):
            raise LangmergeError(f"recipe key 'parameters.{key}': expected a model reference or a list of them")
        refs = [r for r in given if isinstance(r, str)]  # every one, as just checked
        names = [e.model for e in self.inputs]
        keys = [model_key(n) for n in names]
        named = {model_key(r) for r in refs}
        for r in refs:
            if model_key(r) not in keys:
                raise LangmergeError(
                    f"recipe key 'parameters.{key}': {r!r} is not one of the merged models ({', '.join(names)})"
                )
        return [k in named for k in keys]

    def input_index(self, ref: str) -> int | None:
        """The position in ``inputs`` of the model ``ref`` names (compared by ``model_key``), else None."""
        key = model_key(ref)
        return next((i for i, e in enumerate(self.inputs) if model_key(e.model) == key), None)

    def _value(self, name: str, model_index: int | None, tensor: str, t: float) -> Any:
        spec = self.method.parameters[name]
        settings = []
        if model_index is not None:
            settings.append((self.inputs[model_index].parameters.get(name), f"{self.inputs[model_index].model}"))
        settings += [(layer.get(name), "parameters") for layer in self.parameter_layers]
        for setting, _ in settings:
            if setting is None:
                continue
            value = evaluate_setting(setting, tensor, t)
            if value is not None:
                return value
        if spec.default is None:
            who = f"model {self.inputs[model_index].model!r}" if model_index is not None else "the recipe"
            raise LangmergeError(f"recipe: parameter {name!r} is required for {who} (tensor {tensor})")
        return spec.default

    def tensor_parameters(self, tensor: str, t: float) -> MethodParameters:
        """Resolve every parameter of the method for one tensor at layer position ``t``."""
        specs = self.method.parameters
        n = len(self.inputs)
        values: dict[str, Any] = {}
        for name, spec in specs.items():
            if spec.scope == "model":
                values[name] = [
                    _check_scalar(spec, self._value(name, i, tensor, t), f"models[{i}].parameters.{name} ({tensor})")
                    for i in range(n)
                ]
            else:
                values[name] = _check_scalar(spec, self._value(name, None, tensor, t), f"parameters.{name} ({tensor})")
        slack = values.get("slack", 0.0)
        if slack > 0 and not any(self.protected):
            raise LangmergeError("recipe key 'parameters.protect' is required when slack > 0 (name the SFT model)")
        values.update(self.references)
        try:
            return self.method.tensor_parameters(values, self.protected)
        except ValidationError as exc:
            raise LangmergeError(
                f"recipe parameters of {self.method.name} ({tensor}): "
                f"{exc.errors()[0]['msg'].removeprefix('Value error, ')}"
            ) from None
        except LangmergeError as exc:
            raise LangmergeError(f"tensor {tensor!r}: {exc}") from None

    def seed(self, tensor: str) -> int:
        return int(self._value("seed", None, tensor, 0.0)) if "seed" in self.method.parameters else 0

    def to_dict(self, references: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The recipe as written; ``references`` renames model references wherever they occur
        (``base_model``, ``models``, the tokenizer source, ``protect``), e.g. to ``org/name@commit``."""
        doc = self.raw.model_dump(exclude_none=True, exclude_defaults=False)
        if not references:
            return doc

        def rename(ref: Any) -> Any:
            if not isinstance(ref, str):
                return ref
            if ref not in references and "+" in ref:  # BASE+ADAPTER: each side renamed
                return "+".join(references.get(part, part) for part in ref.split("+"))
            return references.get(ref, ref)

        if "base_model" in doc:
            doc["base_model"] = rename(doc["base_model"])
        for entry in doc.get("models", []):
            entry["model"] = rename(entry["model"])
        for piece in doc.get("slices", []):
            if "base_model" in piece:
                piece["base_model"] = rename(piece["base_model"])
            for entry in piece["sources"]:
                entry["model"] = rename(entry["model"])
        if "tokenizer_source" in doc:
            doc["tokenizer_source"] = rename(doc["tokenizer_source"])
        if "tokenizer" in doc:
            doc["tokenizer"]["source"] = rename(doc["tokenizer"]["source"])
            for setting in (doc["tokenizer"].get("tokens") or {}).values():
                source = setting["source"]
                if isinstance(source, dict) and "model" in source:
                    source["model"] = rename(source["model"])
                elif isinstance(source, str):
                    setting["source"] = rename(source)
        for key in ["protect", *self.method.reference_parameters]:
            named = doc.get("parameters", {}).get(key)
            if named is not None:
                doc["parameters"][key] = [rename(r) for r in named] if isinstance(named, list) else rename(named)
        return doc


class RecipeError(ConfigError):
    """Everything wrong with a recipe's shape at once: ``errors`` lists each (naming its key); the message joins
    them."""

    source: str  # the recipe file, or "<recipe>" for one given as text or a mapping

    def __init__(self, source: str, errors: list[str]) -> None:
        super().__init__(source, errors, "recipe")


RECIPE_SUFFIXES = (".yaml", ".yml", ".json", ".txt")


def _recipe_file(arg: str | Path) -> Path | None:
    """The file a recipe argument names (whatever its extension); None for inline YAML text.

    A string that names no file but looks like a path (a recipe suffix, or a
    path separator in a single line that is not a YAML mapping) is refused as
    a missing file rather than parsed as YAML.
    """
    if isinstance(arg, Path):
        return arg
    if "\n" in arg:
        return None
    try:
        if Path(arg).exists():
            return Path(arg)
    except (OSError, ValueError):  # a name too long for a path, a NUL byte
        return None
    text = arg.strip()
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    path_like = text.lower().endswith(RECIPE_SUFFIXES) or (
        any(sep in text for sep in separators) and not text.startswith("{") and ": " not in text
    )
    if path_like:
        raise LangmergeError(f"recipe file {arg} does not exist")
    return None


def _read_recipe_file(path: Path) -> Any:
    if not path.exists():
        raise LangmergeError(f"recipe file {path} does not exist")
    return read_config_document(path, "recipe", _SEVERAL)


_SEVERAL = " here (langmerge merge runs a file of several recipes, as mergekit-multi does)"


def read_recipe_documents(recipe: str | Path) -> tuple[str, list[Any]] | None:
    """``(source, documents)`` when the recipe file (or YAML text) holds several documents (mergekit-multi's
    format, ``merge.multi``), else None."""
    path = _recipe_file(recipe)
    if path is not None and path.suffix.lower() == ".json":
        return None
    source = str(path) if path is not None else "<recipe>"
    if path is not None:
        if not path.exists():
            return None
        text = read_input_text(path, "recipe")
    else:
        text = str(recipe)
    documents = [d for d in parse_yaml_documents(text, source, "recipe") if d is not None]
    return (source, documents) if len(documents) > 1 else None


def load_recipe(recipe: str | Path | dict[str, Any] | Recipe) -> Recipe:
    """A recipe from a file path (YAML, or JSON for a ``.json`` file), a YAML string, a dict, or a Recipe
    (returned as is)."""
    if isinstance(recipe, Recipe):
        return recipe
    source = "<recipe>"
    document: object = recipe
    if isinstance(recipe, (str, Path)):
        path = _recipe_file(recipe)
        if path is not None:
            source = str(path)
            document = _read_recipe_file(path)
        else:
            document = parse_yaml(str(recipe), source, "recipe", _SEVERAL)  # text: a Path names a file
    else:
        check_structure(recipe, source)
    if not isinstance(document, dict):
        raise LangmergeError(f"{source}: a recipe is a YAML mapping with 'merge_method' and 'models'")
    absent = (
        []
        if "models" in document or "slices" in document
        else ["recipe key 'models' is required (or 'slices', layer ranges)"]
    )
    try:
        raw = RecipeFile.model_validate(document)
    except ValidationError as exc:
        raise RecipeError(source, absent + validation_errors(exc, "recipe key", UNSUPPORTED_KEYS)) from None
    if absent:
        raise RecipeError(source, absent)
    try:
        return Recipe(raw, source)
    except RecipeError as exc:
        raise RecipeError(source, exc.errors) from None
    except LangmergeError as exc:
        raise RecipeError(source, [str(exc)]) from None
