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
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from typing_extensions import Buffer

from langmerge.errors import LangmergeError
from langmerge.io.files import open_regular, parse_json

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

# Every dtype name the safetensors format defines that langmerge does not read:
# named as unsupported rather than called corrupt.
UNSUPPORTED_DTYPES = frozenset(
    {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "U16", "U32", "U64", "C64"}
)

# The format caps the header at 100 MB; a larger claimed length means corruption.
_MAX_HEADER_BYTES = 100_000_000
# Offsets and dimensions are unsigned 64-bit in the format; torch's sizes are signed 64-bit.
_MAX_SIZE = 2**63 - 1
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


def _is_utf8(text: str) -> bool:
    """False for a string holding a lone surrogate (a JSON ``\\ud800`` escape), which is not Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _size(value: object) -> int | None:
    """``value`` when it is a JSON integer in [0, 2**63), else None (bool, float, string, negative, huge)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_SIZE:
        return value
    return None


def _sizes(value: object) -> tuple[int, ...] | None:
    """``value`` as a tuple when it is a JSON list of ``_size`` integers, else None."""
    if not isinstance(value, list):
        return None
    sizes = [_size(v) for v in value]
    return tuple(s for s in sizes if s is not None) if None not in sizes else None


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


def _parse_json(path: Path, header_bytes: bytes) -> dict[str, Any]:
    header = parse_json(header_bytes, path, problem="corrupt safetensors header", unique_keys=True)
    if not isinstance(header, dict):
        raise LangmergeError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header


def _check_metadata(path: Path, metadata: object) -> None:
    ok = metadata is None or (
        isinstance(metadata, dict)
        and all(isinstance(v, str) and _is_utf8(k) and _is_utf8(v) for k, v in metadata.items())
    )
    if not ok:
        raise LangmergeError(f"{path}: corrupt safetensors header ('__metadata__' must map strings to strings)")


def _entry(path: Path, name: str, info: object, data_start: int) -> TensorEntry:
    """One header entry, checked field by field (the byte length against shape and dtype too)."""
    bad = f"{path}: corrupt safetensors entry for tensor {name!r}"
    if not _is_utf8(name):
        raise LangmergeError(f"{path}: corrupt safetensors header (tensor name {name!r} is not valid Unicode)")
    if not isinstance(info, dict):
        raise LangmergeError(f"{bad} (not a JSON object)")
    if set(info) != _ENTRY_KEYS:
        missing, extra = sorted(_ENTRY_KEYS - set(info)), sorted(set(info) - _ENTRY_KEYS)
        raise LangmergeError(
            f"{bad} ({'missing ' + ', '.join(missing) if missing else 'unknown key ' + ', '.join(extra)})"
        )
    dtype_name = info["dtype"]
    if isinstance(dtype_name, str) and dtype_name in UNSUPPORTED_DTYPES:
        raise LangmergeError(f"{path}: tensor {name!r} has dtype {dtype_name}, which langmerge does not support")
    if not isinstance(dtype_name, str) or dtype_name not in ST_TO_DTYPE:
        raise LangmergeError(f"{bad} (unknown dtype {dtype_name!r})")
    raw_shape, raw_offsets = info["shape"], info["data_offsets"]
    shape = _sizes(raw_shape)
    if shape is None:
        raise LangmergeError(f"{bad} (shape {raw_shape!r} is not a list of non-negative integers)")
    offsets = _sizes(raw_offsets)
    if offsets is None or len(offsets) != 2:
        raise LangmergeError(f"{bad} (data_offsets {raw_offsets!r} is not two non-negative integers)")
    numel = 1
    for d in shape:  # as the format does: every partial product must fit
        numel *= d
        if numel > _MAX_SIZE:
            raise LangmergeError(f"{bad} (shape {list(shape)} is too large)")
    dtype = ST_TO_DTYPE[dtype_name]
    begin, end = offsets
    expected = numel * _itemsize(dtype)
    if end < begin or end - begin != expected:
        raise LangmergeError(f"{bad} (offsets {begin}..{end} for {expected} bytes of {dtype_name} {list(shape)})")
    return TensorEntry(name, path, dtype, shape, data_start + begin, data_start + end)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate a safetensors header; every failure is a one-line LangmergeError naming the file.

    As strict as the safetensors library: a UTF-8 JSON object (spaces may pad it),
    each tensor's ``dtype``, ``shape`` and ``data_offsets`` well formed and its
    byte length equal to shape times dtype size, and the tensors, in offset
    order, tiling the data region with no gap, overlap or trailing byte.
    Stricter where the library is lax: a key given twice, or an unknown key in a
    tensor entry, is refused. Only regular files are opened (io/files.py).
    """
    with open_regular(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise LangmergeError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise LangmergeError(f"{path}: corrupt safetensors header (claims {header_len} bytes, file has {size})")
            header_bytes = f.read(header_len)
        except OSError as exc:
            raise LangmergeError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    header = _parse_json(path, header_bytes)
    _check_metadata(path, header.get("__metadata__"))

    data_start = 8 + header_len
    entries = {name: _entry(path, name, info, data_start) for name, info in header.items() if name != "__metadata__"}
    position = data_start
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            what = "overlaps the tensor before it" if entry.begin < position else "leaves a gap before it"
            raise LangmergeError(
                f"{path}: corrupt safetensors entry for tensor {entry.name!r} (data_offsets "
                f"{entry.begin - data_start}..{entry.end - data_start} {what}; "
                f"expected to start at {position - data_start})"
            )
        position = entry.end
    if position > size:
        last = max(entries.values(), key=lambda e: e.end)
        raise LangmergeError(f"{path}: truncated file: tensor {last.name!r} ends at byte {last.end}, file has {size}")
    if position < size:
        raise LangmergeError(
            f"{path}: corrupt safetensors file (the data region holds {size - data_start} bytes "
            f"but its tensors cover {position - data_start})"
        )
    return entries


def read_tensor(entry: TensorEntry, handle: BinaryIO | None = None, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Read one whole tensor's bytes with a plain read, into ``buffer`` (uint8, large enough) or a fresh one.

    A plain read (not an mmap) keeps the process's resident memory to the
    tensors it holds, instead of every page of every input it has touched.
    """
    buf = buffer[: entry.nbytes] if buffer is not None else torch.empty(entry.nbytes, dtype=torch.uint8)
    own = handle is None
    f = open_regular(entry.file) if handle is None else handle
    try:
        read_range(entry, f.fileno(), 0, entry.numel, buf.view(entry.dtype) if entry.nbytes else buf)
    finally:
        if own:
            f.close()
    return buf.view(entry.dtype).reshape(entry.shape)


