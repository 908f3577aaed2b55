"""``slices:`` recipes, as mergekit runs them: output layers merged from layer ranges of the models.

A slice lists ``sources``, each a model and a ``layer_range`` ``[start, stop)``
of the same length; its output layers follow the previous slice's, so slices
of different models stack into a deeper model (a frankenmerge). Each slice is
planned as a whole-model merge of its own (``SliceRecipe``) over views of its
sources that show only their range, renumbered from 0 (``SliceView``), and the
planned layers are then renumbered to their place in the stack. As in mergekit:

- parameters resolve from the source's ``parameters``, then the slice's, then
  the recipe's; a gradient runs over the slice's layers (layer ``i`` of ``n`` at
  ``i / (n - 1)``), and tensors outside the layers sit at 0;
- the tensors before the layers (input and position embeddings) are merged
  from the first slice's sources with its parameters, the others (final norm,
  output layer) from the last slice's;
- a slice's base is its ``base_model``, else the recipe's, and must be one of
  its sources (that source's range is the base's).

The written ``config.json`` has ``num_hidden_layers`` equal to the stack's
layers (``layer_types``, where the config has one, follows the stack).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from langmerge.errors import LangmergeError
from langmerge.io.hub import ResolvedModel
from langmerge.io.tensor_source import GatheredRows, TensorSource
from langmerge.merge.plan import MergePlan, TensorPlan
from langmerge.merge.recipe import (
    ModelEntry,
    Recipe,
    RecipeError,
    RecipeFile,
    SliceEntry,
    layer_index,
    model_key,
    with_layer_index,
)
from langmerge.merge.vocab import INPUT_EMBEDDINGS
from langmerge.seeds import derive_seed

# Non-layer tensors before the layers (merged from the first slice); every other one comes after (the last slice).
_BEFORE_LAYERS = (*INPUT_EMBEDDINGS, "wpe.weight", "embed_positions.weight", "embed_layer_norm.weight")


def _slices(raw: RecipeFile) -> list[SliceEntry]:
    """The slices of a slices recipe (the functions here are called for those only)."""
    assert raw.slices is not None, "not a slices recipe"
    return raw.slices


def slice_models(raw: RecipeFile) -> list[ModelEntry]:
    """Each model the slices name, once (by ``model_key``), in order of appearance: the recipe's models."""
    seen: dict[str, ModelEntry] = {}
    for piece in _slices(raw):
        for ref in ([piece.base_model] if piece.base_model else []) + [s.model for s in piece.sources]:
            seen.setdefault(model_key(ref), ModelEntry(model=ref))
    return list(seen.values())


class SliceView(GatheredRows):
    """A model with only the layers ``start .. stop - 1``, numbered from 0; the tensors outside the layers as they
    are."""

    def __init__(self, inner: TensorSource, start: int, stop: int):
        indices = [i for i in (layer_index(n) for n in inner.names) if i is not None]
        layers = max(indices) + 1 if indices else 0
        if stop > layers:
            raise LangmergeError(f"model {inner.label}: layer_range {[start, stop]} but the model has {layers} layers")
        tensors: dict[str, tuple[str, torch.Tensor | None]] = {}
        for name in inner.names:
            index = layer_index(name)
            if index is None:
                tensors[name] = (name, None)
            elif start <= index < stop:
                tensors[with_layer_index(name, index - start)] = (name, None)
        super().__init__(inner, tensors)
        self.start, self.stop = start, stop

    def config(self) -> dict[str, Any] | None:
        config = self.inner.config()
        return None if config is None else sliced_config(config, [(self.start, self.stop)])

    def close(self) -> None:
        self.inner.close()


def sliced_config(config: dict[str, Any], ranges: list[tuple[int, int]]) -> dict[str, Any]:
    """``config`` for a model made of the layer ``ranges`` of it: ``num_hidden_layers`` and ``layer_types`` follow."""
    out = dict(config)
    out["num_hidden_layers"] = sum(b - a for a, b in ranges)
    if isinstance(config.get("layer_types"), list):
        out["layer_types"] = [t for a, b in ranges for t in config["layer_types"][a:b]]
    return out


class SliceRecipe(Recipe):
    """One slice as a whole-model recipe over its sources (the base among them), its parameters between the
    sources' and the recipe's."""

    def __init__(self, parent: Recipe, index: int):
        piece = _slices(parent.raw)[index]
        self.index = index
        self.parent = parent
        self.ranges = {model_key(s.model): tuple(s.layer_range) for s in piece.sources}
        raw = RecipeFile(
            merge_method=parent.raw.merge_method,
            base_model=piece.base_model or parent.raw.base_model,
            models=[ModelEntry(model=s.model, parameters=s.parameters) for s in piece.sources],
            parameters=parent.raw.parameters,
            dtype=parent.raw.dtype,
            out_dtype=parent.raw.out_dtype,
            tokenizer_source=parent.raw.tokenizer_source,
            tokenizer=parent.raw.tokenizer,
        )
        super().__init__(raw, parent.source)
        self.parameter_layers = [piece.parameters, parent.raw.parameters]

    @property
    def length(self) -> int:
        a, b = next(iter(self.ranges.values()))
        return int(b - a)

    def view_source(self, index: int | None, source: TensorSource) -> TensorSource:
        ref = self.base_model if index is None else self.inputs[index].model
        assert ref is not None  # a slice has its base model (SliceRecipe's RecipeFile names one)
        start, stop = self.ranges[model_key(ref)]
        return SliceView(source, start, stop)

    def seed(self, tensor: str) -> int:
        # the same local layer name in two slices is two output layers: DARE draws apart
        return derive_seed(super().seed(tensor), "slice", self.index)


