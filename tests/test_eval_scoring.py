"""The batched, padded scorer against direct unbatched computations."""

import math

import pytest
import torch

from eval_helpers import direct_loglikelihood
from langmerge.evaluation import scoring
from langmerge.evaluation.scoring import (
    cut_at_stop,
    encode_pair,
    generate_greedy,
    loglikelihoods,
    text_windows,
    texts_nll,
)

PAIRS = [
    ("hello world", " foo"),
    ("a", " bcdefgh"),
    ("திங்கள், செவ்வாய்,", " புதன்"),
    ("x", "y"),
    ("a much longer context string here", " end"),
    ("Q: 1 2 3\nA:", " 4"),
]


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_batched_loglikelihood_matches_direct_forward(tiny_model, batch_size):
    model, tok = tiny_model
    pairs = [encode_pair(tok, c, x) for c, x in PAIRS]
    got = loglikelihoods(model, tok, pairs, batch_size=batch_size)
    want = [direct_loglikelihood(model, list(p.context), list(p.continuation)) for p in pairs]
    assert got == pytest.approx(want, abs=1e-4)


def test_one_token_continuations_of_one_context_share_a_forward_pass(tiny_model):
    """Lettered choices: one forward per context, the same log-likelihoods as scoring each pair alone."""
    model, tok = tiny_model
    contexts = ["Verse: a b c ...\nA. x\nB. y\nAnswer:", "Q: 1 2\nAnswer:", "short"]
    pairs = [encode_pair(tok, c, letter) for c in contexts for letter in "ABCD"]
    pairs += [encode_pair(tok, "Q: 1 2\nAnswer:", " two tokens")]  # a longer continuation of a shared context
    assert all(len(p.continuation) == 1 for p in pairs[:-1]) and len(pairs[-1].continuation) > 1
    calls = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        got = loglikelihoods(model, tok, pairs, batch_size=64)
    finally:
        hook.remove()
    assert calls == [len(contexts) + 1]  # three shared contexts and the long pair, not 13 rows
    want = [direct_loglikelihood(model, list(p.context), list(p.continuation)) for p in pairs]
    assert got == pytest.approx(want, abs=1e-4)


def test_full_logits_path_matches(tiny_model, monkeypatch):
    """Models without ``logits_to_keep`` are scored from full logits, to the same values."""
    model, tok = tiny_model
    pairs = [encode_pair(tok, c, x) for c, x in PAIRS]
    keep = loglikelihoods(model, tok, pairs, batch_size=8)
    monkeypatch.setattr(scoring, "_accepts_logits_to_keep", lambda m: False)
    assert loglikelihoods(model, tok, pairs, batch_size=8) == pytest.approx(keep, abs=1e-5)


def test_encode_pair_moves_trailing_space_to_continuation(tiny_model):
    _, tok = tiny_model
    p = encode_pair(tok, "ab ", "c")
    assert tok.decode(list(p.context)) == "ab" and tok.decode(list(p.continuation)) == " c"


def test_left_truncation_keeps_the_continuation(tiny_model):
    model, tok = tiny_model
    pair = encode_pair(tok, "0123456789abcdef", "XYZ")
    got = loglikelihoods(model, tok, [pair], max_length=8)[0]
    seq = list(pair.context + pair.continuation)[-9:]
    assert got == pytest.approx(direct_loglikelihood(model, seq[:-3], seq[-3:]), abs=1e-4)


def test_bits_per_character_by_hand(tiny_model):
    model, tok = tiny_model
    text = "வணக்கம் world"
    ids = tok.encode(text, add_special_tokens=False)
    nll = -direct_loglikelihood(model, [tok.bos_token_id], ids)
    got = texts_nll(model, tok, [text])[0]
    assert got == pytest.approx(nll, abs=1e-4)
    assert got / math.log(2) / len(text) > 0


def test_long_text_is_scored_in_windows(tiny_model):
    model, tok = tiny_model
    text = "abcdefghijklmnopqrstuvwxyz0123"  # 30 characters, windows of 8 tokens
    ids = tok.encode(text, add_special_tokens=False)
    want, prev = 0.0, tok.bos_token_id
    for start in range(0, len(ids), 8):
        chunk = ids[start : start + 8]
        want -= direct_loglikelihood(model, [prev], chunk)
        prev = chunk[-1]
    assert len(text_windows(tok, text, 8)) == 4
    assert texts_nll(model, tok, [text], max_length=8)[0] == pytest.approx(want, abs=1e-4)


def test_greedy_generation_matches_a_step_by_step_argmax(tiny_model):
    model, tok = tiny_model
    prompts = ["abc", "hello there, friend", "தமிழ்"]
    got = generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=3)
    for prompt, text in zip(prompts, got):
        ids = tok.encode(prompt)
        new = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        assert text == tok.decode(new, skip_special_tokens=True)


def test_cut_at_stop():
    assert cut_at_stop("abc, def\nx", [",", "\n"]) == "abc"
    assert cut_at_stop("abc", ["\n"]) == "abc"
