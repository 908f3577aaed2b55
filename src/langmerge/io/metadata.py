"""Everything in a model folder besides the weights: config, tokenizer, model card."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from langmerge.errors import LangmergeError
from langmerge.io.files import copy_regular, optional_folder_file

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_FILES = ("generation_config.json",)
TRAINING_METADATA = "langmerge_training.json"  # written by `langmerge train` (langmerge.training.loop)

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def write_config(
    out: Path,
    config: dict[str, Any] | None,
    dtype: torch.dtype | None,
    source: str,
    updates: dict[str, Any] | None = None,
) -> None:
    """Write ``config`` with the output dtype and ``updates`` (e.g. vocab_size, tie_word_embeddings).

    An update also applies inside ``text_config`` where that nested config has the key
    (multimodal configs such as Gemma 3 keep the language model's settings there).
    """
    if config is None:
        raise LangmergeError(f"model {source}: config.json is missing; the merged model needs one")
    config = dict(config)
    for key, value in (updates or {}).items():
        config[key] = value
        if isinstance(config.get("text_config"), dict) and key in config["text_config"]:
            config["text_config"] = dict(config["text_config"], **{key: value})
    if dtype is not None:
        # transformers 5 reads "dtype"; older versions read "torch_dtype".
        config["dtype"] = DTYPE_NAMES[dtype]
        if "torch_dtype" in config:
            config["torch_dtype"] = DTYPE_NAMES[dtype]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_optional_files(source: Path, out: Path, names: tuple[str, ...]) -> list[str]:
    """Copy those of ``names`` that the model folder ``source`` has.

    A file breaking io/files.py's rule is skipped with a warning.
    """
    copied = []
    for name in names:
        path = optional_folder_file(source, name)
        if path is not None:
            copy_regular(path, out / name)
            copied.append(name)
    return copied


def copy_tokenizer(source: Path, out: Path) -> list[str]:
    """Copy the tokenizer and generation config files that ``source`` has."""
    return copy_optional_files(source, out, TOKENIZER_FILES + GENERATION_FILES)


def write_model_card(
    out: Path,
    *,
    method: str,
    summary: str,
    base: str | None,
    inputs: list[str],
    recipe: dict[str, Any],
    models: Mapping[str, Any] | None = None,
) -> None:
    """A README.md whose YAML front matter the Hub (and people) can read, and ``langmerge_recipe.yaml``.

    ``models`` maps each reference to its ``ResolvedModel`` (io/hub.py). The front matter names the
    Hub ids among the models as ``base_model`` with ``base_model_relation: merge``, so the Hub lists
    the output in each input's model tree (local folders are not Hub ids and are left out). ``recipe``
    is the recipe to write, with Hub ids pinned to the commit they resolved to
    (``Recipe.to_dict(references)``), so that rerunning it reproduces this merge exactly.
    """
    models = models or {}
    refs = ([base] if base else []) + [m for m in inputs if m != base]
    hub_ids = list(dict.fromkeys(models[r].repo_id for r in refs if r in models and models[r].repo_id))
    front: dict[str, Any] = {}
    if hub_ids:
        front["base_model"] = hub_ids
        front["base_model_relation"] = "merge"
    front["library_name"] = "transformers"
    front["tags"] = ["langmerge", "merge", method]

    def named(ref: str) -> str:
        model = models.get(ref)
        if model is None or not model.repo_id:
            return f"`{ref}`"
        at = f" at commit `{model.commit}`" if model.commit else ""
        return f"`{ref}` ([{model.repo_id}](https://huggingface.co/{model.repo_id}){at})"

    pins = [
        f"# {ref}: {m.repo_id}@{m.revision or 'main'} resolved to commit {m.commit}"
        for ref, m in models.items()
        if m.from_hub
    ]
    header = (
        [
            "# Written by langmerge. Hub models are pinned to the commit they resolved to, so rerunning",
            "# this recipe reproduces the merge exactly:",
            *pins,
        ]
        if pins
        else []
    )
    recipe_text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "# Merged model",
        "",
        f"Made with [langmerge](https://pypi.org/project/langmerge/) by **{method}**: {summary}.",
        "",
        f"Base model: {named(base)}" if base else "No base model (weighted average).",
        "",
        "Inputs:",
        *[f"- {named(m)}" for m in inputs],
        "",
        "## Recipe",
        "",
        "```yaml",
        *header,
        recipe_text.rstrip(),
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    (out / "langmerge_recipe.yaml").write_text("".join(line + "\n" for line in header) + recipe_text)
