"""Input files users write (recipes, task, study and search-space files, JSONL data): read, check, and report
errors by file, line and key.

Every configuration file is read the same way: ``read_config_document`` (YAML, or JSON for a ``.json`` file, with
the structure limits below) and ``load_config`` (that document validated into a pydantic model, every error
naming the file and key path, ``validation_errors``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from langmerge.errors import LangmergeError
from langmerge.io.files import parse_json, read_regular

ModelT = TypeVar("ModelT", bound=BaseModel)


# Limits on a YAML document's structure, checked before anything walks it: deeper
# nesting, or more entries once aliases are expanded, is refused rather than
# left to hang (an alias bomb) or to overflow the stack.
MAX_NESTING = 64
MAX_ENTRIES = 100_000


def read_input_text(path: Path, kind: str) -> str:
    """The UTF-8 text of a file the user names; a missing, special, binary or non-UTF-8 file is a one-line error
    naming it."""
    if not path.exists():
        raise LangmergeError(f"{kind} file {path} does not exist")
    data = read_regular(path)
    if b"\0" in data:
        raise LangmergeError(f"{path}: a binary file (it holds NUL bytes), not a {kind} file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LangmergeError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); a {kind} file must be UTF-8"
        ) from None


def parse_yaml(text: str, source: object, kind: str, several: str = "") -> object:
    """The one YAML document ``text`` holds, its structure checked (``check_structure``); errors are one line naming
    ``source``. ``several`` ends the message for a file of several documents."""
    documents = parse_yaml_documents(text, source, kind)
    if len(documents) > 1:
        raise LangmergeError(f"{source}: holds {len(documents)} YAML documents; a {kind} file is one document{several}")
    return documents[0] if documents else None


def parse_yaml_documents(text: str, source: object, kind: str) -> list:
    """Every YAML document ``text`` holds (``---`` between them), each one's structure checked."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "").split())
        if "tag:yaml.org,2002:python/" in problem:
            tag = problem.split("tag:yaml.org,2002:", 1)[1].split("'", 1)[0]
            raise LangmergeError(
                f"{source}: {where}the YAML tag !!{tag} is not allowed (a {kind} file holds plain values; "
                "langmerge never builds Python objects from YAML)"
            ) from None
        raise LangmergeError(f"{source}: not valid YAML ({where}{problem})") from None
    except yaml.YAMLError as exc:
        raise LangmergeError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise LangmergeError(f"{source}: not valid YAML (nested too deeply)") from None
    for document in documents:
        check_structure(document, source)
    return documents


def check_structure(document: object, source: object) -> None:
    """Refuse a document nested deeper than MAX_NESTING, or with more than MAX_ENTRIES entries once YAML aliases are
    expanded (or an alias to itself). Linear in the document's size: shared parts are counted once, by identity."""
    counted: dict[int, tuple[int, int]] = {}  # id -> (entries, height)

    def deep(path: tuple) -> LangmergeError:
        return LangmergeError(
            f"{source}: key {_key(path[:8], more=len(path) > 8)}: nested more than {MAX_NESTING} levels deep"
        )

    def walk(node: object, path: tuple) -> tuple[int, int]:
        if not isinstance(node, (dict, list)):
            return 1, 0
        if len(path) >= MAX_NESTING:
            raise deep(path)
        known = counted.get(id(node))
        if known is not None:
            if len(path) + known[1] > MAX_NESTING:
                raise deep(path)
            return known
        counted[id(node)] = (MAX_ENTRIES + 1, 0)  # until it is counted: an alias to itself is too large
        entries, height = 1, 0
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            n, h = walk(value, (*path, key))
            entries, height = entries + n, max(height, h + 1)
        if entries > MAX_ENTRIES:
            raise LangmergeError(
                f"{source}: key {_key(path[:8], more=len(path) > 8)}: more than {MAX_ENTRIES} entries once YAML "
                "aliases are expanded "
                "(an alias bomb, or an alias to itself?); write the values out"
            )
        counted[id(node)] = (entries, height)
        return entries, height

    walk(document, ())


def _key(path: tuple, more: bool = False) -> str:
    return "'" + ".".join(str(p) for p in path) + ("..." if more else "") + "'" if path else "(top level)"


def read_config_document(path: Path, kind: str, several: str = "") -> object:
    """The one document a configuration file holds: JSON for a ``.json`` file (json names the exact position of a
    fault), else YAML; its structure checked (``check_structure``). Errors are one line naming the file."""
    text = read_input_text(path, kind)
    if path.suffix.lower() == ".json":
        document = parse_json(text.encode("utf-8"), path)
        check_structure(document, path)
        return document
    return parse_yaml(text, path, kind, several)


