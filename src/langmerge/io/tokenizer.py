"""Tokenizer files: reading a model's vocabulary and writing the union tokenizer of several.

``read_tokens`` reads a model folder's ``tokenizer.json`` vocabulary (added
tokens included); ``build_union_tokenizer`` extends a reference tokenizer with
other models' tokens and checks that the result loads to the planned
vocabulary. Which rows of which tensors follow a vocabulary, and how they are
merged, is a plan step (``langmerge.merge.vocab``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from langmerge.errors import LangmergeError
from langmerge.io.files import optional_folder_file, read_json, read_regular
from langmerge.io.metadata import copy_optional_files

# Tokenizer files that describe the vocabulary a second way; a union tokenizer does not write them.
STALE_FOR_UNION = ("tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def read_tokens(folder: Path) -> dict[str, int] | None:
    """The vocabulary of ``folder``'s tokenizer.json; None when it has none (or one skipped by io/files.py's rule)."""
    path = optional_folder_file(folder, "tokenizer.json")
    if path is None:
        return None
    from tokenizers import Tokenizer  # slow to import; only union vocabularies need it

    data = read_regular(path)
    try:
        return Tokenizer.from_str(data.decode("utf-8")).get_vocab(with_added_tokens=True)
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LangmergeError(f"{folder / 'tokenizer.json'}: unreadable tokenizer ({first})") from None


class TokenizerOwner(Protocol):
    """A model as the union tokenizer sees it (``merge.vocab.ModelVocab``)."""

    @property
    def label(self) -> str: ...

    @property
    def tokenizer_folder(self) -> Path: ...

    @property
    def tokens(self) -> dict[str, int] | None: ...


@dataclass
class UnionTokenizer:
    tokenizer_json: str
    tokenizer_config: dict[str, Any] | None
    reference_folder: Path

    def write(self, out: Path) -> list[str]:
        (out / "tokenizer.json").write_text(self.tokenizer_json)
        written = ["tokenizer.json"]
        if self.tokenizer_config is not None:
            (out / "tokenizer_config.json").write_text(
                json.dumps(self.tokenizer_config, indent=2, ensure_ascii=False) + "\n"
            )
            written.append("tokenizer_config.json")
        names = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
        return written + copy_optional_files(self.reference_folder, out, names)


def _load_json(path: Path) -> dict[str, Any]:
    """A JSON object from a tokenizer file (io/files.py's rule and errors)."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise LangmergeError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_added_tokens(folder: Path) -> frozenset[str]:
    """The contents of ``folder``'s tokenizer.json ``added_tokens`` (empty when it has no tokenizer.json)."""
    path = optional_folder_file(folder, "tokenizer.json")
    if path is None:
        return frozenset()
    added = _load_json(path).get("added_tokens") or []
    return frozenset(a["content"] for a in added if isinstance(a, dict) and isinstance(a.get("content"), str))


def build_union_tokenizer(
    reference: TokenizerOwner, new_tokens: list[tuple[str, TokenizerOwner | None]], first_id: int
) -> tuple[UnionTokenizer, dict[str, int]]:
    """The reference's tokenizer.json extended with ``new_tokens`` (token, model that has it, or None for a token
    the recipe adds: a plain added token); returns it and its vocabulary, which decides the new tokens' ids (the
    reference's keep theirs).

    ``reference`` and the models are ``merge.vocab.ModelVocab``: their ``label``, ``tokenizer_folder`` and
    ``added`` tokens.

    A token that is an added token in its model becomes an added token. A token
    of its model's vocabulary extends the reference's WordLevel/BPE/WordPiece
    vocabulary at ``first_id`` onwards (for BPE, with that model's merges the
    reference lacks, appended after the reference's so that the reference's own
    tokenization is unchanged), so callers list vocabulary tokens before added
    ones: the tokenizers library numbers added tokens after the vocabulary. When
    the reference has added tokens of its own beyond its vocabulary, a new
    vocabulary token is added as a (non-special) added token instead, as
    mergekit adds every new token.
    """
    from tokenizers import Tokenizer  # slow to import; only union vocabularies need it

    ref_path = reference.tokenizer_folder / "tokenizer.json"
    tj = _load_json(ref_path)
    model = tj.get("model") or {}
    mtype = model.get("type")
    vocab = model.get("vocab")
    vocab_size = len(vocab) if isinstance(vocab, (dict, list)) else 0
    own_added = [
        a
        for a in tj.get("added_tokens", [])
        if isinstance(a, dict) and not (isinstance(vocab, dict) and a.get("content") in vocab)
    ]
    extend_vocab = mtype in ("WordLevel", "BPE", "WordPiece", "Unigram") and not any(
        a.get("id", 0) >= vocab_size for a in own_added
    )
    next_id = first_id
    added_new: list[dict[str, Any]] = []
    merged_from: set[Path] = set()
    plain = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}
    for token, owner in new_tokens:
        sj = _load_json(owner.tokenizer_folder / "tokenizer.json") if owner is not None else {}
        added = {a["content"]: a for a in sj.get("added_tokens", [])}
        if owner is None or token in added or not extend_vocab:  # owner None: a token the recipe adds
            entry = {**plain, **added.get(token, {}), "content": token, "id": next_id}
            tj.setdefault("added_tokens", []).append(entry)
            added_new.append(entry)
            next_id += 1
            continue
        if mtype in ("WordLevel", "BPE", "WordPiece") and isinstance(vocab, dict):
            vocab[token] = next_id
        elif mtype == "Unigram" and len(model.get("vocab", [])) == next_id:
            score = dict((p, s) for p, s in sj["model"]["vocab"]).get(token, 0.0)
            model["vocab"].append([token, score])
        else:
            raise LangmergeError(
                f"tokenizer_source union: cannot add token {token!r} of {owner.label} to the {mtype} vocabulary of "
                f"{ref_path}; use tokenizer_source: {owner.label} instead"
            )
        next_id += 1
        if mtype == "BPE" and owner.tokenizer_folder not in merged_from:
            merged_from.add(owner.tokenizer_folder)
            known = {tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])}
            for m in sj.get("model", {}).get("merges", []):
                if (tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)) not in known:
                    model["merges"].append(m)
    try:
        loaded = Tokenizer.from_str(json.dumps(tj, ensure_ascii=False))
    except Exception as exc:
        raise LangmergeError(
            f"tokenizer_source union: the extended tokenizer of {ref_path} does not load ({exc})"
        ) from exc
    got = loaded.get_vocab(with_added_tokens=True)
    text = loaded.to_str()  # the ids the library gave the added tokens, written as it reads them
    reference_tokens = reference.tokens or {}
    moved = [(t, i, got.get(t)) for t, i in reference_tokens.items() if got.get(t) != i]
    missing = [t for t, _ in new_tokens if t not in got]
    if moved or missing:
        what = f"moves {moved[0][0]!r} from id {moved[0][1]} to {moved[0][2]}" if moved else f"lacks {missing[0]!r}"
        raise LangmergeError(f"tokenizer_source union: the extended tokenizer of {ref_path} {what}")
    for entry in added_new:
        entry["id"] = got[entry["content"]]
    config = None
    config_path = optional_folder_file(reference.tokenizer_folder, "tokenizer_config.json")
    if config_path is not None:
        config = _load_json(config_path)
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for entry in added_new:
                decoder[str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
    return UnionTokenizer(text, config, reference.tokenizer_folder), got
