"""``langmerge check``: the pre-merge report and its exit codes; tied/untied inputs together."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from ckpt_helpers import NEW_TOKENS, SHAPE, load_state, make_extended_trio, recipe
from langmerge.cli import main
from langmerge.merge import merge
from langmerge.synthetic import LlamaShape, char_tokenizer, write_model


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_extended_trio(tmp_path_factory.mktemp("check"))


def _write(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_check_reports_vocab_mismatch_and_fails_without_setting(trio, tmp_path, capsys):
    code = main(["check", _write(tmp_path, recipe(trio)), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["merge_would_succeed"] is False
    n = len(char_tokenizer())
    by_role = {m["model"]: m for m in report["models"]}
    assert by_role[str(trio["ct"])]["tokens"] == n + len(NEW_TOKENS)
    assert by_role[str(trio["base"])]["tokens"] == n
    assert any("tokenizer_source" in p and f"{n} tokens" in p for p in report["problems"])
    assert any("model.embed_tokens.weight" in d for d in report["differences"])


def test_check_with_union_succeeds_and_says_what_it_does(trio, tmp_path, capsys):
    code = main(["check", _write(tmp_path, recipe(trio, tokenizer_source="union"))])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "OK: the merge would succeed" in text
    assert "LlamaForCausalLM" in text and "float32" in text
    assert "lacks 3 output tokens" in text and repr(NEW_TOKENS[0]) in text
    assert "rows the base lacks take the weighted average" in text


def test_check_unreadable_input_exit_2(trio, tmp_path, capsys):
    data = recipe(trio, tokenizer_source="union")
    data["models"][1]["model"] = str(tmp_path / "missing")
    assert main(["check", _write(tmp_path, data)]) == 2
    assert "does not exist" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "nope.yaml")]) == 2


def test_check_shape_mismatch_exit_1(trio, tmp_path, capsys):
    wide = write_model(tmp_path / "wide", LlamaShape(hidden=32, intermediate=96, layers=1, heads=2, kv_heads=1), seed=0)
    data = recipe({**trio, "sft": wide}, tokenizer_source="union")
    assert main(["check", _write(tmp_path, data), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert any("mlp.up_proj.weight" in d for d in report["differences"])
    assert any("shape" in p for p in report["problems"])


def test_tied_and_untied_inputs_merge_into_untied_output(tmp_path):
    base = write_model(tmp_path / "base", SHAPE, seed=0)
    tied_shape = LlamaShape(**{**SHAPE.__dict__, "tie_embeddings": True})
    ct = write_model(tmp_path / "ct", tied_shape, seed=0, delta_scale=0.3, delta_key="ct")
    sft = write_model(tmp_path / "sft", SHAPE, seed=0, delta_scale=0.1, delta_key="sft")
    data = recipe({"base": base, "ct": ct, "sft": sft})
    merge(data, tmp_path / "out", progress=False)
    b, c, s, m = (load_state(p) for p in (base, ct, sft, tmp_path / "out"))
    assert "lm_head.weight" not in c
    expected = (
        b["lm_head.weight"]
        + 0.7 * (c["model.embed_tokens.weight"] - b["lm_head.weight"])
        + 0.5 * (s["lm_head.weight"] - b["lm_head.weight"])
    )
    torch.testing.assert_close(m["lm_head.weight"], expected, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
