"""Task files: a small YAML spec plus JSONL data, loaded with errors that name file and line.

A task YAML (``TaskSpec``) names its kind, its data file (relative to the YAML)
and ``str.format``-style templates whose ``{field}`` names are keys of each
JSONL example. Only plain field names are allowed in templates, so a template
cannot reach attributes of the data.
"""

from __future__ import annotations

import fnmatch
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from langmerge.errors import LangmergeError
from langmerge.evaluation.builtin import builtin_task_names, materialize
from langmerge.evaluation.metrics import language_id_labels
from langmerge.input_files import json_object_lines, load_config, read_input_text

TaskKind = Literal["multiple_choice", "generation", "bits_per_char"]


class TaskSpec(BaseModel):
    """The schema of a task YAML file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    kind: TaskKind
    data: str  # JSONL file, relative to the YAML file
    language: str | None = None  # the target language (ISO 639-1 where one exists)
    # py3langid labels that count as the target language (Tibetan is labelled "dz");
    # defaults to [language]. Used by generation tasks for the language share.
    language_labels: list[str] | None = None
    family: str | None = None  # tasks of one family in several languages (for the gap to English)
    description: str = ""  # text placed before the few-shot examples
    prompt: str = "{question}"  # template of the context (multiple choice, generation)
    choices_field: str = "choices"  # multiple choice: list of strings
    answer_field: str = "answer"  # multiple choice: index into choices; generation: reference string
    text_field: str = "text"  # bits per character: the raw text
    target_delimiter: str = " "  # between the prompt and the answer
    fewshot_delimiter: str = "\n\n"  # between few-shot examples
    few_shot: int = Field(default=0, ge=0)
    max_new_tokens: int = Field(default=32, ge=1)
    stop: list[str] = Field(default_factory=lambda: ["\n"])

    @field_validator("prompt", "description")
    @classmethod
    def _plain_fields_only(cls, template: str) -> str:
        template_fields(template)
        return template

    @property
    def accepted_labels(self) -> list[str]:
        return self.language_labels or ([self.language] if self.language else [])


@dataclass(frozen=True)
class Example:
    doc: dict
    where: str  # "file:line", for error messages


@dataclass(frozen=True)
class Task:
    spec: TaskSpec
    examples: tuple[Example, ...]
    source: Path  # the YAML file

    @property
    def name(self) -> str:
        return self.spec.name


def _pieces(template: str) -> list[tuple[str, str | None]]:
    """``(literal text, field name or None)`` pieces of a ``{field}`` template; only plain names are allowed.

    Attribute or index access (``{x.__class__}``, ``{x[0]}``), positions, conversions
    (``{x!r}``) and format specs (``{x:>99999999999}``, whose width alone can
    exhaust memory) are refused: a template is filled by plain substitution, never
    by ``str.format``.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from None
    pieces = []
    for literal, field, spec, conversion in parsed:
        if field is not None:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            if not field.isidentifier():
                raise ValueError(f"template field {shown} must be a plain name (no dots, brackets or positions)")
            if spec or conversion:
                raise ValueError(
                    f"template field {shown}: format specs and conversions are not supported; write {{{field}}}"
                )
        pieces.append((literal, field))
    return pieces


def template_fields(template: str) -> list[str]:
    """Field names of a ``{field}`` template (see ``_pieces`` for what is refused)."""
    return [field for _, field in _pieces(template) if field is not None]


def render(template: str, example: Example, task_name: str) -> str:
    """Fill a template from an example; a missing field is a LangmergeError naming file:line."""
    out = []
    for literal, field in _pieces(template):
        out.append(literal)
        if field is None:
            continue
        if field not in example.doc:
            raise LangmergeError(
                f"task {task_name}: template {template!r} references field '{field}' "
                f"missing from the example at {example.where}"
            )
        out.append(str(example.doc[field]))
    return "".join(out)


def load_jsonl(path: Path) -> list[Example]:
    """Examples of a JSONL file; blank lines are skipped, anything else must be a JSON object."""
    text = read_input_text(path, "task data")
    return [Example(doc, f"{path}:{number}") for number, doc in json_object_lines(text.split("\n"), path)]


