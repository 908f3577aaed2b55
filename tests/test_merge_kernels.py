"""Per-tensor kernels against independent computations: mergekit 0.1.5 and hand-worked cases."""

from __future__ import annotations

import itertools
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch
from mergekit.merge_methods import merge_tensors
from mergekit.sparsify import RescaleNorm
from mergekit.sparsify import bernoulli as mk_bernoulli

from langmerge.methods import TensorParameters, get_method, merge_tensor
from langmerge.methods.sparsify import bernoulli_drop, keep_count, magnitude_keep_mask

SHAPES = [(1,), (2,), (3,), (5,), (10,), (7, 5), (16, 32), (4, 3, 5), (257,)]
DENSITIES = [0.0, 0.1, 0.5, 0.93, 1.0]


def _trio(shape, n, seed, dtype=torch.float32, zero_deltas=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    if zero_deltas:
        inputs = [base.clone() for _ in range(n)]
    else:
        inputs = [base + torch.randn(shape, generator=g) * (0.5 + i) for i in range(n)]
    return base.to(dtype), [x.to(dtype) for x in inputs]


def _mergekit(method, base, inputs, weights, densities=None, **shared):
    params = {"weight": {i + 1: w for i, w in enumerate(weights)}, **shared}
    if densities is not None:
        params["density"] = {i + 1: d for i, d in enumerate(densities)}
    if base is None:
        return merge_tensors(inputs, method, parameters={"weight": list(weights), **shared})
    return merge_tensors([base, *inputs], method, parameters=params, base_index=0)


def _ours(method, base, inputs, weights, densities=None, normalize=None, lam=1.0, slack=0.0, protected=None):
    m = get_method(method)
    p = TensorParameters(
        weights=list(weights),
        normalize=m.default_normalize if normalize is None else normalize,
        densities=list(densities or [1.0] * len(inputs)),
        lam=lam,
        slack=slack,
        protected=protected or [False] * len(inputs),
    )
    return merge_tensor(m, base, inputs, p)


CASES = list(itertools.product(SHAPES, [1, 2, 3]))


@pytest.mark.parametrize("shape,n", CASES)
def test_ties_bit_identical_to_mergekit_float32(shape, n):
    for seed, d in enumerate(DENSITIES):
        base, inputs = _trio(shape, n, seed)
        densities = [d, *[(d + 0.3 * (i + 1)) % 1.0 for i in range(n - 1)]]
        weights = [1.0, 0.5, 2.0][:n]
        expected = _mergekit("ties", base, inputs, weights, densities)
        assert torch.equal(_ours("ties", base, inputs, weights, densities), expected), (shape, n, d)


@pytest.mark.parametrize("shape,n", CASES)
def test_task_arithmetic_and_linear_bit_identical_to_mergekit(shape, n):
    base, inputs = _trio(shape, n, 7)
    for weights in ([0.7, -0.4, 1.3][:n], [1.0] * n, [-1.0, 2.5, 0.25][:n]):
        for lam in (1.0, 0.6):
            expected = _mergekit("task_arithmetic", base, inputs, weights, **{"lambda": lam})
            assert torch.equal(_ours("task_arithmetic", base, inputs, weights, lam=lam), expected)
        # negative weights with normalize off, and normalize on
        for normalize in (False, True):
            if normalize and abs(sum(weights)) < 1e-6:
                continue
            expected = _mergekit("linear", None, inputs, weights, normalize=normalize)
            assert torch.equal(_ours("linear", None, inputs, weights, normalize=normalize), expected)


def test_all_zero_task_vectors_return_the_base():
    for shape in SHAPES:
        base, inputs = _trio(shape, 2, 3, zero_deltas=True)
        for method in ("ties", "task_arithmetic"):
            out = _ours(method, base, inputs, [1.0, 0.5], [0.5, 0.5])
            assert torch.equal(out, _mergekit(method, base, inputs, [1.0, 0.5], [0.5, 0.5]))
            assert torch.equal(out, base)


def test_ties_normalize_is_invariant_to_weight_scale():
    base, inputs = _trio((64, 16), 2, 11)
    a = _ours("ties", base, inputs, [1.0, 0.5], [0.4, 0.6])
    b = _ours("ties", base, inputs, [2.0, 1.0], [0.4, 0.6])
    assert torch.equal(a, b)


def test_task_arithmetic_equals_the_formula():
    base, inputs = _trio((33, 9), 3, 5, dtype=torch.float64)
    w, lam = [0.3, -0.2, 0.9], 0.7
    expected = base + lam * sum(wi * (x - base) for wi, x in zip(w, inputs))
    torch.testing.assert_close(_ours("task_arithmetic", base, inputs, w, lam=lam), expected, rtol=0, atol=1e-12)


def _kth_magnitude(delta: torch.Tensor, density: float) -> float:
    k = keep_count(delta.numel(), density)
    return float(delta.abs().float().reshape(-1).sort(descending=True).values[k - 1])


@pytest.mark.parametrize("seed", range(6))
def test_ties_bfloat16_differs_from_mergekit_only_at_tied_trim_boundary(seed):
    base, inputs = _trio((48, 40), 2, 100 + seed, dtype=torch.bfloat16)
    densities, weights = [0.3, 0.6], [1.0, 0.8]
    ours = _ours("ties", base, inputs, weights, densities)
    theirs = _mergekit("ties", base, inputs, weights, densities)
    differ = ours != theirs
    tied = torch.zeros_like(differ)
    for x, d in zip(inputs, densities):
        delta = x - base
        tied |= delta.abs().float() == _kth_magnitude(delta, d)
    assert bool((differ & ~tied).sum() == 0)


def test_magnitude_mask_keeps_exactly_k_even_with_ties():
    t = torch.tensor([0.0, 1.0, -1.0, 1.0, 2.0, -1.0, 0.0, 0.5])
    for density, k in [(0.25, 2), (0.5, 4), (0.3, 2), (0.01, 1), (0.0, 0), (1.0, 8)]:
        mask = magnitude_keep_mask(t, density)
        assert int(mask.sum()) == k
        if 0 < k < 8:
            # nothing dropped is larger than anything kept
            assert t.abs()[~mask].max() <= t.abs()[mask].min()


def _exact_rescaled(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x * mask * (L1(x) / L1(x * mask))`` with both norms summed exactly (fractions), each rounded to ``dtype``."""
    step = 1 << 16 if dtype == torch.bfloat16 else 1  # one unit in the last place, in float32 bits

    def value(bits):
        return Fraction(struct.unpack("<f", struct.pack("<I", bits))[0])

    def l1(t):
        total = sum(Fraction(v) for v in t.double().abs().reshape(-1).tolist())  # float32/bf16 values are exact doubles
        near = struct.unpack("<I", struct.pack("<f", float(total)))[0] // step * step
        # the nearest of the neighbours, ties to the even one
        best = min((near - step, near, near + step), key=lambda b: (abs(value(b) - total), (b // step) % 2))
        return torch.tensor(float(value(best)), dtype=dtype)

    masked = x.to(dtype) * mask
    return masked * (l1(x.to(dtype)) / l1(masked))


@pytest.mark.parametrize("seed", range(4))
def test_dare_matches_mergekit_masks_with_the_same_seed(seed):
    """Same masks as mergekit (the same torch stream); rescale by exactly summed L1 norms (docs/methods.md, DARE)."""
    delta = torch.randn(50, 30, generator=torch.Generator().manual_seed(seed))
    for dtype, rescale in [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)]:
        x = delta.to(dtype)
        torch.manual_seed(1234)
        theirs = mk_bernoulli(x, 0.4, RescaleNorm.l1 if rescale else None)
        ours = bernoulli_drop(x, 0.4, rescale, torch.Generator().manual_seed(1234))
        assert torch.equal(ours != 0, theirs != 0)  # the masks
        if not rescale:
            assert torch.equal(ours, theirs)
            continue
        mask = (theirs != 0).to(ours.dtype)
        assert torch.equal(ours, _exact_rescaled(x, mask, ours.dtype))
        # mergekit's torch sum rounds in its own order: the scale agrees to a few units in the last place
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=4 * torch.finfo(dtype).eps, atol=0)


def _ties_sv_reference(base, ct, sft, w, d, slack):
    """TIES-SV from its definition (docs/methods.md, TIES-SV), written independently in float64 numpy."""
    b = base.double().numpy()
    vs, ms = [], []
    for x, wi, di in zip((ct, sft), w, d):
        t = x.double().numpy() - b
        k = keep_count(t.size, di)
        order = np.argsort(-np.abs(t).reshape(-1), kind="stable")[:k]
        trimmed = np.zeros(t.size)
        trimmed[order] = t.reshape(-1)[order]
        vs.append(wi * trimmed.reshape(t.shape))
    vote = vs[0] + (1 + slack) * vs[1]
    g = np.where(vote >= 0, 1.0, -1.0)
    ms = [np.sign(v) == g for v in vs]
    num = ms[0] * vs[0] + ms[1] * vs[1]
    den = ms[0] * w[0] + ms[1] * w[1]
    den[den == 0] = 1
    return b + num / den, ms, vs


def test_ties_sv_hand_computed_case():
    base = torch.zeros(4, dtype=torch.float64)
    ct = torch.tensor([3.0, -3.0, 1.0, -2.0], dtype=torch.float64)
    sft = torch.tensor([-2.0, 1.0, -2.0, 1.0], dtype=torch.float64)
    ties = _ours("ties_sv", base, [ct, sft], [1.0, 1.0], [1.0, 1.0])
    assert ties.tolist() == [3.0, -3.0, -2.0, -2.0]
    # slack 1: CT overrides SFT only where |CT| > 2 |SFT|; a zero vote elects +.
    sv = _ours("ties_sv", base, [ct, sft], [1.0, 1.0], [1.0, 1.0], slack=1.0, protected=[False, True])
    assert sv.tolist() == [-2.0, -3.0, -2.0, 1.0]


def test_ties_sv_at_slack_zero_is_bit_identical_to_ties():
    for shape, n in CASES[::2]:
        base, inputs = _trio(shape, n, 21)
        d, w = [0.4, 0.7, 0.2][:n], [1.0, 0.6, 1.5][:n]
        prot = [i == n - 1 for i in range(n)]
        assert torch.equal(
            _ours("ties_sv", base, inputs, w, d, slack=0.0, protected=prot), _ours("ties", base, inputs, w, d)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_sv_matches_its_definition_and_protected_loss_never_grows(dtype):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 50, generator=g).to(dtype)
    ct = (base + 2.0 * torch.randn(40, 50, generator=g)).to(dtype)  # large CT task vector
    sft = (base + 0.5 * torch.randn(40, 50, generator=g)).to(dtype)
    w, d = [1.0, 1.0], [0.5, 0.5]
    lost = []
    for slack in [0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 16.0, 1e6]:
        ours = _ours("ties_sv", base, [ct, sft], w, d, slack=slack, protected=[False, True])
        ref, masks, vs = _ties_sv_reference(base, ct, sft, w, d, slack)
        torch.testing.assert_close(ours.double(), torch.from_numpy(ref), rtol=1e-6, atol=1e-6)
        kept_sft = vs[1] != 0
        lost.append(int((kept_sft & ~masks[1]).sum()))
    assert all(a >= b for a, b in zip(lost, lost[1:])), lost
    assert lost[0] > 0 and lost[-1] == 0
