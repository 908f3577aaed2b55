"""`tune` over layer_swap's integer k_bottom / k_top: finds a hidden optimum, in-memory merges equal
`langmerge merge`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from analysis_helpers import tiny_trio, weights
from langmerge.errors import LangmergeError
from langmerge.merge import merge
from langmerge.merge.recipe import load_recipe
from langmerge.tuning import InMemoryMerger, tune
from langmerge.tuning.space import apply_values, load_space

SPACE = {
    "parameters.k_bottom": {"low": 0, "high": 1, "step": 1},
    "parameters.k_top": {"values": [0, 1]},
    "parameters.transition": {"values": [0]},
}
HIDDEN = {"parameters.k_bottom": 1, "parameters.k_top": 0, "parameters.transition": 0}


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return tiny_trio(tmp_path_factory.mktemp("trio"))


def _recipe(trio, **parameters):
    return {
        "merge_method": "layer_swap",
        "dtype": "float32",
        "models": [{"model": str(trio["ct"])}, {"model": str(trio["sft"])}],
        "parameters": {"language_expert": str(trio["ct"]), "k_bottom": 0, "k_top": 0, **parameters},
    }


def test_grid_over_integer_layer_counts_finds_the_hidden_optimum(trio):
    start = _recipe(trio)
    dims = load_space(SPACE, load_recipe(start))
    assert [d.kind for d in dims] == [int, int, int]
    out = Path(tempfile.mkdtemp()) / "target"
    merge(apply_values(start, dims, HIDDEN), out, progress=False)
    target = weights(out)

    def score(model, tokenizer) -> float:
        state = model.state_dict()
        return -float(sum((state[k].double() - v.double()).pow(2).sum() for k, v in target.items()))

    result = tune(start, SPACE, score, progress=False)
    assert len(result.trials) == 4
    assert result.best.values == HIDDEN and result.best.score == 0.0
    assert isinstance(result.best.values["parameters.k_bottom"], int)


def test_in_memory_candidate_equals_langmerge_merge(trio, tmp_path):
    start = _recipe(trio)
    candidate = _recipe(trio, k_bottom=1, k_top=1, transition=1, output_layer=False)
    in_memory = InMemoryMerger(load_recipe(start)).state_dict(load_recipe(candidate))
    merge(candidate, tmp_path / "m", progress=False)
    on_disk = weights(tmp_path / "m")
    assert set(in_memory) == set(on_disk)
    for k, v in on_disk.items():
        assert in_memory[k].dtype == v.dtype and torch.equal(in_memory[k], v), k


def test_fractional_layer_counts_are_refused(trio):
    with pytest.raises(LangmergeError, match="k_bottom"):
        load_space({"parameters.k_bottom": {"low": 0, "high": 2, "step": 0.5}}, load_recipe(_recipe(trio)))
