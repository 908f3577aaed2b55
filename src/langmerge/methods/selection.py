"""Exact k-th magnitude selection over a tensor streamed in chunks (docs/methods.md, "Exact selection").

TIES keeps exactly ``k`` entries of largest magnitude of each task vector,
ranked on float32 magnitudes. The magnitude's float32 bit pattern (its *key*,
sign bit cleared) orders like the magnitude, so the k-th largest key is found
by radix selection: a histogram of the keys' high 16 bits over every chunk
finds the bin holding it, a second histogram of the low 16 bits inside that
bin finds the key itself (not needed for bfloat16, whose keys end in 16 zero
bits, nor where every entry of the bin is kept). Entries tied with the k-th
key are kept in flat-index order until ``k`` are kept: the *cutoff* (the flat
index below which tied entries are kept) is found by ``TieScan`` in the first
pass that sees the chunks in order after the selection, without a pass of
its own. Histograms are exact counts, so the selection does not depend on
the chunk layout.

Both kernels use this: ``reference`` computes keys and histograms with torch
(any dtype, any device), ``fused`` with the C kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from langmerge.methods import fused_cpu
from langmerge.methods.base import Block, Pass

BINS = 1 << 16
KEEP_NONE = 0xFFFFFFFF  # a threshold above every key


def keep_count(numel: int, density: float) -> int:
    """How many entries magnitude trimming keeps: ``max(1, int(d * numel))``, all for d >= 1, none for d <= 0."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def magnitude_keys(delta: torch.Tensor) -> torch.Tensor:
    """The int64 key of each entry: the bits of its float32 magnitude, which order like the magnitude."""
    return (delta.detach().reshape(-1).float().view(torch.int32) & 0x7FFFFFFF).long()


def _task_vector(block: Block, i: int) -> torch.Tensor:
    x = block.inputs[i]
    return x if block.base is None else x - block.base


@dataclass
class TieScan:
    """The flat cutoff below which entries tied at the threshold are kept, found chunk by chunk in order."""

    need: int  # how many tied entries to keep
    total: int  # how many entries are tied at the threshold
    numel: int
    seen: int = 0
    cutoff: int | None = None

    def __post_init__(self) -> None:
        if self.need >= self.total:
            self.cutoff = self.numel  # every tie is kept
        elif self.need == 0:
            self.cutoff = 0

    def for_block(self, start: int, numel: int, scan: Callable[[int], tuple[int, int]]) -> int:
        """The cutoff valid for the chunk ``start .. start + numel``; call it for every chunk, in order.

        ``scan(n)`` gives the chunk's count of tied entries and, when that is
        more than ``n``, the chunk index of its n-th (from 0), else -1: with
        ``n`` ties still to keep, that one is the first tie not kept.
        """
        if self.cutoff is not None:
            return self.cutoff
        left = self.need - self.seen
        here, index = scan(left)
        if here <= left:
            self.seen += here
            if self.seen == self.need:
                self.cutoff = start + numel
            return start + numel
        self.cutoff = start + index
        return self.cutoff


