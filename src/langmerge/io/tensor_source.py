"""What a merge reads tensors from: the ``TensorSource`` interface and the sources that are views of others.

A source knows every tensor's name, shape and dtype up front (from headers)
and reads a range of a tensor's elements on demand into a buffer the caller
owns (``read(name, start, stop, out)``): elements ``start .. stop`` of the
flattened, row-major tensor, so a range of whole rows is ``row * width .. ``.
Nothing is held between reads, so a merge's memory is the caller's buffers.

Kinds: safetensors checkpoints (``io.reader.CheckpointReader``, positional
reads from the file), pickle checkpoints (``io.pickle_reader.PickleReader``,
with ``--allow-pickle``), LoRA adapters applied to their base row block by row
block (``io.lora.LoraSource``), tensors held in memory (``MemorySource``: the
in-memory tuner), and rows gathered from another source (``GatheredRows``:
vocabulary-aligned rows, a tied model's input embedding standing for its
output layer). Every file is opened by io/files.py's rule.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from typing_extensions import Self

from langmerge.errors import LangmergeError


class TensorSource(ABC):
    """A model's tensors by name: shapes and dtypes known up front, elements read on demand.

    Subclasses give ``names``, ``shape``, ``dtype`` and ``read``; the rest is shared.
    """

    label: str  # how messages name the model (the recipe's reference)
    folder: Path
    in_memory = False  # True where ``read`` returns views of tensors held already (it needs no buffer)

    @property
    @abstractmethod
    def names(self) -> list[str]:
        """Every tensor's name, in the checkpoint's order."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype (what ``check`` reports and an output keeps without a recipe dtype)."""

    def read_dtype(self, name: str) -> torch.dtype:
        """The dtype ``read`` delivers (the stored one, unless the source computes its values: LoRA, in float32)."""
        return self.dtype(name)

    @abstractmethod
    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start .. stop`` of the flattened tensor ``name``.

        ``out`` is a 1-D CPU tensor of ``read_dtype(name)`` with at least
        ``stop - start`` elements; the values are written into it and its
        filled view returned, except by a source that holds them in memory
        already, which may return a view of its own (never to be written to).
        Safe to call from several threads.
        """

    def config(self) -> dict[str, Any] | None:
        """The model's config.json (checked), or None."""
        return None

    def close(self) -> None:
        return None

    # ------------------------------------------------------------------ shared

    def __contains__(self, name: str) -> bool:
        return name in set(self.names)

    @property
    def tokenizer_folder(self) -> Path:
        """Where the model's tokenizer files are."""
        return self.folder

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def missing(self, name: str) -> LangmergeError:
        return LangmergeError(f"model {self.label}: tensor {name!r} is missing")

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``, in ``read_dtype`` (small tensors, tests: a merge reads ranges)."""
        if name not in self:
            raise self.missing(name)
        n = self.numel(name)
        out = torch.empty(n, dtype=self.read_dtype(name))
        return self.read(name, 0, n, out).reshape(self.shape(name))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def into(out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` in ``out``'s first elements (no copy when they are there already); returns that view."""
    view = out[: values.numel()]
    if values.numel() and (values.data_ptr() != view.data_ptr() or values.dtype != view.dtype):
        view.copy_(values.reshape(-1))
    return view


class MemorySource(TensorSource):
    """Tensors held in memory (the in-memory tuner, tests); ``read`` returns views of them."""

    in_memory = True

    def __init__(
        self,
        label: str,
        tensors: dict[str, torch.Tensor],
        config: dict[str, Any] | None = None,
        folder: Path | None = None,
    ):
        self.label = label
        self.folder = Path(folder) if folder is not None else Path(label)
        self._tensors = {name: t.reshape(-1) for name, t in tensors.items()}
        self._shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        self._config = config

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return self._tensors[name][start:stop]

    def config(self) -> dict[str, Any] | None:
        return self._config

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())


class GatheredRows(TensorSource):
    """Tensors made of another source's rows: row ``j`` of ``name`` is row ``rows[j]`` of the inner tensor.

    ``tensors`` maps each name to ``(inner name, rows)``; ``rows`` None takes
    the inner tensor as it is (a tied model's input embedding read as its
    output layer). Reads go to the inner source run by run of consecutive rows.
    """

    def __init__(self, inner: TensorSource, tensors: dict[str, tuple[str, torch.Tensor | None]]):
        self.inner = inner
        self.label = inner.label
        self.folder = inner.folder
        self._tensors = {
            name: (target, None if rows is None else rows.to(torch.long).cpu())
            for name, (target, rows) in tensors.items()
        }

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    @property
    def tokenizer_folder(self) -> Path:
        return self.inner.tokenizer_folder

    def shape(self, name: str) -> tuple[int, ...]:
        target, rows = self._tensors[name]
        shape = tuple(self.inner.shape(target))
        return shape if rows is None else (int(rows.numel()), *shape[1:])

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(self._tensors[name][0])

    def read_dtype(self, name: str) -> torch.dtype:
        return self.inner.read_dtype(self._tensors[name][0])

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        target, rows = self._tensors[name]
        if rows is None:
            return self.inner.read(target, start, stop, out)
        view = out[: stop - start]
        if stop <= start:
            return view
        width = math.prod(self.inner.shape(target)[1:])
        first, last = start // width, (stop - 1) // width
        wanted = rows[first : last + 1]
        breaks = (torch.nonzero(wanted[1:] - wanted[:-1] != 1).reshape(-1) + 1).tolist()
        for a, b in zip([0, *breaks], [*breaks, len(wanted)]):  # runs of consecutive inner rows
            lo = max(start, (first + a) * width)
            hi = min(stop, (first + b) * width)
            inner_lo = int(wanted[a]) * width + (lo - (first + a) * width)
            into(view[lo - start :], self.inner.read(target, inner_lo, inner_lo + hi - lo, view[lo - start :]))
        return view

    def config(self) -> dict[str, Any] | None:
        return self.inner.config()
