"""``langmerge check RECIPE.yaml``: what a merge would meet, before any merge.

The report first says what each model reference resolved to (a folder, or a
Hub id at a commit, cached or to download: io/hub.py), before anything is
downloaded; then each model's kind, architecture, dtypes, tensor count,
vocabulary and embedding tying; the tensors whose names or shapes differ; the
vocabulary differences and what the merge does about each; and every reason
the merge would fail: every problem the merge's own planner finds
(``merge.plan.survey_merge``), not just the first. Exit code 0 when the merge
would succeed, 1 when it would fail, 2 when the recipe or a model cannot be read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langmerge.errors import LangmergeError
from langmerge.io.hub import ResolvedModel
from langmerge.io.sources import recipe_models, source_kind
from langmerge.io.tensor_source import TensorSource
from langmerge.merge.plan import MergePlan, survey_merge
from langmerge.merge.recipe import Recipe, RecipeError, load_recipe
from langmerge.merge.vocab import describe_model

MAX_LISTED = 10


@dataclass
class CheckReport:
    recipe: str
    method: str
    resolved: dict[str, ResolvedModel] = field(default_factory=dict)  # reference -> what it stands for
    models: list[dict[str, Any]] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    vocabulary: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the merge does besides merging (copied tensors)
    problems: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 2 if self.unreadable else (1 if self.problems else 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "method": self.method,
            "resolved": {ref: m.to_json() for ref, m in self.resolved.items()},
            "models": self.models,
            "differences": self.differences,
            "vocabulary": self.vocabulary,
            "notes": self.notes,
            "problems": self.problems,
            "unreadable": self.unreadable,
            "merge_would_succeed": self.exit_code == 0,
        }

    def text(self) -> str:
        lines = [f"recipe {self.recipe}: merge_method {self.method}"]
        if self.resolved:
            lines += ["", "resolved:"] + [f"  {ref}: {m.describe()}" for ref, m in self.resolved.items()]
        lines += ["", "models:"]
        for m in self.models:
            vocab = f"{m['tokens']} tokens" if m["tokens"] is not None else "no tokenizer.json"
            lines.append(
                f"  [{m['role']}] {m['model']}: {m['kind']}, {m['architecture']}, {m['tensors']} tensors, "
                f"dtypes {m['dtypes']}, {vocab}, {m['embedding_rows']} embedding rows, "
                f"embeddings {'tied' if m['tied'] else 'untied'}"
            )
        sections = [
            ("differences", self.differences),
            ("vocabulary and embeddings", self.vocabulary),
            ("notes", self.notes),
        ]
        for title, items in sections:
            lines += ["", f"{title}:"] + ([f"  - {x}" for x in items] or ["  none"])
        if self.unreadable:
            lines += ["", "unreadable input:"] + [f"  - {x}" for x in self.unreadable]
        # "none" only when every input was read: an unread input's problems are not known yet.
        nothing = ["  none"] if not self.unreadable else ["  not known: not every input could be read (see above)"]
        lines += ["", "problems (the merge would fail):"] + ([f"  - {x}" for x in self.problems] or nothing)
        verdict = {0: "OK: the merge would succeed", 1: "FAIL: the merge would fail", 2: "FAIL: unreadable input"}
        lines += ["", verdict[self.exit_code]]
        return "\n".join(lines)


def _model_info(source: TensorSource, role: str) -> dict[str, Any]:
    config = source.config() or {}
    text_config = config.get("text_config") or {}
    arch = ",".join(config.get("architectures") or []) or "unknown architecture"
    model_type = config.get("model_type") or text_config.get("model_type")
    dtypes = Counter(str(source.dtype(n)).removeprefix("torch.") for n in source.names)
    vocab = describe_model(source)
    return {
        "model": source.label,
        "role": role,
        "kind": source_kind(source),
        "architecture": f"{arch} ({model_type})" if model_type else arch,
        "tensors": len(source.names),
        "dtypes": dict(dtypes),
        "tokens": len(vocab.tokens) if vocab.tokens is not None else None,
        "embedding_rows": vocab.rows,
        "tied": vocab.tied,
    }


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def _compare(reference: TensorSource, other: TensorSource, vocab_names: set[str], report: CheckReport) -> None:
    missing = [n for n in reference.names if n not in other]
    extra = [n for n in other.names if n not in reference]
    if missing:
        report.differences.append(
            f"{other.label} lacks {len(missing)} tensors of {reference.label}: {_listed(missing)}"
        )
    if extra:
        report.differences.append(f"{other.label} has {len(extra)} tensors {reference.label} lacks: {_listed(extra)}")
    shapes = [
        f"{n} {list(other.shape(n))} vs {list(reference.shape(n))}"
        for n in reference.names
        if n in other and tuple(other.shape(n)) != tuple(reference.shape(n))
    ]
    vocab_shapes = [s for s in shapes if s.split(" ", 1)[0] in vocab_names]
    other_shapes = [s for s in shapes if s.split(" ", 1)[0] not in vocab_names]
    if vocab_shapes:
        report.differences.append(f"{other.label}: vocabulary tensors differ in rows: {_listed(vocab_shapes)}")
    if other_shapes:
        report.differences.append(
            f"{other.label}: {len(other_shapes)} shapes differ from {reference.label}: {_listed(other_shapes)}"
        )
    ref_arch = (reference.config() or {}).get("architectures")
    other_arch = (other.config() or {}).get("architectures")
    if ref_arch != other_arch:
        report.differences.append(f"architecture {other_arch} in {other.label} but {ref_arch} in {reference.label}")


def check_recipe(
    recipe_arg: str | Path | dict[str, Any] | Recipe,
    *,
    allow_pickle: bool = False,
    progress: bool = True,
    announce: Callable[[str, ResolvedModel], None] | None = None,
) -> CheckReport:
    """Check a recipe. Each model reference is resolved first without downloading (``announce`` hears
    each answer at once); then what the cache lacks is downloaded, at the commits announced."""
    try:
        recipe = load_recipe(recipe_arg)
    except RecipeError as exc:  # each error of the recipe on a line of its own
        report = CheckReport(exc.source, "?")
        report.unreadable.extend(f"{exc.source}: {e}" for e in exc.errors)
        return report
    except LangmergeError as exc:
        report = CheckReport(str(recipe_arg), "?")
        report.unreadable.append(str(exc))
        return report
    report = CheckReport(recipe.source, recipe.method.name)
    report.resolved = recipe_models(
        recipe, allow_pickle=allow_pickle, download=False, on_error=lambda ref, exc: report.unreadable.append(str(exc))
    )
    for ref, model in report.resolved.items():
        if announce is not None:
            announce(ref, model)
    if report.unreadable:
        return report
    try:
        report.resolved = recipe_models(recipe, allow_pickle=allow_pickle, progress=progress, resolved=report.resolved)
    except LangmergeError as exc:
        report.unreadable.append(str(exc))
        return report
    plan = survey_merge(recipe, allow_pickle=allow_pickle, models=dict(report.resolved), progress=progress)
    try:
        _describe(plan, report)
    finally:
        plan.close()
    return report


def _describe(plan: MergePlan, report: CheckReport) -> None:
    """The report's sections from a surveyed plan."""
    report.unreadable.extend(str(exc) for exc in plan.unreadable)
    roles = (["base"] if plan.base is not None else []) + ["input"] * len(plan.inputs)
    sources = plan.sources
    for source, role in zip(sources, roles):
        try:
            report.models.append(_model_info(source, role))  # reads config.json and tokenizer.json
        except LangmergeError as exc:
            report.unreadable.append(str(exc))
    report.problems.extend(str(exc) for exc in plan.problems)
    if report.unreadable or not plan.views:
        return  # not every model opened: nothing to compare
    vocab_names = {n for s in sources for n in describe_model(s).vocab_names}
    for other in sources[1:]:
        _compare(sources[0], other, vocab_names, report)
    if plan.vocab is not None:
        report.vocabulary.extend(plan.vocab.notes)
    elif plan.vocab_problem is not None:
        report.vocabulary.append(f"vocabulary: {plan.vocab_problem}")
    report.notes.extend(_method_notes(plan))
    copied = [f"{t.name} ({str(t.out_dtype).removeprefix('torch.')})" for t in plan.tensors if t.copied]
    if copied:
        report.notes.append(
            f"{len(copied)} integer or bool tensors are the same in every model and are copied as is: {_listed(copied)}"
        )


_BASE_ROLES = {
    "optional": "{name} merges the task vectors over base_model {base}",
    "input": "{name} takes no base: base_model {base} is merged as one more input model",
    "unused": "{name} does not read base_model {base}",
}


def _method_notes(plan: MergePlan) -> list[str]:
    """What the method does with the base and (``Method.describe``) with the tensors."""
    recipe = plan.recipe
    method = recipe.method
    notes = []
    if recipe.base_model is not None and method.base_policy in _BASE_ROLES:
        policy = method.base_policy
        listed = policy == "input" and any(e.model == recipe.base_model for e in recipe.raw.models or [])
        if not listed:
            notes.append(_BASE_ROLES[policy].format(name=method.name, base=recipe.base_model))
    tensors = [
        (task.info, task.params) for t in plan.tensors if not t.copied for task in t.tasks if task.params is not None
    ]
    described: list[str] = method.describe(tensors)
    return notes + described
