"""A recipe's schema errors are reported together, and ``check`` never says "problems: none" before failing."""

from __future__ import annotations

import pytest
import yaml

from langmerge.cli import main
from langmerge.merge.recipe import RecipeError, load_recipe


def test_every_pydantic_error_is_reported_at_once():
    doc = {"merge_method": "ties", "colour": "red", "base_model": ["not", "a", "string"]}
    with pytest.raises(RecipeError) as info:
        load_recipe(doc)
    assert info.value.errors == [
        "recipe key 'models' is required (or 'slices', layer ranges)",
        "recipe key 'base_model': Input should be a valid string",
        "recipe key 'colour': unknown key",
    ]
    assert str(info.value) == "<recipe>: 3 recipe errors: " + "; ".join(info.value.errors)
    assert "\n" not in str(info.value)


def test_every_parameter_error_is_reported_at_once():
    doc = {
        "merge_method": "ties",
        "base_model": "b",
        "dtype": "float8",
        "models": [
            {"model": "ct", "parameters": {"weight": 1, "density": 2}},
            {"model": "sft", "parameters": {"normalize": True, "colour": 1}},
        ],
        "parameters": {"lambda": "x"},
    }
    with pytest.raises(RecipeError) as info:
        load_recipe(doc)
    assert info.value.errors == [
        "recipe key 'dtype': unknown dtype 'float8'; use one of float32, float16, bfloat16",
        "recipe key 'parameters.lambda': expected a number, got 'x'",
        "recipe key 'models[0].parameters.density': 2 is above the maximum 1.0",
        "recipe key 'models[1].parameters.normalize': normalize is a global parameter; set it under 'parameters'",
        "recipe key 'models[1].parameters.colour': not a parameter of ties",
    ]


def test_one_error_reads_as_before():
    with pytest.raises(RecipeError, match=r"^<recipe>: recipe key 'models' is required \(or 'slices', layer ranges\)$"):
        load_recipe({"merge_method": "linear"})


def test_check_lists_each_recipe_error_and_no_false_none(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "colour": 1, "dtype": 3}))
    assert main(["check", str(path)]) == 2
    text = capsys.readouterr().out
    assert f"  - {path}: recipe key 'models' is required (or 'slices', layer ranges)" in text
    assert f"  - {path}: recipe key 'colour': unknown key" in text
    assert f"  - {path}: recipe key 'dtype': Input should be a valid string" in text
    problems = text.split("problems (the merge would fail):", 1)[1]
    assert "none" not in problems.split("FAIL")[0]
    assert "not known" in problems and "FAIL: unreadable input" in problems
