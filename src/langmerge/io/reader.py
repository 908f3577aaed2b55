"""Lazy reader of a Hugging Face checkpoint folder.

Only headers are read up front; a tensor's bytes are read when asked for.
Index files are untrusted: a weight map entry that leaves the model folder
(``../``, an absolute path, a symlink pointing outside) is refused, by the
rule of ``langmerge.io.files``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from langmerge.errors import LangmergeError
from langmerge.io.files import model_file
from langmerge.io.safetensors_format import TensorEntry, read_header, read_tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _inside(folder: Path, relative: str, index_path: Path) -> Path:
    """Resolve an index entry, refusing anything outside ``folder`` (io/files.py's rule)."""
    return model_file(folder, relative, what=f"{index_path}: weight map entry {relative!r}")


def read_weight_map(index_path: Path) -> dict[Path, list[str]]:
    """An index file's shards (each checked to lie inside the model folder) and the tensors in each."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LangmergeError(f"{index_path}: unreadable index ({exc!r})") from exc
    if not isinstance(weight_map, dict):
        raise LangmergeError(f"{index_path}: 'weight_map' is not an object")
    files: dict[Path, list[str]] = {}
    for name, rel in weight_map.items():
        files.setdefault(_inside(index_path.parent, str(rel), index_path), []).append(name)
    for path in files:
        if not path.is_file():
            raise LangmergeError(f"{index_path}: shard {path.name} is missing")
    return files


class CheckpointReader:
    """The tensors of one model folder, by name, read on demand."""

    def __init__(self, folder: str | Path, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        if not self.folder.is_dir():
            raise LangmergeError(f"model {self.label}: folder {self.folder} does not exist")
        self.entries = self._index()
        self._handles: dict[Path, object] = {}
        self._scratch: torch.Tensor | None = None

    def _index(self) -> dict[str, TensorEntry]:
        index_path = self.folder / INDEX_FILE
        single = self.folder / SINGLE_FILE
        if index_path.is_file():
            entries: dict[str, TensorEntry] = {}
            for path, names in read_weight_map(index_path).items():
                header = read_header(path)
                for name in names:
                    if name not in header:
                        raise LangmergeError(f"{index_path}: tensor {name!r} is not in shard {path.name}")
                    entries[name] = header[name]
            return entries
        if single.is_file():
            return read_header(_inside(self.folder, SINGLE_FILE, single))
        shards = sorted(self.folder.glob("*.safetensors"))
        if len(shards) == 1:
            return read_header(_inside(self.folder, shards[0].name, shards[0]))
        if any(self.folder.glob("*.bin")):
            raise LangmergeError(
                f"model {self.label}: only pickle (.bin) weights in {self.folder}; pickle files can run code "
                "when loaded: convert them to safetensors, or pass --allow-pickle to load them with "
                "torch.load(weights_only=True)"
            )
        raise LangmergeError(f"model {self.label}: no safetensors weights in {self.folder}")

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def get(self, name: str, scratch: bool = False) -> torch.Tensor:
        """The tensor ``name``. With ``scratch``, it may live in a buffer that this reader's next scratch read overwrites."""
        try:
            entry = self.entries[name]
        except KeyError:
            raise LangmergeError(f"model {self.label}: tensor {name!r} is missing") from None
        handle = self._handles.get(entry.file)
        if handle is None:
            handle = self._handles[entry.file] = open(entry.file, "rb")
        buffer = None
        if scratch:
            if self._scratch is None or self._scratch.numel() < entry.nbytes:
                self._scratch = torch.empty(entry.nbytes, dtype=torch.uint8)
            buffer = self._scratch
        return read_tensor(entry, handle, buffer)

    def config(self) -> dict | None:
        path = self.folder / "config.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise LangmergeError(f"{path}: invalid JSON ({exc})") from exc

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._scratch = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def has_safetensors(folder: Path) -> bool:
    return (folder / INDEX_FILE).is_file() or any(folder.glob("*.safetensors"))


def open_checkpoint(folder: str | Path, label: str | None = None, *, allow_pickle: bool = False):
    """A reader for a model folder: safetensors, or (only with ``allow_pickle``) pickle ``.bin`` files."""
    folder = Path(folder)
    if allow_pickle and folder.is_dir() and not has_safetensors(folder) and any(folder.glob("*.bin")):
        from langmerge.io.pickle_reader import PickleReader

        return PickleReader(folder, label)
    return CheckpointReader(folder, label)
