"""The fused CPU kernel gives the reference kernel's bits (which the mergekit tests pin)."""

from __future__ import annotations

import itertools

import pytest
import torch

from langmerge.merge import merge
from langmerge.methods import TensorParameters, fused_cpu, get_method, merge_in_memory, merge_tensor
from langmerge.methods.fused_cpu import CHUNK
from langmerge.methods.kernels import NonFiniteMerge
from langmerge.methods.selection import select_mask
from langmerge.methods.sparsify import keep_count
from langmerge.synthetic import make_trio


def test_the_fused_kernels_are_built():
    """The C extension builds wherever the tests install (gcc and Python's headers): a missing build fails here."""
    assert fused_cpu.available()


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
        [
            (0.0, [1.0, 1.0, 1.0], 1.0, False),
            (0.3, [0.7, -0.3, 1.3], 0.8, False),
            (1.0, [1.0, 0.5, 2.0], 1.0, True),
            (0.5, [1.0, 1.0, 1.0], 1.0, True),
        ]
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
        assert m.kernels(p, dtype, torch.device("cpu"))[0] == "fused"
        fused = merge_in_memory(m, p, base, xs, kernel="fused")  # raises NonFiniteMerge on a NaN/Inf output
        reference = merge_tensor(m, base, xs, p, fused=False)
        assert torch.equal(_bits(fused), _bits(reference)), (seed, d, weights[:n], lam)


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "ties_sv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_negative_zero_in_the_base_gives_the_reference_bits(dtype, method):
    """torch's sums over the model axis start from +0, as the fused kernel's do, so -0.0 needs no other path."""
    m = get_method(method)
    base, xs = _inputs((64, 33), 2, dtype, 3)
    base.view(-1)[5:40] = -0.0
    xs[0].view(-1)[5:20] = -0.0  # zero task vectors over a -0.0 base: the sign of the zero sum shows
    xs[1].view(-1)[10:30] = 0.0
    p = TensorParameters(
        weights=[1.0, 1.0],
        normalize=m.default_normalize,
        densities=[0.5, 0.5],
        slack=1.0,
        protected=[False, method == "ties_sv"],
    )
    fused = merge_in_memory(m, p, base, xs, kernel="fused")
    assert torch.equal(_bits(fused), _bits(merge_tensor(m, base, xs, p, fused=False)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_keep_mask_is_the_reference_selection(dtype):
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
            assert torch.equal(select_mask(t, k, fused=True).reshape(-1), expected)


def test_nan_or_inf_in_an_input_always_reaches_the_result():
    m = get_method("ties")
    for dtype, bad, density in itertools.product(
        [torch.float32, torch.bfloat16], [float("nan"), float("inf")], [0.0, 0.5, 1.0]
    ):
        base, xs = _inputs((CHUNK + 3,), 2, dtype, 4)
        xs[1][77] = bad
        p = TensorParameters(weights=[1.0, 1.0], normalize=True, densities=[0.5, density])
        for fused in (True, False):
            with pytest.raises(NonFiniteMerge):
                merge_tensor(m, base, xs, p, fused=fused)


@pytest.mark.parametrize("fails", [False, True], ids=["completes", "fails"])
def test_threads_are_set_for_the_merge_and_restored(tmp_path, monkeypatch, fails):
    """``threads=N`` is torch's (and so the fused kernels') count during the merge only, even when the merge fails."""
    trio = make_trio(tmp_path / "models")
    recipe = {
        "merge_method": "ties",
        "base_model": str(trio["base"]),
        "models": [{"model": str(trio[m]), "parameters": {"weight": 1.0, "density": 0.5}} for m in ("ct", "sft")],
    }
    seen = []
    real = fused_cpu.merge_ties

    def spy(*args, **kwargs):  # the fused kernels run on torch's thread count of the moment
        seen.append(fused_cpu.default_threads())
        if fails:
            raise RuntimeError("kernel failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_cpu, "merge_ties", spy)
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    try:
        if fails:
            with pytest.raises(RuntimeError, match="kernel failure"):
                merge(recipe, tmp_path / "out", threads=target, progress=False)
        else:
            merge(recipe, tmp_path / "out", threads=target, progress=False)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)  # so that a leak fails this test only, not the ones after it
    assert seen and set(seen) == {target}
    assert after == before  # restored: the process-wide count did not leak out of the call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 17), (2 * CHUNK + 5,)])
def test_fused_linear_equals_reference_bit_for_bit(dtype, shape):
    m = get_method("linear")
    for n, weights, normalize in [
        (1, [0.7], True),
        (2, [0.3, 0.7], True),
        (3, [1.0, -0.4, 2.5], False),
        (3, [0.2, 0.2, 0.6], True),
    ]:
        _, xs = _inputs(shape, n, dtype, n)
        p = TensorParameters(weights=weights, normalize=normalize)
        fused = merge_in_memory(m, p, None, xs, kernel="fused")
        assert torch.equal(_bits(fused), _bits(merge_tensor(m, None, xs, p, fused=False))), (n, weights, normalize)


def test_the_linear_probe_finds_how_torch_rounds_addcmul():
    """torch's addcmul_ is one fused multiply-add on AVX2/AVX-512 builds: acc + x * w rounded once."""
    g = torch.Generator().manual_seed(4)
    acc, x = torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    w = torch.tensor(0.7312)
    torch_bits = acc.clone().addcmul_(x, w)
    fused = torch.equal(torch_bits, (acc.double() + x.double() * w.double()).float())
    separate = torch.equal(torch_bits, acc + x * w)
    assert fused_cpu.addcmul_fuses() == (True if fused else False if separate else None)
