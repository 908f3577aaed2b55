"""The fused CPU kernels: ``_fused.c``, a C extension built at install time, opened with ctypes.

The reference kernel computes a task-vector merge with one torch operation per
step, some thirty passes over each block, each converting bfloat16 to float32
and back. These kernels compute the same bits in one pass per block (plus the
selection's histogram pass for TIES), vectorized, on threads of their own
started and joined inside each call (docs/methods.md, "Kernels").

Every function takes 1-D contiguous CPU tensors of one dtype (float32 or
bfloat16) and ``threads``, the number of threads of that call. ``available()``
is False where the extension was not built (no C compiler at install time);
the planner then chooses the reference kernel (``kernel_for``).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
from typing import Any, overload

import numpy as np
import torch

log = logging.getLogger(__name__)

CHUNK = 1 << 18  # elements per parallel work item of the C kernels (TASK in _fused.c)
BINS = 1 << 16
ABI = 5
SUPPORTED = (torch.float32, torch.bfloat16)

# Below this many elements a tensor takes the reference kernel (a planning rule; tests move it).
MIN_NUMEL = 1

_p = ctypes.c_void_p
_i64 = ctypes.c_int64


def _load() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("langmerge.methods._fused")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as exc:  # pragma: no cover - a broken build
        log.warning("cannot open the fused CPU kernels %s (%s)", spec.origin, exc)
        return None
    if lib.lm_abi() != ABI:  # pragma: no cover - a stale build
        log.warning("the fused CPU kernels %s are from another version; rebuild with pip install -e .", spec.origin)
        return None
    signatures = {
        "lm_histogram": (None, [ctypes.c_int, _p, _p, _i64, ctypes.c_int, ctypes.c_uint32, _p, ctypes.c_int]),
        "lm_tie_scan": (_i64, [ctypes.c_int, _p, _p, _i64, ctypes.c_uint32, _i64, _p, ctypes.c_int]),
        "lm_merge_linear": (
            _i64,
            [ctypes.c_int, _p, ctypes.c_int, _i64, _p, ctypes.c_float, ctypes.c_int, ctypes.c_int, _p, ctypes.c_int],
        ),
        "lm_merge_sum": (
            _i64,
            [
                ctypes.c_int,
                _p,
                _p,
                ctypes.c_int,
                _i64,
                _p,
                ctypes.c_float,
                ctypes.c_int,
                ctypes.c_float,
                _p,
                ctypes.c_int,
            ],
        ),
        "lm_merge_ties": (
            _i64,
            [
                ctypes.c_int,
                _p,
                _p,
                ctypes.c_int,
                _i64,
                _i64,
                _p,
                _p,
                _p,
                _p,
                _p,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_float,
                _p,
                ctypes.c_int,
            ],
        ),
        "lm_l1_sums": (None, [ctypes.c_int, _p, _i64, _p, ctypes.c_int]),
        "lm_count_nonfinite": (_i64, [ctypes.c_int, _p, _i64, ctypes.c_int]),
        "lm_tally": (
            None,
            [
                ctypes.c_int,
                _p,
                _p,
                ctypes.c_int,
                _i64,
                _i64,
                _p,
                _p,
                _p,
                _p,
                ctypes.c_int,
                _p,
                _p,
                ctypes.c_int,
                _p,
                _p,
                _p,
                _p,
                _p,
                _p,
                _p,
                _p,
                _p,
                ctypes.c_int,
            ],
        ),
    }
    for name, (res, args) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


_LIB = _load()


def _lib() -> ctypes.CDLL:
    """The opened extension; the kernels are called only where ``available()`` (the planner's rule)."""
    if _LIB is None:
        raise RuntimeError("the fused CPU kernels are not built")
    return _LIB


def available() -> bool:
    """True where the C extension was built and opens."""
    return _LIB is not None


def supports(dtype: torch.dtype, device: torch.device | str) -> bool:
    return _LIB is not None and torch.device(device).type == "cpu" and dtype in SUPPORTED


def default_threads() -> int:
    """The threads of a call when none are given: torch's intra-op count (what ``--threads`` sets for a merge)."""
    return max(1, torch.get_num_threads())


def _bf(t: torch.Tensor) -> int:
    return 1 if t.dtype == torch.bfloat16 else 0


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@overload
def _flat(t: torch.Tensor) -> torch.Tensor: ...
@overload
def _flat(t: None) -> None: ...
def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).contiguous()


