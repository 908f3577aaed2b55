"""``tokenizer_source: union`` as mergekit runs it: its own union test case, added tokens before vocabulary tokens
in either order, unused padded tokens, rows no model has; compared with mergekit-yaml token by token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from langmerge.cli import main
from mergekit_helpers import merge_both, vocab
from union_helpers import union_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return union_models(tmp_path_factory.mktemp("union"))


def _by_token(folder: Path, name: str) -> dict[str, torch.Tensor]:
    rows = load_file(str(Path(folder) / "model.safetensors"))[name]
    return {t: rows[i] for t, i in vocab(folder).items()}


def _recipe(method: str, base: Path, others: list[Path]) -> dict:
    return {
        "merge_method": method,
        "base_model": str(base),
        "dtype": "float32",
        "tokenizer_source": "union",
        "models": [
            {"model": str(m), "parameters": {"weight": w}} for m, w in zip([base, *others], [1.0, 0.7, 0.4, 0.5])
        ],
    }


def _assert_equal_by_token(mk: Path, lm: Path):
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        theirs, ours = _by_token(mk, name), _by_token(lm, name)
        assert set(theirs) == set(ours), set(theirs) ^ set(ours)
        for token in theirs:
            torch.testing.assert_close(ours[token], theirs[token], rtol=1e-6, atol=1e-6, msg=f"{name} {token}")
    theirs, ours = load_file(str(mk / "model.safetensors")), load_file(str(lm / "model.safetensors"))
    assert set(theirs) == set(ours)
    for key in theirs:
        if "embed_tokens" not in key and "lm_head" not in key:
            assert torch.equal(ours[key], theirs[key]), key


def test_mergekit_union_test_case(models, tmp_path):
    """mergekit's tests/test_tokenizer.py test_source_union: base, padded (unused added tokens), chatml, linear."""
    mk, lm = merge_both(_recipe("linear", models["base"], [models["padded"], models["chatml"]]), tmp_path)
    ids = vocab(lm)
    assert len(ids) == 66 and "<|im_start|>" in ids and not any(f"<UNUSED_{i}>" in ids for i in range(4))
    chatml = _by_token(models["chatml"], "model.embed_tokens.weight")
    out = _by_token(lm, "model.embed_tokens.weight")
    torch.testing.assert_close(out["<|im_start|>"], chatml["<|im_start|>"])  # only chatml has it: its row
    _assert_equal_by_token(mk, lm)


@pytest.mark.parametrize("order", ["added_first", "vocab_first"])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_added_and_vocabulary_tokens_in_either_order(models, tmp_path, order, method):
    others = [models["chatml"], models["vocab"]] if order == "added_first" else [models["vocab"], models["chatml"]]
    mk, lm = merge_both(_recipe(method, models["base"], others), tmp_path)
    ids = vocab(lm)
    assert len(ids) == 64 + 2 + 3
    _assert_equal_by_token(mk, lm)
    # the written tokenizer tokenizes the new tokens to their ids, and the model loads and runs

    tok = AutoTokenizer.from_pretrained(lm)
    new = [ids["<|im_start|>"], ids["_new_b"]]
    assert tok("<|im_start|>", add_special_tokens=False).input_ids == new[:1]  # an added token is matched whole
    assert tok.convert_ids_to_tokens(new) == ["<|im_start|>", "_new_b"]
    model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32)
    assert model.config.vocab_size == 69
    out = model.generate(torch.tensor([new]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 5)


def test_rows_no_model_has_are_zero_and_noted(models, tmp_path, capsys):
    """A tokenizer_source whose tokenizer has tokens beyond every model's rows (padded's unused tokens)."""
    recipe = {**_recipe("linear", models["base"], [models["padded"]]), "tokenizer_source": str(models["padded"])}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["check", str(path)]) == 0
    text = capsys.readouterr().out
    assert "4 output tokens have an embedding row in no model ('<UNUSED_0>', '<UNUSED_1>'" in text
    assert main(["merge", str(path), str(tmp_path / "lm"), "--no-progress"]) == 0
    rows = load_file(str(tmp_path / "lm" / "model.safetensors"))["model.embed_tokens.weight"]
    assert rows.shape[0] == 68 and torch.equal(rows[64:], torch.zeros(4, rows.shape[1]))
    base = load_file(str(models["base"] / "model.safetensors"))["model.embed_tokens.weight"]
    padded = load_file(str(models["padded"] / "model.safetensors"))["model.embed_tokens.weight"]
    torch.testing.assert_close(rows[:64], (base + 0.7 * padded) / 1.7)
