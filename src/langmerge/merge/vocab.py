"""Vocabulary alignment, a step of the plan: which rows of which tensors follow the vocabulary, and how they merge.

The one place that knows which tensors are indexed by the vocabulary: a 2-D,
non-layer tensor whose name ends with one of ``INPUT_EMBEDDINGS`` /
``OUTPUT_EMBEDDINGS`` and whose first dimension is the model's embedding rows.

The output vocabulary follows ``tokenizer_source`` (mergekit's meaning):
``base`` (the base model's), ``union`` (the base's, then every other model's
tokens it lacks, appended in model order and id order) or a model reference
(that model's). Row ``j`` of each model's vocabulary tensors is re-indexed to
the output token with id ``j``; a row without a token (padding) lines up by
index. The plan merges the rows in groups by presence pattern (``row_groups``),
each group a tensor of its own read through ``io.tensor_source.GatheredRows``:

- base and every model have the token: the recipe's method, as for any tensor;
- base and only some models have it: the method over those models only (the
  others have no opinion on that token: ``params.restrict``);
- the base lacks it: the weighted average (recipe weights, renormalised) of the
  models that have it (``RowMean``), so a token only the CT model has keeps its
  CT row as is;
- without a base (linear): the method over the models that have it.

Without a tokenizer setting, differing vocabularies are an error. Tokenizer
files themselves are read and written by ``io.tokenizer``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from langmerge.errors import LangmergeError
from langmerge.io.metadata import copy_tokenizer
from langmerge.io.tensor_source import GatheredRows, TensorSource, into
from langmerge.io.tokenizer import (
    STALE_FOR_UNION,
    TokenizerOwner,
    UnionTokenizer,
    build_union_tokenizer,
    read_added_tokens,
    read_tokens,
)
from langmerge.merge.recipe import Recipe, layer_index, model_key
from langmerge.merge.tokenizer_block import token_rows
from langmerge.methods.base import Block, NonFiniteMerge, TensorMerge
from langmerge.methods.fused_cpu import all_finite

log = logging.getLogger(__name__)

INPUT_EMBEDDINGS = (
    "embed_tokens.weight",
    "wte.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
    "word_embeddings.weight",
    "shared.weight",
)
OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight", "output.weight")


def _candidates(source: TensorSource, suffixes: tuple[str, ...]) -> list[str]:
    return [n for n in source.names if n.endswith(suffixes) and layer_index(n) is None and len(source.shape(n)) == 2]


@dataclass
class ModelVocab:
    """What one model says about its vocabulary."""

    label: str
    rows: int | None  # rows of the input embedding
    tokens: dict[str, int] | None  # from tokenizer.json, added tokens included
    tokenizer_folder: Path
    input_name: str | None
    output_name: str | None
    config: dict[str, Any] = field(default_factory=dict)
    added: frozenset[str] = (
        frozenset()
    )  # tokenizer.json's added tokens (the others are the tokenizer model's vocabulary)

    @property
    def tied(self) -> bool:
        return self.input_name is not None and self.output_name is None

    @property
    def vocab_names(self) -> list[str]:
        return [n for n in (self.input_name, self.output_name) if n is not None]

    def aligned(self) -> tuple[dict[str, int], int]:
        """``(tokens, rows)`` of a model whose rows are aligned by token (``plan_vocabulary`` refuses a model
        without either first)."""
        assert self.tokens is not None and self.rows is not None
        return self.tokens, self.rows

    def size_text(self) -> str:
        toks = "no tokenizer.json" if self.tokens is None else f"{len(self.tokens)} tokens"
        return f"{self.label}: {toks}, {self.rows} embedding rows"


def describe_model(source: TensorSource) -> ModelVocab:
    inputs = _candidates(source, INPUT_EMBEDDINGS)
    input_name = inputs[0] if inputs else None
    config = source.config() or {}
    rows = (
        source.shape(input_name)[0]
        if input_name
        else (config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size"))
    )
    outputs = [n for n in _candidates(source, OUTPUT_EMBEDDINGS) if source.shape(n)[0] == rows and n != input_name]
    folder = source.tokenizer_folder
    return ModelVocab(
        source.label,
        rows,
        read_tokens(folder),
        folder,
        input_name,
        outputs[0] if outputs else None,
        config,
        read_added_tokens(folder),
    )


@dataclass
class VocabPlan:
    models: list[ModelVocab]  # base (when used) first, then the inputs
    tokenizer_source: str
    tokenizer_model: int | None  # index into models whose tokenizer is copied; None for a union
    out_tokens: dict[str, int] | None
    out_rows: int | None
    row_maps: list[
        torch.Tensor | None
    ]  # per model: its row for each output row (-1: it lacks the token); None: the same rows
    union: UnionTokenizer | None
    output_tied: bool
    aliases: dict[int, dict[str, str]]  # per model: output-layer name -> the tied input embedding that stands for it
    notes: list[str]
    # output row -> its own source (tokenizer block, padding): ("row", k, row), ("zero",) or ("mean",)
    sourced: dict[int, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def aligned_names(self) -> set[str]:
        if all(m is None for m in self.row_maps):
            return set()
        return {n for m in self.models for n in m.vocab_names}

    def is_aligned(self, name: str) -> bool:
        return name in self.aligned_names

    def output(self) -> tuple[dict[str, int], int]:
        """``(out_tokens, out_rows)`` where the vocabularies are aligned by token (both are set then)."""
        assert self.out_tokens is not None and self.out_rows is not None
        return self.out_tokens, self.out_rows

    def own_rows(self, index: int) -> torch.Tensor:
        """Model ``index``'s rows that hold an output token (padding rows' mean is taken over these)."""
        out_tokens, out_rows = self.output()
        row_map = self.row_maps[index]
        if row_map is None:
            rows = self.models[index].aligned()[1]
            return torch.tensor(sorted(j for j in out_tokens.values() if j < rows), dtype=torch.long)
        tokens = torch.zeros(out_rows, dtype=torch.bool)
        tokens[list(out_tokens.values())] = True
        return row_map[tokens & (row_map >= 0)]

    def view(self, index: int, source: TensorSource) -> TensorSource:
        """Model ``index``'s tensors under the names the output has: a tied model's input embedding also stands
        for the output layer the others have. Vocabulary rows keep the model's own order (``row_groups``)."""
        aliases = self.aliases.get(index, {})
        if not aliases:
            return source
        return GatheredRows(
            source, {**{n: (n, None) for n in source.names}, **{a: (t, None) for a, t in aliases.items()}}
        )

    def config_updates(self) -> dict[str, Any]:
        updates: dict[str, Any] = {}
        if self.out_rows is not None:
            updates["vocab_size"] = self.out_rows
        if self.models[0].input_name is not None:
            updates["tie_word_embeddings"] = self.output_tied
        if self.tokenizer_model is not None and self.tokenizer_model != 0:
            source_config = self.models[self.tokenizer_model].config
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if key in source_config:
                    updates[key] = source_config[key]
        return updates

    def write_tokenizer(self, out: Path) -> list[str]:
        if self.union is not None:
            return self.union.write(out)
        assert self.tokenizer_model is not None  # None: a union, written above
        return copy_tokenizer(self.models[self.tokenizer_model].tokenizer_folder, out)


