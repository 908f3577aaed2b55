"""PEFT LoRA adapters as merge inputs: applied tensor by tensor, equal to PEFT's own merge."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from ckpt_helpers import SHAPE, load_state
from langmerge.errors import LangmergeError
from langmerge.io.lora import AdapterMismatch, LoraSource
from langmerge.io.reader import CheckpointReader
from langmerge.merge import merge
from langmerge.synthetic import LlamaShape, write_model


def _make_adapter(base_folder, out, *, use_rslora=False, seed=3, targets=("q_proj", "v_proj", "down_proj")):
    """A PEFT LoRA adapter on ``base_folder`` with random (trained-looking) A and B; returns PEFT's merged state."""
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), use_rslora=use_rslora, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(out)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = write_model(root / "base", SHAPE, seed=0)
    sft = write_model(root / "sft", SHAPE, seed=0, delta_scale=0.1, delta_key="sft")
    peft_merged = _make_adapter(base, root / "adapter")
    return {"base": base, "sft": sft, "adapter": root / "adapter", "peft_merged": peft_merged, "root": root}


def test_adapter_keys_and_values_match_peft_merge(models):
    keys = json.loads((models["adapter"] / "adapter_config.json").read_text())
    assert keys["base_model_name_or_path"] == str(models["base"])
    source = LoraSource(CheckpointReader(models["base"]), models["adapter"], base_ref=str(models["base"]))
    try:
        assert len(source.pairs) == 3 * SHAPE.layers
        for name in source.names:
            torch.testing.assert_close(source.get(name).float(), models["peft_merged"][name], rtol=1e-5, atol=1e-6)
    finally:
        source.close()


def test_rslora_scale(models, tmp_path):
    peft_merged = _make_adapter(models["base"], tmp_path / "rs", use_rslora=True, targets=("o_proj",))
    source = LoraSource(CheckpointReader(models["base"]), tmp_path / "rs", base_ref=str(models["base"]))
    with source:
        name = "model.layers.0.self_attn.o_proj.weight"
        assert source.settings.scale("model.layers.0.self_attn.o_proj", 4) == pytest.approx(8 / 2)
        torch.testing.assert_close(source.get(name), peft_merged[name], rtol=1e-5, atol=1e-6)


def test_merge_with_adapter_equals_merge_with_peft_merged_model(models, tmp_path):
    full = tmp_path / "ct_full"
    model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    model.load_state_dict(models["peft_merged"])
    model.save_pretrained(full)
    shutil.copyfile(models["base"] / "tokenizer.json", full / "tokenizer.json")

    def recipe(ct):
        return {
            "merge_method": "ties",
            "base_model": str(models["base"]),
            "models": [
                {"model": str(ct), "parameters": {"weight": 1.0, "density": 0.6}},
                {"model": str(models["sft"]), "parameters": {"weight": 0.8, "density": 0.6}},
            ],
            "dtype": "float32",
        }

    merge(recipe(models["adapter"]), tmp_path / "from_adapter", progress=False)
    merge(recipe(full), tmp_path / "from_full", progress=False)
    a, b = load_state(tmp_path / "from_adapter"), load_state(tmp_path / "from_full")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # The adapter changed the merge (not a no-op): q_proj differs from the base-only TIES of sft.
    assert not torch.equal(
        a["model.layers.0.self_attn.q_proj.weight"],
        load_state(models["base"])["model.layers.0.self_attn.q_proj.weight"],
    )


def test_adapter_of_another_base_is_refused(models, tmp_path):
    other = write_model(tmp_path / "other_base", SHAPE, seed=5)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(other),
        "models": [{"model": str(models["adapter"]), "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(AdapterMismatch) as err:
        merge(recipe, tmp_path / "out", progress=False)
    assert str(models["base"]) in str(err.value) and str(other) in str(err.value)


def test_adapter_with_wrong_shapes_is_refused(models, tmp_path):
    wide = write_model(tmp_path / "wide", LlamaShape(hidden=48, intermediate=64, layers=1, heads=2, kv_heads=1), seed=0)
    adapter = tmp_path / "adapter"
    shutil.copytree(models["adapter"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(wide)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(wide),
        "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(AdapterMismatch, match="trained on another base"):
        merge(recipe, tmp_path / "out", progress=False)


def test_adapter_needs_a_base(models, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(models["adapter"]), "parameters": {"weight": 1.0}},
            {"model": str(models["sft"]), "parameters": {"weight": 1.0}},
        ],
    }
    with pytest.raises(LangmergeError, match="base_model"):
        merge(recipe, tmp_path / "out", progress=False)
