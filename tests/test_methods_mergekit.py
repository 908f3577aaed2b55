"""The methods of issue 14 against mergekit 0.1.5's ``merge_tensors`` on random tensors (and hand cases).

Every comparison is in float32 compute unless a test says otherwise; ``torch.equal`` where langmerge
reproduces mergekit's bits, a stated tolerance where docs/methods.md says why it cannot (exact L1 sums).
"""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods import merge_tensors

from langmerge.errors import LangmergeError
from langmerge.merge.recipe import Recipe, RecipeFile
from langmerge.methods import get_method, merge_in_memory, merge_tensor
from langmerge.methods.sparsify import della_probabilities

SHAPES = [(1,), (3,), (17,), (7, 5), (16, 32), (4, 3, 5), (64, 48)]


def _models(shape, n, seed, dtype=torch.float32, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    inputs = [base + torch.randn(shape, generator=g) * (scale + 0.3 * i) for i in range(n)]
    return base.to(dtype), [x.to(dtype) for x in inputs]


def _params(method: str, **values):
    return get_method(method).tensor_parameters(values)


def _ours(method, base, inputs, generators=None, **values):
    return merge_tensor(get_method(method), base, inputs, _params(method, **values), generators)


def _theirs(method, base, inputs, **parameters):
    """mergekit's merge of ``[base, *inputs]`` (base at index 0) or of ``inputs`` alone (base None)."""
    tensors = list(inputs) if base is None else [base, *inputs]
    return merge_tensors(tensors, method, parameters=parameters, base_index=None if base is None else 0)


def _per_model(values, offset=1):
    return {i + offset: v for i, v in enumerate(values)}


# ----------------------------------------------------------------------------- slerp


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_slerp_bit_identical_to_mergekit(shape, t):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        base, (other,) = _models(shape, 1, 3, dtype)
        expected = _theirs("slerp", base, [other], t=t)
        out = _ours("slerp", base, [other], t=t)
        assert out.dtype == expected.dtype and torch.equal(out, expected), (shape, t, dtype)


@pytest.mark.parametrize("t", [0.25, 0.7])
def test_slerp_parallel_and_opposite_vectors_interpolate_linearly(t):
    base = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    for other in (2.5 * base, -base, base.clone(), torch.zeros_like(base)):
        out = _ours("slerp", base, [other], t=t)
        assert torch.equal(out, _theirs("slerp", base, [other], t=t))
        if other.abs().sum() > 0:  # (anti)parallel: the linear interpolation, as a hand case
            torch.testing.assert_close(out, (1 - t) * base + t * other, rtol=1e-6, atol=1e-6)


def test_slerp_hand_case_quarter_circle():
    base, other = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = _ours("slerp", base, [other], t=0.5)
    torch.testing.assert_close(out, torch.tensor([2**-0.5, 2**-0.5]))


def test_slerp_large_tensor_over_several_segments_and_chunks():
    """2.5 x 2^20 entries: mergekit's segments; chunked in 1 MiB blocks gives the same bits."""
    base, (other,) = _models((5, 1 << 19), 1, 4)
    expected = _theirs("slerp", base, [other], t=0.4)

    m = get_method("slerp")
    out = merge_in_memory(m, _params("slerp", t=0.4), base, [other], chunk_bytes=1 << 20)
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------- nuslerp


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_bit_identical_to_mergekit(shape, flatten, row_wise):
    for with_base in (True, False):
        for weights in ([1.0, 1.0], [0.2, 0.8], [1.0, 0.0], [1.0, -1.0]):
            base, inputs = _models(shape, 2, 5)
            base = base if with_base else None
            options = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
            expected = _theirs("nuslerp", base, inputs, weight=_per_model(weights, 1 if with_base else 0), **options)
            out = _ours("nuslerp", base, inputs, weight=weights, **options)
            assert torch.equal(out, expected), (shape, flatten, row_wise, with_base, weights)


def test_nuslerp_colinear_task_vectors_interpolate_linearly():
    base = torch.randn(8, 4)
    delta = torch.randn(8, 4)
    inputs = [base + delta, base + 3 * delta]
    out = _ours("nuslerp", base, inputs, weight=[0.5, 0.5])
    torch.testing.assert_close(out, base + 2 * delta)
    assert torch.equal(out, _theirs("nuslerp", base, inputs, weight={1: 0.5, 2: 0.5}))


# ----------------------------------------------------------------------------- breadcrumbs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_bit_identical_to_mergekit(shape, method):
    for seed, (densities, gammas) in enumerate(
        [([0.5, 0.8], [0.01, 0.1]), ([0.9, 0.3], [0.2, 0.0]), ([0.0, 1.0], [0.05, 0.05]), ([0.97, 0.6], [0.5, 0.3])]
    ):
        base, inputs = _models(shape, 2, 10 + seed)
        weights = [1.0, 0.6]
        for normalize in (False, True):
            expected = _theirs(
                method,
                base,
                inputs,
                weight=_per_model(weights),
                density=_per_model(densities),
                gamma=_per_model(gammas),
                normalize=normalize,
            )
            out = _ours(method, base, inputs, weight=weights, density=densities, gamma=gammas, normalize=normalize)
            assert torch.equal(out, expected), (shape, method, densities, gammas, normalize)


def test_breadcrumbs_hand_case_drops_the_largest_and_the_smallest():
    base = torch.zeros(10)
    x = torch.arange(1.0, 11.0)  # magnitudes 1..10
    # density 0.5 keeps 5 entries; gamma 0.2 drops the 2 largest first: 4..8 remain
    out = _ours("breadcrumbs", base, [x], weight=[1.0], density=[0.5], gamma=[0.2])
    assert out.tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 0, 0]
    # gamma too large to keep the density: fewer outliers are dropped, none of the smallest (mergekit's rule)
    out = _ours("breadcrumbs", base, [x], weight=[1.0], density=[0.7], gamma=[0.5])
    assert out.tolist() == [1, 2, 3, 4, 5, 6, 7, 0, 0, 0]