@dataclass(frozen=True)
class RowGroup:
    """Output rows of a vocabulary tensor that the same models have (``present[k]``: model k, the base first)."""

    present: tuple[bool, ...]
    rows: torch.Tensor  # output row indices, ascending

    @property
    def key(self) -> str:
        """The pattern as DARE's seed sees it ("101": base and the second input)."""
        return "".join("1" if p else "0" for p in self.present)

    def model_rows(self, plan: VocabPlan, k: int) -> torch.Tensor:
        """Model k's row for each of the group's rows."""
        row_map = plan.row_maps[k]
        return self.rows if row_map is None else row_map[self.rows]


def row_groups(plan: VocabPlan) -> list[RowGroup]:
    """The output rows of the vocabulary tensors by presence pattern (which models have each row's token),
    without the rows that have a source of their own (``VocabPlan.sourced``)."""
    rows = plan.output()[1]
    presence = torch.stack([torch.ones(rows, dtype=torch.bool) if m is None else m >= 0 for m in plan.row_maps], dim=1)
    keep = torch.ones(rows, dtype=torch.bool)
    keep[list(plan.sourced)] = False
    patterns, inverse = torch.unique(presence.to(torch.int8), dim=0, return_inverse=True)
    groups = [
        RowGroup(tuple(bool(v) for v in pattern), torch.nonzero((inverse == k) & keep).reshape(-1))
        for k, pattern in enumerate(patterns.tolist())
    ]
    return [g for g in groups if g.rows.numel()]


