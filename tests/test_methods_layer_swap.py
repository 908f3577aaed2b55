"""layer_swap pinned by hand-built cases: which layer comes from which expert, the blend in the transition zone."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import yaml

from analysis_helpers import weights
from langmerge.cli import main
from langmerge.errors import LangmergeError
from langmerge.methods import TensorInfo, get_method, merge_in_memory
from langmerge.methods.layer_swap import language_share
from langmerge.synthetic import LlamaShape, make_trio

SWAP = get_method("layer_swap")


def _params(language=(True, False), **values):
    return SWAP.tensor_parameters({"language_expert": list(language), **values})


def _share(p, name, layer, n=8):
    return language_share(p, TensorInfo(name, (4, 4), torch.float32, layer=layer, num_layers=n))


def test_which_layer_comes_from_which_expert_without_transition():
    p = _params(k_bottom=2, k_top=3)
    shares = [_share(p, f"model.layers.{i}.mlp.up_proj.weight", i) for i in range(8)]
    assert shares == [1, 1, 0, 0, 0, 1, 1, 1]
    assert _share(p, "model.embed_tokens.weight", None) == 1
    assert _share(p, "lm_head.weight", None) == 1
    assert _share(p, "model.norm.weight", None) == 1
    p = _params(k_bottom=2, k_top=3, embeddings=False, output_layer=False)
    assert _share(p, "model.embed_tokens.weight", None) == 0
    assert _share(p, "lm_head.weight", None) == 0
    assert _share(p, "model.norm.weight", None) == 0


def test_transition_zone_blends_linearly_on_the_inner_side():
    # 10 layers, bottom 2 and top 2 swapped, transition 2: layers 2, 3 at 2/3, 1/3; layers 7, 6 at 2/3, 1/3
    p = _params(k_bottom=2, k_top=2, transition=2)
    shares = [_share(p, f"model.layers.{i}.self_attn.q_proj.weight", i, n=10) for i in range(10)]
    third = Fraction(1, 3)
    assert shares == [1, 1, 2 * third, third, 0, 0, third, 2 * third, 1, 1]
    # overlapping zones take the larger share
    p = _params(k_bottom=2, k_top=2, transition=3)
    shares = [_share(p, f"model.layers.{i}.mlp.down_proj.weight", i, n=7) for i in range(7)]
    assert shares == [1, 1, Fraction(3, 4), Fraction(2, 4), Fraction(3, 4), 1, 1]


def test_k_zero_is_the_task_expert_and_all_layers_the_language_expert():
    p = _params(k_bottom=0, k_top=0, embeddings=False, output_layer=False)
    assert all(_share(p, f"model.layers.{i}.x", i) == 0 for i in range(8))
    p = _params(k_bottom=5, k_top=3)
    assert all(_share(p, f"model.layers.{i}.x", i) == 1 for i in range(8))


def test_merge_picks_bits_and_blends_in_float32():
    lang, task = torch.randn(4, 6), torch.randn(4, 6)
    p = _params(language=(False, True), k_bottom=1, k_top=1, transition=1)  # the second model is the language expert

    def merged(layer):
        return merge_in_memory(
            SWAP, p, None, [task, lang], name=f"model.layers.{layer}.mlp.up_proj.weight", layer=layer, num_layers=6
        )

    assert torch.equal(merged(0), lang) and torch.equal(merged(5), lang)
    assert torch.equal(merged(2), task) and torch.equal(merged(3), task)
    torch.testing.assert_close(merged(1), 0.5 * lang + 0.5 * task, rtol=0, atol=0)
    torch.testing.assert_close(merged(4), 0.5 * lang + 0.5 * task, rtol=0, atol=0)


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="exactly one of the two models"):
        _params(language=(True, True), k_bottom=1, k_top=1)
    with pytest.raises(ValueError):
        _params(k_bottom=-1, k_top=1)
    p = _params(k_bottom=5, k_top=4)
    with pytest.raises(LangmergeError, match=r"k_bottom \(5\) \+ k_top \(4\) exceed the model's 8 layers"):
        SWAP.check(p, TensorInfo("model.layers.0.x", (2,), torch.float32, layer=0, num_layers=8))


# ----------------------------------------------------------------------------- whole models

SHAPE = LlamaShape(hidden=32, intermediate=48, layers=6, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("trio"), SHAPE)


def _recipe(tmp_path, trio, **parameters):
    recipe = {
        "merge_method": "layer_swap",
        "base_model": str(trio["base"]),
        "models": [{"model": str(trio["ct"])}, {"model": str(trio["sft"])}],
        "parameters": {"language_expert": str(trio["ct"]), **parameters},
        "dtype": "float32",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_whole_model_takes_each_tensor_from_the_right_expert(trio, tmp_path):
    recipe = _recipe(tmp_path, trio, k_bottom=1, k_top=2, transition=1, output_layer=False)
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 0
    out, ct, sft = weights(tmp_path / "out"), weights(trio["ct"]), weights(trio["sft"])
    assert set(out) == set(ct)
    expected_share = {0: 1.0, 1: 0.5, 2: 0.0, 3: 0.5, 4: 1.0, 5: 1.0}
    for name, value in out.items():
        if ".layers." in name:
            a = expected_share[int(name.split(".layers.")[1].split(".")[0])]
        else:
            a = 1.0 if "embed_tokens" in name else 0.0  # the output layer and the final norm stay the task expert's
        if a in (0.0, 1.0):
            assert torch.equal(value, ct[name] if a == 1 else sft[name]), name
        else:
            torch.testing.assert_close(value, a * ct[name] + (1 - a) * sft[name], rtol=0, atol=0)


def test_whole_model_refusals(trio, tmp_path, capsys):
    recipe = _recipe(tmp_path, trio, k_bottom=4, k_top=3)
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    assert "k_bottom (4) + k_top (3) exceed the model's 6 layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    recipe = _recipe(tmp_path, trio, k_bottom=1, k_top=1, language_expert=str(trio["base"]))
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    assert "'parameters.language_expert'" in capsys.readouterr().err
    recipe = _recipe(tmp_path, trio, k_bottom=1, k_top=1, language_expert=[str(trio["ct"]), str(trio["sft"])])
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    assert "must name exactly one of the two models" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_check_says_which_layers_come_from_which_expert(trio, tmp_path, capsys):
    recipe = _recipe(tmp_path, trio, k_bottom=1, k_top=2, transition=1, embeddings=False)
    assert main(["check", str(recipe)]) == 0
    text = capsys.readouterr().out
    assert (f"layer_swap does not read base_model {trio['base']}") in text
    assert (
        "layer_swap takes layer 0: language expert; layer 1: blend: 0.5 language expert; layer 2: task expert; "
        "layer 3: blend: 0.5 language expert; layers 4-5: language expert; embeddings: task expert; "
        "output: language expert"
    ) in text
    recipe = _recipe(tmp_path, trio, k_bottom=4, k_top=3)
    assert main(["check", str(recipe)]) == 1
    assert "k_bottom (4) + k_top (3) exceed the model's 6 layers" in capsys.readouterr().out
