"""The one executor: planned tensors merged chunk by chunk, in flat memory, reading, computing and writing at once.

``langmerge merge`` (``merge``), ``tune``'s in-memory merger and ``analyze``
all run a plan's tasks through ``Executor``; only where the merged chunks go
differs (the output shards, tensors in memory, or a tally in place of the
merge pass).

Each task (a tensor, or a row group of a vocabulary tensor) runs as its
method asks (docs/methods.md, "Passes"): every statistics pass over every
chunk in row order, then the merge pass. Three threads share the work:

- a reader thread fills chunks: each input's elements read at their offset
  into a reused buffer (``TensorSource.read``), cast to the compute dtype and
  moved to the device; it runs one pass ahead (the next pass of the same
  task, or the next task's first pass), bounded by ``READ_SLOTS`` buffers;
- the calling thread runs the passes and the merge (the kernels start their
  own threads), casts each merged chunk to the output dtype and checks it;
- a writer thread puts each chunk at its byte offset in its shard (``FileSink``).

Memory is a constant set by the budget (``memory``, ``--memory``), whatever
the model: half of it for the pipeline's buffers, which fixes the chunk size
(``chunk_bytes``), and the rest for holding a tensor whose inputs fit a
quarter of it (two such, alternately) between its passes, so that a
statistics pass does not read it again. A method's ``ChunkRule`` can ask for
more (whole rows, or the whole tensor: docs/methods.md, "The layout").
Nothing here assumes the CPU: with ``device`` a GPU, blocks are moved there
after reading and merged chunks back before writing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from langmerge.devices import resolve_device
from langmerge.errors import LangmergeError
from langmerge.io.metadata import write_config, write_model_card
from langmerge.io.output import atomic_output_dir, check_output_free, check_space
from langmerge.io.sources import recipe_input_paths
from langmerge.io.writer import ShardedWriter
from langmerge.merge.plan import (
    DEFAULT_SHARD_BYTES,
    MergePlan,
    TensorPlan,
    TensorRef,
    TensorTask,
    iter_tasks,
    plan_merge,
)
from langmerge.merge.recipe import Recipe, load_recipe, read_recipe_documents
from langmerge.merge.tokenizer_block import resolve_chat_template, write_chat_template
from langmerge.methods.base import Block, NonFiniteMerge, Pass, TensorMerge
from langmerge.methods.driver import chunk_ranges, thread_limit
from langmerge.methods.fused_cpu import all_finite
from langmerge.progress import Reporter

log = logging.getLogger(__name__)

DEFAULT_MEMORY = 512 << 20  # bytes of tensor buffers a merge holds (the interpreter and torch add ~0.25 GB)
MIN_MEMORY = 4 << 20
READ_SLOTS = 3  # chunks on the read side: one being filled, one ready, one being merged
WRITE_SLOTS = 2  # merged chunks being written or waiting to be
MAX_CHUNK_BYTES = 64 << 20  # per input: larger chunks gain nothing and delay the pipeline's start
MIN_CHUNK_ELEMENTS = 4096
_ALIGN = 64


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def check_memory(memory: int) -> int:
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < MIN_MEMORY:
        raise LangmergeError(f"memory {memory!r}: expected a number of bytes of at least {MIN_MEMORY:,} (4MiB)")
    return memory


def _staged(task: TensorTask, device: torch.device) -> list[bool]:
    """Per input: whether it is read into a staging buffer and then cast or moved (else read straight into its
    block)."""
    return [ref.source.read_dtype(ref.name) != task.info.dtype or device.type != "cpu" for ref in task.refs]


_NOWHERE = torch.empty(0)


def load(ref: TensorRef, dtype: torch.dtype, device: torch.device, memory: int = DEFAULT_MEMORY) -> torch.Tensor:
    """The whole tensor ``ref`` names, in ``dtype`` on ``device``, read in pieces of an eighth of ``memory``."""
    source, name = ref.source, ref.name
    n = source.numel(name)
    out = torch.empty(n, dtype=dtype, device=device)
    read_dtype = source.read_dtype(name)
    step = max(1, (memory // 8) // _size(read_dtype))
    staging = torch.empty(min(n, step), dtype=read_dtype)
    for a in range(0, n, step):
        b = min(n, a + step)
        out[a:b].copy_(source.read(name, a, b, staging))
    return out.reshape(source.shape(name))


def chunk_bytes(task: TensorTask, out_dtype: torch.dtype, memory: int) -> int:
    """The chunk size of a task, per input in the compute dtype: what half of ``memory`` allows for the pipeline.

    Per element of a chunk: ``READ_SLOTS`` copies of every input (and of its
    staging buffer where it is cast or moved), ``WRITE_SLOTS`` of the output,
    and the kernel's working space (the reference kernel's torch steps allocate
    a few stacks of the models' task vectors; the fused kernel one output).
    """
    c = _size(task.info.dtype)
    device = task.info.device
    refs = task.refs
    staging = sum(_size(ref.source.read_dtype(ref.name)) for ref, s in zip(refs, _staged(task, device)) if s)
    kernel = 2 * c if task.kernel == "fused" else (4 * len(refs) + 8) * max(c, 4)
    per_element = READ_SLOTS * (len(refs) * c + staging) + WRITE_SLOTS * _size(out_dtype) + kernel
    elements = max(MIN_CHUNK_ELEMENTS, min((memory // 2) // per_element, MAX_CHUNK_BYTES // c))
    return elements * c


@dataclass
class Timings:
    """Where a run's time went: seconds the reader and writer threads were busy, and the caller computing or waiting."""

    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    wait: float = 0.0  # the caller waiting for a chunk to be read, or for a write buffer

    def text(self) -> str:
        return (
            f"read {self.read:.1f} s, compute {self.compute:.1f} s, write {self.write:.1f} s, waiting {self.wait:.1f} s"
        )


