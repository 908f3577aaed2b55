"""Number-word tasks from PyPI ``num2words``: numbers and sums written out in the target language.

Prompts are digits and ``+`` only; the answers are number words of the target
language, so a model that answers in English (or in digits) scores zero.
"""

from __future__ import annotations

import random

from langmerge.errors import LangmergeError

# Languages num2words writes (among langmerge's low-resource languages) plus English.
NUM2WORDS_LANGUAGES = ("bn", "te", "am", "en")
N_EXAMPLES = 40


def number_words(n: int, language: str) -> str:
    try:
        from num2words import num2words  # optional (the eval extra)
    except ImportError:
        raise LangmergeError("built-in number-word tasks need num2words: pip install num2words") from None
    return num2words(n, lang=language)


def build_number_words(language: str) -> list[dict]:
    """'N =' -> N in words, for N drawn (seeded) from 1..100."""
    numbers = random.Random("number_words").sample(range(1, 101), N_EXAMPLES)
    return [{"question": f"{n} =", "number": n, "answer": number_words(n, language)} for n in numbers]


def _sums() -> list[tuple[int, int]]:
    rng = random.Random("arith_words")
    return [(rng.randint(1, 40), rng.randint(1, 40)) for _ in range(N_EXAMPLES)]


def build_arith_words(language: str) -> list[dict]:
    """'a + b =' -> the sum in words."""
    return [{"question": f"{a} + {b} =", "answer": number_words(a + b, language)} for a, b in _sums()]


def build_arith_words_mc(language: str) -> list[dict]:
    """'a + b =' with four number-word choices: the sum and three near misses (order seeded)."""
    docs = []
    rng = random.Random("arith_words_mc")
    for a, b in _sums():
        total = a + b
        values = [total, total + 1, total - 1, total + 10]
        rng.shuffle(values)
        docs.append(
            {
                "question": f"{a} + {b} =",
                "choices": [number_words(v, language) for v in values],
                "answer_index": values.index(total),
            }
        )
    return docs