@dataclass
class Selection:
    """One model's selection of its ``k`` largest magnitudes out of ``numel``."""

    numel: int
    k: int
    exact_low_bits: bool  # float32-like keys: a second histogram level may be needed
    threshold: int | None = None
    prefix: int | None = None  # the high 16 bits, between the two levels
    need: int = 0
    ties: TieScan | None = None
    hist: np.ndarray[Any, Any] | None = field(default=None, repr=False)

    @property
    def trims(self) -> bool:
        return self.k < self.numel

    @property
    def done(self) -> bool:
        return self.threshold is not None

    @property
    def key_threshold(self) -> int:
        """The magnitude key at the selection's edge, once it is done."""
        assert self.threshold is not None, "the selection's histogram passes have not run"
        return self.threshold

    @property
    def tie_scan(self) -> TieScan:
        """Which ties at the edge are kept, once the selection is done."""
        assert self.ties is not None, "the selection's histogram passes have not run"
        return self.ties

    def __post_init__(self) -> None:
        if self.k >= self.numel:
            self.threshold, self.ties = 0, TieScan(0, 0, self.numel)  # keep all (never consulted)
        elif self.k == 0:
            self.threshold, self.ties = KEEP_NONE, TieScan(0, 0, self.numel)

    def take(self, hist: np.ndarray[Any, Any], level: int) -> None:
        """Fold one finished level's histogram into the selection."""
        above = 0
        target = self.k if level == 1 else self.need
        from_top = np.cumsum(hist[::-1])
        pos = int(np.searchsorted(from_top, target))  # first bin from the top where the count reaches the target
        bin_ = BINS - 1 - pos
        above = int(from_top[pos - 1]) if pos > 0 else 0
        need, in_bin = target - above, int(hist[bin_])
        if level == 1:
            self.prefix, self.need = bin_, need
            if not self.exact_low_bits or need == in_bin:
                # bfloat16 keys end in 16 zero bits; or the whole bin is kept: bin << 16 as a threshold with
                # every tie kept keeps exactly the bin and everything above it
                self.threshold, self.ties = bin_ << 16, TieScan(need, in_bin, self.numel)
        else:
            assert self.prefix is not None  # level 1 came first
            self.threshold, self.ties = (self.prefix << 16) | bin_, TieScan(need, in_bin, self.numel)

    def cutoff(self, block: Block, i: int, fused: bool) -> int:
        """The tie cutoff for model ``i`` in ``block`` (advances the scan: call once per block, in order)."""
        if fused:

            def scan(n: int) -> tuple[int, int]:
                return fused_cpu.tie_scan(block.base, block.inputs[i], self.key_threshold, n)
        else:

            def scan(n: int) -> tuple[int, int]:
                tied: torch.Tensor = magnitude_keys(_task_vector(block, i)) == self.key_threshold
                count = int(tied.sum())
                return count, int(torch.nonzero(tied).reshape(-1)[n]) if count > n else -1

        return self.tie_scan.for_block(block.start, block.numel, scan)


def keep_mask(delta: torch.Tensor, threshold: int, cutoff: int, start: int) -> torch.Tensor:
    """Which entries of one chunk's task vector are kept (reference kernel): key above, or tied below the cutoff."""
    keys = magnitude_keys(delta)
    keep = keys > threshold
    tied = keys == threshold
    if cutoff > start:
        tied[max(0, cutoff - start) :] = False
        keep |= tied
    return keep.reshape(delta.shape)


class HistogramPass(Pass):
    """One level of the radix selection for every model still selecting."""

    def __init__(self, selections: dict[int, Selection], level: int, fused: bool):
        self.selections = {i: s for i, s in selections.items() if not s.done}
        self.level, self.fused = level, fused
        self.counts: dict[int, torch.Tensor] = {}  # reference kernel: the histograms as torch tensors
        for s in self.selections.values():
            s.hist = np.zeros(BINS, dtype=np.int64)

    def update(self, block: Block) -> None:
        for i, s in self.selections.items():
            if self.fused:
                assert s.hist is not None
                fused_cpu.histogram(block.base, block.inputs[i], self.level, s.prefix or 0, s.hist)
                continue
            keys = magnitude_keys(_task_vector(block, i))
            bins = keys >> 16 if self.level == 1 else keys[(keys >> 16) == s.prefix] & 0xFFFF
            if i not in self.counts:  # on the blocks' device; index_add_ touches only the bins hit
                self.counts[i] = torch.zeros(BINS, dtype=torch.int64, device=keys.device)
            self.counts[i].index_add_(0, bins, torch.ones_like(bins))

    def finish(self) -> None:
        for i, s in self.selections.items():
            assert s.hist is not None
            if i in self.counts:
                s.hist += self.counts[i].cpu().numpy()
            s.take(s.hist, self.level)
            s.hist = None


def selection_passes(selections: dict[int, Selection], fused: bool) -> Iterator[Pass]:
    """The histogram passes that complete ``selections`` (a generator of ``Pass``, as ``statistics`` yields them)."""
    for level in (1, 2):
        if all(s.done for s in selections.values()):
            return
        yield HistogramPass(selections, level, fused)


def select_mask(tensor: torch.Tensor, k: int, fused: bool = False) -> torch.Tensor:
    """Boolean mask of the ``k`` largest magnitudes of an in-memory tensor, ties kept in flat-index order.

    The chunked selection run on one chunk; ``fused`` selects with the C kernels (float32/bfloat16 on the CPU).
    """
    flat = tensor.reshape(-1)
    if k >= flat.numel():
        return torch.ones_like(tensor, dtype=torch.bool)
    block = Block(0, None, [flat])
    s = Selection(flat.numel(), k, tensor.dtype != torch.bfloat16)
    for p in selection_passes({0: s}, fused):
        p.update(block)
        p.finish()
    return keep_mask(flat, s.key_threshold, s.cutoff(block, 0, fused), 0).reshape(tensor.shape)
