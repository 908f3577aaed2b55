"""Recipe resolution: gradients, filters, fallbacks and errors, against hand-worked values."""

from __future__ import annotations

import pytest
import torch
import yaml

from langmerge.errors import LangmergeError
from langmerge.io.writer import plan_shards
from langmerge.merge.recipe import evaluate_setting, layer_position, load_recipe, parse_setting


def test_gradients_interpolate_over_layer_position():
    assert evaluate_setting(parse_setting([0.0, 1.0]), "x", 0.25) == 0.25
    assert evaluate_setting(parse_setting([0.0, 1.0, 0.0]), "x", 0.75) == pytest.approx(0.5)
    assert evaluate_setting(parse_setting([2.0, 4.0, 8.0]), "x", 1.0) == 8.0
    assert evaluate_setting(parse_setting([True, False]), "x", 0.4) is True  # non-numeric lists pick, not interpolate


def test_filters_take_the_first_match():
    setting = parse_setting(
        [{"filter": "mlp", "value": 0.7}, {"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.3}]
    )
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.7
    assert evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate_setting(setting, "model.norm.weight", 0.5) == 0.3
    assert evaluate_setting(parse_setting([{"filter": "mlp", "value": 1}]), "lm_head.weight", 0) is None


def test_layer_positions_follow_mergekit():
    assert layer_position("model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert layer_position("model.layers.3.mlp.up_proj.weight", 5) == 0.75
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0
    assert layer_position("model.embed_tokens.weight", 5) == 0.0
    assert layer_position("lm_head.weight", 5) == 0.0
    assert layer_position("transformer.h.2.attn.c_attn.weight", 3) == 1.0


def _recipe(**over):
    r = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [
            {"model": "b"},
            {"model": "ct", "parameters": {"weight": [0.0, 1.0], "density": 0.5}},
            {"model": "sft", "parameters": {"weight": 1.0}},
        ],
        "parameters": {"density": 0.2, "lambda": 2.0},
    }
    r.update(over)
    return r


def test_model_parameters_fall_back_to_global_then_default():
    recipe = load_recipe(_recipe())
    assert [e.model for e in recipe.inputs] == ["ct", "sft"]  # the base is not a task vector
    p = recipe.tensor_parameters("model.layers.1.mlp.up_proj.weight", 0.5)
    assert p.weights == [0.5, 1.0]
    assert p.densities == [0.5, 0.2]
    assert p.lam == 2.0 and p.normalize is True and p.rescale is False


def test_yaml_text_and_files_load_the_same(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe()))
    a = load_recipe(path).tensor_parameters("x", 0.0)
    b = load_recipe(str(path)).tensor_parameters("x", 0.0)
    c = load_recipe(yaml.safe_dump(_recipe())).tensor_parameters("x", 0.0)
    assert a == b == c


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"merge_method": "nope"}, "merge_method"),
        ({"parameters": {"weight": 1, "slack": 1}}, "parameters.slack"),
        ({"models": [{"model": "ct", "parameters": {"normalize": True}}]}, "global parameter"),
        ({"models": [{"model": "ct", "parameters": {"weight": [{"filter": 3, "value": 1}]}}]}, "filter"),
        ({"models": [{"model": "ct", "parameters": {"weight": []}}]}, "empty list"),
        ({"models": [{"model": "ct"}, {"model": "ct"}]}, "listed twice"),
        ({"base_model": None}, "base_model"),
        ({"tokenizer_source": "base", "tokenizer": {"source": "base"}}, "both given"),
    ],
)
def test_malformed_recipes_name_the_key(over, needle):
    with pytest.raises(LangmergeError, match=needle):
        load_recipe(_recipe(**over))


def test_out_of_range_values_inside_conditionals_are_caught_before_any_tensor():
    with pytest.raises(LangmergeError, match=r"models\[0\]\.parameters\.density\[1\]\.value': 2 is above the maximum"):
        load_recipe(
            _recipe(
                models=[
                    {
                        "model": "ct",
                        "parameters": {"weight": 1, "density": [{"filter": "mlp", "value": 0.5}, {"value": 2}]},
                    }
                ]
            )
        )


def test_required_weight_is_reported():
    recipe = load_recipe(_recipe(models=[{"model": "ct", "parameters": {"density": 0.5}}]))
    with pytest.raises(LangmergeError, match="'weight' is required for model 'ct'"):
        recipe.tensor_parameters("x", 0.0)


def test_shard_plan_packs_in_order_and_isolates_oversized_tensors():
    f32 = torch.float32
    specs = [("a", (10,), f32), ("b", (10,), f32), ("c", (100,), f32), ("d", (5,), f32)]
    shards = plan_shards(specs, 100)
    assert [[s[0] for s in shard] for shard in shards] == [["a", "b"], ["c"], ["d"]]
