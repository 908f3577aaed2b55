"""Step keys and the step runner: what is cached, and that a failed step leaves nothing behind."""

from __future__ import annotations

import hashlib
import json

import pytest

from langmerge.merge.recipe import load_recipe
from langmerge.methods.registry import METHODS
from langmerge.study import run_steps
from langmerge.study.config import MethodSpec
from langmerge.study.steps import DONE, Context, Step, canonical, method_recipe, run_step


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


# global parameters without a default, per method (every other parameter keeps its default)
REQUIRED = {"slerp": {"t": 0.5}, "nearswap": {"t": 0.01}, "layer_swap": {"k_bottom": 1, "k_top": 1}}


def test_every_registered_method_makes_a_study_recipe():
    for name, method in METHODS.items():
        per_model = {k: 0.5 for k, spec in method.parameters.items() if spec.scope == "model" and spec.default is None}
        spec = MethodSpec(merge_method=name, ct=per_model, sft=per_model, parameters=REQUIRED.get(name, {}))
        recipe = load_recipe(method_recipe(spec, "/m/base", "/m/ct", "/m/sft", "float32"))
        inputs = [e.model for e in recipe.inputs]
        if method.max_models == 1:  # the CT model merged into the SFT model (passthrough: the CT model alone)
            assert inputs == ["/m/ct"], name
            assert recipe.base_model == ("/m/sft" if method.base_policy == "required" else None), name
        else:
            assert inputs == ["/m/ct", "/m/sft"], name
            assert recipe.has_base == (method.base_policy in ("required", "optional")), name
        if name == "layer_swap":
            assert recipe.references["language_expert"] == [True, False]
        if name == "ties_sv":
            assert recipe.protected == [False, True]
