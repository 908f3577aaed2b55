"""A study step's cache key does not change when the study's specs become typed: the finished steps of existing
studies stay valid.

The keys below were recorded by running main's code at 5e85b07 (before MethodSpec's parameters and space were
typed, when they were plain dicts) over the same inputs: the steps of the bundled miniature configs, built as
``_config_keys`` builds them, and a tune step of each method in ``METHODS`` (gradients, conditional values, ranges,
value lists, whole numbers), built as ``_method_key`` builds it; that is, this file's two functions run with
PYTHONPATH=<main>/src, printing ``{label: step.key()}``.

quick.yaml's keys were recorded again (by this file's ``_config_keys``) when the quick preset itself changed:
SFT with ``group_by_length`` and a new ``english-tasks-sft-small`` with its own source version (which the pruned
base's vocabulary and so every later step depend on), two SFT epochs, and ``bible_genre_ny`` alone for validation
and score; CT-then-SFT at 500 tokens only (``ct_sft_budgets``) removed four steps and changed none.
full.yaml's were recorded again when its SFT took ``group_by_length`` (the steps that do not depend on the SFT
settings kept theirs); the tune steps' are still 5e85b07's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from langmerge.merge.recipe import ConditionalValue
from langmerge.study.config import MethodSpec, Study, StudySpec, TuningSpec
from langmerge.study.plan import build_plan
from langmerge.study.steps import Step, TaskSettings, TuneSettings
from langmerge.tuning.space import Range, ValueList

MINIATURE = Path(__file__).resolve().parent.parent / "examples" / "miniature"

METHODS: dict[str, dict[str, Any]] = {
    "gradients_conditionals_ranges": {
        "merge_method": "ties",
        "ct": {"weight": [0.0, 0.5, 1.0], "density": 0.5},
        "sft": {"weight": [{"filter": "mlp", "value": 0.8}, {"value": 1.0}]},
        "parameters": {"normalize": True, "lambda": 1},
        "space": {
            "models[ct].parameters.density": {"low": 0.2, "high": 0.8, "step": 0.2},
            "parameters.lambda": {"low": 0.5, "high": 2.0, "log": True},
        },
    },
    "one_conditional_and_values": {
        "merge_method": "ties_sv",
        "label": "TIES-SV",
        "ct": {"weight": {"value": [1, 0.5]}},
        "parameters": {"density": 0.5, "slack": 2},
        "space": {"parameters.slack": {"values": [0, 0.5, 1, 2]}},
    },
    "defaults": {"merge_method": "linear"},
    "whole_numbers": {
        "merge_method": "layer_swap",
        "parameters": {"k_bottom": 2, "k_top": 2, "transition": 1},
        "space": {"parameters.k_bottom": {"values": [2, 4]}},
    },
}

RECORDED_METHOD_KEYS = {
    "gradients_conditionals_ranges": "b6cf3421ced4149f",
    "one_conditional_and_values": "3c275bef109618ff",
    "defaults": "2e14d05e0f449ce9",
    "whole_numbers": "2a4e16be91e42035",
}

RECORDED_CONFIG_KEYS = {
    "quick.yaml": {
        "source python-docs-en": "8c26fe48f178fcfc",
        "source bible-ny": "14f50d984813e977",
        "source english-tasks-sft-small": "979a7eefed4e3c0f",
        "base gemma3-270m (vocabulary pruned)": "7b56fe3af1a3f74c",
        "sft": "ab5af434dc5d4bdb",
        "eval base on English": "1b598f9027a3f97f",
        "eval sft on English": "4ab94f19ec0e8ff4",
        "ct ny (500, 2,000, 8,000 tokens)": "fe2a88945156e04f",
        "eval base on ny": "f990c184178c0de4",
        "eval sft on ny": "91e2d97eac81c059",
        "eval ct ny 500": "2bf03928e4b9e5a4",
        "ct-then-sft ny 500": "7e336ff3e618e323",
        "eval ct-then-sft ny 500": "615a2a7e24c3d78c",
        "tune ties ny 500": "85c7e6a161a1ed5f",
        "eval ties ny 500": "39fe610b046da07f",
        "tune ties_sv ny 500": "aeffc779dbfcfefa",
        "eval ties_sv ny 500": "8aaf7a6e401e370b",
        "tune layer_swap ny 500": "4982687685b6c5fe",
        "eval layer_swap ny 500": "dd0cc005f1e15e0a",
        "analyze ny 500": "ed66283d436e49a0",
        "eval ct ny 2,000": "c053dad747544d79",
        "tune ties ny 2,000": "dd1fb2674b06f629",
        "eval ties ny 2,000": "b37ddc4218c3b943",
        "tune ties_sv ny 2,000": "c0a1a7a22442781b",
        "eval ties_sv ny 2,000": "a18db1ecc745dc67",
        "tune layer_swap ny 2,000": "57b9e171c286b653",
        "eval layer_swap ny 2,000": "2ad27f871b967422",
        "analyze ny 2,000": "8267ffb772c3a7f4",
        "eval ct ny 8,000": "9d71192e6371c96d",
        "tune ties ny 8,000": "1a7d6fdde12c4234",
        "eval ties ny 8,000": "f29a557f030424a4",
        "tune ties_sv ny 8,000": "da6bed6bc097ad3c",
        "eval ties_sv ny 8,000": "b2abd0454b2f7114",
        "tune layer_swap ny 8,000": "4265b9e3353feaf5",
        "eval layer_swap ny 8,000": "9e3b0f6f4d650e55",
        "analyze ny 8,000": "185ba4c2daada6ce",
    },
    "full.yaml": {
        "source python-docs-en": "8c26fe48f178fcfc",
        "source bible-ny": "14f50d984813e977",
        "source english-tasks-sft": "82cd9af7faea8377",
        "base gemma3-270m (vocabulary pruned)": "6ab2d689ddc20ddb",
        "sft": "de8b45abd6131b60",
        "eval base on English": "46d4fde89b4d7148",
        "eval sft on English": "8276957ee15c3ff2",
        "ct ny (1,000, 10,000, 100,000, 1,000,000 tokens)": "7f02d4e6e49593c2",
        "eval base on ny": "a1bbf8f88af91096",
        "eval sft on ny": "ed60275116441839",
        "eval ct ny 1,000": "d8d2443629b2208b",
        "ct-then-sft ny 1,000": "5ac7792149098aea",
        "eval ct-then-sft ny 1,000": "3355b3c2b8e90574",
        "tune wavg ny 1,000": "a26be3020bce2249",
        "eval wavg ny 1,000": "c40121fafe3c0102",
        "tune task_arithmetic ny 1,000": "11b188f725f26d0c",
        "eval task_arithmetic ny 1,000": "e180a300f7f0e022",
        "tune ties ny 1,000": "289103f38a7654c7",
        "eval ties ny 1,000": "3adf8d4a0ff67050",
        "tune ties_sv ny 1,000": "519b6fdae7471c99",
        "eval ties_sv ny 1,000": "4d3dc5de1a5a4b9b",
        "tune layer_swap ny 1,000": "e91a18f605018ad1",
        "eval layer_swap ny 1,000": "2b1d9f64283d291d",
        "analyze ny 1,000": "a5c8f12c70fd2df6",
        "eval ct ny 10,000": "ef4ce4f0021f5a96",
        "ct-then-sft ny 10,000": "b3a4c1f2c8eab8b7",
        "eval ct-then-sft ny 10,000": "17b7f177626348e0",
        "tune wavg ny 10,000": "71916d8d5b169357",
        "eval wavg ny 10,000": "5d257f9ea8c0704d",
        "tune task_arithmetic ny 10,000": "25cc54658077aeae",
        "eval task_arithmetic ny 10,000": "768e5a4828df14a4",
        "tune ties ny 10,000": "227262de43da9b4f",
        "eval ties ny 10,000": "f881eddee60a517e",
        "tune ties_sv ny 10,000": "36f66e9a833519df",
        "eval ties_sv ny 10,000": "2fa685cd9634ff0d",
        "tune layer_swap ny 10,000": "e196f537f431b45a",
        "eval layer_swap ny 10,000": "fa9c54d44322197d",
        "analyze ny 10,000": "d8e4cbe1110b30c5",
        "eval ct ny 100,000": "d847fd4cc6207c32",
        "ct-then-sft ny 100,000": "345aa5419418ba29",
        "eval ct-then-sft ny 100,000": "2c11b47a5cc7a0cf",
        "tune wavg ny 100,000": "2e77b6ff11b6b70c",
        "eval wavg ny 100,000": "7f22ffc47f73cf31",
        "tune task_arithmetic ny 100,000": "483845d28dd98aa7",
        "eval task_arithmetic ny 100,000": "974da662cb975ed0",
        "tune ties ny 100,000": "d5f66ca1509de3c0",
        "eval ties ny 100,000": "fb27e6e7c8d0f4d7",
        "tune ties_sv ny 100,000": "62477b6d0b3100ce",
        "eval ties_sv ny 100,000": "6035f6bdb9cae482",
        "tune layer_swap ny 100,000": "14b6f74f4f30e03a",
        "eval layer_swap ny 100,000": "51505a7a6b95f27c",
        "analyze ny 100,000": "8e3f9b3058a89b8f",
        "eval ct ny 1,000,000": "a92ac575a1a01be5",
        "ct-then-sft ny 1,000,000": "1b3255c31e4e4ae9",
        "eval ct-then-sft ny 1,000,000": "6a2673bfb8e11bdf",
        "tune wavg ny 1,000,000": "09d6c446dcdab0a8",
        "eval wavg ny 1,000,000": "44d89bb08e1cde2a",
        "tune task_arithmetic ny 1,000,000": "5f59cec945af1a6c",
        "eval task_arithmetic ny 1,000,000": "97209478c17f884d",
        "tune ties ny 1,000,000": "8f78b763d693e5b6",
        "eval ties ny 1,000,000": "cda2c1c22ec8aa70",
        "tune ties_sv ny 1,000,000": "daec0a66812dfaea",
        "eval ties_sv ny 1,000,000": "f49706ee5fa9e5b7",
        "tune layer_swap ny 1,000,000": "696c2a9c83436c86",
        "eval layer_swap ny 1,000,000": "d39b1291bc2faa82",
        "analyze ny 1,000,000": "b4c839059ae6813e",
    },
}


def _config_keys(name: str) -> dict[str, str]:
    path = MINIATURE / name
    study = Study(StudySpec.model_validate(yaml.safe_load(path.read_text())), path)
    return {step.label: step.key() for step in build_plan(study).steps}


def _method_key(name: str) -> str:
    settings = TuneSettings(
        budget=8000,
        method=MethodSpec.model_validate(METHODS[name]),
        tuning=TuningSpec(),
        tasks=TaskSettings(tasks=["verse_cont_ny"], split="alternate", builtin_version="1", task_files={}),
        batch_size=16,
        dtype="float32",
        device="cpu",
        precision="fp32",
    )
    return Step("tune", name, settings).key()


@pytest.mark.parametrize("name", list(RECORDED_CONFIG_KEYS))
def test_every_step_of_the_miniature_studies_keeps_its_key(name):
    assert _config_keys(name) == RECORDED_CONFIG_KEYS[name]


@pytest.mark.parametrize("name", list(METHODS))
def test_a_tune_step_keeps_its_key_whatever_shape_its_method_settings_have(name):
    assert _method_key(name) == RECORDED_METHOD_KEYS[name]


def test_the_method_settings_are_typed_and_dumped_as_written():
    spec = MethodSpec.model_validate(METHODS["gradients_conditionals_ranges"])
    assert spec.sft["weight"] == [ConditionalValue(filter="mlp", value=0.8), ConditionalValue(value=1.0)]
    assert spec.space["models[ct].parameters.density"] == Range(low=0.2, high=0.8, step=0.2)
    assert MethodSpec.model_validate(METHODS["one_conditional_and_values"]).space["parameters.slack"] == ValueList(
        values=[0, 0.5, 1, 2]
    )
    for method in METHODS.values():
        written = {"label": None, "ct": {}, "sft": {}, "parameters": {}, "space": {}} | method
        assert MethodSpec.model_validate(method).model_dump() == written
