"""Configuration files (``load_config``), the recipe's parameter values (mergekit's scalar / gradient /
conditional union, against hand-worked values and mergekit's own resolution) and search spaces (value lists and
ranges)."""

from __future__ import annotations

import json

import pytest
from mergekit.config import ParameterSetting as MergekitSetting
from mergekit.config import evaluate_setting as mergekit_evaluate
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from langmerge.errors import LangmergeError
from langmerge.input_files import ConfigError, load_config
from langmerge.merge.recipe import (
    ConditionalValue,
    RecipeError,
    evaluate_setting,
    layer_position,
    load_recipe,
    parse_setting,
)
from langmerge.tuning.space import Range, ValueList, load_space, read_space


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    size: int = Field(ge=1)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str
    items: list[Item] = Field(default_factory=list)
    ratio: float = 0.5


# ----------------------------------------------------------------------------- load_config


def test_yaml_and_json_files_load_the_same(tmp_path):
    doc = {"title": "t", "items": [{"name": "a", "size": 2}], "ratio": 0.25}
    (tmp_path / "s.yaml").write_text("title: t\nitems:\n  - {name: a, size: 2}\nratio: 0.25\n")
    (tmp_path / "s.json").write_text(json.dumps(doc))
    a = load_config(tmp_path / "s.yaml", Settings, "settings")
    b = load_config(tmp_path / "s.json", Settings, "settings")
    assert a == b == Settings(title="t", items=[Item(name="a", size=2)], ratio=0.25)


def test_overrides_replace_top_level_keys(tmp_path):
    (tmp_path / "s.yaml").write_text("title: t\nratio: 0.25\n")
    assert load_config(tmp_path / "s.yaml", Settings, overrides={"ratio": 1.0}).ratio == 1.0


@pytest.mark.parametrize(
    "suffix,text",
    [
        (".yaml", "title: t\nitems:\n  - {name: a, size: 2}\n  - {name: b, size: 0, colour: red}\n"),
        (".json", '{"title": "t", "items": [{"name": "a", "size": 2}, {"name": "b", "size": 0, "colour": "red"}]}'),
    ],
)
def test_errors_name_the_file_and_every_key_path(tmp_path, suffix, text):
    path = tmp_path / f"s{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, Settings, "settings")
    assert info.value.errors == [
        "key 'items[1].size': must be at least 1, got 0",
        "key 'items[1].colour': unknown key",
    ]
    assert str(info.value) == f"{path}: 2 errors: " + "; ".join(info.value.errors)


