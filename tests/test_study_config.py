"""Bad study configs: one clear error naming the key, before any training starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from langmerge.errors import LangmergeError
from langmerge.study import load_study, run_study
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