# ----------------------------------------------------------------------------- della


# rows of one entry are test_della_one_entry_rows_keep_with_probability_density's (mergekit fails on them)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[-1] > 1])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_masks_and_values_match_mergekit_with_the_same_seed(shape, method):
    for seed, (densities, epsilons) in enumerate([([0.5, 0.7], [0.15, 0.2]), ([0.3, 0.5], [0.1, 0.4])]):
        base, inputs = _models(shape, 2, 20 + seed)
        weights = [1.0, 0.7]
        for rescale in (False, True):
            values = dict(density=densities, epsilon=epsilons, rescale=rescale)
            torch.manual_seed(77 + seed)
            expected = _theirs(
                method,
                base,
                inputs,
                weight=_per_model(weights),
                **{k: _per_model(v) if isinstance(v, list) else v for k, v in values.items()},
            )
            torch.manual_seed(77 + seed)
            out = _ours(method, base, inputs, weight=weights, **values)
            if not rescale:
                assert torch.equal(out, expected), (shape, method, densities, rescale)
            else:  # exactly summed L1 norms (docs/methods.md, DARE): a few units in the last place
                torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
                assert torch.equal(out == base, expected == base)  # the same entries kept


def test_della_seeded_merge_is_chunk_independent():
    """With per-model generators (as a merge seeds them) the masks do not depend on the chunk layout."""
    base, inputs = _models((64, 100), 2, 3)
    m, p = get_method("della"), _params("della", weight=[1.0, 1.0], density=[0.4, 0.6], epsilon=[0.1, 0.2])
    outs = []
    for chunk in (400 * 4, 1 << 20):
        gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
        outs.append(merge_in_memory(m, p, base, inputs, generators=gens, chunk_bytes=chunk))
    assert torch.equal(outs[0], outs[1])


def test_della_refuses_probabilities_outside_zero_one():
    with pytest.raises(LangmergeError, match="density 0.9 and epsilon 0.15"):
        _params("della", weight=[1.0], density=[0.9], epsilon=[0.15])


def test_della_one_entry_rows_keep_with_probability_density():
    """mergekit's rank normalisation divides 0 by 0 on a row of one entry (torch.bernoulli then refuses the
    NaN); langmerge gives that entry the middle rank: keep probability = density (docs/methods.md, DELLA)."""
    probs = della_probabilities(torch.randn(5, 1), 0.4, 0.1)
    assert torch.equal(probs, torch.full((5, 1), 0.4))
    with pytest.raises(RuntimeError):
        _theirs("della", torch.zeros(5, 1), [torch.randn(5, 1)], weight={1: 1.0}, density={1: 0.4}, epsilon={1: 0.1})


def test_della_probabilities_hand_case():
    row = torch.tensor([[0.5, -3.0, 1.0, 0.1, 2.0]])  # ranks 2 5 3 1 4 -> spread (r - 1) / 4
    probs = della_probabilities(row, 0.5, 0.2)
    torch.testing.assert_close(probs, torch.tensor([[0.4, 0.7, 0.5, 0.3, 0.6]]))


# ----------------------------------------------------------------------------- sce


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_sce_bit_identical_to_mergekit(shape, n):
    for seed, topk in enumerate([1.0, 0.5, 0.1, 0.0, 0.93]):
        base, inputs = _models(shape, n, 30 + seed)
        for int8_mask in (False, True):
            expected = _theirs("sce", base, inputs, select_topk=topk, int8_mask=int8_mask)
            out = _ours("sce", base, inputs, select_topk=topk, int8_mask=int8_mask)
            assert torch.equal(out, expected), (shape, n, topk, int8_mask)