def slice_recipes(parent: Recipe, errors: list[str]) -> list[SliceRecipe]:
    """Each slice of ``parent`` checked and made a ``SliceRecipe``; problems are added to ``errors`` (keys named)."""
    out = []
    for k, piece in enumerate(_slices(parent.raw)):
        where = f"slices[{k}]"
        before = len(errors)
        lengths = []
        for j, s in enumerate(piece.sources):
            a, b = s.layer_range
            if a < 0 or b <= a:
                errors.append(
                    f"recipe key '{where}.sources[{j}].layer_range': {[a, b]} is not a range of layers "
                    "[start, stop) with 0 <= start < stop"
                )
            lengths.append(b - a)
        if len(set(lengths)) > 1:
            errors.append(
                f"recipe key '{where}.sources': every source of a slice has the same number of layers "
                f"(layer ranges of {', '.join(map(str, lengths))} layers)"
            )
        parent.check_parameters(piece.parameters, f"{where}.parameters", errors)
        base = piece.base_model or parent.raw.base_model
        if parent.method.uses_base and (
            base is None or model_key(base) not in {model_key(s.model) for s in piece.sources}
        ):
            errors.append(
                f"recipe key '{where}.sources': the slice's base model {base!r} is not one of its sources "
                "(list it with its layer_range)"
            )
        if len(errors) > before:
            continue
        try:
            out.append(SliceRecipe(parent, k))
        except RecipeError as exc:
            for e in exc.errors:
                e = e.replace("'models[", f"'{where}.sources[").replace(
                    "recipe key 'models'", f"recipe key '{where}.sources'"
                )
                if e not in errors:
                    errors.append(e)
    return out


def _before_layers(name: str) -> bool:
    return name.endswith(_BEFORE_LAYERS)


@dataclasses.dataclass
class SlicedPlan(MergePlan):
    """A plan stacked from the slices' plans (``parts``), which own the open sources."""

    parts: list[MergePlan] = dataclasses.field(default_factory=list)

    def replan(self, recipe: Recipe, views: Sequence[TensorSource] | None = None) -> list[TensorPlan]:
        raise LangmergeError(
            "a slices recipe cannot be replanned with other parameters (tune takes whole-model recipes)"
        )

    def close(self) -> None:
        for part in self.parts:
            part.close()


def build_sliced(
    recipe: Recipe,
    build: Callable[..., MergePlan],
    *,
    models: dict[str, ResolvedModel],
    shard_bytes: int,
    **options: Any,
) -> SlicedPlan:
    """Plan each slice (``build``: plan.py's builder) and stack their layers; tensors outside the layers come from
    the first slice (before the layers) and the last (after). Problems are collected as the builder does."""
    parts: list[MergePlan] = []
    unreadable: list[LangmergeError] = []
    try:
        for k, piece in enumerate(recipe.slices or []):
            try:
                parts.append(build(piece, models=models, shard_bytes=shard_bytes, **options))
            except LangmergeError as exc:  # a layer range the model lacks
                unreadable.append(type(exc)(f"slices[{k}]: {exc}"))
                continue
            models = parts[-1].models
    except BaseException:
        for part in parts:
            part.close()
        raise
    if unreadable:
        return SlicedPlan(recipe, None, [], [], options["device"], models=models, unreadable=unreadable, parts=parts)
    first, last = parts[0], parts[-1]
    tensors, problems, offset = [], [], 0
    for k, (piece, part) in enumerate(zip(recipe.slices or [], parts)):
        problems += [type(exc)(f"slices[{k}]: {exc}") for exc in part.problems]
        unreadable += [type(exc)(f"slices[{k}]: {exc}") for exc in part.unreadable]
        for tensor in part.tensors:
            index = layer_index(tensor.name)
            if index is None:
                if part is (first if tensor.name.endswith(_BEFORE_LAYERS) else last):
                    tensors.append(tensor)
                continue
            name = with_layer_index(tensor.name, offset + index)
            tasks = [dataclasses.replace(t, name=name) for t in tensor.tasks]
            tensors.append(dataclasses.replace(tensor, name=name, tasks=tasks, placement=None))
        offset += piece.length
    if (
        first.vocab is not None
        and last.vocab is not None
        and (first.vocab.out_tokens, first.vocab.out_rows) != (last.vocab.out_tokens, last.vocab.out_rows)
    ):
        problems.append(
            LangmergeError(
                "slices: the first and the last slice's models give different output "
                "vocabularies; give them the same vocabulary or one tokenizer_source model"
            )
        )
    plan = SlicedPlan(
        recipe,
        first.base,
        first.inputs,
        tensors,
        first.device,
        num_layers=offset,
        vocab=first.vocab,
        vocab_problem=first.vocab_problem,
        models=models,
        problems=problems,
        unreadable=unreadable,
        views=first.views,
        parts=parts,
    )
    plan.config_updates = {"num_hidden_layers": offset}
    configs = [part.reference.config() or {} for part in parts] if all(p.views for p in parts) else []
    if configs and all(isinstance(c.get("layer_types"), list) for c in configs):
        plan.config_updates["layer_types"] = [t for c in configs for t in c["layer_types"]]
    if not problems and not unreadable:
        plan.place(shard_bytes)
    return plan