def validation_errors(
    exc: ValidationError, what: str = "key", unsupported: Mapping[str, str] | None = None, key_depth: int | None = None
) -> list[str]:
    """Every pydantic error, one line each in document order, as ``WHAT 'a.b[0].c': what was expected``.

    ``unsupported`` maps keys that are refused by name (rather than as unknown) to the reason. ``key_depth``: only
    that many parts of a location name the key (a model whose messages name the fields inside it).
    """
    out = []
    for err in exc.errors():
        inside = (err.get("ctx") or {}).get("at", "")  # a place inside the value (``[1].value``)
        loc = key_path(err["loc"][:key_depth]) + inside
        if err["type"] == "extra_forbidden" and unsupported and loc in unsupported:
            text = f"{what} {loc!r}: {unsupported[loc]}"
        else:
            text = describe_error(err, f"{what} {loc!r}")
        if text not in out:
            out.append(text)
    return out


# A numeric bound in words, by pydantic's constraint name (``Field(ge=1)``); and the constraint of each
# bound error type.
BOUND_WORDS = {"ge": "at least", "gt": "more than", "le": "at most", "lt": "less than"}
_BOUNDS = {"greater_than_equal": "ge", "greater_than": "gt", "less_than_equal": "le", "less_than": "lt"}


def error_text(err: ErrorDetails) -> str:
    """What one pydantic error says is wrong, without where: ``must be at least 1, got 0``.

    The one wording of a refused value, for configuration files (``validation_errors``: after a key path) and
    the command line (``cli_options``: after a flag).
    """
    if err["type"] in _BOUNDS:
        key = _BOUNDS[err["type"]]
        return f"must be {BOUND_WORDS[key]} {err['ctx'][key]}, got {err['input']}"
    if err["type"] == "extra_forbidden":
        return "unknown key"
    return err["msg"].removeprefix("Value error, ")


def describe_error(err: ErrorDetails, where: str) -> str:
    """One pydantic error after ``where`` (``key 'a.b'``, ``argument --seq-len``): ``where: error_text``, or
    ``where is required``."""
    if err["type"] == "missing":
        return f"{where} is required"
    return f"{where}: {error_text(err)}"


def key_path(loc: tuple) -> str:
    """A pydantic error location as a key path written the way keys are addressed elsewhere: ``models[0].model``;
    the top level is ``(top level)``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


class ConfigError(LangmergeError):
    """Everything wrong with a configuration file's schema at once: ``errors`` lists each (naming its key); the
    message joins them after the file's name."""

    def __init__(self, source: object, errors: list[str], kind: str = ""):
        self.source = source
        self.errors = list(errors)
        what = f"{kind} errors" if kind else "errors"
        joined = self.errors[0] if len(self.errors) == 1 else f"{len(self.errors)} {what}: " + "; ".join(self.errors)
        super().__init__(f"{source}: {joined}")


def validate_config(document: object, model: type[ModelT], source: object, kind: str = "") -> ModelT:
    """``document`` validated into ``model``; a ``ConfigError`` naming ``source`` and every bad key otherwise."""
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(source, validation_errors(exc), kind) from None


def load_config(
    path: str | Path,
    model: type[ModelT],
    kind: str = "configuration",
    *,
    hint: str = "",
    overrides: Mapping[str, object] | None = None,
) -> ModelT:
    """The configuration file ``path`` (YAML, or JSON for a ``.json`` file) validated into ``model``.

    The file must hold one mapping (``hint`` ends the message when it does not); ``overrides`` replace its
    top-level keys. Errors are ``ConfigError`` / ``LangmergeError`` messages naming the file, the key path and
    what was expected.
    """
    path = Path(path)
    document = read_config_document(path, kind)
    if not isinstance(document, dict):
        raise LangmergeError(f"{path}: a {kind} file must be a mapping{hint}")
    return validate_config({**document, **(overrides or {})}, model, path)


def json_object_line(line: str, path: Path, lineno: int) -> dict:
    """One JSONL line that must hold a JSON object; errors name ``path:lineno``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LangmergeError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise LangmergeError(f"{path}:{lineno}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # an integer too long to convert
        raise LangmergeError(f"{path}:{lineno}: not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise LangmergeError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


def json_object_lines(lines: Iterable[str], path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank JSONL line; each must hold a JSON object."""
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            yield lineno, json_object_line(line, path, lineno)
