"""Step keys and the step runner: what is cached, and that a failed step leaves nothing behind."""

from __future__ import annotations

import hashlib
import json

import pytest

from langmerge.merge.recipe import load_recipe
from langmerge.methods.registry import METHODS
from langmerge.study import run_steps
from langmerge.study.config import MethodSpec, StudyTrainOptions
from langmerge.study.steps import (
    DONE,
    Context,
    CTSettings,
    EvalSettings,
    FileSettings,
    GivenSettings,
    Step,
    StepSettings,
    TaskSettings,
    canonical,
    method_recipe,
    run_step,
)


def _ct(lr: float = 1e-4, budgets: tuple[int, ...] = (1, 2)) -> CTSettings:
    return CTSettings(
        language="ny", budgets=list(budgets), replay_ratio=(4, 1), repeat=False, training=StudyTrainOptions(lr=lr)
    )


def test_key_is_the_hash_of_settings_and_input_keys():
    a = Step("file", "a", FileSettings(path="/x", sha256="1"))
    step = Step("ct", "ct", _ct(), {"text0": a})
    # An independent computation of the documented key: the settings as the plain dict steps were keyed by.
    settings = {
        "language": "ny",
        "budgets": [1, 2],
        "replay_ratio": [4, 1],
        "repeat": False,
        "training": {
            "seq_len": 512,
            "batch_size": 8,
            "micro_batch_size": 8,
            "lr": 1e-4,
            "min_lr": 0.0,
            "warmup": 0.01,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": 0,
            "precision": "auto",
            "gradient_checkpointing": False,
            "lora": None,
            "deterministic": False,
        },
    }
    doc = {"kind": "ct", "version": 1, "settings": settings, "deps": {"text0": a.key()}}
    want = hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert step.key() == want
    assert Step("ct", "renamed", _ct(), {"text0": a}).key() == want  # the label: no effect
    assert Step("ct", "ct", _ct(lr=2e-4), {"text0": a}).key() != want
    changed_input = Step("file", "a", FileSettings(path="/x", sha256="2"))
    assert Step("ct", "ct", _ct(), {"text0": changed_input}).key() != want
    assert canonical({"b": 1, "a": [1.0, "é"]}) == '{"a":[1.0,"é"],"b":1}'


def test_optional_settings_are_absent_from_the_key_when_unset():
    tasks = TaskSettings(tasks=["next_day_ny"], split="alternate", builtin_version="v3", task_files={})
    english = EvalSettings(tasks=tasks, limit=None, batch_size=16, lm_eval=[], device="cpu", precision="fp32")
    assert english.model_dump() == {
        "tasks": tasks.model_dump(),
        "limit": None,
        "batch_size": 16,
        "lm_eval": [],
        "device": "cpu",
        "precision": "fp32",
    }  # limit None is a setting: kept
    merge = english.model_copy(update={"score_tasks": [], "method_name": "ties"})
    assert merge.model_dump() == english.model_dump() | {"score_tasks": [], "method_name": "ties"}
    assert GivenSettings(hub="org/m", commit="abc").model_dump() == {"hub": "org/m", "commit": "abc"}


class Probe(StepSettings):
    fail: bool


def test_a_failing_step_leaves_no_folder_and_a_finished_one_is_not_rerun(tmp_path, monkeypatch):
    calls = []

    def runner(step, ctx, out):
        calls.append(step.label)
        (out / "partial.txt").write_text("x")
        if step.settings_as(Probe).fail:
            raise RuntimeError("boom")
        return {"ok": True}

    monkeypatch.setitem(run_steps.RUNNERS, "probe", runner)
    ctx = Context(tmp_path, progress=False)
    bad = Step("probe", "bad", Probe(fail=True))
    with pytest.raises(RuntimeError):
        run_step(bad, ctx)
    assert list(tmp_path.iterdir()) == []
    good = Step("probe", "good", Probe(fail=False))
    first = run_step(good, ctx)
    assert first.cached is False and first.info == {"ok": True}
    assert (good.folder(tmp_path) / DONE).is_file() and (good.folder(tmp_path) / "partial.txt").is_file()
    assert json.loads((good.folder(tmp_path) / DONE).read_text())["settings"] == {"fail": False}
    again = run_step(good, ctx)
    assert again.cached is True and calls == ["bad", "good"] and again.model_dump() == first.model_dump()
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
