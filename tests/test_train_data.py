"""Pure data functions: budgets, packing with exact token accounting, SFT masks, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from langmerge.errors import LangmergeError
from langmerge.synthetic import char_tokenizer
from langmerge.training.data import (
    IGNORE_INDEX,
    LENGTH_GROUP_STEPS,
    REPLAY,
    TARGET,
    build_sft_example,
    build_sft_examples,
    format_token_count,
    parse_token_count,
    plan_ct,
    plan_sft_order,
    read_documents,
    read_sft_records,
    token_stream,
)
from langmerge.training.schedule import cosine_lr, warmup_steps_for


@pytest.mark.parametrize(
    "text,value",
    [
        ("1M", 10**6),
        ("500k", 500_000),
        ("2.5M", 2_500_000),
        ("1e6", 10**6),
        ("1000", 1000),
        ("1_000", 1000),
        ("3B", 3 * 10**9),
        ("1.001k", 1001),
    ],
)
def test_token_counts_parse(text, value):
    assert parse_token_count(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1M", "0", "1.5", "0.5k1", "nan", "inf"])
def test_bad_token_counts_are_refused(text):
    with pytest.raises(LangmergeError):
        parse_token_count(text)


def test_budget_names():
    assert [format_token_count(n) for n in (10**6, 2_500_000, 500_000, 1234, 3 * 10**9)] == [
        "1M",
        "2.5M",
        "500k",
        "1.234k",
        "3B",
    ]


def _covered(plan, source):
    """Stream positions of one source, sequence by sequence, in the order they are trained."""
    pos = [plan.start[j] + np.arange(plan.length[j]) for j in range(len(plan.source)) if plan.source[j] == source]
    return np.sort(np.concatenate(pos))


def test_packing_hits_every_budget_exactly():
    rng = np.random.default_rng(1)
    target, replay = rng.integers(4, 50, 5000), rng.integers(4, 50, 3000)
    budgets = [100, 250, 1013]
    plan = plan_ct(target, budgets, seq_len=16, batch_size=3, seed=7, replay=replay, ratio=(4, 1))
    assert set(plan.save_steps) == {"tokens-100", "tokens-250", "tokens-1.013k"}
    for budget, name in zip(budgets, ["tokens-100", "tokens-250", "tokens-1.013k"]):
        step = plan.save_steps[name]
        assert plan.tokens(TARGET, upto_step=step) == budget
        assert plan.tokens(REPLAY, upto_step=step) == budget // 4
    # Every target position 0..N-1 is trained exactly once, every replay position 0..N//4-1 too.
    assert np.array_equal(_covered(plan, TARGET), np.arange(1013))
    assert np.array_equal(_covered(plan, REPLAY), np.arange(1013 // 4))
    assert plan.length.max() == 16 and plan.length.min() >= 1
    assert np.all(np.diff(plan.step_bounds) <= 3)
    # The sequence contents are the stream's tokens.
    j = int(np.flatnonzero(plan.source == REPLAY)[0])
    assert np.array_equal(plan.sequence(j), replay[plan.start[j] : plan.start[j] + plan.length[j]])


def test_packing_order_depends_on_seed_only():
    stream = np.arange(400)
    a = plan_ct(stream, [300], seq_len=10, batch_size=4, seed=3)
    b = plan_ct(stream, [300], seq_len=10, batch_size=4, seed=3)
    c = plan_ct(stream, [300], seq_len=10, batch_size=4, seed=4)
    assert np.array_equal(a.start, b.start) and not np.array_equal(a.start, c.start)


def test_budget_larger_than_data_says_how_much_there_is():
    with pytest.raises(LangmergeError, match=r"1,000 tokens is larger than the data: ta.txt hold 400 tokens.*--repeat"):
        plan_ct(np.arange(400), [1000], seq_len=10, batch_size=4, seed=0, target_files=["ta.txt"])
    plan = plan_ct(np.arange(400), [1000], seq_len=10, batch_size=4, seed=0, repeat=True)
    assert plan.tokens(TARGET) == 1000
    seqs = np.concatenate([plan.sequence(j) for j in np.argsort(plan.start)])
    assert np.array_equal(seqs, np.arange(1000) % 400)


def test_replay_budget_larger_than_replay_data():
    with pytest.raises(LangmergeError, match="replay budget of 250 tokens"):
        plan_ct(np.arange(2000), [1000], seq_len=10, batch_size=4, seed=0, replay=np.arange(100))


def test_documents_get_bos_and_eos(tmp_path):
    tok = char_tokenizer()
    path = tmp_path / "t.txt"
    path.write_text("ab\n\nதம\n", encoding="utf-8")
    ids = token_stream(tok, [path])
    expected = [
        tok.bos_token_id,
        *tok.convert_tokens_to_ids(["a", "b"]),
        tok.eos_token_id,
        tok.bos_token_id,
        *tok.convert_tokens_to_ids(["த", "ம"]),
        tok.eos_token_id,
    ]
    assert ids.tolist() == expected


def test_bad_text_files(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(LangmergeError, match="empty.txt: no text"):
        read_documents(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LangmergeError, match="bin.txt: unreadable"):
        read_documents(tmp_path / "bin.txt")
    with pytest.raises(LangmergeError, match="missing.txt: unreadable"):
        read_documents(tmp_path / "missing.txt")
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(LangmergeError, match=r"d.jsonl:2: no string field 'text'"):
        read_documents(tmp_path / "d.jsonl")


def test_sft_mask_without_template_token_by_token():
    tok = char_tokenizer()
    assert not tok.chat_template
    ex = build_sft_example(tok, [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "ok"}])
    ids = lambda s: tok.convert_tokens_to_ids(list(s))  # noqa: E731 - one character per token
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert ex.input_ids == [bos, *ids("Hi?"), *ids("ok"), eos]
    assert ex.labels == [IGNORE_INDEX] * 4 + [*ids("ok"), eos]


TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_sft_mask_with_chat_template_token_by_token():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "D"},
    ]
    ex = build_sft_example(tok, messages)
    text = "<user>a\n<assistant>B\n<user>c\n<assistant>D\n"
    assert ex.input_ids == tok.convert_tokens_to_ids(list(text))
    # Learned: each assistant reply and the newline that ends it; everything else masked.
    learned = {text.index("B\n"), text.index("B\n") + 1, text.index("D\n"), text.index("D\n") + 1}
    for pos, (token, label) in enumerate(zip(ex.input_ids, ex.labels)):
        assert label == (token if pos in learned else IGNORE_INDEX), (pos, text[pos])


def test_template_that_is_not_prefix_stable_is_refused():
    tok = char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    with pytest.raises(LangmergeError, match="prefix by prefix"):
        build_sft_example(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], where="x")


def test_sft_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(LangmergeError, match=r"sft.jsonl:3: needs string fields 'prompt' and 'response'"):
        read_sft_records(path)
    path.write_text("{not json\n")
    with pytest.raises(LangmergeError, match=r"sft.jsonl:1: not valid JSON"):
        read_sft_records(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    with pytest.raises(LangmergeError, match=r"sft.jsonl:1: 'messages' has no assistant"):
        read_sft_records(path)
    path.write_text("")
    with pytest.raises(LangmergeError, match="no examples"):
        read_sft_records(path)


def test_sft_truncation_drops_examples_without_a_response(tmp_path):
    tok = char_tokenizer()
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": "x" * 20, "response": "y"}, {"prompt": "ab", "response": "cdefgh"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, dropped = build_sft_examples(tok, path, max_len=8)
    assert dropped == 1 and len(examples) == 1 and len(examples[0].input_ids) == 8


def test_cosine_schedule_against_the_formula():
    total, warm, peak, floor = 10, 2, 1.0, 0.1
    lrs = [cosine_lr(s, total, peak, warm, floor) for s in range(total)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    # Mid-decay: progress (5-2)/7, cos formula by hand.
    assert lrs[5] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 3 / 7)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert warmup_steps_for(100, 0.05) == 5 and warmup_steps_for(100, 7) == 7 and warmup_steps_for(1, 0.5) == 0


def _padding(order, bounds, lengths):
    """Padded positions of a plan: per step, batch rows times the longest example, less the example tokens."""
    total = 0
    for s in range(len(bounds) - 1):
        step = lengths[order[bounds[s] : bounds[s + 1]]]
        total += len(step) * int(step.max()) - int(step.sum())
    return total


def test_sft_order_without_grouping_is_a_seeded_shuffle_per_epoch():
    order, bounds = plan_sft_order(10, 2, 4, seed=3)
    expected = np.concatenate([np.random.default_rng([3, e]).permutation(10) for e in range(2)])
    assert order.tolist() == expected.tolist()
    assert bounds.tolist() == [0, 4, 8, 12, 16, 20]  # steps run across the epoch boundary, as they always did


def test_length_grouping_reaches_the_least_padding_on_a_hand_built_case():
    """Lengths 1..16 in batches of 4, one group: sorted, the steps are 16-13, 12-9, 8-5 and 4-1, each padded by
    4 * max - sum = 6 positions (24 in all), the least any split into steps of 4 can have."""
    lengths = np.arange(1, 17)
    order, bounds = plan_sft_order(16, 1, 4, seed=0, lengths=lengths)
    steps = [sorted(lengths[order[bounds[s] : bounds[s + 1]]].tolist()) for s in range(len(bounds) - 1)]
    assert sorted(steps) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    assert _padding(order, bounds, lengths) == 24
    plain_order, plain_bounds = plan_sft_order(16, 1, 4, seed=0)
    assert _padding(plain_order, plain_bounds, lengths) > 24


def test_length_grouping_is_deterministic_and_sees_every_example_once_per_epoch():
    rng = np.random.default_rng(7)
    n, batch, epochs = 2 * LENGTH_GROUP_STEPS * 4 + 37, 4, 3  # two full groups and a partial one
    lengths = rng.choice([12, 90], size=n) + rng.integers(0, 5, size=n)  # calendar-like and Bible-like examples
    order, bounds = plan_sft_order(n, epochs, batch, seed=5, lengths=lengths)
    again, again_bounds = plan_sft_order(n, epochs, batch, seed=5, lengths=lengths)
    assert order.tolist() == again.tolist() and bounds.tolist() == again_bounds.tolist()
    other, _ = plan_sft_order(n, epochs, batch, seed=6, lengths=lengths)
    assert other.tolist() != order.tolist()
    sizes = np.diff(bounds)
    per_epoch = -(-n // batch)
    assert len(sizes) == epochs * per_epoch and sizes.sum() == epochs * n
    for e in range(epochs):  # a step never spans two epochs, and each epoch holds every example once
        epoch_steps = range(e * per_epoch, (e + 1) * per_epoch)
        seen = np.concatenate([order[bounds[s] : bounds[s + 1]] for s in epoch_steps])
        assert sorted(seen.tolist()) == list(range(n))
        assert sorted(sizes[list(epoch_steps)].tolist()) == [n % batch] + [batch] * (per_epoch - 1)
    plain_order, plain_bounds = plan_sft_order(n, epochs, batch, seed=5)
    assert _padding(order, bounds, lengths) < _padding(plain_order, plain_bounds, lengths) / 5
    # The steps are shuffled after grouping: long and short steps alternate rather than come in sorted runs.
    longest = [int(lengths[order[bounds[s] : bounds[s + 1]]].max()) for s in range(per_epoch)]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)


def test_length_grouping_needs_one_length_per_example():
    with pytest.raises(LangmergeError, match="3 example lengths given for 4 examples"):
        plan_sft_order(4, 1, 2, seed=0, lengths=[1, 2, 3])
