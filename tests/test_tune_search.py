"""`tune`: finds a known optimum, merges in memory bit-exactly like `langmerge merge`, refuses bad spaces early."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from analysis_helpers import recipe, tiny_trio, weights, write_recipe
from langmerge.cli import main
from langmerge.errors import LangmergeError
from langmerge.merge import merge
from langmerge.merge.recipe import load_recipe
from langmerge.tuning import InMemoryMerger, tune
from langmerge.tuning.space import apply_values, load_space

SPACE = {
    "models[0].parameters.weight": {"low": 0.2, "high": 1.0, "step": 0.4},
    "models[sft].parameters.density": {"values": [0.3, 0.7]},
    "parameters.slack": {"values": [0, 2]},
}
HIDDEN = {"models[0].parameters.weight": 0.6, "models[sft].parameters.density": 0.7, "parameters.slack": 2}


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return tiny_trio(tmp_path_factory.mktemp("trio"))


def target_objective(trio, dtype="float32"):
    """Negative squared distance to the hidden merge, which `langmerge merge` writes (independent of the tuner)."""
    base = recipe(trio, dtype=dtype)
    dims = load_space(SPACE, load_recipe(base))
    out = Path(tempfile.mkdtemp()) / "target"
    merge(apply_values(base, dims, HIDDEN), out, progress=False)
    target = weights(out)

    def score(model, tokenizer) -> float:
        state = model.state_dict()
        return -float(sum((state[k].double() - v.double()).pow(2).sum() for k, v in target.items()))

    return score


def test_grid_finds_the_hidden_optimum_and_the_recipe_reproduces_it(trio, tmp_path):
    objective = target_objective(trio)
    r = write_recipe(tmp_path / "start.yaml", recipe(trio))
    result = tune(r, SPACE, objective, out_dir=tmp_path / "tuned", progress=False)
    assert len(result.trials) == 3 * 2 * 2
    assert result.best.values == HIDDEN and result.best.score == 0.0
    assert sorted(t.score for t in result.trials)[-2] < 0  # no other candidate reaches it
    # The written recipe, merged to disk by `langmerge merge`, scores exactly the best trial's score.
    out = tmp_path / "tuned"
    best = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert best["models"][0]["parameters"]["weight"] == 0.6 and best["parameters"]["slack"] == 2
    assert main(["merge", str(out / "best_recipe.yaml"), str(tmp_path / "merged"), "--no-progress"]) == 0

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert objective(model, AutoTokenizer.from_pretrained(tmp_path / "merged")) == result.best.score
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert len(rows) == 12 and rows[0]["rank"] == "1" and float(rows[0]["score"]) == 0.0
    assert "| 1 |" in (out / "leaderboard.md").read_text()
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_tpe_finds_the_optimum_within_its_budget(trio):
    result = tune(recipe(trio), SPACE, target_objective(trio), search="tpe", trials=24, seed=1, progress=False)
    assert len(result.trials) == 24
    assert result.best.values == HIDDEN


@pytest.mark.parametrize(
    "method, dtype, params",
    [
        (
            "ties_sv",
            "bfloat16",
            {"models[0].parameters.weight": 0.7, "parameters.slack": 1.5, "parameters.lambda": 0.9},
        ),
        ("dare_ties", "float32", {"models[0].parameters.weight": 0.7, "parameters.seed": 5}),
        ("task_arithmetic", "float16", {"models[0].parameters.weight": 0.3, "parameters.lambda": 1.2}),
        ("linear", "float32", {"models[0].parameters.weight": 0.3}),
    ],
)
def test_in_memory_merge_is_bit_identical_to_langmerge_merge(trio, tmp_path, method, dtype, params):
    start = recipe(trio, method, dtype=dtype)
    if method in ("task_arithmetic", "linear"):
        for m in start["models"]:
            m["parameters"].pop("density")
    if method == "linear":
        start.pop("base_model")
    space = {k: {"values": [v]} for k, v in params.items()}
    dims = load_space(space, load_recipe(start))
    candidate = apply_values(start, dims, params)
    merger = InMemoryMerger(load_recipe(start))
    in_memory = merger.state_dict(load_recipe(candidate))
    merge(candidate, tmp_path / "m", progress=False)
    on_disk = weights(tmp_path / "m")
    assert set(in_memory) == set(on_disk)
    for k, v in on_disk.items():
        assert in_memory[k].dtype == v.dtype and torch.equal(in_memory[k], v), k
    model = merger.model(load_recipe(candidate))
    assert torch.equal(
        model.state_dict()["model.layers.1.mlp.up_proj.weight"], on_disk["model.layers.1.mlp.up_proj.weight"]
    )


@pytest.mark.parametrize(
    "space, message",
    [
        ({"models[0].parameters.sharpness": {"values": [1]}}, "'sharpness' is not a parameter of ties_sv"),
        ({"parameters.slack": {"low": 2, "high": 1}}, "empty range"),
        ({"parameters.slack": {"values": []}}, "'values' is empty"),
        ({"models[9].parameters.weight": {"values": [1]}}, "the recipe lists 2 models"),
        ({"models[nobody].parameters.weight": {"values": [1]}}, "'nobody' names no model"),
        ({"models[0].parameters.slack": {"values": [1]}}, "slack is a global parameter"),
        ({"parameters.weight": {"values": [1]}}, "every model sets its own weight"),
        ({"models[0].parameters.density": {"values": [0.5, 1.5]}}, "above the maximum"),
        ({"parameters.normalize": {"low": 0, "high": 1}}, "use values: [true, false]"),
        ({"parameters.lambda": {"low": 0, "high": 1, "stride": 1}}, "unknown field 'stride'"),
        ({"weights": {"values": [1]}}, "not a recipe parameter key"),
        ({"parameters.lambda": {"low": 0.5, "high": 1.0}}, "a grid search needs 'values' or a 'step'"),
    ],
)
def test_bad_search_space_fails_before_any_work(trio, tmp_path, space, message):
    def never(model, tokenizer):
        raise AssertionError("the objective must not run")

    with pytest.raises(LangmergeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tune(recipe(trio), space, never, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_slack_needs_a_protected_model_and_grid_needs_enough_trials(trio):
    no_protect = recipe(trio, slack=None)
    no_protect["parameters"].pop("protect")
    with pytest.raises(LangmergeError, match="'parameters.protect' is required when slack > 0"):
        tune(no_protect, {"parameters.slack": {"values": [0, 1]}}, lambda m, t: 0.0, progress=False)
    with pytest.raises(LangmergeError, match="the grid has 12 points"):
        tune(recipe(trio), SPACE, lambda m, t: 0.0, trials=5, progress=False)


def test_trials_are_told_to_the_reporter_passed_in(trio, capsys):
    calls = []

    class Recorder:
        def start(self, total):
            calls.append(("start", total))

        def advance(self, n, nbytes=0):
            calls.append(("advance", n))

        def close(self):
            calls.append(("close",))

    space = {"parameters.slack": {"values": [0, 1, 2]}}
    result = tune(recipe(trio), space, lambda model, tok: 1.0, progress=False, reporter=Recorder())
    assert len(result.trials) == 3
    assert calls == [("start", 3), ("advance", 1), ("advance", 1), ("advance", 1), ("close",)]
    assert capsys.readouterr() == ("", "")  # no bar of the library's own
