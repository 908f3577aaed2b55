"""Tensor sources: what the engine reads a model's tensors from.

A source has ``label``, ``folder``, ``names``, ``entries`` (supports ``in``),
``shape(name)``, ``dtype(name)``, ``get(name)``, ``config()`` and ``close()``.
Kinds: a safetensors ``CheckpointReader``; a ``PickleReader`` (only with
``allow_pickle``); a ``LoraSource`` (an adapter applied to the recipe's base);
and, around any of them, a ``VocabAlignedSource`` (io/vocab.py).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from langmerge.errors import LangmergeError
from langmerge.io.lora import LoraSource, is_adapter
from langmerge.io.reader import open_checkpoint


def source_kind(source) -> str:
    from langmerge.io.pickle_reader import PickleReader

    if isinstance(source, LoraSource):
        return "LoRA adapter"
    if isinstance(source, PickleReader):
        return "pickle checkpoint"
    return "safetensors checkpoint"


def tokenizer_folder(source) -> Path:
    return getattr(source, "tokenizer_folder", source.folder)


def open_model(path: str, *, base_ref: str | None, allow_pickle: bool = False):
    """Open one recipe model: a checkpoint folder, or a LoRA adapter applied to ``base_ref``."""
    if is_adapter(path):
        if base_ref is None:
            raise LangmergeError(f"model {path}: a LoRA adapter needs the recipe's base_model (the model it was trained on)")
        if is_adapter(base_ref):
            raise LangmergeError(f"base_model {base_ref}: a LoRA adapter cannot be the base model")
        base = open_checkpoint(base_ref, label=base_ref, allow_pickle=allow_pickle)
        try:
            return LoraSource(base, path, label=path, base_ref=base_ref, allow_pickle=allow_pickle)
        except BaseException:
            base.close()
            raise
    return open_checkpoint(path, label=path, allow_pickle=allow_pickle)


def recipe_input_paths(recipe) -> list[str]:
    """Every path a merge of ``recipe`` reads: the recipe file, the base (a LoRA adapter's base too), the models.

    The tokenizer source is one of these by construction (``base``, ``union`` or a model of the recipe).
    """
    paths = [recipe.source] if recipe.source != "<recipe>" else []
    if recipe.base_model is not None:
        paths.append(recipe.base_model)
    return paths + [e.model for e in recipe.raw.models]


def open_recipe_sources(recipe, stack: ExitStack, *, allow_pickle: bool = False):
    """``(base or None, inputs)`` for a recipe; each is closed by ``stack``."""
    base = None
    if recipe.method.uses_base:
        if is_adapter(recipe.base_model):
            raise LangmergeError(f"base_model {recipe.base_model}: a LoRA adapter cannot be the base model")
        base = open_model(recipe.base_model, base_ref=None, allow_pickle=allow_pickle)
        stack.callback(base.close)
    inputs = []
    for entry in recipe.inputs:
        source = open_model(entry.model, base_ref=recipe.base_model, allow_pickle=allow_pickle)
        stack.callback(source.close)
        inputs.append(source)
    return base, inputs