def _check_example(spec: TaskSpec, ex: Example) -> None:
    doc = ex.doc
    if spec.kind == "multiple_choice":
        choices = doc.get(spec.choices_field)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise LangmergeError(f"{ex.where}: field '{spec.choices_field}' must be a list of at least two strings")
        answer = doc.get(spec.answer_field)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise LangmergeError(
                f"{ex.where}: field '{spec.answer_field}' must be an index into '{spec.choices_field}' "
                f"(0..{len(choices) - 1})"
            )
    elif spec.kind == "generation":
        if not isinstance(doc.get(spec.answer_field), str):
            raise LangmergeError(f"{ex.where}: field '{spec.answer_field}' must be a string (the reference answer)")
    else:
        text = doc.get(spec.text_field)
        if not isinstance(text, str) or not text:
            raise LangmergeError(f"{ex.where}: field '{spec.text_field}' must be a non-empty string")


def load_task(yaml_path: str | Path) -> Task:
    """Load and check a task YAML and its JSONL data."""
    path = Path(yaml_path)
    spec = load_config(path, TaskSpec, "task")
    if spec.kind == "generation" and spec.language:
        check_language_labels(spec.accepted_labels, path)
    examples = load_jsonl(path.parent / spec.data)
    if not examples:
        raise LangmergeError(f"task {spec.name}: data file {path.parent / spec.data} has no examples")
    templates = [spec.prompt, spec.description] if spec.kind != "bits_per_char" else []
    for ex in examples:
        _check_example(spec, ex)
        for template in templates:  # fail before any model work, naming the first bad example
            render(template, ex, spec.name)
    if spec.few_shot >= len(examples):
        raise LangmergeError(
            f"task {spec.name}: few_shot {spec.few_shot} needs more than {spec.few_shot} examples, has {len(examples)}"
        )
    return Task(spec, tuple(examples), path)


def check_language_labels(labels: list[str], where: object) -> None:

    known = language_id_labels()
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise LangmergeError(
            f"{where}: language label(s) {unknown} are not known to py3langid; set language_labels to labels it "
            f"has (Tibetan is 'dz'), or leave language out to skip the language check"
        )


def with_few_shot(task: Task, few_shot: int | None) -> Task:
    """The task with its few-shot count overridden (None keeps the YAML's)."""
    if few_shot is None or few_shot == task.spec.few_shot:
        return task
    if few_shot >= len(task.examples):
        raise LangmergeError(f"task {task.name}: few_shot {few_shot} needs more than {few_shot} examples")
    return Task(task.spec.model_copy(update={"few_shot": few_shot}), task.examples, task.source)


def answer_text(task: Task, ex: Example) -> str:
    """The correct answer of an example as text."""
    doc = ex.doc
    if task.spec.kind == "multiple_choice":
        return doc[task.spec.choices_field][doc[task.spec.answer_field]]
    return doc[task.spec.answer_field]


def few_shot_indices(n_examples: int, index: int, k: int, seed: int) -> list[int]:
    """k other examples for example ``index``, the same for a given seed on every run."""
    if k == 0:
        return []
    rng = random.Random(seed * 1_000_003 + index)
    others = [i for i in range(n_examples) if i != index]
    return rng.sample(others, k)


def context(task: Task, index: int, seed: int) -> str:
    """Description, few-shot examples and the prompt of example ``index``."""
    spec = task.spec
    ex = task.examples[index]
    shots = [
        render(spec.prompt, task.examples[j], spec.name) + spec.target_delimiter + answer_text(task, task.examples[j])
        for j in few_shot_indices(len(task.examples), index, spec.few_shot, seed)
    ]
    query = render(spec.prompt, ex, spec.name)
    description = render(spec.description, ex, spec.name) if spec.description else ""
    return description + spec.fewshot_delimiter.join([*shots, query])


def resolve_tasks(names: Sequence[str | Task], cache_dir: Path | None = None) -> list[Task]:
    """Tasks from names: built-in task names, shell-style patterns of them, or task YAML paths
    (loaded ``Task`` objects pass through)."""
    available = builtin_task_names()
    tasks: list[Task] = []
    for name in names:
        if isinstance(name, Task):
            tasks.append(name)
            continue
        name = name.strip()
        if not name:
            continue
        if name.endswith((".yaml", ".yml")) or Path(name).is_file():
            tasks.append(load_task(name))
            continue
        matched = [n for n in available if fnmatch.fnmatchcase(n, name)]
        if not matched:
            raise LangmergeError(f"unknown task '{name}' (see `langmerge eval --list-tasks`, or pass a task YAML path)")
        tasks.extend(load_task(materialize(n, cache_dir)) for n in matched)
    if not tasks:
        raise LangmergeError("no tasks given")
    seen: dict[str, Task] = {}
    for t in tasks:
        seen.setdefault(t.name, t)
    return list(seen.values())
