"""mergekit's ``tokenizer:`` block (tokens with their sources, force, pad_to_multiple_of) and ``chat_template``,
against mergekit-yaml on its own tokenizer test models (tests/union_helpers.py), token by token."""

from __future__ import annotations

import importlib.resources
import json
import shutil
from pathlib import Path

import pytest
import torch
from mergekit._data import chat_templates
from safetensors.torch import load_file
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from langmerge.errors import LangmergeError
from langmerge.merge import merge
from langmerge.merge.recipe import RecipeError, load_recipe
from langmerge.merge.tokenizer_block import BUILTIN_CHAT_TEMPLATES
from mergekit_helpers import merge_both, vocab
from union_helpers import union_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return union_models(tmp_path_factory.mktemp("block"))


def _rows(folder: Path, name: str = "model.embed_tokens.weight") -> torch.Tensor:
    return load_file(str(Path(folder) / "model.safetensors"))[name]


def _assert_same_by_token(mk: Path, lm: Path):
    theirs_vocab, ours_vocab = vocab(mk), vocab(lm)
    assert set(theirs_vocab) == set(ours_vocab)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        theirs, ours = _rows(mk, name), _rows(lm, name)
        assert theirs.shape == ours.shape, name
        for token, i in theirs_vocab.items():
            torch.testing.assert_close(ours[ours_vocab[token]], theirs[i], rtol=1e-5, atol=1e-6, msg=f"{name} {token}")
        if theirs.shape[0] > len(theirs_vocab):  # padding rows
            torch.testing.assert_close(ours[len(ours_vocab) :], theirs[len(theirs_vocab) :], rtol=1e-5, atol=1e-6)


def _linear(models: list[Path], base: Path, **extra) -> dict:
    return {
        "merge_method": "linear",
        "base_model": str(base),
        "dtype": "float32",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        **extra,
    }


def test_forced_tokens_from_named_models(models, tmp_path):
    """mergekit's test_force_token: union, _tok_10 forced from chatml, _tok_11 from base."""
    tokens = {
        "_tok_10": {"source": str(models["chatml"]), "force": True},
        "_tok_11": {"source": str(models["base"]), "force": True},
    }
    mk, lm = merge_both(
        _linear([models["base"], models["chatml"]], models["base"], tokenizer={"source": "union", "tokens": tokens}),
        tmp_path,
    )
    _assert_same_by_token(mk, lm)
    out, ids = _rows(lm), vocab(lm)
    assert torch.equal(out[ids["_tok_10"]], _rows(models["chatml"])[10])
    assert torch.equal(out[ids["_tok_11"]], _rows(models["base"])[11])
    assert not torch.equal(out[ids["_tok_12"]], _rows(models["base"])[12])  # not forced: merged


def test_model_token_sources_by_id_and_by_token(models, tmp_path):
    """mergekit's test_model_token_id: source base, _tok_20 = chatml's row 64, _tok_21 = base's <s>."""
    tokens = {
        "_tok_20": {"source": {"kind": "model_token", "model": str(models["chatml"]), "token_id": 64}, "force": True},
        "_tok_21": {"source": {"kind": "model_token", "model": str(models["base"]), "token": "<s>"}, "force": True},
    }
    mk, lm = merge_both(
        _linear([models["base"], models["chatml"]], models["base"], tokenizer={"source": "base", "tokens": tokens}),
        tmp_path,
    )
    _assert_same_by_token(mk, lm)
    out = _rows(lm)
    assert out.shape[0] == 64
    assert torch.equal(out[20], _rows(models["chatml"])[64]) and torch.equal(out[21], _rows(models["base"])[1])


def test_pad_to_multiple_of(models, tmp_path):
    """mergekit's test_pad_to_multiple_of: 66 tokens padded to 80 rows, the new rows the mean row."""
    mk, lm = merge_both(
        _linear([models["chatml"]], models["chatml"], tokenizer={"source": "base", "pad_to_multiple_of": 16}), tmp_path
    )
    assert json.loads((lm / "config.json").read_text())["vocab_size"] == 80
    assert _rows(lm).shape[0] == 80 and len(vocab(lm)) == 66
    _assert_same_by_token(mk, lm)
    chatml = _rows(models["chatml"])
    torch.testing.assert_close(_rows(lm)[66:], chatml.mean(dim=0).expand(14, -1), rtol=1e-5, atol=1e-6)