def sourced_groups(plan: VocabPlan) -> list[tuple[tuple[Any, ...], torch.Tensor, torch.Tensor]]:
    """The rows with a source of their own, grouped by source kind: ``(("row", k), rows, model_rows)`` etc.
    Returns ``(key, rows, model_rows)`` with ``key`` ``("row", k)``, ``("zero",)`` or ``("mean",)``."""
    groups: dict[tuple[Any, ...], tuple[list[int], list[int]]] = {}
    for j, how in sorted(plan.sourced.items()):
        key = how[:2] if how[0] == "row" else how
        rows, model_rows = groups.setdefault(key, ([], []))
        rows.append(j)
        model_rows.append(how[2] if how[0] == "row" else 0)
    return [(key, torch.tensor(rows), torch.tensor(model_rows)) for key, (rows, model_rows) in groups.items()]


class MeanRows(TensorSource):
    """``count`` rows each equal to the mean of rows ``rows`` of ``name`` in ``inner`` (padding rows, as mergekit
    pads a vocabulary: every model's mean row). The mean is accumulated in float64 once, in pieces of rows."""

    PIECE_ROWS = 4096

    def __init__(self, inner: TensorSource, name: str, rows: torch.Tensor, count: int):
        self.inner, self.name, self.rows, self.count = inner, name, rows, count
        self.label, self.folder = inner.label, inner.folder
        self._mean: torch.Tensor | None = None
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [self.name]

    def shape(self, name: str) -> tuple[int, ...]:
        return (self.count, *self.inner.shape(name)[1:])

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(name)

    def read_dtype(self, name: str) -> torch.dtype:
        return self.inner.read_dtype(name)

    def _row_mean(self) -> torch.Tensor:
        with self._lock:
            if self._mean is None:
                total: torch.Tensor | None = None
                for a in range(0, int(self.rows.numel()), self.PIECE_ROWS):
                    piece = GatheredRows(self.inner, {self.name: (self.name, self.rows[a : a + self.PIECE_ROWS])}).get(
                        self.name
                    )
                    part = piece.to(torch.float64).sum(dim=0)
                    total = part if total is None else total + part
                assert total is not None  # a padding row's mean is over at least one row
                self._mean = (total / max(1, int(self.rows.numel()))).to(self.read_dtype(self.name))
            return self._mean

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        mean = self._row_mean()
        width = mean.numel()
        first, last = start // width, (stop - 1) // width + 1
        values = mean.reshape(1, -1).expand(last - first, width).reshape(-1)
        return into(out, values[start - first * width : stop - first * width])