def test_sce_hand_case():
    base = torch.zeros(3)
    a, b = torch.tensor([2.0, 1.0, -1.0]), torch.tensor([-1.0, 1.0, 1.0])
    # energies: mean squares 2 and 1, weights 2/3 and 1/3; signs elected by mass: +, +, -... (-1 + 1 = 0 -> +)
    out = _ours("sce", base, [a, b])
    # entry 0: vote 2 - 1 > 0: a alone -> 2; entry 1: both -> 1; entry 2: vote 0 -> +: b alone -> 1
    torch.testing.assert_close(out, torch.tensor([2.0, 1.0, 1.0]))


# ----------------------------------------------------------------------------- model_stock


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3])
def test_model_stock_bit_identical_to_mergekit(shape, n):
    for filter_wise in (False, True):
        base, inputs = _models(shape, n, 40 + n)
        expected = _theirs("model_stock", base, inputs, filter_wise=filter_wise)
        out = _ours("model_stock", base, inputs, filter_wise=filter_wise)
        assert torch.equal(out, expected), (shape, n, filter_wise)


def test_model_stock_hand_case_and_opposite_task_vectors():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # cos 0: t = 0, the base
    assert torch.equal(_ours("model_stock", base, [a, b]), base)
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])  # cos 1/sqrt 2: t = 2c / (1 + c)
    c = 2**-0.5
    torch.testing.assert_close(_ours("model_stock", base, [a, b]), (2 * c / (1 + c)) * (a + b) / 2)
    # opposite task vectors: cos -1, 1 + (n - 1) cos = 0: no estimate, the base (as mergekit)
    a = torch.tensor([1.0, 2.0])
    assert torch.equal(_ours("model_stock", base, [a, -a]), base)
    assert torch.equal(_theirs("model_stock", base, [a, -a]), base)


def test_model_stock_refuses_one_model(tmp_path):
    raw = RecipeFile.model_validate({"merge_method": "model_stock", "base_model": "b", "models": [{"model": "a"}]})
    with pytest.raises(LangmergeError, match="merges at least 2 models besides the base"):
        Recipe(raw)
    with pytest.raises(ValueError, match="at least 3 inputs"):  # mergekit refuses it too
        _theirs("model_stock", torch.zeros(3), [torch.ones(3)])


# ----------------------------------------------------------------------------- karcher, multislerp


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_karcher_bit_identical_to_mergekit(shape, n):
    for dtype in (torch.float32, torch.bfloat16):
        _, inputs = _models(shape, n, 50 + n, dtype)
        for max_iter, tol in ((10, 1e-5), (3, 1e-3), (0, 1e-5)):
            expected = _theirs("karcher", None, inputs, max_iter=max_iter, tol=tol)
            out = _ours("karcher", None, inputs, max_iter=max_iter, tol=tol)
            assert out.dtype == expected.dtype and torch.equal(out, expected), (shape, n, dtype, max_iter)


def test_karcher_zero_models_and_hand_case():
    zero = torch.zeros(4)
    x = torch.tensor([3.0, 0.0, 0.0, 0.0])
    assert torch.equal(_ours("karcher", None, [zero, zero]), _theirs("karcher", None, [zero, zero]))
    # one zero model: the mean direction is the other's, scaled by the mean norm (3 + 0) / 2
    torch.testing.assert_close(_ours("karcher", None, [x, zero]), torch.tensor([1.5, 0.0, 0.0, 0.0]))
    # two orthogonal unit vectors of norm 2: the midpoint of the arc at norm 2
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    torch.testing.assert_close(_ours("karcher", None, [a, b]), torch.tensor([2**0.5, 2**0.5]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_multislerp_bit_identical_to_mergekit(shape, n):
    for with_base in (False, True):
        for weights, normalize in (([1.0, 1.0, 1.0], True), ([0.2, 0.5, 1.3], True), ([0.3, 0.9, 0.1], False)):
            base, inputs = _models(shape, n, 60 + n)
            base = base if with_base else None
            w = weights[:n]
            expected = _theirs(
                "multislerp", base, inputs, weight=_per_model(w, 1 if with_base else 0), normalize_weights=normalize
            )
            out = _ours("multislerp", base, inputs, weight=w, normalize_weights=normalize)
            assert torch.equal(out, expected), (shape, n, with_base, w, normalize)


def test_multislerp_antipodal_pair_falls_back_to_linear():
    a = torch.tensor([1.0, 2.0, -1.0])
    out = _ours("multislerp", None, [a, -a], weight=[0.5, 0.5])
    assert torch.equal(out, _theirs("multislerp", None, [a, -a], weight=[0.5, 0.5]))
    assert torch.equal(out, torch.zeros(3))


# ----------------------------------------------------------------------------- nearswap, passthrough


@pytest.mark.parametrize("shape", SHAPES)
def test_nearswap_bit_identical_to_mergekit(shape):
    for t in (0.0, 1e-4, 0.1, 0.5, 10.0):
        for dtype in (torch.float32, torch.bfloat16):
            base, (other,) = _models(shape, 1, 70, dtype, scale=0.2)
            expected = _theirs("nearswap", base, [other], t=t)
            out = _ours("nearswap", base, [other], t=t)
            assert out.dtype == expected.dtype and torch.equal(out, expected), (shape, t, dtype)


def test_nearswap_hand_case():
    a, b = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.05, 0.2, 1.0])
    # t = 0.1: |a - b| 0.05 -> weight 1 (b); 0.2 -> 0.5; 1.0 -> 0.1
    torch.testing.assert_close(_ours("nearswap", a, [b], t=0.1), torch.tensor([0.05, 0.1, 0.1]))