def _np_ptr(a: np.ndarray[Any, Any]) -> int:
    return int(a.ctypes.data)


def _pointers(ts: list[torch.Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * max(1, len(ts)))(*[t.data_ptr() for t in ts])


def histogram(
    base: torch.Tensor | None,
    x: torch.Tensor,
    level: int,
    prefix: int,
    hist: np.ndarray[Any, Any],
    threads: int | None = None,
) -> None:
    """Add to ``hist`` (int64, 65536) the magnitude-key counts of ``round(x - base)`` (``x`` without a base)."""
    assert hist.dtype == np.int64 and hist.size == BINS and hist.flags.c_contiguous
    base, x = _flat(base), _flat(x)
    _lib().lm_histogram(
        _bf(x), _ptr(base), _ptr(x), x.numel(), level, prefix, _np_ptr(hist), threads or default_threads()
    )


def tie_scan(
    base: torch.Tensor | None, x: torch.Tensor, key: int, need: int, threads: int | None = None
) -> tuple[int, int]:
    """How many entries of ``round(x - base)`` have magnitude key ``key``, and (when more than ``need``)
    the index of the ``need``-th of them (from 0), else -1."""
    base, x = _flat(base), _flat(x)
    index = ctypes.c_int64(-1)
    count = _lib().lm_tie_scan(
        _bf(x), _ptr(base), _ptr(x), x.numel(), key, need, ctypes.addressof(index), threads or default_threads()
    )
    return int(count), index.value


def merge_linear(
    xs: list[torch.Tensor],
    weights: np.ndarray[Any, Any],
    divisor: float,
    normalize: bool,
    out: torch.Tensor,
    threads: int | None = None,
) -> int:
    """linear into ``out`` (float32 accumulation, as torch's addcmul_ does it here); returns the NaN/Inf count."""
    fuses = addcmul_fuses()
    if fuses is None:  # the planner offers this kernel only where one of the roundings reproduces torch's
        raise RuntimeError("no fused linear kernel reproduces torch's addcmul_ on this machine")
    xs = [_flat(x) for x in xs]
    return int(
        _lib().lm_merge_linear(
            _bf(xs[0]),
            _pointers(xs),
            len(xs),
            xs[0].numel(),
            _np_ptr(weights),
            divisor,
            int(normalize),
            int(fuses),
            _ptr(out),
            threads or default_threads(),
        )
    )


@functools.cache
def addcmul_fuses() -> bool | None:
    """How torch's CPU ``addcmul_`` rounds ``acc + x * w`` on this machine: True for one fused
    multiply-add, False for a product then a sum, None when neither reproduces it (then linear has no
    fused kernel). Probed once, on float32 and bfloat16 inputs, with and without a vector tail."""
    if _LIB is None:
        return None
    g = torch.Generator().manual_seed(0)
    for mode in (True, False):
        if all(_linear_probe(dtype, n, mode, g) for dtype in SUPPORTED for n in (1, 7, 1000, 4099)):
            return mode
    return None


def _linear_probe(dtype: torch.dtype, n: int, mode: bool, g: torch.Generator) -> bool:
    xs = [torch.randn(n, generator=g).to(dtype) for _ in range(3)]
    w = torch.tensor([0.7312, -1.37, 0.0123], dtype=torch.float32)
    acc = torch.zeros(n, dtype=torch.float32)
    for x, coefficient in zip(xs, w.unbind(0)):
        acc.addcmul_(x, coefficient)
    out = torch.empty(n, dtype=dtype)
    _lib().lm_merge_linear(_bf(out), _pointers(xs), 3, n, _np_ptr(w.numpy()), 1.0, 0, int(mode), _ptr(out), 1)
    return torch.equal(out, acc.to(dtype))


def merge_sum(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    weights: np.ndarray[Any, Any],
    divisor: float,
    normalize: bool,
    lam: float,
    out: torch.Tensor,
    threads: int | None = None,
) -> int:
    """Task arithmetic into ``out``; returns how many outputs are NaN or Inf."""
    base, xs = _flat(base), [_flat(x) for x in xs]
    ptrs = _pointers(xs)
    return int(
        _lib().lm_merge_sum(
            _bf(base),
            _ptr(base),
            ptrs,
            len(xs),
            base.numel(),
            _np_ptr(weights),
            divisor,
            int(normalize),
            lam,
            _ptr(out),
            threads or default_threads(),
        )
    )


def merge_ties(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    offset: int,
    trim: np.ndarray[Any, Any],
    thresholds: np.ndarray[Any, Any],
    cutoffs: np.ndarray[Any, Any],
    weights: np.ndarray[Any, Any],
    scales: np.ndarray[Any, Any],
    round_vote: bool,
    normalize: bool,
    lam: float,
    out: torch.Tensor,
    threads: int | None = None,
) -> int:
    """TIES / TIES-SV into ``out`` for entries ``offset..offset+numel`` of the tensor; returns the NaN/Inf count."""
    base, xs = _flat(base), [_flat(x) for x in xs]
    ptrs = _pointers(xs)
    return int(
        _lib().lm_merge_ties(
            _bf(base),
            _ptr(base),
            ptrs,
            len(xs),
            base.numel(),
            offset,
            _np_ptr(trim),
            _np_ptr(thresholds),
            _np_ptr(cutoffs),
            _np_ptr(weights),
            _np_ptr(scales),
            int(round_vote),
            int(normalize),
            lam,
            _ptr(out),
            threads or default_threads(),
        )
    )


def tally(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    offset: int,
    trim: np.ndarray[Any, Any],
    thresholds: np.ndarray[Any, Any],
    cutoffs: np.ndarray[Any, Any],
    weights: np.ndarray[Any, Any],
    scales: np.ndarray[Any, Any],
    round_vote: np.ndarray[Any, Any],
    pair_a: np.ndarray[Any, Any],
    pair_b: np.ndarray[Any, Any],
    totals: dict[str, np.ndarray[Any, Any]],
    threads: int | None = None,
) -> None:
    """Add one block's loss diagnostic to ``totals`` (numpy arrays: kept, kept_mass, squared_norm, both_kept,
    conflicts, lost, lost_mass; see ``analysis.diagnostics.Tally``)."""
    base, xs = _flat(base), [_flat(x) for x in xs]
    ptrs = _pointers(xs)
    _lib().lm_tally(
        _bf(base),
        _ptr(base),
        ptrs,
        len(xs),
        base.numel(),
        offset,
        _np_ptr(trim),
        _np_ptr(thresholds),
        _np_ptr(cutoffs),
        _np_ptr(weights),
        scales.shape[0],
        _np_ptr(scales),
        _np_ptr(round_vote),
        pair_a.size,
        _np_ptr(pair_a),
        _np_ptr(pair_b),
        *(
            _np_ptr(totals[k])
            for k in ("kept", "kept_mass", "squared_norm", "both_kept", "conflicts", "lost", "lost_mass")
        ),
        threads or default_threads(),
    )


def l1_sums(x: torch.Tensor, threads: int | None = None) -> np.ndarray[Any, Any]:
    """Per float32 exponent (0 counted as 1), the integer sum of the mantissas of ``|x|`` (``exact.ExactL1``'s
    buckets)."""
    x = _flat(x)
    sums = np.zeros(256, dtype=np.uint64)
    _lib().lm_l1_sums(_bf(x), _ptr(x), x.numel(), _np_ptr(sums), threads or default_threads())
    return sums


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or Inf; one parallel pass on the CPU for float32/bfloat16."""
    if not supports(tensor.dtype, tensor.device):
        return bool(torch.isfinite(tensor).all())
    x = _flat(tensor)
    return int(_lib().lm_count_nonfinite(_bf(x), _ptr(x), x.numel(), default_threads())) == 0
