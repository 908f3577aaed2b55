"""A method added through the public interface only is picked up by recipes, merge, check, analyze and the study."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file

import langmerge
from langmerge.analysis import analyze
from langmerge.cli import main
from langmerge.errors import LangmergeError
from langmerge.merge.check import check_recipe
from langmerge.merge.recipe import load_recipe
from langmerge.methods import (
    METHODS,
    ChunkRule,
    Method,
    MethodParameters,
    Pass,
    TensorMerge,
    get_method,
    global_field,
    model_field,
    register_method,
)
from langmerge.study.config import MethodSpec
from langmerge.study.report import row_label
from langmerge.study.steps import method_recipe
from langmerge.synthetic import LlamaShape, make_trio

SHAPE = LlamaShape(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2)


class PeakParameters(MethodParameters):
    weights: list[float] = model_field(alias="weight", help="the model's weight")
    peak: float = global_field(1.0, ge=0.0, help="the largest magnitude each task vector is scaled to")


class PeakMerge(TensorMerge):
    """base + sum_i w_i t_i (peak / max|t_i|) / sum_i w_i: a whole-tensor statistic, then an elementwise merge."""

    chunk_rule = ChunkRule(whole_rows=True)

    def __init__(self, p: PeakParameters, row: int):
        self.p, self.row = p, row
        self.peaks = [0.0] * p.n_models

    def statistics(self):
        merge = self

        class Peaks(Pass):
            def update(self, block):
                assert block.start % merge.row == 0 and block.numel % merge.row == 0  # the chunk rule held
                for i, x in enumerate(block.inputs):
                    merge.peaks[i] = max(merge.peaks[i], float((x - block.base).abs().max()))

        yield Peaks()

    def merge(self, block):
        total = sum(self.p.weights)
        out = block.base.double()
        for w, x, top in zip(self.p.weights, block.inputs, self.peaks):
            if top > 0:
                out = out + (w / total) * (x.double() - block.base.double()) * (self.p.peak / top)
        return out.to(block.base.dtype)


class PeakMethod(Method):
    name = "peak_mean"
    summary = "task vectors scaled to one peak magnitude, then averaged"
    label = "peak mean"
    parameter_model = PeakParameters

    def plan(self, params, tensor, kernel="reference", generators=None):
        return PeakMerge(params, tensor.row_numel)


@pytest.fixture
def peak_method():
    method = register_method(PeakMethod())
    yield method
    METHODS.pop(method.name)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("trio"), SHAPE)


def _recipe(trio, **extra):
    return {
        "merge_method": "peak_mean",
        "base_model": str(trio["base"]),
        "models": [
            {"model": str(trio["ct"]), "parameters": {"weight": 1.0}},
            {"model": str(trio["sft"]), "parameters": {"weight": [0.5, 2.0]}},  # a gradient over the layers
        ],
        "parameters": {"peak": 0.25},
        "dtype": "float32",
        **extra,
    }


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_recipes_and_merge_use_the_registered_method(peak_method, trio, tmp_path):
    recipe = load_recipe(_recipe(trio))
    assert recipe.method is peak_method
    assert set(peak_method.parameters) == {"weight", "peak"}
    langmerge.merge(_recipe(trio), tmp_path / "out", progress=False)
    merged = _weights(tmp_path / "out")
    base, ct, sft = (_weights(trio[k]) for k in ("base", "ct", "sft"))
    name = "model.layers.1.mlp.up_proj.weight"  # layer 1 of 2: the gradient's last value, 2.0
    b, tc, ts = base[name].double(), ct[name].double() - base[name].double(), sft[name].double() - base[name].double()
    expected = b + (1.0 / 3.0) * tc * (0.25 / tc.abs().max()) + (2.0 / 3.0) * ts * (0.25 / ts.abs().max())
    torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-7)
    # a parameter outside the method's bounds is refused with the recipe key
    with pytest.raises(LangmergeError, match="parameters.peak"):
        load_recipe(_recipe(trio, parameters={"peak": -1.0}))
    with pytest.raises(LangmergeError, match="not a parameter of peak_mean"):
        load_recipe(_recipe(trio, parameters={"density": 0.5}))


def test_check_accepts_and_analyze_refuses_the_registered_method(peak_method, trio, tmp_path, capsys):
    report = check_recipe(_recipe(trio))
    assert report.exit_code == 0 and report.method == "peak_mean"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(trio)))
    assert main(["check", str(path), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "peak_mean"
    path.write_text(yaml.safe_dump(_recipe(trio, parameters={"peak": -1.0})))  # the method's own bound, by check
    assert main(["check", str(path), "--no-progress"]) == 2
    assert "parameters.peak': -1.0 is below the minimum 0.0" in capsys.readouterr().out
    with pytest.raises(LangmergeError, match="has no sign vote"):
        analyze(_recipe(trio), progress=False)


def test_the_study_accepts_the_registered_method(peak_method):
    spec = MethodSpec.model_validate({"merge_method": "peak_mean", "parameters": {"peak": 0.5}})
    recipe = method_recipe(spec, "b", "c", "s", "bfloat16")
    assert recipe["merge_method"] == "peak_mean" and recipe["base_model"] == "b"  # uses_base, from the method
    assert "protect" not in recipe["parameters"]
    plan = SimpleNamespace(study=SimpleNamespace(spec=SimpleNamespace(methods={"mine": spec})))
    assert row_label(plan, "mine") == "peak mean"


def test_unregistered_methods_are_refused_everywhere():
    assert "peak_mean" not in METHODS
    with pytest.raises(LangmergeError, match="unknown method 'peak_mean'"):
        get_method("peak_mean")
    with pytest.raises(ValidationError, match="unknown method 'peak_mean'"):
        MethodSpec.model_validate({"merge_method": "peak_mean"})


def test_register_method_refuses_duplicates_and_non_methods(peak_method):
    with pytest.raises(ValueError, match="already registered"):
        register_method(PeakMethod())
    with pytest.raises(TypeError):
        register_method(object())


def test_family_entries_expose_their_composition():
    ties, ta, dare = get_method("ties"), get_method("task_arithmetic"), get_method("dare_ties")
    assert ties.has_sign_vote and ties.sparsifier == "magnitude" and not ties.randomized
    assert not ta.has_sign_vote and ta.sparsifier is None and "density" not in ta.parameters
    assert dare.randomized and dare.has_sign_vote and dare.parameters["rescale"].default is True
    assert get_method("ties_sv").takes_protect and not ties.takes_protect
    assert (
        get_method("linear").parameters["normalize"].default is True and "lambda" not in get_method("linear").parameters
    )
    # one parameter model per entry, with the entry's defaults; resolved values by recipe (mergekit) name
    p = ties.tensor_parameters({"weight": [1.0, 0.5], "density": [0.3, 0.6], "lambda": 0.8})
    assert (p.weights, p.densities, p.lam, p.normalize, p.protected) == (
        [1.0, 0.5],
        [0.3, 0.6],
        0.8,
        True,
        [False, False],
    )
    assert p.restrict([1]).weights == [0.5] and p.restrict([1]).densities == [0.6]
