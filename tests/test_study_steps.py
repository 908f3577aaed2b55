"""Step keys and the step runner: what is cached, and that a failed step leaves nothing behind."""

from __future__ import annotations

import hashlib
import json

import pytest

from langmerge.study import run_steps
from langmerge.study.steps import DONE, Context, Step, canonical, run_step


def test_key_is_the_hash_of_settings_and_input_keys():
    a = Step("file", "a", {"path": "/x", "sha256": "1"})
    step = Step("ct", "ct", {"lr": 1e-4, "budgets": [1, 2]}, {"text0": a})
    # An independent computation of the documented key.
    doc = {"kind": "ct", "version": 1, "settings": {"budgets": [1, 2], "lr": 1e-4}, "deps": {"text0": a.key()}}
    want = hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert step.key() == want
    assert Step("ct", "renamed", {"budgets": [1, 2], "lr": 1e-4}, {"text0": a}).key() == want  # label, order: no effect
    assert Step("ct", "ct", {"lr": 2e-4, "budgets": [1, 2]}, {"text0": a}).key() != want
    changed_input = Step("file", "a", {"path": "/x", "sha256": "2"})
    assert Step("ct", "ct", {"lr": 1e-4, "budgets": [1, 2]}, {"text0": changed_input}).key() != want
    assert canonical({"b": 1, "a": [1.0, "é"]}) == '{"a":[1.0,"é"],"b":1}'


def test_a_failing_step_leaves_no_folder_and_a_finished_one_is_not_rerun(tmp_path, monkeypatch):
    calls = []

    def runner(step, ctx, out):
        calls.append(step.label)
        (out / "partial.txt").write_text("x")
        if step.settings.get("fail"):
            raise RuntimeError("boom")
        return {"ok": True}

    monkeypatch.setitem(run_steps.RUNNERS, "probe", runner)
    ctx = Context(tmp_path, progress=False)
    bad = Step("probe", "bad", {"fail": True})
    with pytest.raises(RuntimeError):
        run_step(bad, ctx)
    assert list(tmp_path.iterdir()) == []
    good = Step("probe", "good", {"fail": False})
    first = run_step(good, ctx)
    assert first["cached"] is False and first["info"] == {"ok": True}
    assert (good.folder(tmp_path) / DONE).is_file() and (good.folder(tmp_path) / "partial.txt").is_file()
    again = run_step(good, ctx)
    assert again["cached"] is True and calls == ["bad", "good"]
    run_step(good, ctx, force=True)
    assert calls == ["bad", "good", "good"]
