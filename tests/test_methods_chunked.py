"""Chunked execution: every method gives the bits of an unchunked merge, with both kernels, whatever the layout."""

from __future__ import annotations

import itertools
import logging
import math
from fractions import Fraction

import pytest
import torch
from mergekit.merge_methods import merge_tensors

from langmerge.analysis import tensor_tally
from langmerge.methods import (
    METHODS,
    ChunkRule,
    TensorInfo,
    TensorParameters,
    choose_kernel,
    chunk_ranges,
    driver,
    fused_cpu,
    get_method,
    merge_in_memory,
    task_vectors,
    thread_limit,
)
from langmerge.methods.exact import ExactL1, round_exact
from langmerge.methods.selection import keep_count, select_mask
from langmerge.methods.task_vectors import ENTRIES

FAMILY = [m.name for m in ENTRIES]
# (shape, chunk bytes): rows split unevenly, tensors smaller than a chunk, 1-D, rows larger than a chunk
LAYOUTS = [
    ((1,), 4),
    ((7,), 12),
    ((257,), 100),
    ((33, 17), 4 * 17 * 3 + 8),  # three rows and a bit: whole rows per chunk, the last chunk short
    ((4, 3, 5), 24),  # a row of 15 elements > the chunk: rows split into element ranges
    ((3, 1000), 256),  # rows much larger than a chunk
    ((40, 30), 1 << 30),  # smaller than a chunk: one chunk
    ((), 4),  # a scalar
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _trio(shape, n, dtype, seed, coarse=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = []
    for i in range(n):
        delta = torch.randn(shape, generator=g) * (0.4 + i)
        if coarse:  # many equal magnitudes: the trim boundary is a long run of ties across chunks
            delta = torch.round(delta * 2) / 2
        xs.append(base + delta)
    for x in xs:  # a few zero task vectors
        x.view(-1)[:2] = base.view(-1)[:2]
    return base.to(dtype), [x.to(dtype) for x in xs]


def _params(method, n, density, rescale=None):
    m = get_method(method)
    values = {"weight": [1.0, -0.4, 0.8][:n], "normalize": m.default_normalize}
    if m.uses_base:
        values["lambda"] = 0.9
    if m.sparsifier:
        values["density"] = [density, (density + 0.35) % 1.0, 0.6][:n]
        values["rescale"] = m.default_rescale if rescale is None else rescale
    if m.takes_protect:
        values["slack"] = 1.5
    return m.tensor_parameters(values, protected=[i == n - 1 for i in range(n)])


def _generators(method, n):
    return [torch.Generator().manual_seed(100 + i) for i in range(n)] if get_method(method).randomized else None


def _merge(method, p, base, xs, kernel, chunk_bytes):
    m = get_method(method)
    return merge_in_memory(
        m,
        p,
        base if m.uses_base else None,
        xs,
        kernel=kernel,
        generators=_generators(method, len(xs)),
        chunk_bytes=chunk_bytes,
    )


def _kernels(method, p, dtype):
    return get_method(method).kernels(p, dtype, torch.device("cpu"))


@pytest.mark.parametrize("method", FAMILY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_chunked_equals_unchunked_bit_for_bit(method, dtype):
    flip = not get_method(method).default_rescale if get_method(method).sparsifier else None
    # (models, density, coarse task vectors, rescale): densities below 1 trim (or drop) all but the last model's
    cases = [
        (1, 0.3, False, None),
        (3, 0.3, True, None),
        (3, 0.0, False, flip),
        (1, 1.0, True, flip),
        (3, 0.3, False, flip),
    ]
    for (shape, chunk_bytes), (n, density, coarse, rescale) in itertools.product(LAYOUTS, cases):
        base, xs = _trio(shape, n, dtype, seed=len(shape) + n, coarse=coarse)
        p = _params(method, n, density, rescale)
        for kernel in _kernels(method, p, dtype):
            whole = _merge(method, p, base, xs, kernel, 1 << 40)
            chunked = _merge(method, p, base, xs, kernel, chunk_bytes)
            assert torch.equal(_bits(chunked), _bits(whole)), (method, kernel, shape, chunk_bytes, n, density, coarse)


@pytest.mark.parametrize("method", ["ties", "ties_sv", "task_arithmetic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_reference_when_chunked(method, dtype):
    """Ties at the trim boundary spread over many chunks: the fused tie scan and the reference one agree."""
    for shape, chunk_bytes in [((300, 70), 1000), ((5000,), 512), ((64, 1025), 3000)]:
        base, xs = _trio(shape, 2, dtype, seed=3, coarse=True)
        p = _params(method, 2, 0.45)
        assert _kernels(method, p, dtype) == ("fused", "reference")
        fused = _merge(method, p, base, xs, "fused", chunk_bytes)
        reference = _merge(method, p, base, xs, "reference", chunk_bytes)
        assert torch.equal(_bits(fused), _bits(reference)), (shape, chunk_bytes)


def test_chunked_ties_and_dare_equal_mergekit_float32():
    """The chunked merge against the independent oracle (a transitivity check made direct)."""
    base, xs = _trio((96, 40), 2, torch.float32, seed=9)
    params = {"weight": {1: 1.0, 2: 0.7}, "density": {1: 0.3, 2: 0.6}}
    theirs = merge_tensors([base, *xs], "ties", parameters=params, base_index=0)
    p = TensorParameters(weights=[1.0, 0.7], normalize=True, densities=[0.3, 0.6])
    for kernel in ("fused", "reference"):
        assert torch.equal(merge_in_memory(get_method("ties"), p, base, xs, kernel=kernel, chunk_bytes=1000), theirs)
    # DARE draws one uniform per entry in flat order: a generator carried over the chunks gives mergekit's masks
    torch.manual_seed(5)
    theirs = merge_tensors(
        [base, xs[0]],
        "dare_linear",
        parameters={"weight": {1: 1.0}, "density": {1: 0.4}, "rescale": False},
        base_index=0,
    )
    p = TensorParameters(weights=[1.0], normalize=False, densities=[0.4])
    ours = merge_in_memory(
        get_method("dare_linear"), p, base, xs[:1], generators=[torch.Generator().manual_seed(5)], chunk_bytes=700
    )
    assert torch.equal(ours, theirs)


def test_dare_does_not_depend_on_threads_or_chunks():
    """The rescale norms are exact sums; torch's own sum changes with the thread count."""
    base, xs = _trio((700, 300), 2, torch.float32, seed=4)
    p = _params("dare_ties", 2, 0.3)
    results = []
    for threads, chunk_bytes in [(1, 1 << 40), (2, 1 << 40), (2, 4096), (1, 100_000)]:
        with thread_limit(threads):
            results.append(_merge("dare_ties", p, base, xs, "reference", chunk_bytes))
    assert all(torch.equal(r, results[0]) for r in results)


def test_selection_is_exact_across_chunks_with_heavy_ties():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        t = (torch.round(torch.randn(3001, generator=g) * 3) / 3).to(dtype)
        for density in (0.01, 0.2, 0.5, 0.77, 0.999):
            k = keep_count(t.numel(), density)
            mag = t.abs().float()
            threshold = torch.kthvalue(mag, t.numel() - k + 1).values
            expected = mag > threshold
            expected[torch.nonzero(mag == threshold).reshape(-1)[: k - int(expected.sum())]] = True
            for fused in (False, True):
                assert torch.equal(select_mask(t, k, fused=fused), expected)


# ----------------------------------------------------------------------------- the layout


def test_chunk_ranges_hand_cases():
    # 10 rows of 4 float32 (16 bytes a row); 40-byte chunks hold two rows
    assert chunk_ranges((10, 4), 4, 40) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40)]
    # a row of 100 elements, chunks of 10 elements: rows split into element ranges
    assert chunk_ranges((2, 100), 4, 40) == [(a, a + 10) for a in range(0, 200, 10)]
    assert chunk_ranges((25,), 2, 20) == [(0, 10), (10, 20), (20, 25)]
    assert chunk_ranges((2, 100), 4, 40, ChunkRule(whole_rows=True)) == [(0, 100), (100, 200)]
    assert chunk_ranges((2, 100), 4, 40, ChunkRule(whole_tensor=True)) == [(0, 200)]
    assert chunk_ranges((100,), 4, 100, ChunkRule(multiple_of=8)) == [(0, 24), (24, 48), (48, 72), (72, 96), (96, 100)]
    assert chunk_ranges((0, 5), 4, 40) == []
    assert chunk_ranges((), 4, 40) == [(0, 1)]


@pytest.mark.parametrize("shape", [(128256, 4096), (4096,), (3, 10**9), (50, 7)])
def test_chunks_never_exceed_the_budget(shape):
    """Peak memory is set by the chunk size: no chunk is larger, whatever the tensor."""
    budget = 8 << 20
    ranges = chunk_ranges(shape, 2, budget)
    assert max(b - a for a, b in ranges) * 2 <= budget
    assert ranges[0][0] == 0 and ranges[-1][1] == math.prod(shape)
    assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))


# ----------------------------------------------------------------------------- exact sums


def test_round_exact_hand_cases():
    assert round_exact(3, 0, torch.float32) == 3.0
    assert round_exact((1 << 24) + 1, 0, torch.float32) == float(1 << 24)  # halfway: to even
    assert round_exact((1 << 24) + 3, 0, torch.float32) == float((1 << 24) + 4)  # halfway: to even (up)
    assert round_exact(257, 0, torch.bfloat16) == 256.0  # bfloat16 keeps 8 bits
    assert round_exact(1, 128, torch.float32) == math.inf
    assert round_exact(1, -149, torch.float32) == 2.0**-149  # the smallest subnormal
    assert round_exact(1, -150, torch.float32) == 0.0  # half of it rounds to even: zero
    assert round_exact(3, -151, torch.float32) == 2.0**-149
    assert round_exact(0, 5, torch.float16) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_exact_l1_equals_fractions_in_any_order(dtype):
    g = torch.Generator().manual_seed(2)
    t = torch.randn(5000, generator=g, dtype=torch.float64) * torch.exp(
        torch.randn(5000, generator=g, dtype=torch.float64) * 8
    )
    t[:10] = torch.tensor([1e-40, -1e-42, 3e-45, 0.0, -0.0, 1e30, -2e30, 1e-310, 5e-324, 7.0], dtype=torch.float64)
    t = t.to(dtype)
    t[~torch.isfinite(t)] = 1.0  # beyond float16's range
    exact = sum(Fraction(v) for v in t.double().abs().tolist())
    whole, parts = ExactL1(), ExactL1()
    whole.add(t)
    for a, b in [(0, 3), (3, 1000), (1000, 4999), (4999, 5000)][::-1]:  # another split, another order
        parts.add(t[a:b])
    assert whole.value(torch.float64) == float(exact)  # Fraction -> float is correctly rounded
    for out in (torch.float32, torch.bfloat16):
        candidate = whole.value(out)
        assert candidate == parts.value(out)
        # no representable value of `out` is nearer to the exact sum (bfloat16: a float32 with 16 zero low bits)
        bits = torch.tensor([candidate], dtype=torch.float32).view(torch.int32)
        ulp = 1 << 16 if out == torch.bfloat16 else 1
        for neighbour in (bits - ulp, bits + ulp):
            other = Fraction(float(neighbour.view(torch.float32)))
            assert abs(Fraction(candidate) - exact) <= abs(other - exact)


# ----------------------------------------------------------------------------- planning


def test_kernels_are_chosen_at_planning():
    cpu = torch.device("cpu")
    info = TensorInfo("t", (64, 64), torch.bfloat16, cpu)
    ties = get_method("ties")
    p = TensorParameters(weights=[1.0, 1.0], normalize=True, densities=[0.5, 0.5])
    assert choose_kernel(ties, p, info) == ("fused" if fused_cpu.available() else "reference")
    assert choose_kernel(ties, p, info, fused=False) == "reference"
    assert choose_kernel(ties, p.model_copy(update={"rescale": True}), info) == "reference"  # no fused rescale
    for name in ("dare_ties", "dare_linear"):
        assert get_method(name).kernels(p, torch.bfloat16, cpu) == ("reference",)
    # linear is fused where the C kernel reproduces torch's addcmul_ (probed once)
    linear = ("fused", "reference") if fused_cpu.addcmul_fuses() is not None else ("reference",)
    assert get_method("linear").kernels(p, torch.bfloat16, cpu) == linear
    assert ties.kernels(p, torch.float16, cpu) == ("reference",)
    assert ties.kernels(p, torch.float32, torch.device("meta")) == ("reference",)
    with pytest.raises(ValueError, match="fused kernel cannot merge"):
        get_method("dare_ties").plan(p, info, "fused")


def test_thread_limit_restores_the_count_even_on_error():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with pytest.raises(RuntimeError):
        with thread_limit(target):
            assert torch.get_num_threads() == target
            raise RuntimeError
    assert torch.get_num_threads() == before


def test_every_registered_family_method_is_covered():
    assert set(FAMILY) <= set(METHODS)


@pytest.mark.parametrize("method", ["ties_sv", "dare_ties"])
def test_the_loss_diagnostic_does_not_depend_on_the_chunks(method, monkeypatch):
    base, xs = _trio((200, 37), 2, torch.bfloat16, seed=6, coarse=True)
    p = _params(method, 2, 0.4)
    slacks = [None, 0.0, 2.0]
    for min_numel in (1, 1 << 62):  # the fused kernel (ties_sv), then the reference one
        monkeypatch.setattr(fused_cpu, "MIN_NUMEL", min_numel)
        whole, chunked = (
            tensor_tally(get_method(method), base, xs, p, slacks, _generators(method, 2), chunk_bytes=c)
            for c in (1 << 40, 900)
        )
        for name in ("kept", "lost", "both_kept", "conflicts"):
            assert (getattr(whole, name) == getattr(chunked, name)).all(), name
        for name in ("kept_mass", "lost_mass", "squared_norm"):
            assert getattr(whole, name) == pytest.approx(getattr(chunked, name), rel=1e-6)


def test_dare_without_generators_draws_from_torch_global_stream_like_mergekit():
    """Models share the global stream, model after model over the whole tensor, as in mergekit."""
    base, xs = _trio((40, 30), 2, torch.float32, seed=12)
    torch.manual_seed(77)
    theirs = merge_tensors(
        [base, *xs],
        "dare_ties",
        parameters={"weight": {1: 1.0, 2: 0.6}, "density": {1: 0.3, 2: 0.5}, "rescale": False},
        base_index=0,
    )
    after_theirs = torch.rand(3)
    torch.manual_seed(77)
    p = TensorParameters(weights=[1.0, 0.6], normalize=False, densities=[0.3, 0.5])
    ours = merge_in_memory(get_method("dare_ties"), p, base, xs, chunk_bytes=64)  # one chunk whatever the size asked
    assert torch.equal(ours, theirs)
    assert torch.equal(torch.rand(3), after_theirs)  # the global stream advanced as mergekit's did


def test_without_the_extension_the_reference_kernel_is_planned_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(fused_cpu, "_LIB", None)  # as where no C compiler built it
    driver._note_reference_only.cache_clear()
    info = TensorInfo("t", (64, 64), torch.bfloat16)
    p = TensorParameters(weights=[1.0, 1.0], normalize=True, densities=[0.5, 0.5])
    base, xs = _trio((64, 64), 2, torch.bfloat16, seed=1)
    with caplog.at_level(logging.INFO, logger="langmerge.methods.driver"):
        for name in ("ties", "task_arithmetic", "linear"):
            assert get_method(name).kernels(p, torch.bfloat16, torch.device("cpu")) == ("reference",)
            assert choose_kernel(get_method(name), p, info) == "reference"
        merged = merge_in_memory(get_method("ties"), p, base, xs)
    assert sum("not built" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.undo()
    driver._note_reference_only.cache_clear()
    assert torch.equal(merged, merge_in_memory(get_method("ties"), p, base, xs, kernel="fused"))


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_masks_kept_or_redrawn_give_the_same_bits(method, monkeypatch):
    """The L1 pass keeps DARE's masks for the merge pass where they fit, else the merge pass redraws them."""
    base, xs = _trio((300, 41), 2, torch.bfloat16, seed=8)
    p = _params(method, 2, 0.35)
    kept = _merge(method, p, base, xs, "reference", 2000)
    monkeypatch.setattr(task_vectors, "MASK_CACHE_BYTES", 0)
    redrawn = _merge(method, p, base, xs, "reference", 2000)
    assert torch.equal(kept, redrawn)