class RowMean(TensorMerge):
    """Rows the base lacks: the weighted average of the models that have them, the weights renormalised
    (no weights: rows no model has, zero).

    Accumulated in float32 (float64 for float64) in model order, then cast to the compute dtype.
    """

    def __init__(self, weights: list[float]):
        self.weights = weights
        self.total = sum(weights)

    def merge(self, block: Block) -> torch.Tensor:
        first = block.inputs[0]
        if not self.weights:  # rows no model has (the input only gives the shape): zero, as mergekit fills them
            return torch.zeros_like(first)
        acc = torch.zeros_like(first, dtype=torch.float64 if first.dtype == torch.float64 else torch.float32)
        for x, w in zip(block.inputs, self.weights):
            acc.add_(x, alpha=w / self.total)
        out = acc.to(first.dtype)
        if not all_finite(out):
            raise NonFiniteMerge
        return out


def _model_position(recipe: Recipe, ref: str, has_base: bool) -> int | None:
    """Where the model ``ref`` names is among the vocabulary step's models (the base first), else None."""
    offset = 1 if has_base else 0
    index = recipe.input_index(ref)  # compared by resolved path, as the recipe compares its models
    if index is not None:
        return offset + index
    if has_base and recipe.base_model is not None and model_key(ref) == model_key(recipe.base_model):
        return 0
    return None


def _resolve_source(recipe: Recipe, has_base: bool) -> int | None:
    source = recipe.tokenizer_source
    if source == "base":
        return 0
    if source == "union":
        return None
    index = _model_position(recipe, source, has_base)
    if index is not None:
        return index
    raise LangmergeError(
        f"recipe key 'tokenizer_source': {source!r} is neither 'base', 'union' nor one of the recipe's models"
    )


def _examples(tokens: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(t) for t in tokens[:n])
    return shown + (", ..." if len(tokens) > n else "")


def _union(
    ref: ModelVocab, others: list[ModelVocab], notes: list[str], wanted: list[str]
) -> tuple[UnionTokenizer, dict[str, int]]:
    """The union tokenizer and its vocabulary: the reference's tokens, then the others' it lacks.

    As in mergekit, a model's tokens at ids beyond its embedding rows (a
    tokenizer padded with unused tokens) are not its tokens; new tokens of the
    models' vocabularies come first and new added tokens after them (each in
    model order, then id order), since the tokenizers library numbers added
    tokens after the vocabulary.
    """
    ref_tokens, ref_rows = ref.aligned()
    seen = set(ref_tokens)
    vocab_tokens: list[tuple[str, TokenizerOwner | None]] = []
    added_tokens: list[tuple[str, TokenizerOwner | None]] = []
    for m in others:
        tokens, rows = m.aligned()
        unused = [t for t, i in tokens.items() if i >= rows]
        if unused:
            notes.append(
                f"{m.label}: {len(unused)} tokens beyond its {rows} embedding rows have no row and are "
                f"not taken into the union ({_examples(sorted(unused, key=tokens.__getitem__))})"
            )
        for token, i in sorted(tokens.items(), key=lambda kv: kv[1]):
            if token in seen or i >= rows:
                continue
            seen.add(token)
            (added_tokens if token in m.added else vocab_tokens).append((token, m))
    # the tokenizer block's, after every model's
    recipe_tokens: list[tuple[str, TokenizerOwner | None]] = [(t, None) for t in wanted if t not in seen]
    first_id = max(ref_rows, max(ref_tokens.values(), default=-1) + 1)
    return build_union_tokenizer(ref, vocab_tokens + added_tokens + recipe_tokens, first_id)


