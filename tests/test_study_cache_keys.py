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
full.yaml's and the tune steps' are still 5e85b07's.
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
