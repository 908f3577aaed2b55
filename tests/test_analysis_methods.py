"""The loss diagnostic for issue 14's methods with a sign vote or a sparsifier, against mergekit's own sparsifiers."""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods.sce import sce_mask
from mergekit.sparsify import RescaleNorm, della_magprune, magnitude_outliers

from analysis_helpers import tiny_trio, weights
from langmerge.analysis import analyze, tensor_tally
from langmerge.errors import LangmergeError
from langmerge.methods import get_method


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return tiny_trio(tmp_path_factory.mktemp("trio"))


def _recipe(trio, method, ct=None, sft=None, **parameters):
    return {
        "merge_method": method,
        "base_model": str(trio["base"]),
        "dtype": "float32",
        "parameters": parameters,
        "models": [
            {"model": str(trio["ct"]), "parameters": ct or {}},
            {"model": str(trio["sft"]), "parameters": sft or {}},
        ],
    }


def _counts(sparsified, weights_, voted=True):
    """kept and lost per model from sparsified task vectors: the definition, written out."""
    v = [w * t for w, t in zip(weights_, sparsified)]
    g = torch.where(sum(v) >= 0, 1.0, -1.0)
    kept = [int((t != 0).sum()) for t in sparsified]
    lost = [int(((t != 0) & (torch.sign(vi) != g)).sum()) if voted else 0 for t, vi in zip(sparsified, v)]
    return kept, lost


@pytest.mark.parametrize("method", ["breadcrumbs_ties", "breadcrumbs"])
def test_breadcrumbs_tally_equals_mergekit_sparsifier(trio, method):
    dens, gam, w = (0.5, 0.7), (0.05, 0.1), (1.0, 0.8)
    report = analyze(
        _recipe(
            trio,
            method,
            ct={"weight": w[0], "density": dens[0], "gamma": gam[0]},
            sft={"weight": w[1], "density": dens[1], "gamma": gam[1]},
        ),
        progress=False,
    )
    base, ct, sft = (weights(trio[k]) for k in ("base", "ct", "sft"))
    kept_total, lost_total = [0, 0], [0, 0]
    for name in base:
        sparse = [magnitude_outliers(x[name] - base[name], d, gamma=g) for x, d, g in zip((ct, sft), dens, gam)]
        kept, lost = _counts(sparse, w, voted=method == "breadcrumbs_ties")
        assert list(report.by_tensor[name].kept) == kept, name
        assert list(report.by_tensor[name].lost[0]) == lost, name
        kept_total = [a + b for a, b in zip(kept_total, kept)]
        lost_total = [a + b for a, b in zip(lost_total, lost)]
    assert list(report.total.kept) == kept_total and list(report.total.lost[0]) == lost_total
    assert (sum(lost_total) > 0) == (method == "breadcrumbs_ties")


def test_sce_tally_equals_mergekit_selection(trio):
    report = analyze(_recipe(trio, "sce", select_topk=0.3), progress=False)
    base, ct, sft = (weights(trio[k]) for k in ("base", "ct", "sft"))
    for name in base:
        tvs = torch.stack([ct[name] - base[name], sft[name] - base[name]])
        selected = tvs * sce_mask(tvs, 0.3, tvs.dtype).unsqueeze(0)
        kept, lost = _counts(list(selected), (1.0, 1.0))  # SCE votes on the unweighted selected vectors
        assert list(report.by_tensor[name].kept) == kept, name
        assert list(report.by_tensor[name].lost[0]) == lost, name
    assert report.total.lost[0].sum() > 0


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_tally_equals_mergekit_masks_with_the_same_stream(method):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=g)
    inputs = [base + torch.randn(40, 30, generator=g), base + 0.5 * torch.randn(40, 30, generator=g)]
    m = get_method(method)
    p = m.tensor_parameters({"weight": [1.0, 0.5], "density": [0.4, 0.6], "epsilon": [0.1, 0.2]})
    torch.manual_seed(11)
    tally = tensor_tally(m, base, inputs, p, [None])
    torch.manual_seed(11)
    sparse = [della_magprune(x - base, d, e, RescaleNorm.l1) for x, d, e in zip(inputs, (0.4, 0.6), (0.1, 0.2))]
    kept, lost = _counts(sparse, (1.0, 0.5), voted=method == "della")
    assert list(tally.kept) == kept
    assert list(tally.lost[0]) == lost


def test_methods_without_vote_or_sparsifier_are_not_applicable(trio):
    for method, extra in (("slerp", {"t": 0.5}), ("model_stock", {}), ("layer_swap", {"k_bottom": 1, "k_top": 1})):
        doc = _recipe(trio, method, **extra)
        if method == "slerp":
            doc["models"] = doc["models"][:1]
        if method == "layer_swap":
            doc["parameters"]["language_expert"] = str(trio["ct"])
        with pytest.raises(LangmergeError, match=f"not applicable to merge_method '{method}'.*applies to .*sce"):
            analyze(doc, progress=False)
    with pytest.raises(LangmergeError, match="'breadcrumbs' holds no sign vote for a slack"):
        analyze(
            _recipe(trio, "breadcrumbs", ct={"density": 0.5}), slacks=[1.0], protect=[str(trio["sft"])], progress=False
        )
    with pytest.raises(LangmergeError, match="'sce' has a sign vote without protected models"):
        analyze(_recipe(trio, "sce"), slacks=[1.0], protect=[str(trio["sft"])], progress=False)
