"""Vocabulary alignment: embedding and output-layer rows matched by token string.

The one place that knows which tensors are indexed by the vocabulary: a 2-D,
non-layer tensor whose name ends with one of ``INPUT_EMBEDDINGS`` /
``OUTPUT_EMBEDDINGS`` and whose first dimension is the model's embedding rows.

The output vocabulary follows ``tokenizer_source`` (mergekit's meaning):
``base`` (the base model's), ``union`` (the base's, then every other model's
tokens it lacks, appended in model order and id order) or a model reference
(that model's). Row ``j`` of each model's vocabulary tensors is re-indexed to
the output token with id ``j``; a row without a token (padding) lines up by
index. Rows are then merged by presence pattern (``merge_aligned_job``):

- base and every model have the token: the recipe's method, as for any tensor;
- base and only some models have it: the method over those models only (the
  others have no opinion on that token);
- the base lacks it: the weighted average (recipe weights, renormalised) of the
  models that have it, so a token only the CT model has keeps its CT row as is;
- without a base (linear): the method over the models that have it.

Without a tokenizer setting, differing vocabularies are an error.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from langmerge.errors import LangmergeError
from langmerge.io.files import optional_folder_file, read_json, read_regular
from langmerge.io.metadata import copy_optional_files, copy_tokenizer
from langmerge.methods.kernels import NonFiniteMerge, merge_tensor
from langmerge.seeds import seeded_generator

log = logging.getLogger(__name__)

INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "tok_embeddings.weight", "word_embeddings.weight", "shared.weight")
OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight", "output.weight")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.\d+\.")
# Tokenizer files that describe the vocabulary a second way; a union tokenizer does not write them.
_STALE_FOR_UNION = ("tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def _candidates(source, suffixes: tuple[str, ...]) -> list[str]:
    return [n for n in source.names if n.endswith(suffixes) and not _LAYER.search(n) and len(source.shape(n)) == 2]


@dataclass
class ModelVocab:
    """What one model says about its vocabulary."""

    label: str
    rows: int | None  # rows of the input embedding
    tokens: dict[str, int] | None  # from tokenizer.json, added tokens included
    tokenizer_folder: Path
    input_name: str | None
    output_name: str | None
    config: dict = field(default_factory=dict)

    @property
    def tied(self) -> bool:
        return self.input_name is not None and self.output_name is None

    @property
    def vocab_names(self) -> list[str]:
        return [n for n in (self.input_name, self.output_name) if n is not None]

    def size_text(self) -> str:
        toks = "no tokenizer.json" if self.tokens is None else f"{len(self.tokens)} tokens"
        return f"{self.label}: {toks}, {self.rows} embedding rows"


def read_tokens(folder: Path) -> dict[str, int] | None:
    """The vocabulary of ``folder``'s tokenizer.json; None when it has none (or one skipped by io/files.py's rule)."""
    path = optional_folder_file(folder, "tokenizer.json")
    if path is None:
        return None
    from tokenizers import Tokenizer

    data = read_regular(path)
    try:
        return Tokenizer.from_str(data.decode("utf-8")).get_vocab(with_added_tokens=True)
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LangmergeError(f"{folder / 'tokenizer.json'}: unreadable tokenizer ({first})") from None


def describe_model(source) -> ModelVocab:
    inputs = _candidates(source, INPUT_EMBEDDINGS)
    input_name = inputs[0] if inputs else None
    config = source.config() or {}
    rows = source.shape(input_name)[0] if input_name else (config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size"))
    outputs = [n for n in _candidates(source, OUTPUT_EMBEDDINGS) if source.shape(n)[0] == rows and n != input_name]
    folder = getattr(source, "tokenizer_folder", source.folder)
    return ModelVocab(source.label, rows, read_tokens(folder), folder, input_name, outputs[0] if outputs else None, config)


class VocabAlignedSource:
    """A source whose vocabulary tensors are re-indexed to the output vocabulary.

    ``row_map[j]`` is this model's row for output row ``j`` (-1: the model lacks
    that token). ``aliases`` maps an output-layer name to the input embedding
    of a tied model, when other models have a separate output layer.
    """

    def __init__(self, inner, row_map: torch.Tensor | None, out_rows: int | None, vocab_names: list[str], aliases: dict[str, str]):
        self.inner = inner
        self.row_map = row_map
        self.out_rows = out_rows
        self.vocab_names = set(vocab_names) | set(aliases)
        self.aliases = aliases
        self.label = inner.label
        self.folder = inner.folder
        self.tokenizer_folder = getattr(inner, "tokenizer_folder", inner.folder)
        self.entries = dict(inner.entries)
        for alias, target in aliases.items():
            self.entries[alias] = inner.entries[target]

    @property
    def names(self) -> list[str]:
        return list(self.inner.names) + [a for a in self.aliases if a not in self.inner.entries]

    def _target(self, name: str) -> str:
        return self.aliases.get(name, name)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.inner.shape(self._target(name)))
        if name in self.vocab_names and self.row_map is not None:
            return (self.out_rows, *shape[1:])
        return shape

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(self._target(name))

    def get_aligned(self, name: str, scratch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tensor, present)``: rows in output order (zeros where absent) and which rows the model has."""
        t = self.inner.get(self._target(name), scratch=scratch and name not in self.vocab_names)
        if name not in self.vocab_names or self.row_map is None:
            return t, torch.ones(t.shape[0], dtype=torch.bool)
        present = self.row_map >= 0
        out = t.new_zeros((self.out_rows, *t.shape[1:]))
        out[present] = t[self.row_map[present]]
        return out, present

    def get(self, name: str, scratch: bool = False) -> torch.Tensor:
        t, present = self.get_aligned(name, scratch)
        if name in self.vocab_names and not bool(present.all()):
            raise RuntimeError(f"{self.label}: {name} lacks some output rows; merge it with merge_aligned_job")
        return t

    def config(self) -> dict | None:
        return self.inner.config()

    def close(self) -> None:
        self.inner.close()


