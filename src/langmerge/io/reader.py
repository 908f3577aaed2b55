"""Lazy reader of a Hugging Face checkpoint folder (a ``TensorSource``).

Only headers are read up front; a range of a tensor's elements is read when
asked for, at its offset in the shard, into the caller's buffer.
Index files are untrusted: a weight map entry that leaves the model folder
(``../``, an absolute path, a symlink pointing outside) is refused, by the
rule of ``langmerge.io.files``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, BinaryIO

import torch

from langmerge.errors import LangmergeError
from langmerge.io.files import check_folder_files, folder_file, is_regular_file, model_file, open_regular, read_json
from langmerge.io.safetensors_format import TensorEntry, read_header, read_range
from langmerge.io.tensor_source import TensorSource

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# config.json keys langmerge reads, that must be positive whole numbers when present (also inside text_config).
_CONFIG_COUNTS = ("num_hidden_layers", "vocab_size", "max_position_embeddings")
_JSON_KINDS = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


def _json_kind(value: object) -> str:
    return "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)


def check_config(config: object, path: Path) -> dict[str, Any]:
    """``config`` when it is a JSON object whose keys langmerge reads have the right types.

    Else a LangmergeError naming the key.
    """
    if not isinstance(config, dict):
        raise LangmergeError(f"{path}: expected a JSON object, got {_json_kind(config)}")
    sections = [("", config)]
    if config.get("text_config") is not None:
        if not isinstance(config["text_config"], dict):
            raise LangmergeError(
                f"{path}: key 'text_config' must be an object, got {_json_kind(config['text_config'])}"
            )
        sections.append(("text_config.", config["text_config"]))
    for prefix, section in sections:
        for key in _CONFIG_COUNTS:
            value = section.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise LangmergeError(f"{path}: key '{prefix}{key}' must be a positive whole number, got {value!r}")
        if section.get("model_type") is not None and not isinstance(section["model_type"], str):
            raise LangmergeError(f"{path}: key '{prefix}model_type' must be a string, got {section['model_type']!r}")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise LangmergeError(f"{path}: key 'architectures' must be a list of strings, got {archs!r}")
    return config


def read_config(folder: Path) -> dict[str, Any] | None:
    """A model folder's config.json, checked (``check_config``); None when the folder has none."""
    path = folder_file(Path(folder), CONFIG_FILE)
    return None if path is None else check_config(read_json(path), path)


def _inside(folder: Path, relative: str, index_path: Path) -> Path:
    """Resolve an index entry, refusing anything outside ``folder`` (io/files.py's rule)."""
    return model_file(folder, relative, what=f"{index_path}: weight map entry {relative!r}")


def read_weight_map(index_path: Path) -> dict[Path, list[str]]:
    """An index file's shards (each checked to lie inside the model folder) and the tensors in each."""
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise LangmergeError(f"{index_path}: unreadable index (no 'weight_map' object)")
    files: dict[Path, list[str]] = {}
    for name, rel in weight_map.items():
        if not isinstance(rel, str):
            raise LangmergeError(
                f"{index_path}: weight map entry of tensor {name!r} is {_json_kind(rel)}, not a file name"
            )
        files.setdefault(_inside(index_path.parent, rel, index_path), []).append(name)
    for path in files:
        if not path.exists():
            raise LangmergeError(f"{index_path}: shard {path.name} is missing")
        if not is_regular_file(path):
            raise LangmergeError(f"{index_path}: shard {path.name} is not a regular file; refused")
    return files


def pickle_refusal(label: str, folder: Path) -> LangmergeError:
    """The error for a folder whose only weights are pickle files, without --allow-pickle."""
    return LangmergeError(
        f"model {label}: only pickle (.bin) weights in {folder}; pickle files can run code "
        "when loaded: convert them to safetensors, or pass --allow-pickle to load them with "
        "torch.load(weights_only=True)"
    )


class CheckpointReader(TensorSource):
    """The tensors of one model folder of safetensors files, by name, read on demand."""

    def __init__(self, folder: str | Path, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        if not self.folder.is_dir():
            raise LangmergeError(f"model {self.label}: folder {self.folder} does not exist")
        self.entries = self._index()
        self._handles: dict[Path, BinaryIO] = {}
        self._lock = threading.Lock()

    def _index(self) -> dict[str, TensorEntry]:
        index_path = folder_file(self.folder, INDEX_FILE)
        if index_path is not None:
            entries: dict[str, TensorEntry] = {}
            for path, names in read_weight_map(index_path).items():
                header = read_header(path)
                for name in names:
                    if name not in header:
                        raise LangmergeError(f"{index_path}: tensor {name!r} is not in shard {path.name}")
                    entries[name] = header[name]
            return entries
        single = folder_file(self.folder, SINGLE_FILE)
        if single is not None:
            return read_header(single)
        shards = sorted(self.folder.glob("*.safetensors"))
        if len(shards) == 1:
            only = folder_file(self.folder, shards[0].name)
            assert only is not None  # found by the glob just now
            return read_header(only)
        if has_pickle(self.folder):
            raise pickle_refusal(self.label, self.folder)
        raise LangmergeError(f"model {self.label}: no safetensors weights in {self.folder}")

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def _fd(self, path: Path) -> int:
        with self._lock:  # readers on several threads share one handle per shard (positional reads)
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = open_regular(path)
            return handle.fileno()

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        try:
            entry = self.entries[name]
        except KeyError:
            raise self.missing(name) from None
        return read_range(entry, self._fd(entry.file), start, stop, out)

    def config(self) -> dict[str, Any] | None:
        return read_config(self.folder)

    def close(self) -> None:
        with self._lock:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()


def has_safetensors(folder: Path) -> bool:
    """Whether the folder names safetensors weights (whatever they turn out to be: the reader checks them)."""
    return (folder / INDEX_FILE).exists() or any(folder.glob("*.safetensors"))


def has_pickle(folder: Path) -> bool:
    return any(folder.glob("*.bin"))


def pretrained_options(folder: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Check a model folder before transformers loads it; the ``from_pretrained`` options that load its weights.

    Every file in it keeps to io/files.py's rule (a planted symlink must not be
    read through transformers either). A folder with safetensors weights is
    loaded from them only; one with only pickle (.bin) weights is refused
    unless ``allow_pickle``, then loaded by transformers with ``weights_only=True``.
    """
    folder = Path(folder)
    check_folder_files(folder)
    if has_safetensors(folder) or not has_pickle(folder):
        return {"use_safetensors": True, "trust_remote_code": False}
    if not allow_pickle:
        raise pickle_refusal(str(folder), folder)
    return {"use_safetensors": False, "weights_only": True, "trust_remote_code": False}


def open_checkpoint(folder: str | Path, label: str | None = None, *, allow_pickle: bool = False) -> TensorSource:
    """A reader for a model folder: safetensors, or (only with ``allow_pickle``) pickle ``.bin`` files."""
    folder = Path(folder)
    if allow_pickle and folder.is_dir() and not has_safetensors(folder) and has_pickle(folder):
        from langmerge.io.pickle_reader import PickleReader  # here: pickle_reader imports this module

        return PickleReader(folder, label)
    return CheckpointReader(folder, label)
