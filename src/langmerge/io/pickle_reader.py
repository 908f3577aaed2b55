"""Opt-in reader of PyTorch pickle checkpoints (``pytorch_model.bin`` and its shards).

Pickle files can run code when unpickled, so they are read only when the user
passes ``--allow-pickle``, and then with ``torch.load(weights_only=True)``,
which accepts tensors and plain containers and refuses any other object.
Shards are memory-mapped (zip-format files), so opening reads no tensor data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from langmerge.errors import LangmergeError
from langmerge.io.files import folder_file
from langmerge.io.reader import read_config, read_weight_map
from langmerge.io.tensor_source import TensorSource, into

log = logging.getLogger(__name__)

PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one pickle file, loaded with ``weights_only=True``; errors name the file."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "zip" not in str(exc).lower():
                raise
            # The legacy (pre-1.6) format cannot be memory-mapped; it is read whole.
            log.info("%s: legacy pickle format, loading without mmap", path)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LangmergeError(f"{path}: cannot load pickle checkpoint with weights_only=True ({first})") from exc
    if not isinstance(state, dict):
        raise LangmergeError(f"{path}: not a state dict (got {type(state).__name__})")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise LangmergeError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    return state


class PickleReader(TensorSource):
    """The ``TensorSource`` of a folder of ``.bin`` files (memory-mapped: reading a range touches its pages only)."""

    def __init__(self, folder: str | Path, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        index_path = folder_file(self.folder, PICKLE_INDEX_FILE)
        if index_path is not None:
            files = sorted(read_weight_map(index_path))
        else:
            single = self.folder / PICKLE_FILE
            names = [PICKLE_FILE] if single.exists() else sorted(p.name for p in self.folder.glob("*.bin"))
            if len(names) != 1:
                raise LangmergeError(
                    f"model {self.label}: expected one .bin file or {PICKLE_INDEX_FILE} in {self.folder}"
                )
            only = folder_file(self.folder, names[0])
            assert only is not None  # found just now
            files = [only]
        self._tensors: dict[str, torch.Tensor] = {}
        for path in files:
            self._tensors.update(load_pickle_state_dict(path))

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        try:
            t = self._tensors[name]
        except KeyError:
            raise self.missing(name) from None
        flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
        return into(out, flat[start:stop])

    def config(self) -> dict[str, Any] | None:
        return read_config(self.folder)

    def close(self) -> None:
        self._tensors.clear()
