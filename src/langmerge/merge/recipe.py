"""Merge recipes: mergekit's YAML format for the methods langmerge shares with it.

A recipe is validated in two steps. ``load_recipe`` checks its shape (keys,
types, method, parameter names, model references); ``Recipe.tensor_parameters``
resolves the per-tensor values (conditional ``filter`` values and layer
gradients) and checks their ranges. Every error names the recipe key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from langmerge.errors import LangmergeError
from langmerge.input_files import check_structure, parse_yaml, read_input_text
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
    "slices": "per-slice layer ranges (frankenmerges) are not supported; list whole models under 'models'",
    "modules": "multi-module merges are not supported",
    "chat_template": "set the chat template on the tokenizer source model instead",
}


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class TokenizerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = "base"


class RecipeFile(BaseModel):
    """The YAML document as written."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None


def _dtype(value: str | None, key: str) -> torch.dtype | None:
    if value is None:
        return None
    try:
        return DTYPES[value.removeprefix("torch.")]
    except KeyError:
        raise LangmergeError(f"recipe key {key!r}: unknown dtype {value!r}; use one of float32, float16, bfloat16") from None


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


def _check_setting(spec: ParameterSpec, setting: Any, key: str) -> None:
    """Validate a setting's shape: scalar, gradient list, or list of {filter, value}."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            raise LangmergeError(f"recipe key {key!r}: empty list")
        if all(isinstance(e, dict) for e in setting):
            for i, cond in enumerate(setting):
                extra = set(cond) - {"filter", "value"}
                if extra or "value" not in cond:
                    raise LangmergeError(
                        f"recipe key {key}[{i}]: a conditional value needs 'value' and an optional 'filter'"
                    )
                if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                    raise LangmergeError(f"recipe key {key}[{i}].filter: expected a string")
                _check_setting(spec, cond["value"], f"{key}[{i}].value")
            return
        if any(isinstance(e, (dict, list)) for e in setting):
            raise LangmergeError(f"recipe key {key!r}: mixes conditional values with plain values")
        for i, e in enumerate(setting):
            _check_scalar(spec, e, f"{key}[{i}]")
        return
    _check_scalar(spec, setting, key)


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to, from its name (``model.layers.3.mlp...`` -> 3); None outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's ``t`` for gradients: layer i of n at i/(n-1) (1 when n == 1); tensors outside layers at 0."""
    index = layer_index(name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """mergekit's resolution of one setting for one tensor.

    A list of numbers is a gradient interpolated at ``t`` (the layer's
    position in [0, 1]); other plain lists pick ``int(t * (n - 1))``; a list of
    ``{filter, value}`` takes the first whose filter is absent, ``*``, or a
    substring of the tensor name (None when none matches).
    """
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(isinstance(e, dict) for e in setting):
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or f in tensor_name:
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting[int(t * (len(setting) - 1))]


class Recipe:
    """A validated recipe with model references resolved to input positions."""

    def __init__(self, raw: RecipeFile, source: str = "<recipe>"):
        self.raw = raw
        self.source = source
        self.method: Method = get_method(raw.merge_method)
        self.dtype = _dtype(raw.dtype, "dtype")
        self.out_dtype = _dtype(raw.out_dtype, "out_dtype")
        if raw.tokenizer_source is not None and raw.tokenizer is not None:
            raise LangmergeError("recipe keys 'tokenizer_source' and 'tokenizer' both given; keep one")
        self.tokenizer_source = raw.tokenizer.source if raw.tokenizer else (raw.tokenizer_source or "base")

        policy = self.method.base_policy
        if policy == "required" and raw.base_model is None:
            raise LangmergeError(f"recipe key 'base_model' is required by merge_method {self.method.name!r}")
        self.base_model = raw.base_model
        # Whether the merge reads a base (the origin of the task vectors): docs/methods.md, "The method interface".
        self.has_base = policy == "required" or (policy == "optional" and raw.base_model is not None)
        # Inputs that contribute a task vector (or, for linear, a weighted term).
        # As in mergekit, a base model listed under 'models' is not a task vector; for a method that takes the
        # base as one more input (mergekit's "ignored" base), a base not listed joins after the models.
        # References compare by model_key: one folder spelt two ways is one model.
        base_key = model_key(raw.base_model) if raw.base_model is not None else None
        if self.has_base:
            self.inputs = [e for e in raw.models if model_key(e.model) != base_key]
        elif policy == "input" and base_key is not None and all(model_key(e.model) != base_key for e in raw.models):
            self.inputs = [*raw.models, ModelEntry(model=raw.base_model)]
        else:
            self.inputs = list(raw.models)
        if not self.inputs:
            raise LangmergeError("recipe key 'models': no model to merge besides the base")
        low, high = self.method.min_models, self.method.max_models
        if len(self.inputs) < low or (high is not None and len(self.inputs) > high):
            count = f"exactly {low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
            besides = " besides the base" if self.has_base else (" (a base_model not listed counts)" if policy == "input" else "")
            raise LangmergeError(f"recipe key 'models': merge_method {self.method.name!r} merges {count} "
                                 f"model{'s' if high != 1 else ''}{besides}; the recipe gives {len(self.inputs)}")
        seen: dict[str, str] = {}
        for i, e in enumerate(self.inputs):
            key = model_key(e.model)
            if key in seen:
                same = "" if seen[key] == e.model else f" (the same model as {seen[key]!r})"
                raise LangmergeError(f"recipe key 'models[{i}].model': {e.model!r} is listed twice{same}")
            seen[key] = e.model

        specs = self.method.parameters
        references = (["protect"] if self.method.takes_protect else []) + list(self.method.reference_parameters)
        for key, value in raw.parameters.items():
            if key in references:
                continue
            if key not in specs:
                raise LangmergeError(
                    f"recipe key 'parameters.{key}': not a parameter of {self.method.name}; "
                    f"known: {', '.join(sorted(specs) + references)}"
                )
            _check_setting(specs[key], value, f"parameters.{key}")
        for i, e in enumerate(raw.models):
            for key, value in e.parameters.items():
                where = f"models[{i}].parameters.{key}"
                if key not in specs:
                    raise LangmergeError(f"recipe key {where!r}: not a parameter of {self.method.name}")
                if specs[key].scope != "model":
                    raise LangmergeError(f"recipe key {where!r}: {key} is a global parameter; set it under 'parameters'")
                _check_setting(specs[key], value, where)

        self.protected = self._models_named("protect") if self.method.takes_protect else [False] * len(self.inputs)
        # the method's reference parameters, one bool per input model (layer_swap's language_expert)
        self.references = {name: self._models_named(name) for name in self.method.reference_parameters}

    def _models_named(self, key: str) -> list[bool]:
        """Which inputs the model references at ``parameters.KEY`` name (one reference or a list)."""
        refs = self.raw.parameters.get(key, [])
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise LangmergeError(f"recipe key 'parameters.{key}': expected a model reference or a list of them")
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
        settings.append((self.raw.parameters.get(name), "parameters"))
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
            raise LangmergeError(f"recipe parameters of {self.method.name} ({tensor}): {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        except LangmergeError as exc:
            raise LangmergeError(f"tensor {tensor!r}: {exc}") from None

    def seed(self, tensor: str) -> int:
        return int(self._value("seed", None, tensor, 0.0)) if "seed" in self.method.parameters else 0

    def to_dict(self, references: Mapping[str, str] | None = None) -> dict:
        """The recipe as written; ``references`` renames model references wherever they occur
        (``base_model``, ``models``, the tokenizer source, ``protect``), e.g. to ``org/name@commit``."""
        doc = self.raw.model_dump(exclude_none=True, exclude_defaults=False)
        if not references:
            return doc

        def rename(ref):
            return references.get(ref, ref) if isinstance(ref, str) else ref

        if "base_model" in doc:
            doc["base_model"] = rename(doc["base_model"])
        for entry in doc["models"]:
            entry["model"] = rename(entry["model"])
        if "tokenizer_source" in doc:
            doc["tokenizer_source"] = rename(doc["tokenizer_source"])
        if "tokenizer" in doc:
            doc["tokenizer"]["source"] = rename(doc["tokenizer"]["source"])
        for key in ["protect", *self.method.reference_parameters]:
            named = doc.get("parameters", {}).get(key)
            if named is not None:
                doc["parameters"][key] = [rename(r) for r in named] if isinstance(named, list) else rename(named)
        return doc


def _format_validation(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "<top>"
    if err["type"] == "extra_forbidden" and loc in UNSUPPORTED_KEYS:
        return f"{source}: recipe key {loc!r}: {UNSUPPORTED_KEYS[loc]}"
    if err["type"] == "extra_forbidden":
        return f"{source}: recipe key {loc!r}: unknown key"
    if err["type"] == "missing":
        return f"{source}: recipe key {loc!r} is required"
    return f"{source}: recipe key {loc!r}: {err['msg']}"


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
    from langmerge.io.files import parse_json

    if not path.exists():
        raise LangmergeError(f"recipe file {path} does not exist")
    text = read_input_text(path, "recipe")
    if path.suffix.lower() == ".json":  # JSON is YAML, but json names the exact position of a fault
        document = parse_json(text.encode("utf-8"), path)
        check_structure(document, path)
        return document
    return parse_yaml(text, path, "recipe", _SEVERAL)


_SEVERAL = " (several recipes in one file, as mergekit-multi takes them, are not supported yet)"


def load_recipe(recipe: str | Path | dict | Recipe) -> Recipe:
    """A recipe from a file path (YAML, or JSON for a ``.json`` file), a YAML string, a dict, or a Recipe (returned as is)."""
    if isinstance(recipe, Recipe):
        return recipe
    source = "<recipe>"
    if isinstance(recipe, (str, Path)):
        path = _recipe_file(recipe)
        if path is not None:
            source = str(path)
            recipe = _read_recipe_file(path)
        else:
            recipe = parse_yaml(recipe, source, "recipe", _SEVERAL)
    else:
        check_structure(recipe, source)
    if not isinstance(recipe, dict):
        raise LangmergeError(f"{source}: a recipe is a YAML mapping with 'merge_method' and 'models'")
    try:
        raw = RecipeFile.model_validate(recipe)
    except ValidationError as exc:
        raise LangmergeError(_format_validation(exc, source)) from None
    try:
        return Recipe(raw, source)
    except LangmergeError as exc:
        raise LangmergeError(f"{source}: {exc}") from None
