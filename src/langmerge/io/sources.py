"""A recipe's models opened as tensor sources (``io.tensor_source.TensorSource``).

Kinds: a safetensors ``CheckpointReader``; a ``PickleReader`` (only with
``allow_pickle``); a ``LoraSource`` (an adapter applied to the recipe's base).

A model is named by a reference, a folder or a Hub id (io/hub.py); each
reference of a recipe is resolved once (``recipe_models``) and the source's
label is the reference as written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from langmerge.errors import LangmergeError
from langmerge.io.hub import TO_DOWNLOAD, ResolvedModel, hub_repository_folder, resolve_model
from langmerge.io.lora import ADAPTER_CONFIG, LoraSource, is_adapter
from langmerge.io.pickle_reader import PickleReader
from langmerge.io.reader import open_checkpoint
from langmerge.io.tensor_source import TensorSource

if TYPE_CHECKING:  # merge.recipe's package imports this module
    from langmerge.merge.recipe import Recipe


def source_kind(source: TensorSource) -> str:

    if isinstance(source, LoraSource):
        return "LoRA adapter"
    if isinstance(source, PickleReader):
        return "pickle checkpoint"
    return "safetensors checkpoint"


def split_adapted(ref: str) -> tuple[str, str] | None:
    """mergekit's ``BASE+ADAPTER``: ``(BASE, ADAPTER)`` for a reference naming a LoRA adapter on its base, else None.

    An existing path wins (a folder may have ``+`` in its name); Hub ids cannot contain ``+``.
    """
    if "+" not in ref:
        return None
    try:
        if Path(ref).exists():
            return None
    except (OSError, ValueError):
        pass
    parts = ref.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise LangmergeError(
            f"model {ref!r}: write a LoRA-adapted model as BASE+ADAPTER (one '+', a model on each side)"
        )
    return parts[0], parts[1]


def model_references(ref: str) -> list[str]:
    """The references a recipe model stands for: itself, or the base and the adapter of ``BASE+ADAPTER``."""
    parts = split_adapted(ref)
    return list(parts) if parts else [ref]


def is_adapter_model(model: ResolvedModel) -> bool:
    """A LoRA adapter, known before its files are downloaded (a Hub model's file list says)."""
    return ADAPTER_CONFIG in model.files if model.from_hub else is_adapter(model.folder)


def recipe_models(
    recipe: Recipe,
    *,
    allow_pickle: bool = False,
    download: bool = True,
    progress: bool = True,
    resolved: Mapping[str, ResolvedModel] | None = None,
    on_error: Callable[[str, LangmergeError], None] | None = None,
) -> dict[str, ResolvedModel]:
    """Each model reference of ``recipe`` resolved once: the base (when the method uses it, or an adapter
    needs it) first, then the inputs.

    ``resolved`` holds answers already given (e.g. by ``download=False``): they are kept, and
    downloaded at the same commit when ``download``. With ``on_error`` a reference that cannot be
    resolved is reported there and left out; without it the error is raised.
    """
    models = dict(resolved or {})

    def get(ref: str) -> ResolvedModel | None:
        current = models.get(ref)
        if current is None or (download and current.origin == TO_DOWNLOAD):
            try:
                models[ref] = resolve_model(
                    current or ref, allow_pickle=allow_pickle, download=download, progress=progress
                )
            except LangmergeError as exc:
                if on_error is None:
                    raise
                on_error(ref, exc)
                return None
        return models[ref]

    def get_model(ref: str) -> ResolvedModel | None:
        """The model ``ref`` resolves to; for ``BASE+ADAPTER`` both are resolved and None is returned
        (the adapter applies to its own base, not to the recipe's)."""
        parts = split_adapted(ref)
        if parts is None:
            return get(ref)
        for part in parts:
            get(part)
        return None

    if recipe.has_base and recipe.base_model is not None:
        get_model(recipe.base_model)
    inputs = [get_model(e.model) for e in recipe.inputs]
    if recipe.base_model is not None and any(m is not None and is_adapter_model(m) for m in inputs):
        get_model(recipe.base_model)
    return models


def _model(ref: str, models: dict[str, ResolvedModel], allow_pickle: bool) -> ResolvedModel:
    if ref not in models or models[ref].origin == TO_DOWNLOAD:
        models[ref] = resolve_model(models.get(ref, ref), allow_pickle=allow_pickle)
    return models[ref]


def open_model(
    path: str, *, base_ref: str | None, allow_pickle: bool = False, models: dict[str, ResolvedModel] | None = None
) -> TensorSource:
    """Open one recipe model: a checkpoint, or a LoRA adapter applied to ``base_ref``.

    ``models`` holds the references resolved so far (``recipe_models``); what is missing is resolved here and added.
    """
    models = {} if models is None else models
    parts = split_adapted(path)
    if parts is not None:
        return _open_adapted(path, *parts, allow_pickle=allow_pickle, models=models)
    model = _model(path, models, allow_pickle)
    if is_adapter(model.folder):
        if base_ref is None:
            raise LangmergeError(
                f"model {path}: a LoRA adapter needs the recipe's base_model (the model it was trained on)"
            )
        base_model = _model(base_ref, models, allow_pickle)
        if is_adapter(base_model.folder):
            raise LangmergeError(f"base_model {base_ref}: a LoRA adapter cannot be the base model")
        return _lora_source(path, base_ref, base_model, model.folder, allow_pickle)
    return open_checkpoint(model.folder, label=path, allow_pickle=allow_pickle)


def _lora_source(label: str, base_ref: str, base_model: ResolvedModel, adapter: Path, allow_pickle: bool) -> LoraSource:
    """The adapter in folder ``adapter`` applied to ``base_model`` (opened here; closed if the adapter is refused)."""
    base = open_checkpoint(base_model.folder, label=base_ref, allow_pickle=allow_pickle)
    try:
        return LoraSource(
            base, adapter, label=label, base_ref=base_ref, allow_pickle=allow_pickle, base_model=base_model
        )
    except BaseException:
        base.close()
        raise


def _open_adapted(
    ref: str, base_ref: str, adapter_ref: str, *, allow_pickle: bool, models: dict[str, ResolvedModel]
) -> LoraSource:
    """``BASE+ADAPTER``: the adapter applied to the base named with it."""
    base_model = _model(base_ref, models, allow_pickle)
    if is_adapter(base_model.folder):
        raise LangmergeError(f"model {ref}: {base_ref} is a LoRA adapter; BASE+ADAPTER names the base model first")
    adapter = _model(adapter_ref, models, allow_pickle)
    if not is_adapter(adapter.folder):
        raise LangmergeError(
            f"model {ref}: {adapter_ref} is not a LoRA adapter (no {ADAPTER_CONFIG} in {adapter.folder})"
        )
    return _lora_source(ref, base_ref, base_model, adapter.folder, allow_pickle)


def recipe_input_paths(recipe: Recipe) -> list[str | Path]:
    """Every path a merge of ``recipe`` reads: the recipe file, the base (a LoRA adapter's base too), the models.

    A Hub id that is not a local folder stands for its repository in the Hugging Face cache, where
    its files are or will be (known without the network). The tokenizer source is one of these by
    construction (``base``, ``union`` or a model of the recipe).
    """
    paths: list[str | Path] = [recipe.source] if recipe.source != "<recipe>" else []
    refs = [part for ref in recipe.model_references() for part in model_references(ref)]
    return paths + [hub_repository_folder(ref) or ref for ref in refs]


def open_recipe_sources(
    recipe: Recipe,
    stack: ExitStack,
    *,
    allow_pickle: bool = False,
    models: dict[str, ResolvedModel] | None = None,
    on_error: Callable[[str, LangmergeError], None] | None = None,
) -> tuple[TensorSource | None, list[TensorSource | None]]:
    """``(base or None, inputs)`` for a recipe; each is closed by ``stack``.

    With ``on_error``, a model that cannot be opened is reported there and stands as None; without it the error
    is raised.
    """
    models = recipe_models(recipe, allow_pickle=allow_pickle) if models is None else models

    def opened(ref: str, base_ref: str | None) -> TensorSource | None:
        try:
            if base_ref is None and split_adapted(ref) is None and is_adapter(_model(ref, models, allow_pickle).folder):
                raise LangmergeError(f"base_model {ref}: a LoRA adapter cannot be the base model")
            source = open_model(ref, base_ref=base_ref, allow_pickle=allow_pickle, models=models)
        except LangmergeError as exc:
            if on_error is None:
                raise
            on_error(ref, exc)
            return None
        stack.callback(source.close)
        return source

    base = opened(recipe.base_model, None) if recipe.has_base and recipe.base_model is not None else None
    return base, [opened(entry.model, recipe.base_model) for entry in recipe.inputs]
