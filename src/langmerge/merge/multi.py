"""Multi-document recipes, as ``mergekit-multi`` runs them: several recipes in one file (``---`` between them).

A document with ``name: N`` is an intermediate merge, written to ``OUT_DIR/N``;
later (or earlier: the order is the dependencies') documents name it as a
model, by ``N`` wherever a model reference goes (``base_model``, ``models``,
slices' sources, ``tokenizer_source``, the tokenizer block's sources,
``protect``, either side of ``BASE+ADAPTER``). The one document without a name
(at most one) is the final merge, written to ``OUT_DIR`` itself, around the
intermediates' sub-folders; without one, ``OUT_DIR`` holds only the
intermediates.

Every document is read and checked before anything is merged. Each merge is
atomic (``io.output``), so an interrupted or killed run leaves its finished
intermediates: a rerun into the same ``OUT_DIR`` reuses them (as mergekit-multi
does by default) and merges the rest; ``--force`` merges every document again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from langmerge.errors import LangmergeError
from langmerge.io.output import check_disjoint
from langmerge.merge.execute import MergeReport, merge
from langmerge.merge.recipe import Recipe, RecipeError, load_recipe

log = logging.getLogger(__name__)

# Recipe keys whose string values (and lists of strings) are model references.
_MODEL_KEYS = {"base_model", "model", "tokenizer_source", "source", "protect"}


def _rename(value: Any, names: dict[str, str], used: set[str]) -> Any:
    """``value`` with every model reference that names a document replaced by its folder (``used`` collects them)."""
    if isinstance(value, list):
        return [_rename(v, names, used) for v in value]
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if key == "parameters":  # only protect names models there
                out[key] = (
                    {**v, "protect": _rename(v["protect"], names, used)}
                    if isinstance(v, dict) and "protect" in v
                    else v
                )
            elif key in _MODEL_KEYS or isinstance(v, (dict, list)):
                out[key] = _rename(v, names, used)
            else:
                out[key] = v
        return out
    if isinstance(value, str):
        parts = value.split("+")  # BASE+ADAPTER: either side may be a document
        if len(parts) <= 2 and any(p in names for p in parts):
            used.update(p for p in parts if p in names)
            return "+".join(names.get(p, p) for p in parts)
    return value


class MultiRecipe:
    """The documents of a multi-document recipe, checked, with references to other documents made folder paths
    under ``out_dir``, in an order that merges each document after the ones it names."""

    def __init__(self, source: str, documents: list[Any], out_dir: Path):
        self.source, self.out_dir = source, Path(out_dir)
        names: dict[str, str] = {}
        unnamed = []
        for i, doc in enumerate(documents):
            if not isinstance(doc, dict):
                raise LangmergeError(f"{source}: document {i + 1} is not a recipe (a YAML mapping)")
            name = doc.get("name")
            if name is None:
                unnamed.append(i)
                continue
            if (
                not isinstance(name, str)
                or not name
                or name in (".", "..")
                or "/" in name
                or "\\" in name
                or name.startswith(".")
            ):
                raise LangmergeError(f"{source}: document {i + 1}: 'name' {name!r} must be a plain folder name")
            if name in names:
                raise LangmergeError(f"{source}: document {i + 1}: name {name!r} is used by an earlier document")
            names[name] = str(self.out_dir / name)
        if len(unnamed) > 1:
            raise LangmergeError(
                f"{source}: holds {len(documents)} YAML documents, and documents {unnamed[0] + 1} and "
                f"{unnamed[1] + 1} both have no 'name'; only the final merge (written to OUT_DIR) may "
                "be unnamed (the others are intermediates, named for their sub-folders)"
            )
        self.names = names
        docs, needs = {}, {}
        for i, doc in enumerate(documents):
            used: set[str] = set()
            renamed = _rename({k: v for k, v in doc.items() if k != "name"}, names, used)
            key = doc.get("name")
            if key in used:
                raise LangmergeError(f"{source}: document {i + 1} ({key}) names itself as a model")
            docs[key], needs[key] = renamed, used
        self.order = _order(needs, source)
        errors: list[str] = []
        self.recipes = {}
        for key in self.order:
            label = f"{source} [{key or 'final'}]"
            try:
                self.recipes[key] = load_recipe_as(docs[key], label)
            except RecipeError as exc:
                errors += [f"[{key or 'final'}] {e}" for e in exc.errors]
            except LangmergeError as exc:
                errors.append(f"[{key or 'final'}] {exc}")
        if errors:
            raise RecipeError(source, errors)

    def folder(self, key: str | None) -> Path:
        return self.out_dir if key is None else self.out_dir / key


def load_recipe_as(document: dict[str, Any], label: str) -> Recipe:
    """A document as a Recipe whose messages name it ``label``."""
    recipe = load_recipe(document)
    recipe.source = label
    return recipe


def _order(needs: dict[str | None, set[str]], source: str) -> list[str | None]:
    """The documents so that each comes after those it names; a cycle is an error."""
    order: list[str | None] = []
    state: dict[str | None, str] = {}

    def visit(key: str | None, path: list[str | None]) -> None:
        if state.get(key) == "done":
            return
        if state.get(key) == "visiting":
            cycle = " -> ".join(str(k) for k in [*path, key])
            raise LangmergeError(f"{source}: the documents name each other in a cycle ({cycle})")
        state[key] = "visiting"
        for dep in sorted(needs[key]):
            visit(dep, [*path, key])
        state[key] = "done"
        order.append(key)

    for key in needs:
        visit(key, [])
    return order


def _check_out_dir(multi: MultiRecipe, force: bool) -> None:
    """An existing OUT_DIR is resumed when it holds only this recipe's intermediates; else it needs ``force``."""
    out = multi.out_dir
    if not out.exists() or force:
        return
    if not out.is_dir() or out.is_symlink():
        raise LangmergeError(f"output {out} exists and is not a folder")
    foreign = [p.name for p in out.iterdir() if p.name not in multi.names and not p.name.startswith(".")]
    if foreign:
        done = (
            "a finished merge"
            if (out / "config.json").exists()
            else f"files this recipe does not write ({', '.join(sorted(foreign)[:3])})"
        )
        raise LangmergeError(f"output {out} already exists and holds {done}; pass --force to replace it")


def run_multi(
    source: str, documents: list[Any], out_dir: str | Path, *, force: bool = False, **options: Any
) -> MergeReport:
    """Merge every document (``merge.execute.merge``'s options); returns the final merge's report (the last one's
    when every document is named)."""

    multi = MultiRecipe(source, documents, Path(out_dir))
    check_disjoint([multi.out_dir], [source if source != "<recipe>" else None])  # the recipe file is no intermediate
    _check_out_dir(multi, force)
    intermediates = [multi.folder(k) for k in multi.order if k is not None]
    report = None
    for key in multi.order:
        folder = multi.folder(key)
        if key is not None and folder.is_dir() and (folder / "config.json").exists() and not force:
            log.info("%s: %s is merged already (a previous run's): reused", key, folder)
            continue
        log.info("merging %s into %s", key or "the final recipe", folder)
        adopt = [p for p in intermediates if p.exists()] if key is None else []
        report = merge(multi.recipes[key], folder, force=force or key is None, adopt=adopt, **options)
    if report is None:
        raise LangmergeError(
            f"output {multi.out_dir} already holds every document's merge; pass --force to merge them again"
        )
    return report
