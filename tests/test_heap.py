"""reuse_freed_memory: inside it a large allocation comes from the heap, not from a fresh mapping, and glibc's
settings come back after it (nested uses included)."""

from __future__ import annotations

import ctypes

import numpy as np

from langmerge.heap import _glibc, reuse_freed_memory


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _mapped_bytes() -> int:
    """Bytes glibc holds in mmap'd chunks (mallinfo2's hblkhd)."""
    libc = _glibc()
    assert libc is not None, "the CI machines run glibc"
    libc.mallinfo2.restype = _Mallinfo2
    return int(libc.mallinfo2().hblkhd)


def _mapped_while_holding(nbytes: int) -> int:
    before = _mapped_bytes()
    block = np.ones(nbytes, dtype=np.uint8)  # numpy allocates with malloc
    grown = _mapped_bytes() - before
    del block
    return grown


def test_a_large_allocation_comes_from_the_heap_inside_and_is_mapped_outside():
    size = 64 << 20
    assert _mapped_while_holding(size) >= size  # glibc's default: a fresh mapping
    with reuse_freed_memory():
        assert _mapped_while_holding(size) == 0
        with reuse_freed_memory():  # nested: the inner exit leaves the outer's settings
            pass
        assert _mapped_while_holding(size) == 0
    assert _mapped_while_holding(size) >= size  # the default is back
