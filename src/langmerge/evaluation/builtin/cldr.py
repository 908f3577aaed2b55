"""Day and month sequence tasks from CLDR names (PyPI ``babel``), the same in every language.

The prompt is a run of consecutive day (or month) names in the target
language, written with commas; the answer is the next name. No instruction
words are needed, so the task is identical across languages and its answer
depends on the language, not on memorised English facts.

The multiple-choice options are the names *not* in the prompt. A small model
strongly prefers repeating a name it has just read: with every name offered,
each model of the bundled miniature (Gemma-3-270M) scored 0 on the Chichewa
days, below the 1 in 7 of a random pick, so the task measured that copying
bias, not knowledge of the sequence.
"""

from __future__ import annotations

from langmerge.errors import LangmergeError

# ISO 639-1 code -> the CLDR locale babel knows it by.
CLDR_LOCALES = {
    "ta": "ta",
    "te": "te",
    "bn": "bn",
    "or": "or",
    "ne": "ne",
    "mn": "mn",
    "ug": "ug",
    "bo": "bo",
    "si": "si",
    "sw": "sw",
    "yo": "yo",
    "ny": "ny",
    "am": "am",
    "en": "en",
}
RUN_LENGTHS = (2, 3, 4)


def _babel_locale(language: str):
    try:
        from babel import Locale  # optional (the eval extra)
    except ImportError:
        raise LangmergeError("built-in day/month tasks need babel: pip install babel") from None
    return Locale.parse(CLDR_LOCALES[language])


def calendar_names(language: str, unit: str) -> list[str]:
    """Wide day names Monday..Sunday or month names January..December in the language."""
    locale = _babel_locale(language)
    if unit == "day":
        names = locale.days["format"]["wide"]
        return [names[i] for i in range(7)]
    names = locale.months["format"]["wide"]
    return [names[i] for i in range(1, 13)]


def sequence_examples(names: list[str]) -> list[dict]:
    """Every run of 2-4 consecutive names (wrapping around), the name that follows it, and as choices
    the names that are not in the run (in calendar order)."""
    docs = []
    n = len(names)
    for length in RUN_LENGTHS:
        for start in range(n):
            run = [(start + j) % n for j in range(length)]
            answer = (start + length) % n
            choices = [i for i in range(n) if i not in run]
            docs.append(
                {
                    "question": ", ".join(names[i] for i in run) + ",",
                    "choices": [names[i] for i in choices],
                    "answer_index": choices.index(answer),
                    "answer": names[answer],
                }
            )
    return docs


def build_sequence(language: str, unit: str) -> list[dict]:
    return sequence_examples(calendar_names(language, unit))
