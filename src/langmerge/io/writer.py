"""Sharded safetensors writer: every tensor's place is fixed before any is computed.

Every output tensor's name, shape and dtype are known before any is
computed, so shards and their headers are laid out up front and each range
of a tensor's elements goes straight to its byte offset in its shard
(``write_at``), in whatever pieces the merge produces them: nothing is
buffered beyond the piece being written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from langmerge.io.reader import INDEX_FILE, SINGLE_FILE
from langmerge.io.safetensors_format import StreamingFileWriter, header_bytes, tensor_nbytes

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
    return {
        name: sum(tensor_nbytes(s, d) for _, s, d in shard) for name, shard in zip(shard_names(len(shards)), shards)
    }


@dataclass(frozen=True)
class Placement:
    """Where one tensor's bytes go: its shard file and the byte offset of its first element there."""

    file: str
    offset: int
    nbytes: int


def shard_layout(specs: list[TensorSpec], max_shard_bytes: int) -> dict[str, Placement]:
    """Every tensor's placement, known before any tensor is computed (the writer puts them exactly there)."""
    out = {}
    shards = plan_shards(specs, max_shard_bytes)
    for file, shard in zip(shard_names(len(shards)), shards):
        offset = len(header_bytes(shard))
        for name, shape, dtype in shard:
            n = tensor_nbytes(shape, dtype)
            out[name] = Placement(file, offset, n)
            offset += n
    return out


class ShardedWriter:
    """Writes ``specs`` into ``folder`` as HF-style shards, tensor by tensor or in element ranges.

    Shards are opened in order: writing a tensor of a later shard closes the
    current one (which must then be complete).
    """

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int):
        self.folder = Path(folder)
        self.shards = plan_shards(specs, max_shard_bytes)
        self.files = shard_names(len(self.shards))
        self._shard_of = {spec[0]: i for i, shard in enumerate(self.shards) for spec in shard}
        self._current: StreamingFileWriter | None = None
        self._current_index = -1
        self.total_bytes = sum(tensor_nbytes(s, d) for _, s, d in specs)

    def _shard(self, name: str) -> StreamingFileWriter:
        index = self._shard_of[name]
        if index != self._current_index:
            if index < self._current_index:
                raise RuntimeError(
                    f"{self.folder}: tensor {name!r} of shard {index + 1} written after shard {self._current_index + 1}"
                )
            if self._current is not None:
                self._current.close()
            self._current_index = index
            self._current = StreamingFileWriter(self.folder / self.files[index], self.shards[index])
        assert self._current is not None  # opened when its shard's first tensor came
        return self._current

    def write_at(self, name: str, start: int, values: torch.Tensor) -> None:
        """Elements ``start .. start + values.numel()`` of the flattened tensor ``name``, in place in its shard."""
        self._shard(name).write_at(name, start, values)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._shard(name).write(name, tensor)

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