def plan_vocabulary(recipe: Recipe, base: TensorSource | None, inputs: Sequence[TensorSource]) -> VocabPlan:
    """Decide the output vocabulary and each model's row map; raises on a mismatch the recipe does not resolve."""
    sources = ([base] if base is not None else []) + list(inputs)
    models = [describe_model(s) for s in sources]
    ref = models[0]
    chosen = _resolve_source(recipe, base is not None)
    explicit = recipe.raw.tokenizer_source is not None or recipe.raw.tokenizer is not None
    notes: list[str] = []

    # Tied and untied models together: the output gets a separate output layer;
    # a tied model's output layer is its input embedding.
    tied = [m.tied for m in models if m.input_name is not None]
    aliases: dict[int, dict[str, str]] = {}
    output_tied = bool(tied) and all(tied)
    if tied and any(tied) and not all(tied):
        out_name = next(m.output_name for m in models if m.output_name is not None)
        for i, m in enumerate(models):
            if m.tied and m.input_name is not None:  # tied: an input embedding and no output layer
                aliases[i] = {out_name: m.input_name}
                m.output_name = out_name
        notes.append(
            f"tied embeddings: {', '.join(m.label for m, t in zip(models, tied) if t)} tie the output layer to the "
            f"input embeddings, the others do not; the output gets a separate {out_name} (tied models contribute "
            "their input embedding to it) and config.json says tie_word_embeddings: false"
        )
    elif tied:
        notes.append(
            f"embeddings: {'tied (no separate output layer)' if output_tied else 'untied'} in every model; kept as is"
        )

    rows = {m.rows for m in models}
    token_sets = [m.tokens for m in models]
    have_tokens = all(t is not None for t in token_sets)
    block = recipe.raw.tokenizer
    reshaped = block is not None and bool(block.tokens or block.pad_to_multiple_of)  # rows to add or source
    same = len(rows) == 1 and (not have_tokens or all(t == ref.tokens for t in token_sets))
    if same and not reshaped:
        if not have_tokens and len(models) > 1:
            notes.append(
                "vocabulary: some models have no tokenizer.json; equal embedding rows, so rows are matched by index"
            )
        else:
            notes.append(f"vocabulary: every model has the same {len(ref.tokens) if ref.tokens else ref.rows} tokens")
        index = 0 if chosen is None else chosen
        return VocabPlan(
            models, recipe.tokenizer_source, index, None, None, [None] * len(models), None, output_tied, aliases, notes
        )

    sizes = "; ".join(m.size_text() for m in models)
    if not explicit:
        raise LangmergeError(
            f"vocabulary mismatch: {sizes}. Set 'tokenizer_source' in the recipe: union (keep every model's tokens; "
            "new tokens keep their trained rows), base, or one of the models; langmerge never truncates embeddings "
            "silently"
        )
    for m in models:
        if m.tokens is None:
            raise LangmergeError(
                f"model {m.label}: vocabularies differ ({sizes}) but {m.tokenizer_folder} has no tokenizer.json to "
                "align rows by token"
            )
        if m.rows is None:
            raise LangmergeError(f"model {m.label}: no input embedding tensor found to align")

    wanted = list((block.tokens or {}) if block is not None else {})  # the block's tokens: added where missing
    union = None
    if chosen is None:
        union, out_tokens = _union(ref, models[1:], notes, wanted)
    else:
        chosen_tokens, chosen_rows = models[chosen].aligned()
        out_tokens = dict(chosen_tokens)
        extra = [t for t in wanted if t not in out_tokens]
        if extra:
            first_id = max(chosen_rows, max(out_tokens.values(), default=-1) + 1)
            union, out_tokens = build_union_tokenizer(models[chosen], [(t, None) for t in extra], first_id)
            notes.append(
                f"tokenizer.tokens: {len(extra)} tokens added to the tokenizer of {models[chosen].label} "
                f"({_examples(extra)})"
            )
    out_rows = max(models[chosen or 0].aligned()[1], max(out_tokens.values(), default=-1) + 1)
    if block is not None and block.pad_to_multiple_of and out_rows % block.pad_to_multiple_of:
        padded = -(-out_rows // block.pad_to_multiple_of) * block.pad_to_multiple_of
        notes.append(
            f"tokenizer.pad_to_multiple_of {block.pad_to_multiple_of}: {out_rows} rows padded to {padded}; "
            "each new row is every model's mean row, merged"
        )
        out_rows = padded

    by_id: list[str | None] = [None] * out_rows
    for token, j in out_tokens.items():
        by_id[j] = token
    row_maps: list[torch.Tensor | None] = []
    anyone = torch.zeros(out_rows, dtype=torch.bool)
    for m in models:
        model_tokens, model_rows = m.aligned()
        own_ids = set(model_tokens.values())
        rm = [-1] * out_rows
        for j, out_token in enumerate(by_id):
            if out_token is None:
                if j < model_rows and j not in own_ids:
                    rm[j] = j  # padding rows line up by index
            else:
                row = model_tokens.get(out_token)
                if row is not None and row < model_rows:
                    rm[j] = row
        row_map = torch.tensor(rm, dtype=torch.long)
        anyone |= row_map >= 0
        identity = model_rows == out_rows and bool((row_map == torch.arange(out_rows)).all())
        row_maps.append(None if identity else row_map)
    sourced: dict[int, tuple[Any, ...]] = {}
    if block is not None and block.tokens:
        sourced = token_rows(
            block, models, lambda r: _model_position(recipe, r, base is not None), out_tokens, lambda j: bool(anyone[j])
        )
        for token in block.tokens:
            if out_tokens[token] in sourced:
                notes.append(
                    f"tokenizer.tokens: {token!r} takes its rows from {block.tokens[token].source!r}"
                    + (" (force)" if block.tokens[token].force else "")
                )
    padding = [j for j in (~anyone).nonzero().reshape(-1).tolist() if j not in sourced and by_id[j] is None]
    if block is not None and block.pad_to_multiple_of:
        sourced.update({j: ("mean",) for j in padding})
    nowhere = [
        by_id[j] if by_id[j] is not None else f"<row {j}>"
        for j in (~anyone).nonzero().reshape(-1).tolist()
        if j not in sourced
    ]
    if nowhere:  # mergekit's rule too: a token no model has a row for gets a zero row
        sourced.update({j: ("zero",) for j in (~anyone).nonzero().reshape(-1).tolist() if j not in sourced})
        notes.append(
            f"{len(nowhere)} output tokens have an embedding row in no model ({_examples(nowhere)}): "
            "their rows are zero"
        )

    for m in models:
        model_tokens = m.aligned()[0]
        lacking = [t for t in model_tokens if t not in out_tokens]
        extra = [t for t in out_tokens if t not in model_tokens]
        if lacking:
            notes.append(
                f"{m.label}: {len(lacking)} tokens not in the output vocabulary are dropped ({_examples(lacking)})"
            )
        if extra:
            notes.append(
                f"{m.label}: lacks {len(extra)} output tokens ({_examples(extra)}); it has no say on their rows"
            )
    what = "union of all vocabularies" if chosen is None else f"vocabulary of {models[chosen].label}"
    notes.append(
        f"vocabulary mismatch ({sizes}); tokenizer_source {recipe.tokenizer_source}: output is the {what}, "
        f"{out_rows} rows, matched by token string"
    )
    rule_base = (
        "rows every model has follow the merge method; rows only some models have merge those models alone; "
        "rows the base lacks take the weighted average of the models that have them (one model: its row as is)"
        if base is not None
        else "each row is merged over the models that have it"
    )
    notes.append(f"row rule: {rule_base}")

    if chosen is None:
        stale = [n for n in STALE_FOR_UNION if (ref.tokenizer_folder / n).exists()]
        if stale:
            notes.append(
                f"union tokenizer: written as tokenizer.json; {', '.join(stale)} of the base are not copied "
                "(they would disagree)"
            )
    for note in notes:
        log.info("vocabulary: %s", note)
    return VocabPlan(
        models,
        recipe.tokenizer_source,
        chosen,
        out_tokens,
        out_rows,
        row_maps,
        union,
        output_tied,
        aliases,
        notes,
        sourced,
    )
