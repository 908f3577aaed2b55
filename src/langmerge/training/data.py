"""Training data as plain arrays: packed CT sequences and masked SFT examples.

Token accounting (the definition the whole package uses): a *token* is one id
fed to the model as input; padding is never counted. Documents are tokenized
without the tokenizer's own special tokens, and each document becomes
``[bos] + ids + [eos]`` (bos/eos only where the tokenizer has them), so those
separators count as tokens of the document's source. A CT budget of N tokens
means exactly N target-language input tokens; replay (English) text adds
``floor(N * replay / target)`` more tokens at a ``target:replay`` ratio, and
the total is the sum of both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from langmerge.errors import LangmergeError
from langmerge.input_files import json_object_lines

IGNORE_INDEX = -100
TARGET, REPLAY = 0, 1
_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_token_count(text: str) -> int:
    """Token counts in 1M / 500k / 2.5M / 1e6 / 1000000 notation (decimal units)."""
    t = str(text).strip().lower().replace("_", "").replace(",", "")
    factor = 1
    if t and t[-1] in _SUFFIXES:
        factor, t = _SUFFIXES[t[-1]], t[:-1]
    try:
        value = Decimal(t) * factor  # Decimal: '1.001k' is exactly 1001, not 1000.999...
    except InvalidOperation:
        raise LangmergeError(f"not a token count: {text!r} (try 1M, 500k, 2.5M or 1000000)") from None
    if not value.is_finite() or value <= 0 or value != int(value):
        raise LangmergeError(f"not a positive whole token count: {text!r}")
    return int(value)


def format_token_count(n: int) -> str:
    """The short name of a budget, as used in folder names: 1000000 -> '1M', 2500000 -> '2.5M'."""
    for suffix, factor in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= factor and (n * 1000) % factor == 0:
            return f"{n / factor:g}{suffix}"
    return str(n)


def parse_ratio(text: str) -> tuple[int, int]:
    """'4:1' -> (4, 1): parts of target-language text to parts of replay text."""
    parts = str(text).split(":")
    try:
        target, replay = (int(p) for p in parts)
    except ValueError:
        raise LangmergeError(f"not a ratio: {text!r} (write TARGET:REPLAY, e.g. 4:1)") from None
    if target <= 0 or replay < 0:
        raise LangmergeError(f"ratio {text!r}: the target part must be > 0 and the replay part >= 0")
    return target, replay


# ----------------------------------------------------------------------------- raw text


def read_documents(path: str | Path) -> list[str]:
    """Documents of one text file: one per non-empty line (``.txt``), or the ``text`` field of each JSONL line."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LangmergeError(f"{path}: unreadable text file ({exc})") from exc
    docs: list[str] = []
    if path.suffix == ".jsonl":
        for lineno, record in json_object_lines(raw.splitlines(), path):
            text = record.get("text")
            if not isinstance(text, str):
                raise LangmergeError(f"{path}:{lineno}: no string field 'text'")
            if text.strip():
                docs.append(text)
    else:
        docs = [line for line in raw.splitlines() if line.strip()]
    if not docs:
        raise LangmergeError(f"{path}: no text (the file is empty or blank)")
    return docs


