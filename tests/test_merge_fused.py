"""The fused CPU kernel gives the reference kernel's bits (which the mergekit tests pin)."""

from __future__ import annotations

import itertools

import pytest
import torch

from langmerge.methods import TensorParameters, get_method, merge_tensor
from langmerge.methods import fused_cpu
from langmerge.methods.fused_cpu import CHUNK

pytestmark = pytest.mark.skipif(fused_cpu.numba is None, reason="numba is a test dependency; install langmerge[test]")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _inputs(shape, n, dtype, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = [base + torch.randn(shape, generator=g) * (0.3 + i) for i in range(n)]
    if ties:  # many equal magnitudes: coarse task vectors
        xs = [base + torch.round(x - base) for x in xs]
    for x in xs:  # a few entries with a zero task vector
        x.view(-1)[:2] = base.view(-1)[:2]
    return base.to(dtype), [x.to(dtype) for x in xs]


CASES = list(
    itertools.product(
        [torch.float32, torch.bfloat16],
        [(1,), (7,), (33, 17), (2 * CHUNK + 5,)],
        [1, 2, 3],
        ["ties", "task_arithmetic", "ties_sv"],
    )
)


@pytest.mark.parametrize("dtype,shape,n,method", CASES)
def test_fused_equals_reference_bit_for_bit(dtype, shape, n, method):
    m = get_method(method)
    for seed, (d, weights, lam, ties) in enumerate(
        [(0.0, [1.0, 1.0, 1.0], 1.0, False), (0.3, [0.7, -0.3, 1.3], 0.8, False), (1.0, [1.0, 0.5, 2.0], 1.0, True), (0.5, [1.0, 1.0, 1.0], 1.0, True)]
    ):
        base, xs = _inputs(shape, n, dtype, seed, ties)
        p = TensorParameters(
            weights=weights[:n],
            normalize=m.default_normalize,
            densities=[d, (d + 0.5) % 1.0, 0.7][:n],
            lam=lam,
            slack=1.5 if method == "ties_sv" else 0.0,
            protected=[i == n - 1 for i in range(n)],
        )
        fused = fused_cpu.merge_tensor_fused(
            base, xs, p.weights, p.densities if m.sparsification else None, m.consensus, p.normalize, p.lam,
            [1.0 + p.slack if q else 1.0 for q in p.protected] if method == "ties_sv" else None,
        )
        assert fused is not None
        fused, nonfinite = fused
        assert nonfinite == 0
        reference = merge_tensor(m, base, xs, p, fused=False)
        assert torch.equal(_bits(fused), _bits(reference)), (seed, d, weights[:n], lam)


def test_negative_zero_in_the_base_takes_the_reference_path():
    base, xs = _inputs((64,), 2, torch.bfloat16, 3)
    base[5] = -0.0
    assert fused_cpu.merge_tensor_fused(base, xs, [1.0, 1.0], [0.5, 0.5], True, True, 1.0, None) is None
    m, p = get_method("ties"), TensorParameters(weights=[1.0, 1.0], normalize=True, densities=[0.5, 0.5])
    assert torch.equal(_bits(merge_tensor(m, base, xs, p)), _bits(merge_tensor(m, base, xs, p, fused=False)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_keep_mask_is_the_reference_selection(dtype):
    from langmerge.methods.sparsify import keep_count

    g = torch.Generator().manual_seed(8)
    for shape, coarse in [((3 * CHUNK + 11,), False), ((700, 1001), True)]:
        t = torch.randn(shape, generator=g)
        if coarse:  # heavy ties at every magnitude
            t = torch.round(t * 4) / 4
        t = t.to(dtype)
        for density in (0.05, 0.5, 0.97):
            k = keep_count(t.numel(), density)
            mag = t.reshape(-1).abs().float()
            threshold = torch.kthvalue(mag, t.numel() - k + 1).values
            expected = mag > threshold
            expected[torch.nonzero(mag == threshold).reshape(-1)[: k - int(expected.sum())]] = True
            assert torch.equal(fused_cpu.keep_mask(t, k).reshape(-1), expected)


def test_nan_or_inf_in_an_input_always_reaches_the_result():
    from langmerge.methods.kernels import NonFiniteMerge

    m = get_method("ties")
    for dtype, bad, density in itertools.product([torch.float32, torch.bfloat16], [float("nan"), float("inf")], [0.0, 0.5, 1.0]):
        base, xs = _inputs((CHUNK + 3,), 2, dtype, 4)
        xs[1][77] = bad
        p = TensorParameters(weights=[1.0, 1.0], normalize=True, densities=[0.5, density])
        for fused in (True, False):
            with pytest.raises(NonFiniteMerge):
                merge_tensor(m, base, xs, p, fused=fused)


def test_threads_limit_the_fused_kernels_too(tmp_path):
    numba = pytest.importorskip("numba")
    from langmerge.engine import merge
    from langmerge.synthetic import make_trio

    trio = make_trio(tmp_path / "models")
    recipe = {"merge_method": "ties", "base_model": str(trio["base"]),
              "models": [{"model": str(trio[m]), "parameters": {"weight": 1.0, "density": 0.5}} for m in ("ct", "sft")]}
    before_numba, before_torch = numba.get_num_threads(), torch.get_num_threads()
    try:
        merge(recipe, tmp_path / "out", threads=1, progress=False)
        assert numba.get_num_threads() == 1 and torch.get_num_threads() == 1
    finally:
        numba.set_num_threads(before_numba)
        torch.set_num_threads(before_torch)
