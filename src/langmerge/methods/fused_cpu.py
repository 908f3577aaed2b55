"""A fused CPU kernel for task arithmetic, TIES and TIES-SV (float32 and bfloat16).

``kernels.merge_tensor`` is the reference: one torch operation per step, as
in REFERENCE §1.4. On a CPU that costs some thirty passes over each tensor,
each converting bfloat16 to float32 and back. This module computes the same
bits in three passes: a magnitude histogram per model (exact k-th selection
by radix on the float32 bit patterns, two levels for float32), and one pass
that rebuilds each task vector, trims, weights, votes and mixes in registers.

Bit-exactness rests on emulating what torch does on the CPU: every bfloat16
operation computes in float32 and rounds to nearest-even; a reduction over
the model axis accumulates in float32 in model order and rounds once; masks
multiply, so trimmed and outvoted entries are signed zeros. The tests compare
this kernel with the reference bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

try:  # numba is an optional accelerator; without it the reference kernel runs.
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None

CHUNK = 1 << 18  # elements per parallel work item; also the unit of tie bookkeeping
_BINS = 1 << 16
_SUPPORTED = {torch.float32: (np.uint32, 0), torch.bfloat16: (np.uint16, 16)}
_NEGATIVE_ZERO = {0: np.uint32(0x80000000), 16: np.uint16(0x8000)}


# Below this size, launching parallel kernels costs more than the reference's torch steps.
MIN_NUMEL = 1 << 15


def available(dtype: torch.dtype, device: torch.device) -> bool:
    return numba is not None and device.type == "cpu" and dtype in _SUPPORTED


def set_threads(n: int) -> None:
    """Run the fused kernels on ``n`` threads (at most numba's pool, which is sized when numba starts)."""
    if numba is not None:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


if numba is not None:
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def _as_float(typingctx, bits):
        """Reinterpret uint32 bits as a float32 (no memory round trip)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.uint32), codegen

    @intrinsic
    def _as_bits(typingctx, value):
        """Reinterpret a float32 as uint32 bits."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen

    @njit(inline="always")
    def _value(bits, shift):
        return _as_float(np.uint32(np.uint32(bits) << np.uint32(shift)))

    @njit(inline="always")
    def _round(v, shift):
        """Round a float32 to the compute dtype (bfloat16: nearest-even; float32: as is)."""
        if shift == 0:
            return v
        u = _as_bits(v)
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN stays NaN
            return v
        u = np.uint32((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000))
        return _as_float(u)

    @njit(inline="always")
    def _key(v):
        return _as_bits(v) & np.uint32(0x7FFFFFFF)

    @njit(inline="always")
    def _shift(bits):
        """16 for bfloat16 bit arrays, 0 for float32 ones; a compile-time constant per array type."""
        return 16 if bits.itemsize == 2 else 0

    @njit(parallel=True, cache=True, nogil=True)
    def _count_nonfinite(bits):
        shift = _shift(bits)
        n = bits.size
        nchunks = (n + CHUNK - 1) // CHUNK
        bad = np.zeros(nchunks, dtype=np.int64)
        for c in prange(nchunks):
            count = 0
            for j in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
                if (np.uint32(np.uint32(bits[j]) << np.uint32(shift)) & np.uint32(0x7F800000)) == np.uint32(0x7F800000):
                    count += 1
            bad[c] = count
        return bad.sum()

    @njit(inline="always")
    def _delta(base, x, j, shift):
        """round(x - base) at j, or x itself when there is no base."""
        if base is None:
            return _value(x[j], shift)
        return _round(_value(x[j], shift) - _value(base[j], shift), shift)

    @njit(parallel=True, cache=True, nogil=True)
    def _histogram(base, x, level, prefix):
        """Per-chunk counts of magnitude-key bins of round(x - base) (of x when base is None).

        level 1 bins by the key's high 16 bits; level 2 bins the low 16 bits
        of the entries whose high bits equal ``prefix``.
        """
        shift = _shift(x)
        n = x.size
        nchunks = (n + CHUNK - 1) // CHUNK
        counts = np.zeros((nchunks, _BINS), dtype=np.int64)
        for c in prange(nchunks):
            local = np.zeros(_BINS, dtype=np.int64)
            for j in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
                k = _key(_delta(base, x, j, shift))
                if level == 1:
                    local[k >> np.uint32(16)] += 1
                elif (k >> np.uint32(16)) == prefix:
                    local[k & np.uint32(0xFFFF)] += 1
            counts[c, :] = local
        return counts

    @njit(inline="always")
    def _task_value(xs, i, j, b, shift, trim, thresholds, cutoffs, c):
        """Model i's trimmed task vector at j: round(x - b), zeroed (by multiplication) unless kept.

        Kept: keys above the threshold, and keys equal to it at indices below
        ``cutoffs[i, c]`` (so exactly the first ``need`` tied entries survive).
        No state is carried from one j to the next, which lets LLVM vectorize.
        """
        d = _round(_value(xs[i][j], shift) - b, shift)
        if trim[i]:
            k = _key(d)
            keep = (k > thresholds[i]) | ((k == thresholds[i]) & (j < cutoffs[i, c]))
            d = d * np.float32(keep)
        return d

    @njit(parallel=True, cache=True, nogil=True)
    def _keep_mask(x, threshold, cutoffs, out):
        shift = _shift(x)
        n = x.size
        for c in prange((n + CHUNK - 1) // CHUNK):
            for j in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
                k = _key(_value(x[j], shift))
                out[j] = (k > threshold) | ((k == threshold) & (j < cutoffs[c]))

    @njit(inline="always")
    def _sign(v):
        return (v > 0) - (v < 0)

    @njit(parallel=True, cache=True, nogil=True)
    def _tally(base, xs, trim, thresholds, cutoffs, weights, scales, round_vote, pair_a, pair_b):
        """The loss diagnostic (REFERENCE §1.7) of one tensor, per chunk, for several vote scales.

        scales: (votes, models); round_vote[s]: round vote s's mass to the compute
        dtype (plain TIES) or keep it float32 (TIES-SV). Entries are the merge's:
        the same trimmed values, weighted values and votes as ``_merge_ties``.
        """
        shift = _shift(base)
        n = base.size
        m = len(xs)
        votes = scales.shape[0]
        npairs = pair_a.size
        nchunks = (n + CHUNK - 1) // CHUNK
        kept = np.zeros((nchunks, m), dtype=np.int64)
        kept_mass = np.zeros((nchunks, m), dtype=np.float64)
        squared = np.zeros((nchunks, m), dtype=np.float64)
        both = np.zeros((nchunks, npairs), dtype=np.int64)
        conflicts = np.zeros((nchunks, npairs), dtype=np.int64)
        lost = np.zeros((nchunks, votes, m), dtype=np.int64)
        lost_mass = np.zeros((nchunks, votes, m), dtype=np.float64)
        for c in prange(nchunks):
            # chunk-local accumulators: writing shared arrays per entry defeats the optimizer
            t = np.empty(m, dtype=np.float32)
            v = np.empty(m, dtype=np.float32)
            lkept = np.zeros(m, dtype=np.int64)
            lmass = np.zeros(m, dtype=np.float64)
            lsquared = np.zeros(m, dtype=np.float64)
            lboth = np.zeros(npairs, dtype=np.int64)
            lconflicts = np.zeros(npairs, dtype=np.int64)
            llost = np.zeros((votes, m), dtype=np.int64)
            llost_mass = np.zeros((votes, m), dtype=np.float64)
            for j in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
                b = _value(base[j], shift)
                for i in range(m):
                    d = _round(_value(xs[i][j], shift) - b, shift)
                    lsquared[i] += np.float64(d) * np.float64(d)
                    if trim[i]:
                        k = _key(d)
                        d = d * np.float32((k > thresholds[i]) | ((k == thresholds[i]) & (j < cutoffs[i, c])))
                    t[i] = d
                    v[i] = _round(weights[i] * d, shift)
                    lkept[i] += d != 0
                    lmass[i] += abs(d)
                for q in range(npairs):
                    kept_both = (t[pair_a[q]] != 0) & (t[pair_b[q]] != 0)
                    lboth[q] += kept_both
                    lconflicts[q] += kept_both & (_sign(v[pair_a[q]]) != _sign(v[pair_b[q]]))
                for s in range(votes):
                    mass = np.float32(0.0)
                    for i in range(m):
                        mass += v[i] * scales[s, i]
                    if round_vote[s]:
                        mass = _round(mass, shift)
                    up = mass >= 0
                    for i in range(m):
                        lost_here = (t[i] != 0) & ~((v[i] != 0) & ((v[i] > 0) == up))
                        llost[s, i] += lost_here
                        llost_mass[s, i] += abs(t[i]) * lost_here
            kept[c] = lkept
            kept_mass[c] = lmass
            squared[c] = lsquared
            both[c] = lboth
            conflicts[c] = lconflicts
            lost[c] = llost
            lost_mass[c] = llost_mass
        return (kept.sum(axis=0), kept_mass.sum(axis=0), squared.sum(axis=0), both.sum(axis=0),
                conflicts.sum(axis=0), lost.sum(axis=0), lost_mass.sum(axis=0))

    @njit(inline="always")
    def _finish(b, mixed, divisor, normalize, lam, shift):
        """Normalize, scale by lambda and add to the base; returns the output bits (float32 layout)."""
        mixed = _round(mixed, shift)
        if normalize:
            mixed = _round(mixed / divisor, shift)
        if lam != 1:
            mixed = _round(mixed * lam, shift)
        return _as_bits(_round(b + mixed, shift))

    @njit(parallel=True, cache=True, nogil=True)
    def _merge_ties(base, xs, trim, thresholds, cutoffs, weights, scales, round_vote, normalize, lam, out):
        """TIES / TIES-SV in one pass; returns the count of non-finite outputs.

        Sums over models accumulate in float32 in model order and round once,
        as torch's reductions do. The weighted task values are recomputed in
        the second model loop rather than stored: no per-element state keeps
        the loop vectorizable.
        """
        shift = _shift(base)
        n = base.size
        m = len(xs)
        nchunks = (n + CHUNK - 1) // CHUNK
        bad = np.zeros(nchunks, dtype=np.int64)
        for c in prange(nchunks):
            nonfinite = 0
            for j in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
                b = _value(base[j], shift)
                mass = np.float32(0.0)
                for i in range(m):
                    v = _round(weights[i] * _task_value(xs, i, j, b, shift, trim, thresholds, cutoffs, c), shift)
                    mass += v * scales[i]
                if round_vote:
                    mass = _round(mass, shift)
                up = mass >= 0
                mixed = np.float32(0.0)
                divisor = np.float32(0.0)
                for i in range(m):
                    v = _round(weights[i] * _task_value(xs, i, j, b, shift, trim, thresholds, cutoffs, c), shift)
                    # masks multiply: an outvoted or trimmed entry adds a signed zero
                    agree = np.float32((v != 0) & ((v > 0) == up))
                    mixed += v * agree
                    divisor += weights[i] * agree
                divisor = _round(divisor, shift)
                if divisor == 0:
                    divisor = np.float32(1.0)
                r = _finish(b, mixed, divisor, normalize, lam, shift)
                nonfinite += (r & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
                out[j] = r >> np.uint32(shift)
            bad[c] = nonfinite
        return bad.sum()

    @njit(parallel=True, cache=True, nogil=True)
    def _merge_sum(base, xs, weights, normalize, lam, out):
        """Task arithmetic in one pass; returns the count of non-finite outputs."""
        shift = _shift(base)
        n = base.size
        m = len(xs)
        nchunks = (n + CHUNK - 1) // CHUNK
        bad = np.zeros(nchunks, dtype=np.int64)
        divisor = np.float32(0.0)
        for i in range(m):
            divisor += weights[i]
        divisor = _round(divisor, shift)
        if abs(divisor) < np.float32(1e-8):
            divisor = np.float32(1.0)
        for c in prange(nchunks):
            nonfinite = 0
            for j in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
                b = _value(base[j], shift)
                mixed = np.float32(0.0)
                for i in range(m):
                    mixed += _round(weights[i] * _round(_value(xs[i][j], shift) - b, shift), shift)
                r = _finish(b, mixed, divisor, normalize, lam, shift)
                nonfinite += (r & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
                out[j] = r >> np.uint32(shift)
            bad[c] = nonfinite
        return bad.sum()


def _select(counts: np.ndarray, k: int) -> tuple[int, int, np.ndarray]:
    """The bin holding the k-th largest key, how many of its entries to keep, and its count per chunk."""
    total = counts.sum(axis=0)
    from_top = np.cumsum(total[::-1])
    pos = int(np.searchsorted(from_top, k))  # first position where the count from the top reaches k
    bin_ = _BINS - 1 - pos
    above = int(from_top[pos - 1]) if pos > 0 else 0
    return bin_, k - above, counts[:, bin_]


def _tie_cutoffs(base: torch.Tensor, x: torch.Tensor, threshold: int, need: int, per_chunk: np.ndarray) -> np.ndarray:
    """Per chunk, the flat index below which entries tied at ``threshold`` are kept.

    Ties are kept in index order until ``need`` are kept: whole chunks first,
    and in the one chunk where the quota runs out, up to the right tie.
    """
    n = x.numel()
    starts = np.arange(per_chunk.size, dtype=np.int64) * CHUNK
    ends = np.minimum(starts + CHUNK, n)
    before = np.cumsum(per_chunk) - per_chunk
    cutoffs = np.where(before + per_chunk <= need, ends, starts)
    partial = np.nonzero((before < need) & (before + per_chunk > need))[0]
    for c in partial:  # at most one chunk
        lo, hi = int(starts[c]), int(ends[c])
        delta = x.reshape(-1)[lo:hi] if base is None else x.reshape(-1)[lo:hi] - base.reshape(-1)[lo:hi]
        delta = delta.float()
        keys = delta.view(torch.int32) & 0x7FFFFFFF
        tied = torch.nonzero(keys == threshold).reshape(-1)
        cutoffs[c] = lo + int(tied[need - int(before[c]) - 1]) + 1
    return cutoffs


def _trim_threshold(base, x, b_bits, x_bits, shift: int, k: int) -> tuple[int, np.ndarray]:
    """Key threshold and per-chunk tie cutoffs that keep exactly the k largest |x - base| (|x| without base)."""
    high, need, per_chunk = _select(_histogram(b_bits, x_bits, 1, np.uint32(0)), k)
    threshold = high << 16
    if shift == 0:  # float32 keys have 16 more bits to resolve
        low, need, per_chunk = _select(_histogram(b_bits, x_bits, 2, np.uint32(high)), need)
        threshold |= low
    return threshold, _tie_cutoffs(base, x, threshold, need, per_chunk)


def _flat_bits(t: torch.Tensor) -> np.ndarray:
    np_bits, shift = _SUPPORTED[t.dtype]
    return t.contiguous().reshape(-1).view(torch.int16 if shift else torch.int32).numpy().view(np_bits)


def keep_mask(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest magnitudes, ties kept in index order: ``sparsify.magnitude_keep_mask``'s selection."""
    bits = _flat_bits(tensor)
    threshold, cutoffs = _trim_threshold(None, tensor, None, bits, _SUPPORTED[tensor.dtype][1], k)
    out = np.empty(bits.size, dtype=np.bool_)
    _keep_mask(bits, np.uint32(threshold), cutoffs, out)
    return torch.from_numpy(out).reshape(tensor.shape)


def _trim_plan(base, inputs, densities, b_bits, xs_bits, shift):
    """Per model: trimmed at all, key threshold, per-chunk tie cutoffs."""
    from langmerge.methods.sparsify import keep_count

    n, m = b_bits.size, len(xs_bits)
    nchunks = max(1, (n + CHUNK - 1) // CHUNK)
    trim = np.zeros(m, dtype=np.bool_)
    thresholds = np.zeros(m, dtype=np.uint32)
    cutoffs = np.zeros((m, nchunks), dtype=np.int64)
    for i, (x_bits, x) in enumerate(zip(xs_bits, inputs)):
        k = keep_count(n, densities[i]) if densities is not None else n
        if k == n:
            continue
        trim[i] = True
        if k == 0:
            thresholds[i] = np.uint32(0xFFFFFFFF)  # above every key: keep none
            continue
        thresholds[i], cutoffs[i] = _trim_threshold(base, x, b_bits, x_bits, shift, k)
    return trim, thresholds, cutoffs


def tally_fused(base, inputs, weights, densities, vote_scales: list[list[float] | None]):
    """``(kept, kept_mass, squared_norm, both_kept, conflicts, lost, lost_mass)`` for TIES-family votes.

    ``vote_scales`` holds one entry per vote: None for TIES's own vote, or the
    per-model multipliers of a TIES-SV vote. Returns None where the base holds
    -0.0 or the dtype has no fused kernel (the caller then uses the torch steps).
    """
    if not available(base.dtype, base.device):
        return None
    shift = _SUPPORTED[base.dtype][1]
    b = _flat_bits(base)
    if np.any(b == _NEGATIVE_ZERO[shift]):
        return None
    xs = tuple(_flat_bits(x) for x in inputs)
    trim, thresholds, cutoffs = _trim_plan(base, inputs, densities, b, xs, shift)
    m = len(xs)
    w = torch.tensor(weights, dtype=base.dtype).float().numpy()
    scales = np.asarray([s if s is not None else [1.0] * m for s in vote_scales], dtype=np.float32).reshape(-1, m)
    round_vote = np.asarray([s is None for s in vote_scales], dtype=np.bool_)
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    pair_a = np.asarray([p[0] for p in pairs], dtype=np.int64)
    pair_b = np.asarray([p[1] for p in pairs], dtype=np.int64)
    return _tally(b, xs, trim, thresholds, cutoffs, w, scales, round_vote, pair_a, pair_b)


def merge_tensor_fused(
    base: torch.Tensor,
    inputs: list[torch.Tensor],
    weights: list[float],
    densities: list[float] | None,
    consensus: bool,
    normalize: bool,
    lam: float,
    vote_scale: list[float] | None,
) -> tuple[torch.Tensor, int] | None:
    """Same bits as ``kernels.merge_tensor`` for task arithmetic / TIES / TIES-SV without rescale,
    with the count of NaN or Inf entries in the result.

    Returns None where the base holds -0.0 (see below): the caller then runs the reference steps.
    """
    dtype = base.dtype
    np_bits, shift = _SUPPORTED[dtype]
    b = _flat_bits(base)
    if np.any(b == _NEGATIVE_ZERO[shift]):
        # torch's reductions start from +0 or from the first term depending on
        # the kernel it picks, which decides the sign of a zero sum; that sign
        # shows only where the base holds -0.0, so such tensors take the
        # reference path.
        return None
    xs = tuple(_flat_bits(x) for x in inputs)
    n, m = b.size, len(xs)
    trim, thresholds, cutoffs = _trim_plan(base, inputs, densities, b, xs, shift)
    # weights as the reference holds them: a tensor of the compute dtype
    w = torch.tensor(weights, dtype=dtype).float().numpy()
    out = np.empty(n, dtype=np_bits)
    if consensus:
        scales = np.asarray(vote_scale if vote_scale is not None else [1.0] * m, dtype=np.float32)
        # TIES rounds the vote to the compute dtype (a torch sum); TIES-SV's scaled vote stays float32
        nonfinite = _merge_ties(b, xs, trim, thresholds, cutoffs, w, scales, vote_scale is None, normalize, np.float32(lam), out)
    else:
        nonfinite = _merge_sum(b, xs, w, normalize, np.float32(lam), out)
    result = torch.from_numpy(out.view(np.int16 if shift else np.int32)).view(dtype).reshape(base.shape)
    return result, int(nonfinite)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or Inf; one parallel pass on the CPU for float32/bfloat16."""
    if not available(tensor.dtype, tensor.device):
        return bool(torch.isfinite(tensor).all())
    return int(_count_nonfinite(_flat_bits(tensor))) == 0
