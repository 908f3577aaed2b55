"""Batched model scoring: log-likelihood of continuations, greedy generation, text NLL.

Batches are left-padded so that every row ends at the last position; the
model is then asked only for the logits of the last K positions (K = the
longest continuation in the batch), which keeps the output layer's cost small
for large vocabularies. Requests are sorted by length so that padding is small.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from langmerge.errors import LangmergeError

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class TokenPair:
    context: tuple[int, ...]  # at least one token
    continuation: tuple[int, ...]  # at least one token


def prefix_token_id(tokenizer) -> int:
    """The token that conditions text with no context: BOS, else EOS (as lm-eval does)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise LangmergeError("the tokenizer has neither a BOS nor an EOS token to start text with")


def encode_pair(tokenizer, context: str, continuation: str, add_special_tokens: bool = True) -> TokenPair:
    """Tokens of context and continuation, split the way lm-eval splits them.

    Trailing spaces of the context move to the continuation; the pair is encoded
    whole and the context's tokens are cut off the front, so the continuation is
    tokenized as it would be in running text.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        ctx = [prefix_token_id(tokenizer)]
        cont = tokenizer.encode(continuation, add_special_tokens=False)
    else:
        whole = tokenizer.encode(context + continuation, add_special_tokens=add_special_tokens)
        ctx = tokenizer.encode(context, add_special_tokens=add_special_tokens)
        cont = whole[len(ctx) :]
    if not cont:
        raise LangmergeError(f"continuation {continuation!r} encodes to no tokens")
    return TokenPair(tuple(ctx), tuple(cont))


def model_max_length(model, override: int | None = None) -> int:
    if override:
        return override
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, 4096)
    return 2048


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer))


@torch.inference_mode()
def loglikelihoods(
    model,
    tokenizer,
    pairs: Sequence[TokenPair],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: ProgressFn | None = None,
) -> list[float]:
    """Sum of log-probabilities (nats) of each continuation given its context.

    A sequence longer than ``max_length + 1`` tokens loses tokens from the left
    of its context, as in lm-eval. Requests that continue the same input by one
    token each (the letters or labels of a multiple-choice question) share one
    forward pass.
    """
    max_len = model_max_length(model, max_length)
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    use_keep = _accepts_logits_to_keep(model)
    # One forward job per distinct input: (input ids, [(request index, continuation ids)]).
    jobs: list[tuple[tuple[int, ...], list[tuple[int, tuple[int, ...]]]]] = []
    single: dict[tuple[int, ...], int] = {}
    for i, p in enumerate(pairs):
        if len(p.continuation) > max_len:
            raise LangmergeError(f"a continuation of {len(p.continuation)} tokens exceeds the model's {max_len}")
        seq = (p.context + p.continuation)[-(max_len + 1) :]
        inputs = seq[:-1]
        if len(p.continuation) == 1:
            if inputs in single:
                jobs[single[inputs]][1].append((i, p.continuation))
                continue
            single[inputs] = len(jobs)
        jobs.append((inputs, [(i, p.continuation)]))
    # Longest first: the first batch shows at once whether memory suffices.
    order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][0]))
    results = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = _left_pad([jobs[j][0] for j in batch], pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(cont) for j in batch for _, cont in jobs[j][1])
        kwargs = {"logits_to_keep": keep} if use_keep else {}
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs).logits[:, -keep:, :]
        done = 0
        for row, j in enumerate(batch):
            for i, cont_ids in jobs[j][1]:
                cont = torch.tensor(cont_ids, dtype=torch.long, device=device)
                row_logits = logits[row, keep - len(cont) :, :].float()
                logprobs = torch.log_softmax(row_logits, dim=-1)
                results[i] = float(logprobs.gather(-1, cont[:, None]).sum())
                done += 1
        if progress:
            progress(done)
    return results


def text_windows(tokenizer, text: str, max_length: int) -> list[TokenPair]:
    """Disjoint windows covering all tokens of ``text``, each predicted from the token before it.

    The first window is conditioned on the prefix token (BOS, else EOS); as in
    lm-eval's rolling log-likelihood, no context crosses a window boundary
    except that one token.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise LangmergeError(f"text {text[:40]!r} encodes to no tokens")
    prev = prefix_token_id(tokenizer)
    windows = []
    for start in range(0, len(ids), max_length):
        chunk = tuple(ids[start : start + max_length])
        windows.append(TokenPair((prev,), chunk))
        prev = chunk[-1]
    return windows


def texts_nll(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: ProgressFn | None = None,
) -> list[float]:
    """Negative log-likelihood (nats) of each whole text."""
    max_len = model_max_length(model, max_length)
    owners, pairs = [], []
    for i, text in enumerate(texts):
        for w in text_windows(tokenizer, text, max_len):
            owners.append(i)
            pairs.append(w)
    per_window = (lambda n: progress(n * len(texts) / len(pairs))) if progress else None
    lls = loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, max_length=max_len, progress=per_window)
    totals = [0.0] * len(texts)
    for i, ll in zip(owners, lls, strict=True):
        totals[i] -= ll
    return totals


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        if s and (pos := text.find(s)) != -1:
            cut = min(cut, pos)
    return text[:cut]


@torch.inference_mode()
def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 16,
    add_special_tokens: bool = True,
    max_length: int | None = None,
    progress: ProgressFn | None = None,
) -> list[str]:
    """Greedy continuations of each prompt, cut at the first stop string."""
    max_len = model_max_length(model, max_length)
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    encoded = []
    for p in prompts:
        ids = tokenizer.encode(p, add_special_tokens=add_special_tokens) or [prefix_token_id(tokenizer)]
        encoded.append(ids[-max(1, max_len - max_new_tokens) :])
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs = [""] * len(prompts)
    eos = tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = _left_pad([encoded[i] for i in batch], pad_id, device)
        gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        if eos is not None:
            gen_kwargs["eos_token_id"] = eos
        stops = [s for s in stop if s]
        if stops:
            gen_kwargs.update(stop_strings=stops, tokenizer=tokenizer)
        out = model.generate(input_ids=ids, attention_mask=mask, temperature=None, top_p=None, top_k=None, **gen_kwargs)
        new = out[:, ids.shape[1] :]
        for row, i in enumerate(batch):
            text = tokenizer.decode(new[row], skip_special_tokens=True)
            outputs[i] = cut_at_stop(text, stop)
        if progress:
            progress(len(batch))
    return outputs