def test_a_missing_key_is_named(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("ratio: 2\n")
    with pytest.raises(ConfigError, match=r"^.*s\.yaml: key 'title' is required$"):
        load_config(path, Settings, "settings")


def test_json_faults_give_the_position(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"title": "t",\n "items": [}\n')
    with pytest.raises(LangmergeError, match=r"s\.json: not valid JSON \(Expecting value: line 2 column 12"):
        load_config(path, Settings, "settings")


@pytest.mark.parametrize(
    "content,message",
    [
        (b"- a\n- b\n", "s.yaml: a settings file must be a mapping (title, items)"),
        (b"title: t\n---\ntitle: u\n", "s.yaml: holds 2 YAML documents; a settings file is one document"),
        (
            b"title: !!python/name:os.system\n",
            "s.yaml: line 1, column 8: the YAML tag !!python/name:os.system is not allowed",
        ),
        (b"title: \0\n", "s.yaml: a binary file (it holds NUL bytes), not a settings file"),
        (
            b"a: &a [1, 2]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
            b"d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
            b"f: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
            "s.yaml: key 'f': more than 100000 entries",
        ),
    ],
)
def test_hostile_files_are_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "s.yaml"
    path.write_bytes(content)
    with pytest.raises(LangmergeError) as info:
        load_config(path, Settings, "settings", hint=" (title, items)")
    assert message in str(info.value)


# ----------------------------------------------------------------------------- parameter values


def test_the_value_shapes_parse_as_mergekit_defines_them():
    assert parse_setting(0.5) == 0.5 and parse_setting(True) is True and parse_setting(3) == 3
    assert parse_setting([0.0, 1.0]) == [0.0, 1.0]  # a gradient
    assert parse_setting({"filter": "mlp", "value": 0.7}) == ConditionalValue(filter="mlp", value=0.7)
    assert parse_setting([{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.3}]) == [
        ConditionalValue(filter="mlp", value=[0.1, 0.9]),
        ConditionalValue(value=0.3),
    ]


SETTINGS = {
    "scalar": 0.4,
    "gradient": [0.0, 1.0],
    "three-point gradient": [0.2, 1.0, 0.4],
    "boolean list": [True, False, True],
    "one conditional": {"filter": "mlp", "value": 0.7},
    "conditionals": [
        {"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
        {"filter": "mlp", "value": 0.8},
        {"value": [1.0, 0.0]},
    ],
    "star filter": [{"filter": "*", "value": [0.3, 0.6]}],
}
TENSORS = [f"model.layers.{i}.{part}.weight" for i in range(5) for part in ("self_attn.q_proj", "mlp.up_proj")]
TENSORS += ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]


@pytest.mark.parametrize("case", SETTINGS)
def test_values_resolve_per_layer_as_mergekit_resolves_them(case):
    ours = parse_setting(SETTINGS[case])
    theirs = TypeAdapter(MergekitSetting).validate_python(SETTINGS[case])
    for tensor in TENSORS:
        t = layer_position(tensor, 5)
        assert evaluate_setting(ours, tensor, t) == pytest.approx(
            mergekit_evaluate(tensor, theirs, t, validate=lambda v: v)
        ), (case, tensor)


def test_values_resolve_per_layer_to_hand_worked_values():
    recipe = load_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": "b",
            "models": [
                {"model": "ct", "parameters": {"weight": [0.0, 1.0]}},
                {
                    "model": "sft",
                    "parameters": {"weight": [{"filter": "mlp", "value": [1.0, 0.0, 1.0]}, {"value": 0.5}]},
                },
            ],
        }
    )
    weights = {}
    for i in range(5):
        for part in ("mlp.up_proj", "self_attn.q_proj"):
            name = f"model.layers.{i}.{part}.weight"
            weights[i, part] = recipe.tensor_parameters(name, layer_position(name, 5)).weights
    # layer i of 5 at t = i / 4; the 3-point gradient runs 1 -> 0 -> 1 over the layers
    assert [weights[i, "mlp.up_proj"] for i in range(5)] == [
        [0.0, 1.0],
        [0.25, 0.5],
        [0.5, 0.0],
        [0.75, 0.5],
        [1.0, 1.0],
    ]
    assert [weights[i, "self_attn.q_proj"] for i in range(5)] == [
        [0.0, 0.5],
        [0.25, 0.5],
        [0.5, 0.5],
        [0.75, 0.5],
        [1.0, 0.5],
    ]
    assert recipe.tensor_parameters("lm_head.weight", 0.0).weights == [0.0, 0.5]


def test_every_malformed_value_is_named_at_once():
    doc = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [
            {"model": "ct", "parameters": {"weight": [], "density": [0.5, [0.2]]}},
            {
                "model": "sft",
                "parameters": {
                    "weight": [{"filter": 3, "value": 1}],
                    "density": [{"value": 0.5}, {"value": {"value": 0.2}}],
                },
            },
        ],
        "parameters": {"lambda": None, "normalize": [{"filter": "mlp", "value": 1}, 0.5], "epsilon": [{"valu": 1}]},
    }
    with pytest.raises(RecipeError) as info:
        load_recipe(doc)
    assert info.value.errors == [
        "recipe key 'models[0].parameters.weight': empty list",
        "recipe key 'models[0].parameters.density': a gradient is a list of numbers (lists do not nest)",
        "recipe key 'models[1].parameters.weight[0].filter': expected a string",
        "recipe key 'models[1].parameters.density[1].value': conditional values do not nest; a conditional value "
        "is a number or a gradient",
        "recipe key 'parameters.lambda': expected a number or true/false, got None",
        "recipe key 'parameters.normalize': mixes conditional values with plain values",
        "recipe key 'parameters.epsilon[0]': a conditional value needs 'value' and an optional 'filter'",
    ]