# ----------------------------------------------------------------------------- buffers


class _Buffers:
    """One set of chunk buffers: per input a block buffer (compute dtype, on the device) and a staging buffer
    (the dtype read, on the CPU), grown as needed and reused."""

    def __init__(self, device: torch.device):
        self.device = device
        self.blocks: dict[int, torch.Tensor] = {}
        self.staging: dict[int, torch.Tensor] = {}

    def _get(
        self, store: dict[int, torch.Tensor], k: int, dtype: torch.dtype, n: int, device: torch.device
    ) -> torch.Tensor:
        buf = store.get(k)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            store[k] = buf = torch.empty(
                max(n, 1), dtype=dtype, device=device, pin_memory=device.type == "cpu" and self.device.type == "cuda"
            )
        return buf[:n]

    def block(self, k: int, dtype: torch.dtype, n: int) -> torch.Tensor:
        return self._get(self.blocks, k, dtype, n, self.device)

    def stage(self, k: int, dtype: torch.dtype, n: int) -> torch.Tensor:
        return self._get(self.staging, k, dtype, n, torch.device("cpu"))


class _Arena:
    """A tensor's chunks held between its passes: one allocation, reused by the next tensor held in it."""

    def __init__(self, capacity: int, device: torch.device):
        self.capacity, self.device = capacity, device
        self.memory: torch.Tensor | None = None
        self.used = 0

    def reset(self) -> None:
        self.used = 0

    def block(self, k: int, dtype: torch.dtype, n: int) -> torch.Tensor:
        if self.memory is None:
            self.memory = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
        nbytes = n * _size(dtype)
        start = -(-self.used // _ALIGN) * _ALIGN
        if start + nbytes > self.capacity:
            raise RuntimeError("a held tensor outgrew its arena")  # Executor._open sized it first
        self.used = start + nbytes
        return self.memory[start : start + nbytes].view(dtype)


# ----------------------------------------------------------------------------- the reader thread


@dataclass
class _Order:
    task: TensorTask
    ranges: list[tuple[int, int]]
    hold: bool


class _Reader:
    """Fills chunks on a thread of its own, one pass ahead of the caller, in bounded memory."""

    def __init__(self, device: torch.device, arena_bytes: int, timings: Timings):
        self.device = device
        self.timings = timings
        self.orders: queue.Queue[_Order | None] = queue.Queue()  # None: stop
        # a block read, with the buffers to free once it is used (None: held in an arena), or the reader's error
        self.ready: queue.Queue[tuple[Block, _Buffers | None] | BaseException] = queue.Queue()
        self.free: queue.Queue[_Buffers] = queue.Queue()
        for _ in range(READ_SLOTS):
            self.free.put(_Buffers(device))
        self.staging = _Buffers(device)  # for held tensors (their blocks are in an arena)
        self.arenas = [_Arena(arena_bytes, device), _Arena(arena_bytes, device)] if arena_bytes else []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="langmerge-reader", daemon=True)
        self.thread.start()

    def order(self, task: TensorTask, ranges: list[tuple[int, int]], hold: bool) -> None:
        """Read one pass over the task's chunks (after the passes ordered before)."""
        self.orders.put(_Order(task, ranges, hold))

    def blocks(self, count: int) -> Iterator[Block]:
        """The next pass's ``count`` blocks, in order; each block's buffers are reused once the loop body is done."""
        for _ in range(count):
            start = time.perf_counter()
            item = self.ready.get()
            self.timings.wait += time.perf_counter() - start
            if isinstance(item, BaseException):
                raise item
            block, buffers = item
            yield block
            if buffers is not None:
                self.free.put(buffers)

    def _fill(self, task: TensorTask, a: int, b: int, buffers: _Buffers | _Arena, staging: _Buffers) -> Block:
        n = b - a
        dtype = task.info.dtype
        values = []
        for k, (ref, staged) in enumerate(zip(task.refs, _staged(task, self.device))):
            if ref.source.in_memory:
                got = ref.source.read(ref.name, a, b, _NOWHERE)
                if got.dtype == dtype and got.device == self.device:
                    values.append(got)
                    continue
            target = buffers.block(k, dtype, n)
            got = ref.source.read(
                ref.name, a, b, staging.stage(k, ref.source.read_dtype(ref.name), n) if staged else target
            )
            if got.dtype != dtype or got.device != self.device:
                target.copy_(got)
                got = target
            values.append(got)
        base = values.pop(0) if task.base is not None else None
        return Block(a, base, values)

    def _take(self) -> _Buffers | None:
        while not self.stopping.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _run(self) -> None:
        held: TensorTask | None = None
        held_blocks: list[Block] = []
        arena = -1
        try:
            while not self.stopping.is_set():
                order = self.orders.get()
                if order is None:
                    return
                if order.hold and order.task is held:  # a later pass of a held tensor: no reading
                    for block in held_blocks:
                        self.ready.put((block, None))
                    continue
                if order.hold:
                    arena = (arena + 1) % 2
                    self.arenas[arena].reset()
                    held, held_blocks = order.task, []
                for a, b in order.ranges:
                    if order.hold:  # into the arena, kept for the later passes
                        start = time.perf_counter()
                        block = self._fill(order.task, a, b, self.arenas[arena], self.staging)
                        self.timings.read += time.perf_counter() - start
                        held_blocks.append(block)
                        self.ready.put((block, None))
                        continue
                    buffers = self._take()
                    if buffers is None:
                        return
                    start = time.perf_counter()
                    block = self._fill(order.task, a, b, buffers, buffers)
                    self.timings.read += time.perf_counter() - start
                    self.ready.put((block, buffers))
        except BaseException as exc:  # handed to the caller, which raises it
            self.ready.put(exc)

    def close(self) -> None:
        """Stop reading (a read in progress ends first) and let go of every buffer."""
        self.stopping.set()
        self.orders.put(None)
        self.thread.join()


