"""`langmerge tune --tasks`: validation tasks as the objective, bad input before any work."""

from __future__ import annotations

import json

import pytest
import yaml

from analysis_helpers import recipe, tiny_trio, write_recipe
from langmerge.cli import main
from langmerge.evaluation import evaluate

TEXTS = ["வணக்கம் உலகம்", "hello world, hello tune", "ஒன்று இரண்டு மூன்று", "abc abc abc"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune_cli")
    trio = tiny_trio(root / "trio")
    (root / "val.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS))
    task = root / "val.yaml"
    task.write_text(yaml.safe_dump({"name": "val_bpc", "kind": "bits_per_char", "data": "val.jsonl"}))
    r = write_recipe(root / "start.yaml", recipe(trio))
    space = root / "space.yaml"
    space.write_text(
        yaml.safe_dump({"parameters.slack": {"values": [0, 4]}, "models[ct].parameters.weight": {"values": [0.1, 1.0]}})
    )
    return root, r, task, space


def test_tune_on_a_validation_task_and_reproduce_the_best_score(setup):
    root, r, task, space = setup
    out = root / "tuned"
    assert main(["tune", str(r), "--space", str(space), "--tasks", str(task), "-o", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "tune.json").read_text())
    assert len(doc["trials"]) == 4 and doc["objective"] == "mean of -bpc(val_bpc)"
    assert doc["settings"] == {"recipe": str(r), "search": "grid", "trials": 4, "seed": 0}
    scores = [t["score"] for t in doc["trials"]]
    assert doc["best"]["score"] == max(scores) and len(set(scores)) == 4
    # The written recipe, merged by `langmerge merge` and evaluated from disk, scores the best trial's score.
    assert main(["merge", str(out / "best_recipe.yaml"), str(root / "merged"), "--no-progress"]) == 0

    results = evaluate(str(root / "merged"), [str(task)], progress=False)
    assert -results.tasks["val_bpc"].metrics["bpc"] == pytest.approx(doc["best"]["score"], rel=1e-6)
    for name in ("leaderboard.csv", "leaderboard.md", "scores.png", "best_recipe.yaml"):
        assert (out / name).is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "no_such_task_xyz"], "unknown task 'no_such_task_xyz'"),
        (["--metric", "acc"], "--metric acc: task val_bpc (bits_per_char) reports bpc"),
        (["--trials", "2"], "the grid has 4 points"),
    ],
)
def test_bad_input_is_one_line_before_any_work(setup, capsys, args, message):
    root, r, task, space = setup
    argv = ["tune", str(r), "--space", str(space), "--tasks", str(task), "-o", str(root / "never"), "--no-progress"]
    argv += args  # a later --tasks replaces the first
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("langmerge: error:") and message in err and err.count("\n") == 1
    assert not (root / "never").exists()


def test_bad_space_file_names_the_file_and_key(setup, capsys):
    root, r, task, _ = setup
    bad = root / "bad_space.yaml"
    bad.write_text(yaml.safe_dump({"parameters.slack": {"low": 1, "high": 1}}))
    assert (
        main(["tune", str(r), "--space", str(bad), "--tasks", str(task), "-o", str(root / "never"), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert str(bad) in err and "'parameters.slack'" in err and "empty range" in err