def test_new_token_with_zero_and_default_union_source(models, tmp_path):
    """A token no model has, added by the block (default source: union, as in mergekit), its row zero."""
    tokens = {"<new>": {"source": {"kind": "zero"}}, "<|im_end|>": {"source": {"kind": "zero"}, "force": True}}
    mk, lm = merge_both(
        _linear([models["base"], models["chatml"]], models["base"], tokenizer={"tokens": tokens}), tmp_path
    )
    _assert_same_by_token(mk, lm)
    ids = vocab(lm)
    assert len(ids) == 67 and "<|im_start|>" in ids  # union
    assert not _rows(lm)[ids["<new>"]].any() and not _rows(lm)[ids["<|im_end|>"]].any()


def test_block_errors_name_the_key(models, tmp_path):
    bad = {"_tok_3": {"source": {"kind": "model_token", "model": str(models["base"]), "token": "x", "token_id": 1}}}
    with pytest.raises(RecipeError, match=r"tokenizer\.tokens\._tok_3\.source"):
        load_recipe(_linear([models["base"]], models["base"], tokenizer={"tokens": bad}))
    with pytest.raises(LangmergeError, match=r"'tokenizer\.tokens\._tok_3': .*/sft' is not one of the recipe's models"):
        merge(
            _linear(
                [models["base"], models["chatml"]],
                models["base"],
                tokenizer={"tokens": {"_tok_3": {"source": str(tmp_path / "sft"), "force": True}}},
            ),
            tmp_path / "o1",
            progress=False,
        )
    with pytest.raises(LangmergeError, match=r"row 70 of model .* is beyond its 66 embedding rows"):
        merge(
            _linear(
                [models["base"], models["chatml"]],
                models["base"],
                tokenizer={
                    "tokens": {
                        "_tok_3": {
                            "source": {"kind": "model_token", "model": str(models["chatml"]), "token_id": 70},
                            "force": True,
                        }
                    }
                },
            ),
            tmp_path / "o2",
            progress=False,
        )
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ----------------------------------------------------------------------------- chat templates

CONVERSATIONS = [
    [{"role": "user", "content": "hi there "}],
    [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "more"},
    ],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": " a "}],
]


def _render(template: str, conversation, generation: bool) -> str:
    return render_jinja_template(
        conversations=[conversation],
        chat_template=template,
        add_generation_prompt=generation,
        bos_token="<s>",
        eos_token="</s>",
    )[0][0]


@pytest.mark.parametrize("name", ["chatml", "mistral", "alpaca"])
def test_builtin_templates_render_as_mergekit_s(name):
    theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
    for conversation in CONVERSATIONS:
        for generation in (False, True):
            ours = _render(BUILTIN_CHAT_TEMPLATES[name], conversation, generation)
            expected = _render(theirs, conversation, generation)
            if name == "alpaca" and generation and conversation[-1]["role"] != "assistant":
                # mergekit's lacks the line break before the generation prompt ("more### Response:")
                without = _render(theirs, conversation, False)
                assert expected == without + "### Response:\n" and ours == without + "\n\n### Response:\n"
                continue
            assert ours == expected, (name, conversation, generation)


def test_llama3_renders_the_format_by_hand():
    conversation = CONVERSATIONS[1]
    assert _render(BUILTIN_CHAT_TEMPLATES["llama3"], conversation, True) == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nbe kind<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nmore<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("setting", ["chatml", "jinja", "auto"])
def test_chat_template_is_written_and_used_by_transformers(models, tmp_path, setting):
    own = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    if setting == "auto":  # two of three models have the same template
        for key in ("chatml", "vocab"):
            folder = tmp_path / key
            shutil.copytree(models[key], folder)
            (folder / "chat_template.jinja").write_text(own)
        inputs, value, expected = [models["base"], tmp_path / "chatml", tmp_path / "vocab"], "auto", own
    else:
        value = "chatml" if setting == "chatml" else own
        inputs, expected = [models["base"]], (BUILTIN_CHAT_TEMPLATES["chatml"] if setting == "chatml" else own)
    recipe = _linear(
        inputs, models["base"], chat_template=value, **({"tokenizer_source": "union"} if setting == "auto" else {})
    )
    merge(recipe, tmp_path / "out", progress=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template == expected
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == _render(expected, [{"role": "user", "content": "hi"}], True)


def test_bad_chat_template_is_refused_with_the_others(models):
    with pytest.raises(RecipeError) as info:
        load_recipe({**_linear([models["base"]], models["base"], chat_template="chatmlx"), "dtype": "f8"})
    assert info.value.errors[1] == (
        "recipe key 'chat_template': 'chatmlx' is neither 'auto', a built-in template "
        "(alpaca, chatml, exaone, llama3, mistral) nor a Jinja template"
    )
    with pytest.raises(RecipeError, match="not a valid Jinja template"):
        load_recipe(_linear([models["base"]], models["base"], chat_template="{% for m in messages %}"))
