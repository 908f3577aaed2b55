"""`langmerge analyze`: outputs, several CT budgets in one figure, bad input as one-line errors."""

from __future__ import annotations

import json

import pytest

from analysis_helpers import ct_model, recipe, tiny_trio, write_recipe
from langmerge.cli import main


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return tiny_trio(tmp_path_factory.mktemp("trio"))


def test_analyze_writes_json_markdown_and_plots(trio, tmp_path, capsys):
    r = write_recipe(tmp_path / "sv.yaml", recipe(trio))
    out = tmp_path / "out"
    assert main(["analyze", str(r), "-o", str(out), "--slack", "0,0.5,1,2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "sft *" in printed and "sign conflicts ct vs sft" in printed
    doc = json.loads((out / "analysis.json").read_text())
    run = doc["runs"][0]
    assert run["slacks"] == [0.0, 0.5, 1.0, 2.0]
    sft = run["total"]["models"]["sft"]
    assert len(sft["loss_rate"]) == 4 and sft["loss_rate"][0] == pytest.approx(sft["lost"][0] / sft["kept"])
    assert set(run["by_layer"]) == {"0", "1", "other"}
    assert "self_attn.q_proj" in run["by_module"] and "embed_tokens" in run["by_module"]
    assert "model.layers.0.mlp.up_proj.weight" in run["by_tensor"]
    for png in ("loss_by_layer.png", "loss_vs_slack.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| sv.yaml |" in (out / "summary.md").read_text()
    # An existing output is refused without --force.
    assert main(["analyze", str(r), "-o", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_several_ct_budgets_give_the_sft_loss_against_tokens(trio, tmp_path):
    # A larger CT task vector stands in for more CT tokens (the paper's mechanism); tokens come from metadata.
    recipes = []
    for scale, tokens in ((0.1, 1_000_000), (0.3, 4_000_000), (0.9, 16_000_000)):
        ct = ct_model(tmp_path / f"ct-{tokens}", scale, tokens)
        recipes.append(str(write_recipe(tmp_path / f"r{tokens}.yaml", recipe(trio, "ties", ct=ct))))
    out = tmp_path / "budgets"
    assert main(["analyze", *recipes, "-o", str(out), "--protect", "sft", "--slack", "0,1", "--no-progress"]) == 0
    doc = json.loads((out / "analysis.json").read_text())
    assert doc["ct_tokens"] == [1_000_000, 4_000_000, 16_000_000]
    sft_ties = [run["total"]["models"]["sft"]["loss_rate"][0] for run in doc["runs"]]
    assert sft_ties[0] < sft_ties[1] < sft_ties[2]  # the paper's finding, on this synthetic trio
    sft_sv = [run["total"]["models"]["sft"]["loss_rate"][1] for run in doc["runs"]]
    assert all(sv <= t for sv, t in zip(sft_sv, sft_ties))
    assert (out / "loss_vs_tokens.png").stat().st_size > 1000
    # --tokens overrides the metadata, aligned with the recipes.
    out2 = tmp_path / "budgets2"
    assert (
        main(["analyze", *recipes, "-o", str(out2), "--protect", "sft", "--tokens", "1M,2M,3.5M", "--no-progress"]) == 0
    )
    assert json.loads((out2 / "analysis.json").read_text())["ct_tokens"] == [1_000_000, 2_000_000, 3_500_000]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--slack", "0,x"], "--slack: 'x' is not a number"),
        (["--slack", "0,1"], "needs a protected model"),  # a ties recipe without --protect
        (["--protect", "sft", "--tokens", "1M"], "--tokens: compare CT budgets with several recipes"),
        (["--protect", "nobody"], "--protect 'nobody' is not one of the merged models"),
    ],
)
def test_bad_input_is_one_line_exit_2(trio, tmp_path, capsys, args, message):
    r = write_recipe(tmp_path / "ties.yaml", recipe(trio, "ties"))
    assert main(["analyze", str(r), "-o", str(tmp_path / "out"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("langmerge: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_several_recipes_need_tokens_and_the_sft_model(trio, tmp_path, capsys):
    a = str(write_recipe(tmp_path / "a.yaml", recipe(trio, "ties")))
    b = str(write_recipe(tmp_path / "b.yaml", recipe(trio, "ties", ct_density=0.3)))
    assert main(["analyze", a, b, "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "name it with --protect" in capsys.readouterr().err
    assert main(["analyze", a, b, "-o", str(tmp_path / "o"), "--protect", "sft", "--no-progress"]) == 2
    assert "no langmerge_training.json" in capsys.readouterr().err
    assert (
        main(["analyze", a, b, "-o", str(tmp_path / "o"), "--protect", "sft", "--tokens", "1M", "--no-progress"]) == 2
    )
    assert "1 values for 2 recipes" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
