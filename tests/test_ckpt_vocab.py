"""Vocabulary alignment: extended CT vocabularies keep their trained rows; shared rows follow the method."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ckpt_helpers import NEW_TOKENS, extend_vocabulary, load_state, make_extended_trio, recipe
from langmerge.errors import LangmergeError
from langmerge.io.writer import write_state_dict
from langmerge.merge import merge
from langmerge.synthetic import char_tokenizer

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_extended_trio(tmp_path_factory.mktemp("vocab"))


def test_mismatch_without_setting_names_both_sizes(trio, tmp_path):
    with pytest.raises(LangmergeError) as err:
        merge(recipe(trio), tmp_path / "out", progress=False)
    message = str(err.value)
    n = len(char_tokenizer())
    assert f"{n} tokens" in message and f"{n + len(NEW_TOKENS)} tokens" in message
    assert "tokenizer_source" in message
    assert not (tmp_path / "out").exists()


def test_union_rows_token_by_token(trio, tmp_path):
    out = tmp_path / "out"
    merge(recipe(trio, tokenizer_source="union"), out, progress=False)
    base, ct, sft, merged = (load_state(p) for p in (trio["base"], trio["ct"], trio["sft"], out))

    out_tok = AutoTokenizer.from_pretrained(out)
    ct_tok = AutoTokenizer.from_pretrained(trio["ct"])
    base_tok = char_tokenizer()
    n = len(base_tok)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == merged[EMB].shape[0] == len(out_tok) == n + len(NEW_TOKENS)
    assert config["tie_word_embeddings"] is False
    for name in (EMB, HEAD):
        # Shared tokens: task arithmetic computed by hand, row by row through the token strings.
        for token, i in base_tok.get_vocab().items():
            j = out_tok.convert_tokens_to_ids(token)
            c = ct_tok.convert_tokens_to_ids(token)
            expected = base[name][i] + 0.7 * (ct[name][c] - base[name][i]) + 0.5 * (sft[name][i] - base[name][i])
            torch.testing.assert_close(merged[name][j], expected, rtol=1e-5, atol=1e-6)
        # New-script tokens keep the CT rows exactly.
        for token in NEW_TOKENS:
            j = out_tok.convert_tokens_to_ids(token)
            assert j >= n
            assert torch.equal(merged[name][j], ct[name][ct_tok.convert_tokens_to_ids(token)])
    ids = out_tok("வணக்கம் தமிழ்").input_ids
    assert out_tok.convert_tokens_to_ids("வணக்கம்") in ids and out_tok.convert_tokens_to_ids("தமிழ்") in ids


def test_union_logits_match_direct_reference(trio, tmp_path):
    out = tmp_path / "out"
    merge(recipe(trio, tokenizer_source="union"), out, progress=False)
    base, ct, sft = (load_state(p) for p in (trio["base"], trio["ct"], trio["sft"]))
    n = base[EMB].shape[0]
    reference = {}
    for name, b in base.items():
        c = ct[name][:n] if name in (EMB, HEAD) else ct[name]
        reference[name] = b + 0.7 * (c - b) + 0.5 * (sft[name] - b)
        if name in (EMB, HEAD):  # the CT vocabulary appends its tokens after the base's: same ids
            reference[name] = torch.cat([reference[name], ct[name][n:]])
    config = LlamaConfig.from_pretrained(trio["ct"])
    ref_model = LlamaForCausalLM(config).eval()
    ref_model.load_state_dict(reference)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("வணக்கம் தமிழ் மொழி", return_tensors="pt").input_ids
    assert (ids >= n).sum() == 3  # the new-script words are single tokens
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=1e-4, atol=1e-5)
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] == ids.shape[1] + 3


def test_ties_shared_rows_equal_merge_of_truncated_models(trio, tmp_path):
    """Shared rows of a union TIES merge equal a TIES merge of the CT model cut to the base vocabulary."""
    cut = tmp_path / "ct_cut"
    shutil.copytree(trio["base"], cut)  # base tokenizer and config
    ct = load_state(trio["ct"])
    n = load_state(trio["base"])[EMB].shape[0]
    (cut / "model.safetensors").unlink()
    write_state_dict(cut, {k: (v[:n] if k in (EMB, HEAD) else v) for k, v in ct.items()})
    merge(recipe(trio, method="ties", tokenizer_source="union"), tmp_path / "union", progress=False)
    merge(recipe({**trio, "ct": cut}, method="ties"), tmp_path / "plain", progress=False)
    union, plain = load_state(tmp_path / "union"), load_state(tmp_path / "plain")
    for name in plain:
        got = union[name][:n] if name in (EMB, HEAD) else union[name]
        assert torch.equal(got, plain[name]), name
    for name in (EMB, HEAD):
        assert torch.equal(union[name][n:], ct[name][n:])


def test_tokenizer_source_base_drops_new_tokens(trio, tmp_path):
    out = tmp_path / "out"
    merge(recipe(trio, tokenizer_source="base"), out, progress=False)
    merged = load_state(out)
    n = len(char_tokenizer())
    assert merged[EMB].shape[0] == merged[HEAD].shape[0] == n
    assert json.loads((out / "config.json").read_text())["vocab_size"] == n

    assert len(AutoTokenizer.from_pretrained(out)) == n


def test_tokenizer_source_model_uses_its_vocabulary(trio, tmp_path):
    out = tmp_path / "out"
    merge(recipe(trio, tokenizer_source=str(trio["ct"])), out, progress=False)

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(trio["ct"]).get_vocab()
    assert load_state(out)[EMB].shape[0] == len(tok)


def test_tokens_the_base_lacks_average_the_models_that_have_them(tmp_path):
    """CT adds three words, SFT adds one of them plus its own: every presence pattern at once."""
    paths = make_extended_trio(tmp_path)
    extend_vocabulary(paths["sft"], ["<tool>", "தமிழ்"], seed=11)
    out = tmp_path / "out"
    merge(recipe(paths, tokenizer_source="union"), out, progress=False)
    toks = {k: AutoTokenizer.from_pretrained(p) for k, p in {**paths, "out": out}.items()}
    states = {k: load_state(p) for k, p in {**paths, "out": out}.items()}
    assert len(toks["out"]) == len(char_tokenizer()) + 4
    for name in (EMB, HEAD):

        def row(model, token, name=name):  # this pass's tensor
            return states[model][name][toks[model].convert_tokens_to_ids(token)]

        torch.testing.assert_close(row("out", "தமிழ்"), (0.7 * row("ct", "தமிழ்") + 0.5 * row("sft", "தமிழ்")) / 1.2)
        assert torch.equal(row("out", "<tool>"), row("sft", "<tool>"))
        assert torch.equal(row("out", "மொழி"), row("ct", "மொழி"))
        b = row("base", "a")
        torch.testing.assert_close(row("out", "a"), b + 0.7 * (row("ct", "a") - b) + 0.5 * (row("sft", "a") - b))
