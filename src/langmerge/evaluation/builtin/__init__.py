"""Built-in tasks: their specs, and builders that make their data from offline assets at first use.

Data is built deterministically and cached as ``task.yaml`` + ``data.jsonl``
under ``$LANGMERGE_CACHE/eval-tasks/<version>/<name>/`` (default cache:
``~/.cache/langmerge``); the files are ordinary task files, so they also serve
as examples for writing your own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from langmerge.errors import LangmergeError
from langmerge.evaluation.builtin import bible, cldr, numbers, udhr
from langmerge.io.output import OutputAppeared, atomic_output_dir

# Bumped whenever a built-in task's data changes (v2: sequence choices leave out the prompt's names;
# v3: the verse-aligned Bible tasks).
BUILTIN_VERSION = "v3"
# py3langid labels where they differ from the ISO 639-1 code.
LANGID_LABELS = {"bo": ["dz"]}
# Languages py3langid cannot identify: their generation tasks would have no language check.
NO_LANGID = {"ny"}


@dataclass(frozen=True)
class BuiltinTask:
    spec: dict
    build: Callable[[Path], list[dict]]


# The builders are looked up when a task is built (the lambdas below), not when the table is made.
def _cacheless(build: Callable[[str], list[dict]], language: str) -> Callable[[Path], list[dict]]:
    """The builder of a task of ``language`` that needs no download cache."""
    return lambda _cache: build(language)


def _cached(build: Callable[[str, Path], list[dict]], language: str) -> Callable[[Path], list[dict]]:
    """The builder of a task of ``language`` that downloads into the cache folder."""
    return lambda cache_dir: build(language, cache_dir)


def cache_root(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("LANGMERGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "langmerge"


def _mc(name: str, family: str, language: str, **extra) -> dict:
    return {
        "name": name,
        "kind": "multiple_choice",
        "family": family,
        "language": language,
        "prompt": "{question}",
        "choices_field": "choices",
        "answer_field": "answer_index",
        **extra,
    }


def _gen(name: str, family: str, language: str, **extra) -> dict:
    return {
        "name": name,
        "kind": "generation",
        "family": family,
        "language": language,
        "language_labels": LANGID_LABELS.get(language, [language]),
        "prompt": "{question}",
        "answer_field": "answer",
        **extra,
    }


@cache
def builtin_tasks() -> dict[str, BuiltinTask]:
    tasks: dict[str, BuiltinTask] = {}
    for lang in cldr.CLDR_LOCALES:
        for unit in ("day", "month"):
            family = f"next_{unit}"
            build = lambda _cache, lang=lang, unit=unit: cldr.build_sequence(lang, unit)  # noqa: E731
            tasks[f"{family}_{lang}"] = BuiltinTask(_mc(f"{family}_{lang}", family, lang), build)
            if lang not in NO_LANGID:
                spec = _gen(f"{family}_gen_{lang}", f"{family}_gen", lang, stop=[",", "\n"], max_new_tokens=32)
                tasks[spec["name"]] = BuiltinTask(spec, build)
    for lang in numbers.NUM2WORDS_LANGUAGES:
        gen = dict(stop=["\n"], few_shot=3, fewshot_delimiter="\n", max_new_tokens=48)
        tasks[f"number_words_{lang}"] = BuiltinTask(
            _gen(f"number_words_{lang}", "number_words", lang, **gen),
            _cacheless(lambda language: numbers.build_number_words(language), lang),
        )
        tasks[f"arith_words_{lang}"] = BuiltinTask(
            _gen(f"arith_words_{lang}", "arith_words", lang, **gen),
            _cacheless(lambda language: numbers.build_arith_words(language), lang),
        )
        tasks[f"arith_words_mc_{lang}"] = BuiltinTask(
            _mc(f"arith_words_mc_{lang}", "arith_words_mc", lang),
            _cacheless(lambda language: numbers.build_arith_words_mc(language), lang),
        )
    for lang in udhr.UDHR_CODES:
        tasks[f"udhr_bpc_{lang}"] = BuiltinTask(
            {
                "name": f"udhr_bpc_{lang}",
                "kind": "bits_per_char",
                "family": "udhr_bpc",
                "language": lang,
                "text_field": "text",
            },
            _cached(lambda language, cache_dir: udhr.build_udhr(language, cache_dir), lang),
        )
    for lang in bible.LANGUAGES:
        tasks[f"verse_cont_{lang}"] = BuiltinTask(
            _mc(f"verse_cont_{lang}", "verse_cont", lang),
            _cacheless(lambda language: bible.build_verse_cont(language), lang),
        )
        tasks[f"bible_genre_{lang}"] = BuiltinTask(
            _mc(f"bible_genre_{lang}", "bible_genre", lang),
            _cacheless(lambda language: bible.build_genre(language), lang),
        )
        tasks[f"bible_bpc_{lang}"] = BuiltinTask(
            {
                "name": f"bible_bpc_{lang}",
                "kind": "bits_per_char",
                "family": "bible_bpc",
                "language": lang,
                "text_field": "text",
            },
            _cacheless(lambda language: bible.build_bible_bpc(language), lang),
        )
    return tasks


def builtin_task_names() -> list[str]:
    return sorted(builtin_tasks())


def materialize(name: str, cache_dir: Path | None = None) -> Path:
    """The cached task.yaml of a built-in task, building its data the first time."""
    tasks = builtin_tasks()
    if name not in tasks:
        raise LangmergeError(f"unknown task '{name}' (see `langmerge eval --list-tasks`)")
    root = cache_root(cache_dir)
    folder = root / "eval-tasks" / BUILTIN_VERSION / name
    task_yaml = folder / "task.yaml"
    if task_yaml.is_file():
        return task_yaml
    task = tasks[name]
    docs = task.build(root)
    try:
        # A folder without task.yaml is a broken cache entry: replaced.
        with atomic_output_dir(folder, force=folder.exists()) as tmp:
            with (tmp / "data.jsonl").open("w", encoding="utf-8") as fh:
                for doc in docs:
                    fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
            spec = {**task.spec, "data": "data.jsonl"}
            (tmp / "task.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    except OutputAppeared:
        if not task_yaml.is_file():  # not another process that finished first
            raise
    return task_yaml
