"""The safetensors file format, read and written without loading whole files.

A safetensors file is an 8-byte little-endian header length, a JSON header
mapping tensor names to ``{dtype, shape, data_offsets}``, then raw bytes.
Reading the header ourselves gives shapes and dtypes for free and lets us
report a truncated or corrupt file by name; writing it ourselves lets the
writer stream one tensor at a time into a shard whose header is known up front.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from langmerge.errors import LangmergeError

DTYPE_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}

# The format caps the header at 100 MB; a larger claimed length means corruption.
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in one file."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header; every failure names the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise LangmergeError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise LangmergeError(
                    f"{path}: corrupt safetensors header (claims {header_len} bytes, file has {size})"
                )
            header_bytes = f.read(header_len)
    except OSError as exc:
        raise LangmergeError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LangmergeError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise LangmergeError(f"{path}: corrupt safetensors header (not a JSON object)")

    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_TO_DTYPE[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LangmergeError(f"{path}: corrupt safetensors entry for tensor {name!r} ({exc!r})") from exc
        entry = TensorEntry(name, path, dtype, shape, data_start + begin, data_start + end)
        expected = entry.numel * _itemsize(dtype)
        if end < begin or entry.nbytes != expected:
            raise LangmergeError(
                f"{path}: corrupt safetensors entry for tensor {name!r} "
                f"(offsets {begin}..{end} for {expected} bytes)"
            )
        if entry.end > size:
            raise LangmergeError(
                f"{path}: truncated file: tensor {name!r} ends at byte {entry.end}, file has {size}"
            )
        entries[name] = entry
    return entries


def read_tensor(entry: TensorEntry, handle=None, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes with a plain read, into ``buffer`` (uint8, large enough) or a fresh one.

    A plain read (not an mmap) keeps the process's resident memory to the
    tensors it holds, instead of every page of every input it has touched.
    Reading into a reused buffer also avoids faulting in fresh pages, which
    costs more than the read itself.
    """
    buf = buffer[: entry.nbytes] if buffer is not None else torch.empty(entry.nbytes, dtype=torch.uint8)
    if entry.nbytes:
        view = memoryview(buf.numpy())
        own = handle is None
        f = open(entry.file, "rb") if own else handle
        try:
            f.seek(entry.begin)
            got = f.readinto(view)
        finally:
            if own:
                f.close()
        if got != entry.nbytes:
            raise LangmergeError(f"{entry.file}: truncated file while reading tensor {entry.name!r}")
    return buf.view(entry.dtype).reshape(entry.shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * _itemsize(dtype)


class StreamingFileWriter:
    """Writes one safetensors file whose tensor list is known in advance.

    The header is written first; tensors must then be given in header order.
    """

    def __init__(self, path: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]], metadata=None):
        self.path = path
        self._expected = [name for name, _, _ in layout]
        self._specs = {name: (shape, dtype) for name, shape, dtype in layout}
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, shape, dtype in layout:
            n = tensor_nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._expected) or self._expected[self._next] != name:
            raise RuntimeError(f"{self.path}: tensor {name!r} written out of order")
        shape, dtype = self._specs[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"{self.path}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}"
            )
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            self._file.close()
            raise RuntimeError(f"{self.path}: closed after {self._next} of {len(self._expected)} tensors")
        # No fsync: atomicity comes from the output folder's final rename, and
        # a durable flush would make a merge disk-bound on these machines.
        self._file.close()

    def abort(self) -> None:
        self._file.close()