def read_range(entry: TensorEntry, fd: int, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """Elements ``start .. stop`` of the flattened tensor, read at their offset in the file into ``out``.

    ``out`` is 1-D, of the entry's dtype, with at least ``stop - start``
    elements; returns the filled view. A positional read (``preadv``) needs
    no seek, so several threads may read one file; reading into a reused
    buffer avoids faulting in fresh pages, which costs more than the read.
    """
    n = stop - start
    view = out[:n]
    nbytes = n * view.element_size()
    if nbytes == 0:
        return view
    target = view.view(torch.uint8).numpy().data
    offset = entry.begin + start * view.element_size()
    done = 0
    try:
        while done < nbytes:
            got = os.preadv(fd, [target[done:]], offset + done)
            if got == 0:
                raise LangmergeError(f"{entry.file}: truncated file while reading tensor {entry.name!r}")
            done += got
    except OSError as exc:
        raise LangmergeError(f"{entry.file}: cannot read tensor {entry.name!r} ({exc.strerror or exc})") from exc
    return view


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * _itemsize(dtype)


class StreamingFileWriter:
    """Writes one safetensors file whose tensor list is known in advance.

    The header is written when the file is opened, so every tensor's byte
    offset is fixed before any tensor is computed; ``write_at`` puts a range
    of a tensor's elements at its place (positional writes, in any order),
    and ``close`` checks that every byte was written.
    """

    def __init__(
        self,
        path: Path,
        layout: list[tuple[str, tuple[int, ...], torch.dtype]],
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = path
        self._specs = {name: (shape, dtype) for name, shape, dtype in layout}
        header = header_bytes(layout, metadata)
        self.data_start = len(header)
        self._offsets: dict[str, int] = {}
        offset = self.data_start
        for name, shape, dtype in layout:
            self._offsets[name] = offset
            offset += tensor_nbytes(shape, dtype)
        self._written = dict.fromkeys(self._specs, 0)
        self._file = open(path, "wb")
        self._fd = self._file.fileno()
        self._pwrite(header, 0)

    def _pwrite(self, data: Buffer, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done

    def write_at(self, name: str, start: int, values: torch.Tensor) -> None:
        """Elements ``start .. start + values.numel()`` of tensor ``name`` (``values``: 1-D, the planned dtype)."""
        shape, dtype = self._specs[name]
        if values.dtype != dtype or values.dim() != 1 or start < 0 or start + values.numel() > math.prod(shape):
            raise RuntimeError(
                f"{self.path}: elements {start}..{start + values.numel()} of {name!r} "
                f"({values.dtype}) do not fit the planned {list(shape)} {dtype}"
            )
        t = values.detach().to("cpu").contiguous()
        if t.numel():
            self._pwrite(t.view(torch.uint8).numpy().data, self._offsets[name] + start * t.element_size())
        self._written[name] += t.numel() * t.element_size()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The whole tensor ``name``."""
        shape, dtype = self._specs[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"{self.path}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}"
            )
        self.write_at(name, 0, tensor.reshape(-1))

    def close(self) -> None:
        missing = [n for n, (s, d) in self._specs.items() if self._written[n] != tensor_nbytes(s, d)]
        self._file.close()
        if missing:
            raise RuntimeError(f"{self.path}: closed with {len(missing)} tensors not written whole ({missing[0]!r}...)")
        # No fsync: atomicity comes from the output folder's final rename, and
        # a durable flush would make a merge disk-bound on these machines.

    def abort(self) -> None:
        self._file.close()


def header_bytes(
    layout: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding ``layout`` in that order."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in layout:
        n = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw
