"""``model: BASE+ADAPTER`` and PEFT adapters as PEFT saves them by default, against PEFT's ``merge_and_unload()``
and mergekit-yaml (which merges ``BASE+ADAPTER`` with PEFT before merging)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ckpt_helpers import SHAPE, load_state
from langmerge.cli import main
from langmerge.errors import LangmergeError
from langmerge.io.lora import LoraSource
from langmerge.io.reader import CheckpointReader
from langmerge.merge import merge
from langmerge.synthetic import write_model
from mergekit_helpers import mergekit_exe


def _peft_adapter(base_folder, out, *, seed=5, **config):
    """An adapter made by PEFT with its defaults (``save_embedding_layers="auto"``) and random A/B;
    PEFT's merged state."""
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(out)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-recipes")
    base = write_model(root / "base", SHAPE, seed=0)
    sft = write_model(root / "sft", SHAPE, seed=0, delta_scale=0.1, delta_key="sft")
    merged = _peft_adapter(base, root / "adapter", target_modules=ALL_LINEAR + ["embed_tokens"])
    return {"root": root, "base": base, "sft": sft, "adapter": root / "adapter", "peft_merged": merged}


def _assert_source_equals(source, expected):
    try:
        for name in source.names:
            torch.testing.assert_close(source.get(name).float(), expected[name], rtol=1e-5, atol=1e-6)
    finally:
        source.close()


def test_embedding_saved_by_auto_merges_equal_to_peft(models):
    keys = load_file(str(models["adapter"] / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys  # PEFT's "auto" saved the layer whole
    source = LoraSource(CheckpointReader(models["base"]), models["adapter"], base_ref=str(models["base"]))
    assert "model.embed_tokens.weight" in source.pairs and "model.embed_tokens.weight" in source.whole
    _assert_source_equals(source, models["peft_merged"])


def test_rslora_with_modules_to_save_equals_peft(models, tmp_path):
    merged = _peft_adapter(
        models["base"], tmp_path / "rs", seed=9, target_modules=ALL_LINEAR, use_rslora=True, modules_to_save=["lm_head"]
    )
    source = LoraSource(CheckpointReader(models["base"]), tmp_path / "rs", base_ref=str(models["base"]))
    assert "lm_head.weight" in source.whole
    assert not torch.equal(merged["lm_head.weight"], load_state(models["base"])["lm_head.weight"])
    _assert_source_equals(source, merged)


def test_dora_is_refused_clearly(models, tmp_path):
    dora = tmp_path / "dora"
    shutil.copytree(models["adapter"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LangmergeError, match="DoRA adapter .* merge_and_unload"):
        LoraSource(CheckpointReader(models["base"]), dora, base_ref=str(models["base"]))


def _linear(models, first: str) -> dict:
    return {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [
            {"model": first, "parameters": {"weight": 0.6}},
            {"model": str(models["sft"]), "parameters": {"weight": 0.4}},
        ],
    }


def test_plus_syntax_equals_mergekit_yaml_and_the_peft_merged_folder(models, tmp_path):
    ref = f"{models['base']}+{models['adapter']}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_linear(models, ref)))
    subprocess.run(
        [
            mergekit_exe("mergekit-yaml"),
            str(recipe),
            str(tmp_path / "mk"),
            "--lora-merge-cache",
            str(tmp_path / "cache"),
        ],
        check=True,
        capture_output=True,
    )
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    ours, theirs = load_state(tmp_path / "lm"), load_file(str(tmp_path / "mk" / "model.safetensors"))
    expected_folder = write_model(tmp_path / "peft", SHAPE, seed=0)  # the PEFT-merged model as a folder
    save_file({k: v.contiguous() for k, v in models["peft_merged"].items()}, str(expected_folder / "model.safetensors"))
    merge(_linear(models, str(expected_folder)), tmp_path / "direct", progress=False)
    direct = load_state(tmp_path / "direct")
    assert set(ours) == set(theirs) == set(direct)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(ours[key], direct[key], rtol=1e-5, atol=1e-6, msg=key)
    pinned = yaml.safe_load((tmp_path / "lm" / "langmerge_recipe.yaml").read_text())
    assert pinned["models"][0]["model"] == ref


def test_plus_syntax_errors_name_the_side(models, tmp_path):
    with pytest.raises(LangmergeError, match=r"is not a LoRA adapter"):
        merge(_linear(models, f"{models['base']}+{models['sft']}"), tmp_path / "a", progress=False)
    with pytest.raises(LangmergeError, match=r"BASE\+ADAPTER names the base model first"):
        merge(_linear(models, f"{models['adapter']}+{models['adapter']}"), tmp_path / "b", progress=False)
    with pytest.raises(LangmergeError, match=r"one '\+'"):
        merge(_linear(models, f"{models['base']}+{models['adapter']}+x"), tmp_path / "c", progress=False)
    with pytest.raises(LangmergeError, match="does not exist"):
        merge(_linear(models, f"{models['base']}+{tmp_path / 'nope'}"), tmp_path / "d", progress=False)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_folder_with_plus_in_its_name_is_a_folder(models, tmp_path):
    plus = tmp_path / "a+b"
    shutil.copytree(models["sft"], plus)
    merge(
        {**_linear(models, str(plus)), "models": [{"model": str(plus), "parameters": {"weight": 1.0}}]},
        tmp_path / "out",
        progress=False,
    )
    for key, value in load_state(tmp_path / "out").items():
        assert torch.equal(value, load_state(models["sft"])[key]), key
