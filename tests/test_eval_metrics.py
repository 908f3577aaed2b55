"""Metrics on hand-computed cases and against direct library calls."""

import math

import pytest
import sacrebleu

from langmerge.evaluation import metrics

TAMIL = ["இன்று வானிலை மிகவும் நன்றாக இருக்கிறது", "நான் பள்ளிக்குச் செல்கிறேன்", "ஏழு"]
ENGLISH = ["The weather is very nice today", "I am going to school", "seven"]


def test_accuracy_and_length_normalised_accuracy():
    lls = [[-1.0, -2.0], [-6.0, -4.0], [-3.0, -3.0]]
    choices = [["a", "bb"], ["abcdef", "ab"], ["x", "y"]]
    golds = [0, 0, 0]
    assert metrics.accuracy(lls, golds) == pytest.approx(2 / 3)  # ties go to the first choice
    # normalised: [-1, -1] -> 0; [-1, -2] -> 0; [-3, -3] -> 0
    assert metrics.accuracy_norm(lls, choices, golds) == pytest.approx(1.0)


def test_exact_match_normalises_whitespace_only():
    assert metrics.exact_match(["  ஏழு ", "a  b", "Seven"], ["ஏழு", "a b", "seven"]) == pytest.approx(2 / 3)


def test_chrf_matches_sacrebleu_directly():
    hyps, refs = ["ஏழு", "இருபத்தி ஒன்று", "ten"], ["ஏழு", "இருபத்தொன்று", "eleven"]
    assert metrics.chrf(hyps, refs) == pytest.approx(sacrebleu.CHRF().corpus_score(hyps, [refs]).score)
    assert metrics.chrf(["abcdef"], ["abcdef"]) == pytest.approx(100.0)
    assert metrics.chrf(["xyz"], ["abc"]) == pytest.approx(0.0)


def test_language_share_tells_tamil_from_english():
    assert metrics.language_share(TAMIL, ["ta"]) == 1.0
    assert metrics.language_share(ENGLISH, ["ta"]) == 0.0
    assert metrics.language_share(TAMIL[:2] + ENGLISH[:2], ["ta"]) == 0.5
    assert metrics.language_share(["", "42"], ["ta"]) == 0.0  # nothing to judge is not Tamil


def test_tibetan_is_labelled_dz():
    assert metrics.identify_language("བོད་ཀྱི་སྐད་ཡིག་ནི་སྐད་ཡིག་གལ་ཆེན་ཞིག་རེད།") == "dz"


def test_bits_per_character():
    assert metrics.bits_per_character(10 * math.log(2), 5) == pytest.approx(2.0)
