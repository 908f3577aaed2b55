"""A study step's cache key does not change when the study's specs become typed: the finished steps of existing
studies stay valid.

The keys below were recorded by running main's code at 5e85b07 (before MethodSpec's parameters and space were
typed, when they were plain dicts) over the same inputs: the steps of the bundled miniature configs, built as
``_config_keys`` builds them, and a tune step of each method in ``METHODS`` (gradients, conditional values, ranges,
value lists, whole numbers), built as ``_method_key`` builds it; that is, this file's two functions run with
PYTHONPATH=<main>/src, printing ``{label: step.key()}``.

quick.yaml's keys were recorded again at 4bc1451, after the quick preset itself changed (SFT with
``group_by_length``, and a new ``english-tasks-sft-small`` with its own source version, which the pruned
base's vocabulary and so every later step depend on); full.yaml's and the tune steps' are still 5e85b07's.
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
        "sft": "67560d7d38b5455d",
        "eval base on English": "1b598f9027a3f97f",
        "eval sft on English": "08de503080ab9fba",
        "ct ny (500, 2,000, 8,000 tokens)": "fe2a88945156e04f",
        "eval base on ny": "41f53d64a7177667",
        "eval sft on ny": "37185e487e795e12",
        "eval ct ny 500": "1bb8166f55af62af",
        "ct-then-sft ny 500": "dde14b1327f84fec",
        "eval ct-then-sft ny 500": "77cd5ac3de715c83",
        "tune ties ny 500": "3aee4ec5fd445298",
        "eval ties ny 500": "bfedaece4d9ca4a7",
        "tune ties_sv ny 500": "4408d37f3710d9cc",
        "eval ties_sv ny 500": "e1330268d3fda77f",
        "tune layer_swap ny 500": "fd86d96c601b99e0",
        "eval layer_swap ny 500": "410c074365a233f7",
        "analyze ny 500": "e37f6de4ed147e98",
        "eval ct ny 2,000": "ddfbceb76bf8b677",
        "ct-then-sft ny 2,000": "d10e6b907c8ffb50",
        "eval ct-then-sft ny 2,000": "08d77f90b01588d3",
        "tune ties ny 2,000": "c2a52f0f4c248afb",
        "eval ties ny 2,000": "133d0043b4755320",
        "tune ties_sv ny 2,000": "6c7fc478f471cc67",
        "eval ties_sv ny 2,000": "b36620220ef1ab4a",
        "tune layer_swap ny 2,000": "e9b1966a1d2ece3d",
        "eval layer_swap ny 2,000": "4a489bcebeb0709f",
        "analyze ny 2,000": "a5aa57e58b30ff3c",
        "eval ct ny 8,000": "9168eafb9a0529d1",
        "ct-then-sft ny 8,000": "6068a2055ba14812",
        "eval ct-then-sft ny 8,000": "018ae71844e8b97d",
        "tune ties ny 8,000": "ced50e87a3840140",
        "eval ties ny 8,000": "0357e8a0d5d88a00",
        "tune ties_sv ny 8,000": "29090c459cb917dc",
        "eval ties_sv ny 8,000": "b6dbf27f2cb35910",
        "tune layer_swap ny 8,000": "abcfc4ef8241d39a",
        "eval layer_swap ny 8,000": "83516dda159f132b",
        "analyze ny 8,000": "af7f916ca30563b8",
    },
    "full.yaml": {
        "source python-docs-en": "8c26fe48f178fcfc",
        "source bible-ny": "14f50d984813e977",
        "source english-tasks-sft": "82cd9af7faea8377",
        "base gemma3-270m (vocabulary pruned)": "6ab2d689ddc20ddb",
        "sft": "7b9a281c4d6ca777",
        "eval base on English": "46d4fde89b4d7148",
        "eval sft on English": "2f1cd155fab225b6",
        "ct ny (1,000, 10,000, 100,000, 1,000,000 tokens)": "7f02d4e6e49593c2",
        "eval base on ny": "a1bbf8f88af91096",
        "eval sft on ny": "2bd8e49f45f5ff87",
        "eval ct ny 1,000": "d8d2443629b2208b",
        "ct-then-sft ny 1,000": "efd15e9fc320cf11",
        "eval ct-then-sft ny 1,000": "5815c6dd2fee09c2",
        "tune wavg ny 1,000": "1b08eb932dbb6b09",
        "eval wavg ny 1,000": "37ec2d86fec8ba55",
        "tune task_arithmetic ny 1,000": "a559f48f6f03e997",
        "eval task_arithmetic ny 1,000": "743abec230e06c42",
        "tune ties ny 1,000": "353e58a9e44a19d1",
        "eval ties ny 1,000": "f74df41e7a9b52f2",
        "tune ties_sv ny 1,000": "d34b222ad367c650",
        "eval ties_sv ny 1,000": "fe75a1b62c377334",
        "tune layer_swap ny 1,000": "6f8ab697829d80a5",
        "eval layer_swap ny 1,000": "5890a055c167e4fe",
        "analyze ny 1,000": "dc44b8e1b5fb7ff4",
        "eval ct ny 10,000": "ef4ce4f0021f5a96",
        "ct-then-sft ny 10,000": "39ab21f607288cb3",
        "eval ct-then-sft ny 10,000": "03cec1e99fa55a2e",
        "tune wavg ny 10,000": "4058d51332ba2239",
        "eval wavg ny 10,000": "fcf5978d1f65ffd8",
        "tune task_arithmetic ny 10,000": "ef4c7abfef1bcb09",
        "eval task_arithmetic ny 10,000": "d46c162a65b7713b",
        "tune ties ny 10,000": "be4587f086a0b864",
        "eval ties ny 10,000": "aef70a6d2e435fca",
        "tune ties_sv ny 10,000": "84b71a09325aa69c",
        "eval ties_sv ny 10,000": "f35b9fc3f34c1382",
        "tune layer_swap ny 10,000": "f82477e964ced4df",
        "eval layer_swap ny 10,000": "75adfd48f14eeccb",
        "analyze ny 10,000": "1a16e8bd4c990ec3",
        "eval ct ny 100,000": "d847fd4cc6207c32",
        "ct-then-sft ny 100,000": "af3d493eaf48b05c",
        "eval ct-then-sft ny 100,000": "ac3b03ffd83d8fe2",
        "tune wavg ny 100,000": "e4f167efaf0073a8",
        "eval wavg ny 100,000": "2b5a943e6e08f7d3",
        "tune task_arithmetic ny 100,000": "d4683a0d3b434890",
        "eval task_arithmetic ny 100,000": "ce0f0d10eeef5b2d",
        "tune ties ny 100,000": "7e4c2419035e3fe3",
        "eval ties ny 100,000": "b58fc6a63d3fb234",
        "tune ties_sv ny 100,000": "1d263d87fbecafa0",
        "eval ties_sv ny 100,000": "db74eb5aa83962cf",
        "tune layer_swap ny 100,000": "30082af1ac24b842",
        "eval layer_swap ny 100,000": "68ab103f35e018fc",
        "analyze ny 100,000": "1976dd9ac09ce8cf",
        "eval ct ny 1,000,000": "a92ac575a1a01be5",
        "ct-then-sft ny 1,000,000": "6e60d11d8c8834e6",
        "eval ct-then-sft ny 1,000,000": "a757552fb8f6ce17",
        "tune wavg ny 1,000,000": "d5c3f05050bbcb20",
        "eval wavg ny 1,000,000": "e3a87540bf8bd147",
        "tune task_arithmetic ny 1,000,000": "a2c12accbf07c1af",
        "eval task_arithmetic ny 1,000,000": "925be6089e4315b4",
        "tune ties ny 1,000,000": "c1c940de955bac60",
        "eval ties ny 1,000,000": "bcbd9232d45d02ce",
        "tune ties_sv ny 1,000,000": "59a2b754419ad013",
        "eval ties_sv ny 1,000,000": "ba98a7457b3dc011",
        "tune layer_swap ny 1,000,000": "a46545337ba958c4",
        "eval layer_swap ny 1,000,000": "32e79853d752acd9",
        "analyze ny 1,000,000": "6a05b7bb4463a645",
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
