"""Input files users write (task and study YAML, JSONL data): read, check, and report errors by file, line and key."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml
from pydantic import ValidationError

from langmerge.errors import LangmergeError


def read_yaml_mapping(path: Path, kind: str, hint: str = "") -> dict:
    """The mapping a YAML file holds; a missing file, bad YAML or another shape is a LangmergeError naming it."""
    if not path.is_file():
        raise LangmergeError(f"{kind} file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise LangmergeError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LangmergeError(f"{path}: cannot read ({exc})") from None
    if not isinstance(raw, dict):
        raise LangmergeError(f"{path}: a {kind} file must be a mapping{hint}")
    return raw


def validation_message(exc: ValidationError, source: str | Path) -> str:
    """``source: key 'a.b': message`` for the first error pydantic reports."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{source}: key '{key}': {err['msg'].removeprefix('Value error, ')}"


def json_object_line(line: str, path: Path, lineno: int) -> dict:
    """One JSONL line that must hold a JSON object; errors name ``path:lineno``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LangmergeError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise LangmergeError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


def json_object_lines(lines: Iterable[str], path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank JSONL line; each must hold a JSON object."""
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            yield lineno, json_object_line(line, path, lineno)