def test_values_inside_gradients_and_conditionals_are_checked_against_the_method():
    doc = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [
            {"model": "ct", "parameters": {"weight": 1, "density": [0.5, 1.5]}},
            {"model": "sft", "parameters": {"weight": 1, "density": {"filter": "mlp", "value": [0.2, -1]}}},
        ],
    }
    with pytest.raises(RecipeError) as info:
        load_recipe(doc)
    assert info.value.errors == [
        "recipe key 'models[0].parameters.density[1]': 1.5 is above the maximum 1.0",
        "recipe key 'models[1].parameters.density.value[1]': -1 is below the minimum 0.0",
    ]


def test_a_recipe_dumps_its_values_as_written():
    doc = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [
            {"model": "ct", "parameters": {"weight": [0.0, 1.0], "density": {"filter": "mlp", "value": 0.5}}},
            {
                "model": "sft",
                "parameters": {"weight": 1, "density": [{"filter": "mlp", "value": 0.7}, {"value": [0.1, 0.2]}]},
            },
        ],
        "parameters": {"normalize": True},
    }
    assert load_recipe(doc).to_dict() == doc


# ----------------------------------------------------------------------------- search spaces


def test_a_space_entry_is_a_value_list_or_a_range():
    space, where = read_space(
        {
            "parameters.lambda": {"values": [0.5, 1]},
            "models[0].parameters.weight": {"low": 0.2, "high": 1.0, "step": 0.4},
            "parameters.epsilon": {"low": 0.01, "high": 1, "log": True},
        }
    )
    assert where == "search space"
    assert space.root == {
        "parameters.lambda": ValueList(values=[0.5, 1]),
        "models[0].parameters.weight": Range(low=0.2, high=1.0, step=0.4),
        "parameters.epsilon": Range(low=0.01, high=1, log=True),
    }
    assert isinstance(space.root["parameters.lambda"].values[1], int)  # as written: an int stays one


def test_space_files_in_yaml_and_json_load_the_same(tmp_path):
    doc = {"parameters.lambda": {"values": [0.5, 1.0]}, "parameters.slack": {"low": 0, "high": 2, "step": 1}}
    (tmp_path / "space.yaml").write_text(
        "parameters.lambda: {values: [0.5, 1.0]}\nparameters.slack: {low: 0, high: 2, step: 1}\n"
    )
    (tmp_path / "space.json").write_text(json.dumps(doc))
    assert read_space(tmp_path / "space.yaml")[0] == read_space(tmp_path / "space.json")[0] == read_space(doc)[0]


def test_every_space_entry_fault_is_named_by_file_and_key(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "parameters.a: {values: []}\nparameters.b: {low: 1, high: 1}\nparameters.c: {low: 0, high: 1, "
        "stride: 1}\nparameters.d: {values: [1], low: 0}\nparameters.e: {low: .nan, high: 1}\n"
        "parameters.f: {low: 0, high: 1, log: yes, step: 0.5}\nparameters.g: 3\n"
    )
    with pytest.raises(ConfigError) as info:
        read_space(path)
    assert info.value.errors == [
        "key 'parameters.a': 'values' is empty; list at least one value",
        "key 'parameters.b': empty range (low 1 is not below high 1)",
        "key 'parameters.c': unknown field 'stride'; use values, or low/high/step/log",
        "key 'parameters.d': give either 'values' or a range (low, high), not both",
        "key 'parameters.e': 'low' must be a finite number, got nan",
        "key 'parameters.f': a log range needs low > 0 and no step",
        "key 'parameters.g': expected {values: [...]} or {low: .., high: ..}",
    ]
    assert str(info.value).startswith(f"{path}: 7 search space errors: key 'parameters.a'")


def test_a_range_grid_reads_as_typed():
    recipe = load_recipe(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "ct", "parameters": {"weight": 1}}, {"model": "sft", "parameters": {"weight": 1}}],
        }
    )
    dims = load_space(
        {
            "models[ct].parameters.weight": {"low": 0.1, "high": 0.5, "step": 0.2},
            "parameters.lambda": {"values": [1, 2]},
        },
        recipe,
    )
    assert [d.grid() for d in dims] == [[0.1, 0.3, 0.5], [1, 2]]
