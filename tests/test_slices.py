"""``slices:`` recipes against mergekit-yaml, tensor for tensor (float32 compute): frankenmerges that stack layer
ranges of different models, per-slice and per-source parameters, sources taken from different depths."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from langmerge.cli import main
from langmerge.errors import LangmergeError
from langmerge.merge import merge
from langmerge.merge.recipe import RecipeError, load_recipe
from langmerge.synthetic import LlamaShape, make_trio
from mergekit_helpers import mergekit_exe

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=4, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return {k: str(v) for k, v in make_trio(tmp_path_factory.mktemp("slices"), SHAPE).items()}


def _src(model, a, b, **parameters):
    return {"model": model, "layer_range": [a, b], **({"parameters": parameters} if parameters else {})}


RECIPES = {
    "frankenmerge": lambda p: {
        "merge_method": "linear",
        "dtype": "float32",
        "slices": [{"sources": [_src(p["ct"], 0, 3, weight=1.0)]}, {"sources": [_src(p["sft"], 1, 4, weight=1.0)]}],
    },
    # the community's usual frankenmerge: passthrough over stacked layer ranges (with a scale filter)
    "passthrough_frankenmerge": lambda p: {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [_src(p["ct"], 0, 3)]},
            {"sources": [_src(p["sft"], 1, 4, scale=[{"filter": "o_proj", "value": 0.5}, {"value": 1.0}])]},
            {"sources": [_src(p["ct"], 3, 4)]},
        ],
    },
    "task_arithmetic_slice_parameters": lambda p: {
        "merge_method": "task_arithmetic",
        "base_model": p["base"],
        "dtype": "float32",
        "parameters": {"lambda": 0.9},
        "slices": [
            {
                "sources": [
                    _src(p["base"], 0, 2),
                    _src(p["ct"], 0, 2, weight=0.6),
                    _src(p["sft"], 0, 2, weight=[0.2, 1.0]),
                ]
            },
            {
                "sources": [_src(p["base"], 2, 4), _src(p["ct"], 2, 4), _src(p["sft"], 2, 4, weight=0.5)],
                "parameters": {"weight": 0.3, "lambda": 1.1},
            },
        ],
    },
    "ties_sources_at_other_depths": lambda p: {
        "merge_method": "ties",
        "base_model": p["base"],
        "dtype": "float32",
        "parameters": {"density": 0.5},
        "slices": [
            {
                "sources": [
                    _src(p["base"], 0, 3),
                    _src(p["ct"], 1, 4, weight=0.7),
                    _src(p["sft"], 0, 3, weight=1.0, density=[{"filter": "mlp", "value": 0.8}, {"value": [0.3, 0.6]}]),
                ]
            },
            {
                "sources": [_src(p["base"], 2, 4), _src(p["ct"], 0, 2, weight=1.0), _src(p["sft"], 2, 4, weight=0.4)],
                "parameters": {"normalize": False},
            },
        ],
    },
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_slices_identical_to_mergekit_yaml(trio, tmp_path, name):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPES[name](trio)))
    subprocess.run([mergekit_exe("mergekit-yaml"), str(recipe), str(tmp_path / "mk")], check=True, capture_output=True)
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    ours = load_file(str(tmp_path / "lm" / "model.safetensors"))
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    config, mk_config = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("lm", "mk"))
    assert config["num_hidden_layers"] == mk_config["num_hidden_layers"]


def test_frankenmerge_stacks_layers_renumbered_and_generates(trio, tmp_path):
    out = tmp_path / "deep"
    assert main(["merge", _write(tmp_path, RECIPES["frankenmerge"](trio)), str(out), "--no-progress"]) == 0
    merged = load_file(str(out / "model.safetensors"))
    ct, sft = (load_file(str(Path(trio[k]) / "model.safetensors")) for k in ("ct", "sft"))
    name = "model.layers.{}.mlp.down_proj.weight"
    assert [i for i in range(8) if name.format(i) in merged] == list(range(6))
    for i in range(3):
        assert torch.equal(merged[name.format(i)], ct[name.format(i)])
        assert torch.equal(merged[name.format(3 + i)], sft[name.format(1 + i)])
    assert torch.equal(merged["model.embed_tokens.weight"], ct["model.embed_tokens.weight"])  # before: the first slice
    assert torch.equal(merged["lm_head.weight"], sft["lm_head.weight"])  # after: the last slice
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_hidden_layers == 6
    assert model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 6)


def _write(tmp_path, data) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_slice_errors_are_named_and_collected(trio):
    doc = {
        "merge_method": "task_arithmetic",
        "base_model": trio["base"],
        "slices": [
            {
                "sources": [_src(trio["base"], 0, 2), _src(trio["ct"], 0, 3, weight=2, colour=1)],
                "parameters": {"density": 0.5},
            },
            {"sources": [_src(trio["ct"], 2, 2, weight=1)]},
        ],
    }
    with pytest.raises(RecipeError) as info:
        load_recipe(doc)
    errors = info.value.errors
    assert errors[1].startswith(
        "recipe key 'slices[0].parameters.density': not a parameter of task_arithmetic; known: "
    )
    assert errors[:1] + errors[2:] == [
        "recipe key 'slices[0].sources': every source of a slice has the same number of layers "
        "(layer ranges of 2, 3 layers)",
        "recipe key 'slices[1].sources[0].layer_range': [2, 2] is not a range of layers [start, stop) "
        "with 0 <= start < stop",
        "recipe key 'slices[1].sources': the slice's base model " + repr(trio["base"]) + " is not one of its sources "
        "(list it with its layer_range)",
    ]
    with pytest.raises(RecipeError, match=r"'slices\[0\]\.sources\[1\]\.parameters\.colour': not a parameter"):
        load_recipe({**doc, "slices": [{"sources": [_src(trio["base"], 0, 2), _src(trio["ct"], 0, 2, colour=1)]}]})
    with pytest.raises(RecipeError, match="'models' and 'slices' both given"):
        load_recipe({**doc, "models": [{"model": trio["ct"]}]})
    # model counts are a slice's own: passthrough takes one source per slice, however many slices
    two = {"merge_method": "passthrough", "slices": [{"sources": [_src(trio["ct"], 0, 2), _src(trio["sft"], 0, 2)]}]}
    with pytest.raises(RecipeError, match=r"'slices\[0\]\.sources': merge_method 'passthrough' merges exactly 1 model"):
        load_recipe(two)


def test_layer_range_beyond_the_model_is_refused_before_writing(trio, tmp_path):
    doc = {"merge_method": "linear", "slices": [{"sources": [_src(trio["ct"], 2, 6, weight=1.0)]}]}
    with pytest.raises(LangmergeError, match=r"slices\[0\].*layer_range \[2, 6\].*has 4 layers"):
        main_merge(doc, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def main_merge(doc, out):
    return merge(doc, out, progress=False)


def test_analyze_refuses_a_slices_recipe_clearly(trio, tmp_path, capsys):
    path = _write(tmp_path, RECIPES["ties_sources_at_other_depths"](trio))
    assert main(["analyze", path, "-o", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "langmerge analyze takes recipes of whole 'models', not 'slices'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