def aligned_rows(source, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(source, VocabAlignedSource):
        return source.get_aligned(name)
    t = source.get(name)
    return t, torch.ones(t.shape[0], dtype=torch.bool)


@dataclass
class UnionTokenizer:
    tokenizer_json: str
    tokenizer_config: dict | None
    reference_folder: Path

    def write(self, out: Path) -> list[str]:
        (out / "tokenizer.json").write_text(self.tokenizer_json)
        written = ["tokenizer.json"]
        if self.tokenizer_config is not None:
            (out / "tokenizer_config.json").write_text(json.dumps(self.tokenizer_config, indent=2, ensure_ascii=False) + "\n")
            written.append("tokenizer_config.json")
        names = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
        return written + copy_optional_files(self.reference_folder, out, names)


def _load_json(path: Path) -> dict:
    """A JSON object from a tokenizer file (io/files.py's rule and errors)."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise LangmergeError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def build_union_tokenizer(reference: ModelVocab, new_tokens: list[tuple[str, int, ModelVocab]], out_tokens: dict[str, int]) -> UnionTokenizer:
    """The reference's tokenizer.json extended with ``new_tokens`` (token, output id, model that has it).

    A token that is an added token in its model becomes an added token; a token
    of its model's vocabulary extends the reference's WordLevel/BPE/WordPiece
    vocabulary (for BPE, with that model's merges the reference lacks, appended
    after the reference's so that the reference's own tokenization is unchanged).
    """
    from tokenizers import Tokenizer

    ref_path = reference.tokenizer_folder / "tokenizer.json"
    tj = _load_json(ref_path)
    model = tj.get("model") or {}
    mtype = model.get("type")
    added_new: list[dict] = []
    merged_from: set[Path] = set()
    for token, new_id, owner in new_tokens:
        sj_path = owner.tokenizer_folder / "tokenizer.json"
        sj = _load_json(sj_path)
        added = {a["content"]: a for a in sj.get("added_tokens", [])}
        if token in added:
            entry = dict(added[token], id=new_id)
            tj.setdefault("added_tokens", []).append(entry)
            added_new.append(entry)
            continue
        if mtype in ("WordLevel", "BPE", "WordPiece") and isinstance(model.get("vocab"), dict):
            model["vocab"][token] = new_id
        elif mtype == "Unigram" and len(model.get("vocab", [])) == new_id:
            score = dict((p, s) for p, s in sj["model"]["vocab"]).get(token, 0.0)
            model["vocab"].append([token, score])
        else:
            raise LangmergeError(
                f"tokenizer_source union: cannot add token {token!r} of {owner.label} to the {mtype} vocabulary of "
                f"{ref_path}; use tokenizer_source: {owner.label} instead"
            )
        if mtype == "BPE" and owner.tokenizer_folder not in merged_from:
            merged_from.add(owner.tokenizer_folder)
            known = {tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])}
            for m in sj.get("model", {}).get("merges", []):
                if (tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)) not in known:
                    model["merges"].append(m)
    text = json.dumps(tj, ensure_ascii=False)
    try:
        got = Tokenizer.from_str(text).get_vocab(with_added_tokens=True)
    except Exception as exc:
        raise LangmergeError(f"tokenizer_source union: the extended tokenizer of {ref_path} does not load ({exc})") from exc
    if got != out_tokens:
        wrong = sorted(set(got.items()) ^ set(out_tokens.items()), key=lambda kv: kv[1])[:3]
        raise LangmergeError(f"tokenizer_source union: the extended tokenizer of {ref_path} disagrees with the planned vocabulary (e.g. {wrong})")
    config = None
    config_path = optional_folder_file(reference.tokenizer_folder, "tokenizer_config.json")
    if config_path is not None:
        config = _load_json(config_path)
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for entry in added_new:
                decoder[str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
    return UnionTokenizer(text, config, reference.tokenizer_folder)


@dataclass
class VocabPlan:
    models: list[ModelVocab]  # base (when used) first, then the inputs
    tokenizer_source: str
    tokenizer_model: int | None  # index into models whose tokenizer is copied; None for a union
    out_tokens: dict[str, int] | None
    out_rows: int | None
    row_maps: list[torch.Tensor | None]
    union: UnionTokenizer | None
    output_tied: bool
    aliases: dict[int, dict[str, str]]
    notes: list[str]

    @property
    def aligned_names(self) -> set[str]:
        if all(m is None for m in self.row_maps):
            return set()
        return {n for m in self.models for n in m.vocab_names}

    def is_aligned(self, name: str) -> bool:
        return name in self.aligned_names

    def wrap(self, source, index: int):
        if self.row_maps[index] is None and not self.aliases.get(index):
            return source
        return VocabAlignedSource(source, self.row_maps[index], self.out_rows, self.models[index].vocab_names, self.aliases.get(index, {}))

    def config_updates(self) -> dict:
        updates: dict = {}
        if self.out_rows is not None:
            updates["vocab_size"] = self.out_rows
        if self.models[0].input_name is not None:
            updates["tie_word_embeddings"] = self.output_tied
        if self.tokenizer_model not in (None, 0):
            source_config = self.models[self.tokenizer_model].config
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if key in source_config:
                    updates[key] = source_config[key]
        return updates

    def write_tokenizer(self, out: Path) -> list[str]:
        if self.union is not None:
            return self.union.write(out)
        return copy_tokenizer(self.models[self.tokenizer_model].tokenizer_folder, out)


def _resolve_source(recipe, has_base: bool) -> int | None:
    source = recipe.tokenizer_source
    if source == "base":
        return 0
    if source == "union":
        return None
    from langmerge.recipe import model_key

    offset = 1 if has_base else 0
    index = recipe.input_index(source)  # compared by resolved path, as the recipe compares its models
    if index is not None:
        return offset + index
    if has_base and model_key(source) == model_key(recipe.base_model):
        return 0
    raise LangmergeError(f"recipe key 'tokenizer_source': {source!r} is neither 'base', 'union' nor one of the recipe's models")


def _examples(tokens: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(t) for t in tokens[:n])
    return shown + (", ..." if len(tokens) > n else "")


def plan_vocabulary(recipe, base, inputs) -> VocabPlan:
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
            if m.tied:
                aliases[i] = {out_name: m.input_name}
                m.output_name = out_name
        notes.append(
            f"tied embeddings: {', '.join(m.label for m, t in zip(models, tied) if t)} tie the output layer to the "
            f"input embeddings, the others do not; the output gets a separate {out_name} (tied models contribute "
            "their input embedding to it) and config.json says tie_word_embeddings: false"
        )
    elif tied:
        notes.append(f"embeddings: {'tied (no separate output layer)' if output_tied else 'untied'} in every model; kept as is")

    rows = {m.rows for m in models}
    token_sets = [m.tokens for m in models]
    have_tokens = all(t is not None for t in token_sets)
    same = len(rows) == 1 and (not have_tokens or all(t == ref.tokens for t in token_sets))
    if same:
        if not have_tokens and len(models) > 1:
            notes.append("vocabulary: some models have no tokenizer.json; equal embedding rows, so rows are matched by index")
        else:
            notes.append(f"vocabulary: every model has the same {len(ref.tokens) if ref.tokens else ref.rows} tokens")
        index = 0 if chosen is None else chosen
        return VocabPlan(models, recipe.tokenizer_source, index, None, None, [None] * len(models), None, output_tied, aliases, notes)

    sizes = "; ".join(m.size_text() for m in models)
    if not explicit:
        raise LangmergeError(
            f"vocabulary mismatch: {sizes}. Set 'tokenizer_source' in the recipe: union (keep every model's tokens; "
            "new tokens keep their trained rows), base, or one of the models; langmerge never truncates embeddings silently"
        )
    for m in models:
        if m.tokens is None:
            raise LangmergeError(f"model {m.label}: vocabularies differ ({sizes}) but {m.tokenizer_folder} has no tokenizer.json to align rows by token")
        if m.rows is None:
            raise LangmergeError(f"model {m.label}: no input embedding tensor found to align")

    new_tokens: list[tuple[str, int, ModelVocab]] = []
    if chosen is None:
        out_tokens = dict(ref.tokens)
        next_id = max(ref.rows, max(out_tokens.values(), default=-1) + 1)
        for m in models[1:]:
            for token, _ in sorted(m.tokens.items(), key=lambda kv: kv[1]):
                if token not in out_tokens:
                    out_tokens[token] = next_id
                    new_tokens.append((token, next_id, m))
                    next_id += 1
        out_rows = next_id
    else:
        out_tokens = dict(models[chosen].tokens)
        out_rows = max(models[chosen].rows, max(out_tokens.values(), default=-1) + 1)

    by_id: list[str | None] = [None] * out_rows
    for token, j in out_tokens.items():
        by_id[j] = token
    row_maps: list[torch.Tensor | None] = []
    anyone = torch.zeros(out_rows, dtype=torch.bool)
    for m in models:
        own_ids = set(m.tokens.values())
        rm = [-1] * out_rows
        for j, token in enumerate(by_id):
            if token is None:
                if j < m.rows and j not in own_ids:
                    rm[j] = j  # padding rows line up by index
            else:
                i = m.tokens.get(token)
                if i is not None and i < m.rows:
                    rm[j] = i
        row_map = torch.tensor(rm, dtype=torch.long)
        anyone |= row_map >= 0
        identity = m.rows == out_rows and bool((row_map == torch.arange(out_rows)).all())
        row_maps.append(None if identity else row_map)
    if not bool(anyone.all()):
        j = int((~anyone).nonzero()[0])
        raise LangmergeError(f"output token {by_id[j]!r} (id {j}) has an embedding row in no model")

    for m in models:
        lacking = [t for t in m.tokens if t not in out_tokens]
        extra = [t for t in out_tokens if t not in m.tokens]
        if lacking:
            notes.append(f"{m.label}: {len(lacking)} tokens not in the output vocabulary are dropped ({_examples(lacking)})")
        if extra:
            notes.append(f"{m.label}: lacks {len(extra)} output tokens ({_examples(extra)}); it has no say on their rows")
    what = "union of all vocabularies" if chosen is None else f"vocabulary of {models[chosen].label}"
    notes.append(f"vocabulary mismatch ({sizes}); tokenizer_source {recipe.tokenizer_source}: output is the {what}, {out_rows} rows, matched by token string")
    rule_base = (
        "rows every model has follow the merge method; rows only some models have merge those models alone; "
        "rows the base lacks take the weighted average of the models that have them (one model: its row as is)"
        if base is not None
        else "each row is merged over the models that have it"
    )
    notes.append(f"row rule: {rule_base}")

    union = None
    if chosen is None:
        union = build_union_tokenizer(ref, new_tokens, out_tokens)
        stale = [n for n in _STALE_FOR_UNION if (ref.tokenizer_folder / n).exists()]
        if stale:
            notes.append(f"union tokenizer: written as tokenizer.json; {', '.join(stale)} of the base are not copied (they would disagree)")
    return VocabPlan(models, recipe.tokenizer_source, chosen, out_tokens, out_rows, row_maps, union, output_tied, aliases, notes)


def merge_aligned_job(plan, job, device: torch.device) -> torch.Tensor:
    """One vocabulary tensor, merged row group by row group (see the module doc)."""
    method = plan.recipe.method
    p = job.params
    loaded = []
    for source in ([plan.base] if plan.base is not None else []) + list(plan.inputs):
        t, present = aligned_rows(source, job.name)
        if not bool(torch.isfinite(t[present]).all()):
            raise LangmergeError(f"model {source.label}: tensor {job.name!r} contains NaN or Inf")
        loaded.append((t, present))
    dtype = plan.compute_dtype or loaded[0][0].dtype
    tensors = [t.to(device=device, dtype=dtype) for t, _ in loaded]
    presence = torch.stack([m for _, m in loaded], dim=1)  # rows x models
    patterns, inverse = torch.unique(presence.to(torch.int8), dim=0, return_inverse=True)
    off = 1 if plan.base is not None else 0
    out = torch.empty_like(tensors[0])
    for k, pattern in enumerate(patterns.tolist()):
        rows = (inverse == k).nonzero().squeeze(1).to(device)
        idx = [i for i in range(len(plan.inputs)) if pattern[off + i]]
        xs = [tensors[off + i].index_select(0, rows) for i in idx]
        if plan.base is not None and not pattern[0]:
            weights = [p.weights[i] for i in idx]
            total = sum(weights)
            if total == 0:
                raise LangmergeError(f"tensor {job.name!r}: rows the base lacks are a weighted average, but the weights of {', '.join(plan.inputs[i].label for i in idx)} sum to zero")
            acc = torch.zeros_like(xs[0], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            for x, w in zip(xs, weights):
                acc.add_(x, alpha=w / total)
            merged = acc
        else:
            generators = None
            if method.randomized:
                generators = [seeded_generator(job.seed, "".join(map(str, pattern)), i, device=device) for i in idx]
            base_rows = tensors[0].index_select(0, rows) if plan.base is not None else None
            try:
                merged = merge_tensor(method, base_rows, xs, p.restrict(idx), generators)
            except NonFiniteMerge:
                raise LangmergeError(_non_finite_message(job.name)) from None
        out[rows] = merged.to(out.dtype)
    result = out.to(dtype=job.out_dtype).cpu()
    if not bool(torch.isfinite(result).all()):
        raise LangmergeError(_non_finite_message(job.name))
    return result


def _non_finite_message(name: str) -> str:
    return f"tensor {name!r}: the merge produced NaN or Inf (weights summing to zero with normalize?)"
