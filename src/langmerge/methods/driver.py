"""Running one tensor's merge over chunks: the layout, the passes, the kernel choice, the thread count.

``run`` is the whole protocol (docs/methods.md, "Passes"): given a planned
``TensorMerge``, a reader of chunks and a writer of output chunks, it runs each
statistics pass over every chunk in row order, then the merge pass. The merge
executor calls it with its sources and output file; ``merge_in_memory`` calls
it with tensors held in memory (tests, the in-memory tuner, one-off merges).
Peak memory is set by the chunk size, not by the tensor.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from langmerge.methods import fused_cpu
from langmerge.methods.base import Block, ChunkRule, Kernel, Method, MethodParameters, TensorInfo, TensorMerge

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 8 << 20  # per input, in the compute dtype

Reader = Callable[[int, int], Block]  # (start, stop) flat element range -> the chunk's base and inputs
Writer = Callable[[int, int, torch.Tensor], None]  # (start, stop, merged values) for that range


def chunk_ranges(
    shape: tuple[int, ...], element_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, rule: ChunkRule = ChunkRule()
) -> list[tuple[int, int]]:
    """The chunks of a tensor: flat element ranges ``[start, stop)`` in row order, covering it once.

    Chunks hold whole rows (as many as fit in ``chunk_bytes``); a row larger
    than that is split into ranges of ``chunk_bytes`` (so memory stays bounded
    whatever the tensor), unless the rule asks for whole rows. A 1-D tensor's
    rows are its elements. ``rule.multiple_of`` takes precedence over rows.
    """
    info = TensorInfo("", tuple(shape), torch.float32)
    numel, row = info.numel, info.row_numel
    if numel == 0:
        return []
    if rule.whole_tensor:
        return [(0, numel)]
    budget = max(1, chunk_bytes // max(1, element_size))
    if rule.whole_rows:
        step = row * max(1, budget // row)
    elif rule.multiple_of > 1:
        step = rule.multiple_of * max(1, budget // rule.multiple_of)
    elif row <= budget:
        step = row * (budget // row)
    else:
        step = budget
    return [(a, min(a + step, numel)) for a in range(0, numel, step)]


def run_statistics(merge: TensorMerge, read: Reader, ranges: list[tuple[int, int]]) -> None:
    """Every statistics pass of ``merge`` over every chunk, in the order given (row order)."""
    for stats in merge.statistics():
        for a, b in ranges:
            stats.update(read(a, b))
        stats.finish()


def run(merge: TensorMerge, read: Reader, write: Writer, ranges: list[tuple[int, int]]) -> None:
    """Every statistics pass over every chunk, then the merge pass; chunks in the order given (row order)."""
    run_statistics(merge, read, ranges)
    for a, b in ranges:
        write(a, b, merge.merge(read(a, b)))


def memory_reader(base: torch.Tensor | None, inputs: list[torch.Tensor]) -> Reader:
    """A reader of chunks of tensors held in memory (views, no copies)."""
    flat_base = base.reshape(-1) if base is not None else None
    flat_inputs = [x.reshape(-1) for x in inputs]

    def read(a: int, b: int) -> Block:
        return Block(a, None if flat_base is None else flat_base[a:b], [x[a:b] for x in flat_inputs])

    return read


@functools.cache
def _note_reference_only() -> None:
    log.info(
        "the fused CPU kernels are not built (no C compiler when langmerge was installed): "
        "merges run the reference torch kernel"
    )


def choose_kernel(method: Method, params: MethodParameters, tensor: TensorInfo, fused: bool = True) -> Kernel:
    """The kernel a merge plans for one tensor: the fused one where it applies (and ``fused``), else the reference."""
    kernels = method.kernels(params, tensor.dtype, tensor.device)
    if fused and "fused" in kernels and tensor.numel >= fused_cpu.MIN_NUMEL:
        return "fused"
    if fused and tensor.device.type == "cpu" and not fused_cpu.available():
        _note_reference_only()
    return "reference"


def merge_in_memory(
    method: Method,
    params: MethodParameters,
    base: torch.Tensor | None,
    inputs: list[torch.Tensor],
    *,
    kernel: Kernel | None = None,
    generators: list[torch.Generator] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    name: str = "<tensor>",
    layer: int | None = None,
    num_layers: int | None = None,
) -> torch.Tensor:
    """Merge one tensor held in memory, chunk by chunk (``inputs`` exclude the base; one compute dtype).

    ``kernel`` None chooses as a merge plans (``choose_kernel``). ``name``,
    ``layer`` and ``num_layers`` are what the method knows of the tensor
    (``TensorInfo``). The result is in the compute dtype, or in the method's
    ``result_dtype``. Raises ``NonFiniteMerge`` when it holds NaN or Inf.
    """
    first = base if base is not None else inputs[0]
    info = TensorInfo(name, tuple(first.shape), first.dtype, first.device, layer, num_layers)
    kernel = kernel or choose_kernel(method, params, info)
    merge = method.plan(params, info, kernel, generators)
    out = torch.empty(info.numel, dtype=merge.result_dtype or first.dtype, device=first.device)

    def write(a: int, b: int, values: torch.Tensor) -> None:
        out[a:b] = values

    ranges = chunk_ranges(info.shape, first.element_size(), chunk_bytes, merge.chunk_rule)
    run(merge, memory_reader(base, inputs), write, ranges)
    return out.reshape(first.shape)


@contextmanager
def thread_limit(threads: int | None) -> Iterator[None]:
    """Run torch (and so the fused kernels, which take torch's count) on ``threads`` threads, then restore.

    torch's count is process-wide: it is set for the duration of the block and
    put back afterwards, whatever happens inside.
    """
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
