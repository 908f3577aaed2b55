"""Metrics: accuracy, length-normalised accuracy, exact match, chrF, language share, bits per character."""

from __future__ import annotations

import math
from collections.abc import Sequence

from langmerge.errors import LangmergeError

# The metric that stands for a task of each kind (tuning's "auto" objective, study scores, summaries).
MAIN_METRIC = {"multiple_choice": "acc", "generation": "exact_match", "bits_per_char": "bpc"}


def argmax(values: Sequence[float]) -> int:
    # First maximum, as numpy.argmax does (lm-eval uses it).
    return max(range(len(values)), key=lambda i: (values[i], -i))


def accuracy(loglikelihoods: Sequence[Sequence[float]], golds: Sequence[int]) -> float:
    """Share of examples whose correct choice has the highest log-likelihood."""
    return sum(argmax(ll) == g for ll, g in zip(loglikelihoods, golds, strict=True)) / len(golds)


def accuracy_norm(
    loglikelihoods: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], golds: Sequence[int]
) -> float:
    """Accuracy on log-likelihood divided by the choice's length in characters (lm-eval's acc_norm)."""
    hits = 0
    for ll, ch, g in zip(loglikelihoods, choices, golds, strict=True):
        normed = [value / max(len(c), 1) for value, c in zip(ll, ch, strict=True)]
        hits += argmax(normed) == g
    return hits / len(golds)


def normalize_answer(text: str) -> str:
    """Whitespace-collapsed, stripped text: the form exact match compares."""
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    pairs = list(zip(predictions, references, strict=True))
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in pairs) / len(pairs)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu's defaults: character 6-grams, beta 2), 0..100."""
    try:
        import sacrebleu  # optional (the eval extra)
    except ImportError:
        raise LangmergeError("chrF needs sacrebleu: pip install 'langmerge[eval]' (or pip install sacrebleu)") from None
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def language_id_labels() -> set[str]:
    """The labels py3langid can give."""
    try:
        from py3langid.langid import _get_identifier  # optional (the eval extra); loads its model
    except ImportError:
        raise LangmergeError("the language check needs py3langid: pip install py3langid") from None
    return set(_get_identifier().nb_classes)


def identify_language(text: str) -> str | None:
    """py3langid's label for the text; None for text with no letters to judge."""
    import py3langid  # optional (the eval extra); loads its model

    if not any(ch.isalpha() for ch in text):
        return None
    label, _ = py3langid.classify(text)
    return label


def language_share(predictions: Sequence[str], accepted_labels: Sequence[str]) -> float:
    """Share of predictions identified as one of the accepted labels (empty answers count as misses)."""
    return accepted_share([identify_language(p) for p in predictions], accepted_labels)


def accepted_share(languages: Sequence[str | None], accepted_labels: Sequence[str]) -> float:
    """Share of already identified languages (``identify_language``'s labels) that are accepted."""
    if not accepted_labels:
        raise LangmergeError("language share needs the target language's labels")
    return sum(lang in accepted_labels for lang in languages) / len(languages)


def bits_per_character(total_nll_nats: float, n_characters: int) -> float:
    """Total negative log-likelihood in bits divided by the number of characters."""
    return total_nll_nats / math.log(2) / n_characters
