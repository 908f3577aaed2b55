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
    from tokenizers import Tokenizer

    data = read_regular(path)
    try:
        return Tokenizer.from_str(data.decode("utf-8")).get_vocab(with_added_tokens=True)
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LangmergeError(f"{folder / 'tokenizer.json'}: unreadable tokenizer ({first})") from None


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


def build_union_tokenizer(reference, new_tokens: list[tuple[str, int, object]], out_tokens: dict[str, int]) -> UnionTokenizer:
    """The reference's tokenizer.json extended with ``new_tokens`` (token, output id, model that has it).

    ``reference`` and the models are ``merge.vocab.ModelVocab``: their ``label`` and ``tokenizer_folder``.

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
