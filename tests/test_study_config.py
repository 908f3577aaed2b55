"""Bad study configs: one clear error naming the key, before any training starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from langmerge.errors import LangmergeError
from langmerge.study import build_plan, load_study, run_study
from study_helpers import study_dict, write_inputs, write_study


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    write_inputs(root)
    return root


def _error(tmp_path, d) -> str:
    cfg = write_study(tmp_path / "study.yaml", d)
    with pytest.raises(LangmergeError) as exc:
        run_study(load_study(cfg), progress=False)
    return str(exc.value)


def test_missing_base_model(inputs, tmp_path):
    msg = _error(tmp_path, study_dict(inputs, tmp_path / "out", base={"path": str(tmp_path / "nowhere")}))
    assert "base.path" in msg and "nowhere" in msg and "does not exist" in msg
    (tmp_path / "empty").mkdir()
    msg = _error(tmp_path, study_dict(inputs, tmp_path / "out", base={"path": str(tmp_path / "empty")}))
    assert "base.path" in msg and "empty" in msg and "no config.json" in msg


def test_unknown_task(inputs, tmp_path):
    d = study_dict(inputs, tmp_path / "out")
    d["languages"]["ny"]["test"] = ["next_day_ny", "next_week_ny"]
    msg = _error(tmp_path, d)
    assert "languages.ny.test" in msg and "next_week_ny" in msg


def test_unknown_language(inputs, tmp_path):
    d = study_dict(inputs, tmp_path / "out")
    d["languages"]["xx"] = d["languages"].pop("ny")
    assert "languages.xx" in _error(tmp_path, d)


def test_budget_larger_than_text_fails_before_training(inputs, tmp_path):
    d = study_dict(inputs, tmp_path / "out")
    d["languages"]["ny"]["budgets"] = [300, 100000]
    msg = _error(tmp_path, d)
    assert "languages.ny.budgets" in msg and "100,000" in msg and "more than the text holds" in msg
    cache = tmp_path / "out" / "cache"
    assert not [p for p in cache.iterdir() if p.name.startswith(("ct-", "sft-", "ct_sft-", "tune-", "eval-"))]


def test_replay_too_short(inputs, tmp_path):
    d = study_dict(inputs, tmp_path / "out", replay_ratio="1:4")
    msg = _error(tmp_path, d)
    assert "replay" in msg and "1:4" in msg


def test_bad_space_key_and_unknown_method_field(inputs, tmp_path):
    d = study_dict(inputs, tmp_path / "out")
    d["methods"]["ties"]["space"] = {"models[ct].parameters.slack": {"values": [1.0]}}
    assert "methods.ties" in _error(tmp_path, d)
    d = study_dict(inputs, tmp_path / "out")
    d["methods"]["ties"]["densty"] = 0.5
    assert "methods.ties.densty" in _error(tmp_path, d)


def test_group_by_length_is_for_sft_training_only(inputs, tmp_path):
    d = study_dict(inputs, tmp_path / "out", ct_training={"group_by_length": True})
    msg = _error(tmp_path, d)
    assert "ct_training" in msg and "group_by_length applies to SFT" in msg


def test_unknown_builtin_source(inputs, tmp_path):
    d = study_dict(inputs, tmp_path / "out", replay=[{"builtin": "english-tasks-sft"}])
    msg = _error(tmp_path, d)
    assert "replay[0]" in msg and "english-tasks-sft" in msg


def test_cli_prints_one_line_and_exits_2(inputs, tmp_path):
    d = study_dict(inputs, tmp_path / "out", base={"path": str(tmp_path / "nowhere")})
    cfg = write_study(tmp_path / "study.yaml", d)
    done = subprocess.run([sys.executable, "-m", "langmerge", "study", str(cfg)], capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("langmerge: error:") and "base.path" in lines[0]


def test_score_seeds_methods_and_device_are_checked(inputs, tmp_path):
    d = study_dict(inputs, tmp_path / "out")
    d["languages"]["ny"]["score"] = ["next_month_ny"]  # a validation task, not a test task
    assert "languages.ny.score" in _error(tmp_path, d)
    d = study_dict(inputs, tmp_path / "out", seeds={"extra": [0]})  # the main runs' seed
    assert "seeds.extra" in _error(tmp_path, d)
    d = study_dict(inputs, tmp_path / "out", seeds={"extra": [1], "methods": ["nope"]})
    assert "seeds.methods" in _error(tmp_path, d)
    d = study_dict(inputs, tmp_path / "out")
    d["methods"]["ties"]["merge_method"] = "tie"
    msg = _error(tmp_path, d)
    assert "methods.ties.merge_method" in msg and "unknown method 'tie'" in msg and "ties_sv" in msg
    d = study_dict(inputs, tmp_path / "out", sft={"data": str(inputs / "sft.jsonl"), "test": ["no_such_en"]})
    assert "sft.test" in _error(tmp_path, d)
    if not torch.cuda.is_available():
        d = study_dict(inputs, tmp_path / "out", evaluation={"device": "cuda"})
        msg = _error(tmp_path, d)
        assert "evaluation.device" in msg and "no CUDA device" in msg
        assert not (tmp_path / "out").exists()  # refused before anything is written


def test_seeds_repeat_the_smallest_budget_and_the_sft_run(inputs, tmp_path):
    d = study_dict(inputs, tmp_path / "out", seeds={"extra": [1, 2], "methods": ["ties"]})
    d["sft"]["test"] = ["next_day_en"]
    plan = build_plan(load_study(write_study(tmp_path / "study.yaml", d)))
    labels = [s.label for s in plan.steps]
    for seed in (1, 2):
        assert f"sft (seed {seed})" in labels and f"ct ny (300 tokens, seed {seed})" in labels
        assert f"ct-then-sft ny 300 (seed {seed})" in labels and f"tune ties ny 300 (seed {seed})" in labels
        assert f"eval sft on English (seed {seed})" in labels
        assert plan.seeded[("ny", seed, "ties")].deps["tune"].deps["sft"].settings.training.seed == seed
    assert not any("tune wavg ny 300 (seed" in label for label in labels)
    assert set(plan.english) == {(0, "base"), (0, "sft"), (1, "sft"), (2, "sft")}
    # The main runs are the same steps as without seeds: the seed repeats add steps, they change none.
    plain = build_plan(load_study(write_study(tmp_path / "plain.yaml", study_dict(inputs, tmp_path / "out"))))
    assert {s.key() for s in plain.steps} <= {s.key() for s in plan.steps}


def test_ct_sft_budgets_train_the_baseline_at_those_budgets_only(inputs, tmp_path):
    d = study_dict(inputs, tmp_path / "out")
    d["languages"]["ny"]["ct_sft_budgets"] = [300]
    plan = build_plan(load_study(write_study(tmp_path / "study.yaml", d)))
    assert [s.label for s in plan.steps if s.kind == "ct_sft"] == ["ct-then-sft ny 300"]
    assert {k for k in plan.evals if k[2] == "ct_sft"} == {("ny", 300, "ct_sft")}
    # The steps kept are those of the study without the option: fewer steps, none changed.
    every = build_plan(load_study(write_study(tmp_path / "every.yaml", study_dict(inputs, tmp_path / "out"))))
    assert {s.key() for s in plan.steps} < {s.key() for s in every.steps}
    assert len([s for s in every.steps if s.kind == "ct_sft"]) == 3
    d["languages"]["ny"]["ct_sft_budgets"] = ["1k"]
    msg = _error(tmp_path, d)
    assert "languages.ny.ct_sft_budgets" in msg and "1,000 is not one of the budgets [300, 600, 1200]" in msg
