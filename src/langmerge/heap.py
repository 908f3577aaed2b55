"""Freed memory kept for reuse while training and evaluating (glibc's malloc; elsewhere nothing changes).

Each training step allocates the same large tensors again: the gradient of the embedding, the bfloat16
copies of the weights under autocast, the logits. glibc serves every allocation above its mmap threshold
with fresh pages from the kernel and unmaps them when freed, so every step pays a page fault on each 4 KiB
of them again, and on a virtual machine these are slow. Measured on the 2-core CI machine with a
Gemma-3-270M-sized model (128M parameters, 32k vocabulary, bfloat16 autocast, AdamW; forward, backward and
optimizer step): 8 x 16 tokens 0.98 -> 0.74 s a step, 8 x 128 tokens 2.65 -> 2.08 s, 1.26 to 1.32 times
faster (``python benchmarks/heap_reuse.py``).
Inside ``reuse_freed_memory`` allocations come from the heap and freed memory stays there for the next
step; on leaving, the previous settings' defaults come back and the free top of the heap is returned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# mallopt's parameters and glibc's defaults (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_INT_MAX = 2**31 - 1

_lock = threading.Lock()
_depth = 0  # nested uses (a tuning run evaluates inside a study step): only the outermost sets and restores


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
        return None  # not glibc (musl, macOS): its malloc has no such settings
    return libc


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within the block, serve large allocations from the heap and keep freed memory for reuse."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                # glibc's own values (its dynamic mmap threshold, which grows with freed blocks, stays off:
                # setting any of these turns it off, and its state cannot be read back)
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
