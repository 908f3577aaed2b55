"""Sharded safetensors writer that holds one tensor at a time.

Every output tensor's name, shape and dtype are known before any is computed,
so shards and their headers are laid out up front and each tensor's bytes go
straight to disk when it is ready.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from langmerge.io.reader import INDEX_FILE, SINGLE_FILE
from langmerge.io.safetensors_format import StreamingFileWriter, tensor_nbytes

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy consecutive packing; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        n = tensor_nbytes(spec[1], spec[2])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def shard_names(count: int) -> list[str]:
    return [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def shard_sizes(specs: list[TensorSpec], max_shard_bytes: int) -> dict[str, int]:
    """Each shard file's size in bytes, less its header (a lower bound known before any tensor is computed)."""
    shards = plan_shards(specs, max_shard_bytes)
    return {name: sum(tensor_nbytes(s, d) for _, s, d in shard) for name, shard in zip(shard_names(len(shards)), shards)}


class ShardedWriter:
    """Writes ``specs`` (in order) into ``folder`` as HF-style shards."""

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int):
        self.folder = Path(folder)
        self.shards = plan_shards(specs, max_shard_bytes)
        self.files = shard_names(len(self.shards))
        self._shard_of = {spec[0]: i for i, shard in enumerate(self.shards) for spec in shard}
        self._current: StreamingFileWriter | None = None
        self._current_index = -1
        self.total_bytes = sum(tensor_nbytes(s, d) for _, s, d in specs)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index = self._shard_of[name]
        if index != self._current_index:
            if self._current is not None:
                self._current.close()
            self._current_index = index
            self._current = StreamingFileWriter(self.folder / self.files[index], self.shards[index])
        self._current.write(name, tensor)

    def finish(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        if self._current_index != len(self.shards) - 1:
            raise RuntimeError(f"{self.folder}: only {self._current_index + 1} of {len(self.shards)} shards written")
        if len(self.files) > 1:
            weight_map = {spec[0]: self.files[i] for i, shard in enumerate(self.shards) for spec in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._current is not None:
            try:
                self._current.abort()
            except OSError:
                pass  # closing flushes, and may fail as the write did (a full disk): keep the first error
            self._current = None


def write_state_dict(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = 5 * 10**9) -> None:
    """Write an in-memory state dict (small models, tests, synthetic inputs)."""
    specs = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = ShardedWriter(folder, specs, max_shard_bytes)
    try:
        for name, t in tensors.items():
            writer.write(name, t)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