def tokenize_documents(tokenizer, docs: list[str]) -> np.ndarray:
    """One stream of ids: each document as ``[bos] + ids + [eos]``."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    pieces = [([bos] if bos is not None else []) + ids + ([eos] if eos is not None else []) for ids in encoded]
    return np.fromiter((i for p in pieces for i in p), dtype=np.int64)


def token_stream(tokenizer, paths: list[str | Path]) -> np.ndarray:
    """The concatenated token stream of several text files, in the order given."""
    if not paths:
        raise LangmergeError("no text files given")
    streams = [tokenize_documents(tokenizer, read_documents(p)) for p in paths]
    return np.concatenate(streams)


# ----------------------------------------------------------------------------- CT plan


@dataclass
class SequencePlan:
    """Every sequence of a run, in training order, as index ranges into token streams.

    Sequence ``j`` is ``streams[source[j]]`` positions ``start[j] .. start[j] + length[j]``
    (modulo the stream's length when repetition was asked for). ``step_bounds[s]`` to
    ``step_bounds[s + 1]`` are the sequences of optimizer step ``s``; ``save_steps`` maps a
    budget name (e.g. ``tokens-1M``) to the number of steps after which it is complete.
    """

    streams: list[np.ndarray]
    source: np.ndarray
    start: np.ndarray
    length: np.ndarray
    step_bounds: np.ndarray
    save_steps: dict[str, int] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.step_bounds) - 1

    def tokens(self, source: int | None = None, upto_step: int | None = None) -> int:
        end = self.step_bounds[self.steps if upto_step is None else upto_step]
        lengths, sources = self.length[:end], self.source[:end]
        return int(lengths.sum() if source is None else lengths[sources == source].sum())

    def sequence(self, j: int) -> np.ndarray:
        stream = self.streams[self.source[j]]
        idx = (self.start[j] + np.arange(self.length[j])) % len(stream)
        return stream[idx]


def _check_budget(stream: np.ndarray, needed: int, what: str, files: list, repeat: bool) -> None:
    if needed > len(stream) and not repeat:
        names = ", ".join(str(f) for f in files)
        raise LangmergeError(
            f"the {what} budget of {needed:,} tokens is larger than the data: {names} hold {len(stream):,} tokens "
            f"({needed / len(stream):.2f}x); lower the budget or pass --repeat to cycle through the text"
        )


def _chunks(begin: int, end: int, seq_len: int) -> list[tuple[int, int]]:
    """Split stream positions [begin, end) into sequences of ``seq_len``, the last one partial."""
    return [(s, min(seq_len, end - s)) for s in range(begin, end, seq_len)]


def plan_ct(
    target: np.ndarray,
    budgets: list[int],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    replay: np.ndarray | None = None,
    ratio: tuple[int, int] = (4, 1),
    repeat: bool = False,
    target_files: list | None = None,
    replay_files: list | None = None,
) -> SequencePlan:
    """Pack target (and replay) text into sequences so that every budget is hit exactly.

    ``budgets`` are target-token counts, ascending; the last is the run's total. Between
    two budgets the segment's target tokens and ``floor(b * replay / target)`` replay
    tokens (cumulative) are packed into ``seq_len`` sequences (the last of each source
    partial), shuffled together with a generator seeded by ``seed`` and the segment, and
    grouped into optimizer steps of ``batch_size`` sequences (the last one partial), so a
    checkpoint after a segment has seen exactly the budget.
    """
    if seq_len < 2:
        raise LangmergeError(f"sequence length {seq_len} is too short (at least 2)")
    if batch_size < 1:
        raise LangmergeError(f"batch size {batch_size} must be at least 1")
    budgets = sorted(set(budgets))
    t_parts, r_parts = ratio
    replay_total = budgets[-1] * r_parts // t_parts if replay is not None else 0
    _check_budget(target, budgets[-1], "target-language", target_files or ["the target text"], repeat)
    if replay is not None:
        _check_budget(replay, replay_total, "replay", replay_files or ["the replay text"], repeat)
    streams = [target] + ([replay] if replay is not None else [])
    source, start, length, bounds, save_steps = [], [], [], [0], {}
    prev_t = prev_r = 0
    for k, budget in enumerate(budgets):
        r_upto = budget * r_parts // t_parts if replay is not None else 0
        seqs = [(TARGET, s, n) for s, n in _chunks(prev_t, budget, seq_len)]
        seqs += [(REPLAY, s, n) for s, n in _chunks(prev_r, r_upto, seq_len)]
        order = np.random.default_rng([seed, k]).permutation(len(seqs))
        for i in order:
            kind, offset, size = seqs[i]
            source.append(kind)
            start.append(offset)
            length.append(size)
        segment_end = len(source)
        bounds.extend(range(bounds[-1] + batch_size, segment_end, batch_size))
        bounds.append(segment_end)
        save_steps[f"tokens-{format_token_count(budget)}"] = len(bounds) - 1
        prev_t, prev_r = budget, r_upto
    return SequencePlan(
        streams=streams,
        source=np.asarray(source, dtype=np.int64),
        start=np.asarray(start, dtype=np.int64),
        length=np.asarray(length, dtype=np.int64),
        step_bounds=np.asarray(bounds, dtype=np.int64),
        save_steps=save_steps,
    )


# ----------------------------------------------------------------------------- SFT


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken (prompt, template text)


def read_sft_records(path: str | Path) -> list[list[dict]]:
    """Conversations of a JSONL file: ``{"prompt", "response"}`` or ``{"messages": [{"role", "content"}]}`` per line."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LangmergeError(f"{path}: unreadable JSONL file ({exc})") from exc
    conversations = []
    for lineno, record in json_object_lines(raw.splitlines(), path):
        if "messages" in record:
            messages = record["messages"]
            ok = (
                isinstance(messages, list)
                and messages
                and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages
                )
            )
            if not ok:
                raise LangmergeError(
                    f"{path}:{lineno}: 'messages' must be a non-empty list of {{role, content}} strings"
                )
            if not any(m["role"] == "assistant" for m in messages):
                raise LangmergeError(f"{path}:{lineno}: 'messages' has no assistant message to learn")
            conversations.append(messages)
        elif isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
            conversations.append(
                [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
            )
        else:
            raise LangmergeError(f"{path}:{lineno}: needs string fields 'prompt' and 'response', or 'messages'")
    if not conversations:
        raise LangmergeError(f"{path}: no examples (the file is empty or blank)")
    return conversations


def _template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def build_sft_example(tokenizer, messages: list[dict], where: str = "") -> SFTExample:
    """Token ids and labels with loss on assistant tokens only.

    With a chat template, assistant turn ``i`` spans from the end of
    ``template(messages[:i], add_generation_prompt=True)`` to the end of
    ``template(messages[:i + 1])``; everything else is masked. Without a template a
    conversation must be one prompt and one response, written as
    ``[bos] + prompt + response + [eos]`` with the loss on ``response + [eos]``.
    """
    if getattr(tokenizer, "chat_template", None):
        ids: list[int] = []
        labels: list[int] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = _template_ids(tokenizer, messages[:i], add_generation_prompt=True)
            through = _template_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if through[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
                raise LangmergeError(
                    f"{where}: the tokenizer's chat template does not render conversations prefix by prefix; "
                    "cannot tell prompt from response tokens"
                )
            labels += [IGNORE_INDEX] * (len(prefix) - len(ids)) + through[len(prefix) :]
            ids = through
        return SFTExample(ids, labels)
    if [m["role"] for m in messages] != ["user", "assistant"]:
        raise LangmergeError(f"{where}: multi-turn 'messages' need a tokenizer with a chat template")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = ([bos] if bos is not None else []) + tokenizer(messages[0]["content"], add_special_tokens=False)[
        "input_ids"
    ]
    response = tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"] + (
        [eos] if eos is not None else []
    )
    return SFTExample(prompt + response, [IGNORE_INDEX] * len(prompt) + response)


def build_sft_examples(tokenizer, path: str | Path, max_len: int) -> tuple[list[SFTExample], int]:
    """Examples of a JSONL file truncated to ``max_len``; returns them and how many were dropped
    because truncation left no response token to learn."""
    examples, dropped = [], 0
    for n, messages in enumerate(read_sft_records(path), 1):
        ex = build_sft_example(tokenizer, messages, where=f"{path} (example {n})")
        ids, labels = ex.input_ids[:max_len], ex.labels[:max_len]
        # The model predicts token t from tokens < t, so a label at position 0 teaches nothing.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        examples.append(SFTExample(ids, labels))
    if not examples:
        raise LangmergeError(f"{path}: no example keeps a response token within {max_len} tokens")
    return examples, dropped


# Examples are sorted by length within groups of this many steps (transformers' LengthGroupedSampler sorts
# within mega-batches of 50 batches): enough for the lengths to sort, few enough for the steps to stay mixed.
LENGTH_GROUP_STEPS = 50


def plan_sft_order(
    n_examples: int, epochs: int, batch_size: int, seed: int, *, lengths: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Example indices in training order (a fresh seeded shuffle per epoch) and the step bounds.

    With ``lengths`` (each example's token count: ``group_by_length``) each epoch's shuffle is cut
    into groups of ``LENGTH_GROUP_STEPS * batch_size`` examples, each group sorted by length
    (longest first, ties in shuffled order) and cut into steps, and the epoch's steps are shuffled
    again (seeded), so that a step's examples are padded little and long steps do not all come
    first. A step then never spans two epochs; every example is still seen once per epoch.
    """
    if epochs < 1:
        raise LangmergeError(f"epochs must be at least 1, got {epochs}")
    shuffles = [np.random.default_rng([seed, e]).permutation(n_examples) for e in range(epochs)]
    if lengths is None:
        order = np.concatenate(shuffles)
        bounds = np.asarray(list(range(0, len(order), batch_size)) + [len(order)], dtype=np.int64)
        return order, bounds
    sizes = np.asarray(lengths, dtype=np.int64)
    if sizes.shape != (n_examples,):
        raise LangmergeError(f"{len(sizes)} example lengths given for {n_examples} examples")
    group = LENGTH_GROUP_STEPS * batch_size
    steps: list[np.ndarray] = []
    for e, perm in enumerate(shuffles):
        grouped = np.concatenate(
            [
                chunk[np.argsort(-sizes[chunk], kind="stable")]
                for chunk in np.split(perm, list(range(group, n_examples, group)))
            ]
        )
        epoch_steps = [grouped[i : i + batch_size] for i in range(0, n_examples, batch_size)]
        steps += [epoch_steps[i] for i in np.random.default_rng([seed, e, 1]).permutation(len(epoch_steps))]
    order = np.concatenate(steps).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum([len(s) for s in steps])]).astype(np.int64)
    return order, bounds
