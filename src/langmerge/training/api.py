"""The Python API: ``train_ct`` and ``train_sft``, each returning a ``TrainResult``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from langmerge.errors import LangmergeError
from langmerge.io.files import check_folder_files
from langmerge.io.hub import hub_repository_folder, resolve_model
from langmerge.io.reader import pretrained_options, read_config
from langmerge.training.data import (
    REPLAY,
    TARGET,
    build_sft_examples,
    parse_token_count,
    plan_ct,
    plan_sft_order,
    token_stream,
)
from langmerge.training.loop import Item, Job, TrainResult, fingerprint, prepare_output, run
from langmerge.training.options import TrainOptions, sft_only_problem

log = logging.getLogger(__name__)


def _tokens(value: int | str) -> int:
    return parse_token_count(value) if isinstance(value, str) else int(value)


def load_tokenizer(base: Path):
    """The tokenizer of a model folder, checked by io/files.py's rule first; never runs code from the folder."""
    from transformers import AutoTokenizer  # transformers takes seconds to import: not at `langmerge --help`

    if read_config(base) is None:
        raise LangmergeError(f"{base}: not a model folder (no config.json)")
    check_folder_files(base)
    try:
        return AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LangmergeError(f"{base}: cannot load the tokenizer ({first})") from exc


def check_base(base: Path, seq_len: int, allow_pickle: bool) -> dict:
    """Check the base model folder before any work (config.json, its files, pickle-only weights, the sequence
    length); the ``from_pretrained`` options that load it."""
    config = read_config(base) if base.is_dir() else None
    if config is None:
        raise LangmergeError(f"{base}: not a model folder (no config.json)")
    pretrained = pretrained_options(base, allow_pickle=allow_pickle)
    limit = config.get("max_position_embeddings")
    if limit and seq_len > limit:
        raise LangmergeError(f"sequence length {seq_len} exceeds {base}'s max_position_embeddings ({limit})")
    return pretrained


def _options_fingerprint(options: TrainOptions) -> dict:
    return options.model_dump(mode="json", exclude={"checkpoint_every"})


def train_ct(
    base: str | Path,
    texts: Sequence[str | Path],
    tokens: int | str,
    out: str | Path,
    *,
    save_at: Sequence[int | str] = (),
    replay: Sequence[str | Path] = (),
    replay_ratio: tuple[int, int] = (4, 1),
    repeat: bool = False,
    options: TrainOptions = TrainOptions(),
    force: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Continual pre-training of ``base`` on exactly ``tokens`` target-language tokens.

    ``save_at`` budgets (target tokens, each <= ``tokens``) are written as ``OUT/tokens-<budget>/``.
    ``replay`` files are mixed in at ``replay_ratio`` (target parts : replay parts).
    """
    out = Path(out)
    problem = sft_only_problem(options)
    if problem:
        raise LangmergeError(f"{problem} (drop the option)")
    total = _tokens(tokens)
    budgets = sorted({_tokens(b) for b in save_at} | {total})
    if budgets[-1] > total:
        raise LangmergeError(f"--save-at budget {budgets[-1]:,} is larger than --tokens {total:,}")
    # fail before downloading or tokenizing anything (a Hub id's files stay in its cache repository)
    prepare_output(out, force, resume, [hub_repository_folder(str(base)) or base, *texts, *replay])
    source = resolve_model(base, allow_pickle=allow_pickle, progress=progress)
    base = source.folder
    pretrained = check_base(base, options.seq_len, allow_pickle)
    tokenizer = load_tokenizer(base)
    target = token_stream(tokenizer, list(texts))
    replay_stream = token_stream(tokenizer, list(replay)) if replay else None
    plan = plan_ct(
        target,
        budgets,
        seq_len=options.seq_len,
        batch_size=options.batch_size,
        seed=options.seed,
        replay=replay_stream,
        ratio=replay_ratio,
        repeat=repeat,
        target_files=list(texts),
        replay_files=list(replay),
    )

    def step_items(step: int) -> list[Item]:
        items = []
        for j in range(plan.step_bounds[step], plan.step_bounds[step + 1]):
            ids = plan.sequence(j)
            items.append(Item(ids, ids, int(plan.source[j])))
        return items

    metadata = {
        "text": [str(p) for p in texts],
        "text_tokens_available": int(len(target)),
        "replay": [str(p) for p in replay],
        "replay_tokens_available": int(len(replay_stream)) if replay_stream is not None else 0,
        "replay_ratio": f"{replay_ratio[0]}:{replay_ratio[1]}" if replay else None,
        "budget_target_tokens": total,
        "budget_replay_tokens": plan.tokens(REPLAY),
        "repeat": repeat,
    }
    job = Job(
        kind="ct",
        base=base,
        steps=plan.steps,
        step_items=step_items,
        save_steps=plan.save_steps,
        fingerprint=fingerprint(
            *plan.streams,
            plan.source,
            plan.start,
            plan.length,
            plan.step_bounds,
            _options_fingerprint(options),
            source.pinned,
        ),
        metadata=metadata,
        base_model=source,
        pretrained=pretrained,
    )
    log.info("CT plan: %d steps, %d target + %d replay tokens", plan.steps, plan.tokens(TARGET), plan.tokens(REPLAY))
    return run(job, out, options, tokenizer, force=force, resume=resume, stop_after=stop_after, progress=progress)


def train_sft(
    base: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    epochs: int = 1,
    options: TrainOptions = TrainOptions(),
    force: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Supervised fine-tuning of ``base`` on a JSONL of prompt/response pairs or chat messages.

    The loss is taken on response (assistant) tokens only; examples are truncated to
    ``options.seq_len``. The CT-then-SFT baseline is ``train_sft(ct_folder, ...)``.
    """
    out, data = Path(out), Path(data)
    prepare_output(
        out, force, resume, [hub_repository_folder(str(base)) or base, data]
    )  # fail before downloading anything
    source = resolve_model(base, allow_pickle=allow_pickle, progress=progress)
    base = source.folder
    pretrained = check_base(base, options.seq_len, allow_pickle)
    tokenizer = load_tokenizer(base)
    examples, dropped = build_sft_examples(tokenizer, data, options.seq_len)
    if dropped:
        log.warning("%s: %d examples dropped: no response token within %d tokens", data, dropped, options.seq_len)
    lengths = [len(ex.input_ids) for ex in examples] if options.group_by_length else None
    order, bounds = plan_sft_order(len(examples), epochs, options.batch_size, options.seed, lengths=lengths)

    def step_items(step: int) -> list[Item]:
        return [
            Item(np.asarray(examples[i].input_ids), np.asarray(examples[i].labels), TARGET)
            for i in order[bounds[step] : bounds[step + 1]]
        ]

    flat_ids = np.asarray([t for ex in examples for t in ex.input_ids + [-1] + ex.labels + [-2]], dtype=np.int64)
    metadata = {
        "data": str(data),
        "examples": len(examples),
        "examples_dropped_too_long": dropped,
        "epochs": epochs,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }
    job = Job(
        kind="sft",
        base=base,
        steps=len(bounds) - 1,
        step_items=step_items,
        save_steps={},
        fingerprint=fingerprint(flat_ids, order, bounds, _options_fingerprint(options), source.pinned),
        metadata=metadata,
        base_model=source,
        pretrained=pretrained,
    )
    return run(job, out, options, tokenizer, force=force, resume=resume, stop_after=stop_after, progress=progress)