# ----------------------------------------------------------------------------- where merged chunks go


def _row_runs(task: TensorTask, start: int, stop: int, width: int) -> Iterator[tuple[int, int, int]]:
    """``(output element, values offset, count)`` for the task's elements ``start .. stop`` (rows mapped)."""
    rows = task.rows
    assert rows is not None  # called for the tasks of row groups only
    first, last = start // width, (stop - 1) // width
    wanted = rows[first : last + 1]
    breaks = (torch.nonzero(wanted[1:] - wanted[:-1] != 1).reshape(-1) + 1).tolist()
    for a, b in zip([0, *breaks], [*breaks, len(wanted)]):
        lo, hi = max(start, (first + a) * width), min(stop, (first + b) * width)
        yield int(wanted[a]) * width + (lo - (first + a) * width), lo - start, hi - lo


def _width(tensor: TensorPlan) -> int:
    width = 1
    for s in tensor.shape[1:]:
        width *= s
    return width


class FileSink:
    """Merged chunks into the output shards, each at its byte offset, written by a thread of its own."""

    def __init__(self, writer: ShardedWriter, timings: Timings):
        self.writer = writer
        self.timings = timings
        # what to write (None: stop), with the buffers to free once it is written
        self.queue: queue.Queue[
            tuple[TensorPlan, TensorTask, int, torch.Tensor, dict[torch.dtype, torch.Tensor]] | None
        ] = queue.Queue()
        self.free: queue.Queue[dict[torch.dtype, torch.Tensor]] = queue.Queue()
        for _ in range(WRITE_SLOTS):
            self.free.put({})
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="langmerge-writer", daemon=True)
        self.thread.start()

    def stage(self, tensor: TensorPlan, task: TensorTask, start: int, merged: torch.Tensor) -> torch.Tensor:
        """``merged`` cast to the output dtype, on the CPU, in a buffer of the writer's."""
        self._check()
        wait = time.perf_counter()
        self._buffers = self.free.get()
        self.timings.wait += time.perf_counter() - wait
        buf = self._buffers.get(tensor.out_dtype)
        if buf is None or buf.numel() < merged.numel():
            self._buffers[tensor.out_dtype] = buf = torch.empty(max(1, merged.numel()), dtype=tensor.out_dtype)
        view = buf[: merged.numel()]
        view.copy_(merged)
        return view

    def commit(self, tensor: TensorPlan, task: TensorTask, start: int, values: torch.Tensor) -> None:
        self.queue.put((tensor, task, start, values, self._buffers))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            tensor, task, start, values, buffers = item
            try:
                if self.error is None:
                    began = time.perf_counter()
                    if task.rows is None:
                        self.writer.write_at(tensor.name, start, values)
                    else:
                        for at, offset, count in _row_runs(task, start, start + values.numel(), _width(tensor)):
                            self.writer.write_at(tensor.name, at, values[offset : offset + count])
                    self.timings.write += time.perf_counter() - began
            except BaseException as exc:  # raised on the caller's thread at its next chunk
                self.error = exc
            finally:
                self.free.put(buffers)

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _stop(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def finish(self) -> None:
        """Every chunk written, the shards closed and the index written; raises the first write error."""
        self._stop()
        self._check()
        self.writer.finish()

    def abort(self) -> None:
        self._stop()  # a write in flight ends before its file is closed
        self.writer.abort()


class MemorySink:
    """Merged chunks into tensors in memory (``tensors``, by name, in the output dtypes on the CPU)."""

    def __init__(self, tensors: list[TensorPlan]):
        self.tensors = {t.name: torch.empty(t.shape, dtype=t.out_dtype) for t in tensors}

    def stage(self, tensor: TensorPlan, task: TensorTask, start: int, merged: torch.Tensor) -> torch.Tensor:
        if task.rows is not None:
            return merged.to(device="cpu", dtype=tensor.out_dtype)
        view = self.tensors[tensor.name].view(-1)[start : start + merged.numel()]
        view.copy_(merged)
        return view

    def commit(self, tensor: TensorPlan, task: TensorTask, start: int, values: torch.Tensor) -> None:
        if task.rows is None:
            return
        flat = self.tensors[tensor.name].view(-1)
        for at, offset, count in _row_runs(task, start, start + values.numel(), _width(tensor)):
            flat[at : at + count] = values[offset : offset + count]


# ----------------------------------------------------------------------------- the executor


FinalPass = Callable[[TensorPlan, TensorTask, TensorMerge], Callable[[Block], None]]


class Sink(Protocol):
    """Where merged chunks go (``FileSink``, ``MemorySink``): ``stage`` gives the chunk's output buffer, filled,
    and ``commit`` hands it over."""

    def stage(self, tensor: TensorPlan, task: TensorTask, start: int, merged: torch.Tensor) -> torch.Tensor: ...

    def commit(self, tensor: TensorPlan, task: TensorTask, start: int, values: torch.Tensor) -> None: ...


def nonfinite_input(task: TensorTask, block: Block) -> LangmergeError | None:
    """The error naming the first input of ``block`` that holds NaN or Inf, or None where every input is finite."""
    for ref, values in zip(task.refs, [*([block.base] if block.base is not None else []), *block.inputs]):
        if not all_finite(values):
            return LangmergeError(f"model {ref.label}: tensor {task.name!r} contains NaN or Inf")
    return None


def nonfinite_error(task: TensorTask, block: Block | None = None, memory: int = DEFAULT_MEMORY) -> LangmergeError:
    """Name the input that holds NaN or Inf (the chunk's first, then the whole tensor's), else blame the merge.

    Every kernel multiplies its masks, so a NaN or Inf in any input reaches
    the output: checking the output alone keeps the inputs' extra pass off the
    normal path, and this runs only once something is wrong.
    """
    floating = task.info.dtype.is_floating_point
    if block is not None and floating and (found := nonfinite_input(task, block)) is not None:
        return found
    if floating:
        n = task.info.numel
        for ref in task.refs:
            dtype = ref.source.read_dtype(ref.name)
            step = max(1, (memory // 8) // _size(dtype))
            buf = torch.empty(min(n, step), dtype=dtype)
            for a in range(0, n, step):
                if not all_finite(ref.source.read(ref.name, a, min(n, a + step), buf)):
                    return LangmergeError(f"model {ref.label}: tensor {task.name!r} contains NaN or Inf")
    return LangmergeError(
        f"tensor {task.name!r}: the merge produced NaN or Inf (weights summing to zero with normalize?)"
    )


class Executor:
    """Runs planned tensors (see the module doc); ``timings`` says where the time went."""

    def __init__(
        self, device: torch.device = torch.device("cpu"), memory: int = DEFAULT_MEMORY, reporter: Reporter | None = None
    ):
        self.device = device
        self.memory = check_memory(memory)
        self.reporter = reporter
        self.timings = Timings()

    def _open(self, tensor: TensorPlan, task: TensorTask) -> tuple[TensorMerge, list[tuple[int, int]], bool]:
        """The task's merge, its chunks, and whether its inputs fit an arena (a quarter of the budget) to be held."""
        merge = task.open()
        c = _size(task.info.dtype)
        ranges = chunk_ranges(task.info.shape, c, chunk_bytes(task, tensor.out_dtype, self.memory), merge.chunk_rule)
        held = len(task.refs) * sum(-(-(b - a) * c // _ALIGN) * _ALIGN for a, b in ranges)
        return merge, ranges, held <= self.memory // 4

    def run(self, tensors: list[TensorPlan], sink: Sink | None = None, final: FinalPass | None = None) -> None:
        """Every task of ``tensors`` in order: statistics passes, then the merge pass into ``sink`` (or ``final``'s
        pass)."""
        work = list(iter_tasks(tensors))
        if self.reporter is not None:
            self.reporter.start(len(tensors))
        if not work:
            return
        reader = _Reader(self.device, self.memory // 4, self.timings)
        try:
            with torch.no_grad():
                opened = self._open(*work[0])
                reader.order(work[0][1], opened[1], opened[2])
                for index, (tensor, task) in enumerate(work):
                    merge, ranges, hold = opened
                    passes = merge.statistics()
                    while (stats := self._next(passes)) is not None:
                        reader.order(task, ranges, hold)  # the pass after this one reads the task again
                        for block in reader.blocks(len(ranges)):
                            began = time.perf_counter()
                            stats.update(block)
                            self.timings.compute += time.perf_counter() - began
                        stats.finish()
                    if index + 1 < len(work):  # the merge pass is the task's last: read the next task meanwhile
                        opened = self._open(*work[index + 1])
                        reader.order(work[index + 1][1], opened[1], opened[2])
                    consume = (
                        final(tensor, task, merge) if final is not None else self._writes(tensor, task, merge, sink)
                    )
                    for block in reader.blocks(len(ranges)):
                        began, waited = time.perf_counter(), self.timings.wait
                        consume(block)  # a sink's wait for a write buffer counts as waiting, not computing
                        self.timings.compute += time.perf_counter() - began - (self.timings.wait - waited)
                    last = index + 1 == len(work) or work[index + 1][0] is not tensor
                    if self.reporter is not None and last:
                        self.reporter.advance(1, 0)
        finally:
            reader.close()

    def _next(self, passes: Iterator[Pass]) -> Pass | None:
        began = time.perf_counter()
        try:
            return next(passes, None)
        finally:
            self.timings.compute += time.perf_counter() - began

    def _writes(
        self, tensor: TensorPlan, task: TensorTask, merge: TensorMerge, sink: Sink | None
    ) -> Callable[[Block], None]:
        assert sink is not None  # run() takes a sink or a final pass
        floating = tensor.out_dtype.is_floating_point

        def consume(block: Block) -> None:
            try:
                merged = merge.merge(block)
            except NonFiniteMerge:
                raise nonfinite_error(task, block, self.memory) from None
            values = sink.stage(tensor, task, block.start, merged)
            if floating and not all_finite(values):  # a narrower output dtype can overflow; a method may not check
                raise nonfinite_error(task, block, self.memory)
            sink.commit(tensor, task, block.start, values)
            if self.reporter is not None:
                self.reporter.advance(0, values.numel() * values.element_size())

        return consume


# ----------------------------------------------------------------------------- langmerge merge


@dataclass(frozen=True)
class MergeReport:
    out_dir: Path
    method: str
    tensors: int
    bytes_written: int
    seconds: float
    timings: Timings = field(default_factory=Timings)

    def summary(self) -> str:
        gb = self.bytes_written / 1e9
        return (
            f"merged {self.tensors} tensors ({gb:.2f} GB) with {self.method} in {self.seconds:.1f} s "
            f"({gb / max(self.seconds, 1e-9):.2f} GB/s) -> {self.out_dir}"
        )


def merge(
    recipe: str | Path | dict[str, Any] | Recipe,
    out_dir: str | Path,
    *,
    force: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    memory: int = DEFAULT_MEMORY,
    progress: bool = True,
    reporter: Reporter | None = None,
    allow_pickle: bool = False,
    adopt: Sequence[Path] = (),
) -> MergeReport:
    """Merge per ``recipe`` (path, YAML text, dict or Recipe) into the folder ``out_dir``.

    A file (or text) of several recipes is a multi-document recipe (``merge.multi``): its named documents are
    merged into sub-folders of ``out_dir``, the unnamed one into ``out_dir``. ``adopt``: folders inside
    ``out_dir`` (those intermediates) that the new output keeps: read as inputs, then moved into it just
    before it takes ``out_dir``'s place.

    ``threads``: torch's and the fused kernels' thread count for the duration
    of the call (restored after). ``memory``: the bytes of tensor buffers the
    merge may hold (``DEFAULT_MEMORY``), which sets its chunk size.
    ``reporter`` hears the merge's progress; ``progress`` shows
    huggingface_hub's download bars (models named by Hub id).
    """
    if isinstance(recipe, (str, Path)) and (several := read_recipe_documents(recipe)) is not None:
        from langmerge.merge.multi import run_multi  # here: multi imports this module

        return run_multi(
            *several,
            out_dir,
            force=force,
            device=device,
            threads=threads,
            shard_bytes=shard_bytes,
            memory=memory,
            progress=progress,
            reporter=reporter,
            allow_pickle=allow_pickle,
        )
    recipe = load_recipe(recipe)
    kept = {Path(p).resolve() for p in adopt}
    check_output_free(
        out_dir,
        force,
        [
            p
            for p in recipe_input_paths(recipe)
            if not any(Path(p).resolve() == k or k in Path(p).resolve().parents for k in kept)
        ],
    )
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise LangmergeError(f"threads {threads!r}: expected a whole number of at least 1")
    check_memory(memory)
    dev = resolve_device(device)
    with thread_limit(threads):
        return _merge(
            recipe, Path(out_dir), force, dev, shard_bytes, memory, progress, reporter, allow_pickle, list(adopt)
        )


def _merge(
    recipe: Recipe,
    out_dir: Path,
    force: bool,
    dev: torch.device,
    shard_bytes: int,
    memory: int,
    progress: bool,
    reporter: Reporter | None,
    allow_pickle: bool,
    adopt: list[Path],
) -> MergeReport:
    start = time.perf_counter()
    plan = plan_merge(recipe, allow_pickle=allow_pickle, progress=progress, device=dev, shard_bytes=shard_bytes)
    executor = Executor(dev, memory, reporter)
    try:
        check_space(out_dir, plan.place(shard_bytes))  # a full disk is found before the merge, not during it
        with atomic_output_dir(out_dir, force=force) as tmp:
            writer = ShardedWriter(tmp, plan.specs, shard_bytes)
            sink = FileSink(writer, executor.timings)
            try:
                executor.run(plan.tensors, sink)
                sink.finish()
            except BaseException:
                sink.abort()
                raise
            finally:
                if reporter is not None:
                    reporter.close()
            _write_metadata(tmp, plan, recipe)
            for folder in adopt:  # last, just before the output takes out_dir's place (were that rename to fail,
                folder.rename(tmp / folder.name)  # they would go with the partial folder, to be merged again)
    finally:
        plan.close()
    report = MergeReport(
        out_dir,
        recipe.method.name,
        len(plan.tensors),
        writer.total_bytes,
        time.perf_counter() - start,
        executor.timings,
    )
    log.info(report.summary())
    log.info("time: %s", executor.timings.text())
    return report


def write_model_files(folder: Path, plan: MergePlan) -> None:
    """config.json and the tokenizer of the merged model: what transformers loads besides the weights."""
    vocab = plan.vocab
    assert vocab is not None  # a plan without a vocabulary plan has a problem: it is never merged
    write_config(
        folder,
        plan.reference.config(),
        plan.model_dtype,
        plan.reference.label,
        updates={**vocab.config_updates(), **plan.config_updates},
    )
    vocab.write_tokenizer(folder)


def _write_metadata(folder: Path, plan: MergePlan, recipe: Recipe) -> None:
    """config.json, the tokenizer, the chat template, the model card and the pinned recipe."""
    write_model_files(folder, plan)
    if recipe.raw.chat_template is not None:
        template, how = resolve_chat_template(recipe.raw.chat_template, [s.tokenizer_folder for s in plan.sources])
        log.info("chat template: %s", how)
        if template is not None:
            write_chat_template(folder, template)
    write_model_card(
        folder,
        method=recipe.method.name,
        summary=recipe.method.summary,
        base=recipe.base_model,
        inputs=[e.model for e in recipe.inputs],
        recipe=recipe.to_dict({ref: m.pinned for ref, m in plan.models.items()}),
        models=plan.models,
    )
