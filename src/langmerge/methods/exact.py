"""Exact sums of magnitudes, folded chunk by chunk: the L1 norms of DARE's (and TIES's) ``rescale``.

torch's ``tensor.abs().sum()`` rounds in an order that depends on the tensor's
size and on the thread count, so it cannot be reproduced over chunks (and
differs between ``--threads 1`` and ``--threads 2``). ``ExactL1`` sums
exactly: each value is a mantissa times a power of two, so per exponent the
mantissas add up as integers, in any order; the total is rounded once, to
nearest-even, into the dtype asked for (docs/methods.md, "DARE").
"""

from __future__ import annotations

import math

import torch

from langmerge.methods import fused_cpu

# (mantissa bits with the hidden one, smallest normal exponent, largest exponent) per dtype
_FORMATS = {
    torch.float64: (53, -1022, 1023),
    torch.float32: (24, -126, 127),
    torch.bfloat16: (8, -126, 127),
    torch.float16: (11, -14, 15),
}
_LIMB = 26  # float64 mantissas are added in two limbs of at most 27 bits
_PIECE = 1 << 26  # elements per bucket sum: every float64 bucket sum stays below 2**53, so exact


def round_exact(numerator: int, exponent: int, dtype: torch.dtype) -> float:
    """``numerator * 2**exponent`` (numerator >= 0) rounded to nearest-even in ``dtype``; inf past its range."""
    if numerator == 0:
        return 0.0
    bits, emin, emax = _FORMATS[dtype]
    top = exponent + numerator.bit_length() - 1  # exponent of the leading bit
    ulp = max(top - bits + 1, emin - bits + 1)  # the dtype's unit in the last place there (subnormals included)
    if ulp > exponent:
        shift = ulp - exponent
        q, r = divmod(numerator, 1 << shift)
        half = 1 << (shift - 1)
        if r > half or (r == half and q & 1):
            q += 1
    else:
        q = numerator << (exponent - ulp)
    if q.bit_length() + ulp - 1 > emax:
        return math.inf
    return math.ldexp(q, ulp)


def _bucket_sums(bucket: torch.Tensor, value: torch.Tensor, buckets: int) -> torch.Tensor:
    """Per bucket, the sum of the integer values, in float64 (exact: every sum stays below 2**53)."""
    return torch.zeros(buckets, dtype=torch.float64, device=value.device).index_add_(0, bucket, value.double())


class ExactL1:
    """The exact sum of ``|t|`` over every tensor added (any dtype, any device), in any order."""

    def __init__(self) -> None:
        self._total = 0  # integer, in units of 2**-1074 (float64's smallest subnormal)

    def add(self, t: torch.Tensor) -> None:
        t = t.detach().reshape(-1)
        if t.numel() == 0:
            return
        if fused_cpu.supports(t.dtype, t.device):  # the same integer sums, from the C kernels
            for e, s in enumerate(fused_cpu.l1_sums(t).tolist()):
                if s:
                    self._total += s << (e + 924)
        elif t.dtype == torch.float64:
            self._add_float64(t)
        else:
            self._add_float32(t.float())

    def _add_float32(self, t: torch.Tensor) -> None:
        bits = t.abs().view(torch.int32).long()
        exp = bits >> 23
        mantissa = (bits & 0x7FFFFF) | ((exp > 0).long() << 23)
        exp = exp.clamp(min=1)  # subnormals: exponent field 0 counts as 1, without the hidden bit
        for lo in range(0, t.numel(), _PIECE):
            sums = _bucket_sums(exp[lo : lo + _PIECE], mantissa[lo : lo + _PIECE], 256)
            for e, s in enumerate(sums.tolist()):
                if s:  # value = mantissa * 2**(e - 150); in units of 2**-1074: shift by e + 924
                    self._total += int(s) << (e + 924)

    def _add_float64(self, t: torch.Tensor) -> None:
        bits = t.abs().view(torch.int64)
        exp = bits >> 52
        mantissa = (bits & ((1 << 52) - 1)) | ((exp > 0).long() << 52)
        exp = exp.clamp(min=1)
        for lo in range(0, t.numel(), _PIECE):
            e_piece, m_piece = exp[lo : lo + _PIECE], mantissa[lo : lo + _PIECE]
            high = _bucket_sums(e_piece, m_piece >> _LIMB, 2048)
            low = _bucket_sums(e_piece, m_piece & ((1 << _LIMB) - 1), 2048)
            for e in torch.nonzero((high != 0) | (low != 0)).reshape(-1).tolist():  # value = mantissa * 2**(e - 1075)
                self._total += ((int(high[e]) << _LIMB) + int(low[e])) << (e - 1)

    def value(self, dtype: torch.dtype) -> float:
        """The sum, rounded once to ``dtype``."""
        return round_exact(self._total, -1074, dtype)
