"""Merging works from tensor names alone: tiny Llama, Mistral, Qwen2, Qwen3, Gemma2 and Gemma3 checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM, AutoTokenizer

from ckpt_helpers import load_state
from langmerge.merge import merge
from langmerge.synthetic import char_tokenizer

COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _config(arch: str, vocab: int):
    if arch == "llama":
        return tf.LlamaConfig(vocab_size=vocab, **COMMON)
    if arch == "mistral":
        return tf.MistralConfig(vocab_size=vocab, sliding_window=16, **COMMON)
    if arch == "qwen2":
        return tf.Qwen2Config(vocab_size=vocab, **COMMON)
    if arch == "qwen3":
        return tf.Qwen3Config(vocab_size=vocab, head_dim=16, **COMMON)
    if arch == "gemma2":
        return tf.Gemma2Config(vocab_size=vocab, head_dim=16, sliding_window=16, **COMMON)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(vocab_size=vocab, head_dim=16, sliding_window=16, **COMMON)
    raise AssertionError(arch)


def _write_trio(root, arch: str) -> dict:
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch, len(tok)))
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    paths = {}
    for i, role in enumerate(("base", "ct", "sft")):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g) * (0.05 * i)
                p.copy_(base_state[name] + noise)
        paths[role] = root / role
        model.save_pretrained(paths[role])
        tok.save_pretrained(paths[role])
    return paths


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_merged_architecture_loads_and_generates(tmp_path, arch):
    paths = _write_trio(tmp_path, arch)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths["ct"]), "parameters": {"weight": 0.6}},
            {"model": str(paths["sft"]), "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
    }
    out = tmp_path / "merged"
    merge(recipe, out, progress=False)
    base, ct, sft, merged = (load_state(p) for p in (paths["base"], paths["ct"], paths["sft"], out))
    assert merged.keys() == base.keys()
    for name in base:
        expected = base[name] + 0.6 * (ct[name] - base[name]) + 0.4 * (sft[name] - base[name])
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)

    config = json.loads((out / "config.json").read_text())
    tied = "lm_head.weight" not in base
    assert config["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in merged) is not tied
    assert config["vocab_size"] == merged["model.embed_tokens.weight"].shape[0]
    if arch.startswith("gemma"):
        assert tied  # Gemma ties the output layer to the input embeddings

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == json.loads((paths["base"] / "config.json").read_text())["architectures"][0]
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("தமிழ் hello", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] == ids.shape[1] + 4