@pytest.mark.parametrize("shape", SHAPES)
def test_passthrough_bit_identical_to_mergekit(shape):
    _, (x,) = _models(shape, 1, 80)
    for scale in (None, 1.0, 0.5, -2.0):
        expected = merge_tensors([x], "passthrough", parameters={} if scale is None else {"scale": [scale]})
        out = _ours("passthrough", None, [x], **({} if scale is None else {"scale": [scale]}))
        assert torch.equal(out, expected), (shape, scale)


# ----------------------------------------------------------------------------- arcee_fusion, ram, ramplus_tl


@pytest.mark.parametrize("shape", SHAPES)
def test_arcee_fusion_bit_identical_to_mergekit(shape):
    for dtype in (torch.float32, torch.bfloat16):
        base, (x,) = _models(shape, 1, 90, dtype)
        expected = _theirs("arcee_fusion", base, [x])
        out = _ours("arcee_fusion", base, [x])
        assert out.dtype == expected.dtype and torch.equal(out, expected), (shape, dtype)


def test_arcee_fusion_samples_its_quartiles_above_a_million_entries():
    """mergekit samples 10^6 entries from torch's global stream: the same draws give the same bits."""
    base, (x,) = _models((1100, 1000), 1, 91)
    torch.manual_seed(5)
    expected = _theirs("arcee_fusion", base, [x])
    torch.manual_seed(5)
    assert torch.equal(_ours("arcee_fusion", base, [x]), expected)
    # with a seeded generator (as a merge plans it): reproducible, and the mask still an upper-outlier share
    m, p = get_method("arcee_fusion"), _params("arcee_fusion")
    a = merge_tensor(m, base, [x], p, [torch.Generator().manual_seed(1)])
    b = merge_tensor(m, base, [x], p, [torch.Generator().manual_seed(1)])
    assert torch.equal(a, b)
    changed = float((a != base).float().mean())
    assert 0 < changed < 0.25


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_bit_identical_to_mergekit(shape, method):
    for n in (1, 2, 3):
        base, inputs = _models(shape, n, 100 + n)
        # sparse task vectors so that entries are changed by one, several or no model
        g = torch.Generator().manual_seed(n)
        inputs = [torch.where(torch.rand(shape, generator=g) < 0.5, x, base) for x in inputs]
        extra = {"epsilon": 1e-5}
        if method == "ramplus_tl":
            extra.update(r=0.3, alpha=0.5)
        for dtype in (torch.float32, torch.bfloat16):
            b, xs = base.to(dtype), [x.to(dtype) for x in inputs]
            expected = _theirs(method, b, xs, **extra)
            out = _ours(method, b, xs, **extra)
            assert out.dtype == expected.dtype and torch.equal(out, expected), (shape, method, n, dtype)


def test_ram_hand_case():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 2.0, 0.0, 0.0]), torch.tensor([3.0, 0.0, 0.0, 4.0])
    # entry 0 changed by both: mean 2; entries 1 and 3 by one: taken whole; entry 2 by none
    assert _ours("ram", base, [a, b]).tolist() == [2.0, 2.0, 0.0, 4.0]
    # RAM+: rho = shared / unique = 1 / 1 for both models, clamped to alpha 0.5: unique entries x (1 + 0.2 * 0.5)
    torch.testing.assert_close(_ours("ramplus_tl", base, [a, b], r=0.2, alpha=0.5), torch.tensor([2.0, 2.2, 0.0, 4.4]))
