"""Issue 14's methods on whole tiny models: ``langmerge merge`` against ``mergekit-yaml`` on the same recipe.

The randomised DELLA draws its masks from per-tensor seeded generators in langmerge and from torch's
global stream in mergekit, so its whole-model outputs differ by design; its masks are compared per tensor
with the same stream in test_methods_mergekit.py.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml

from analysis_helpers import weights
from ckpt_helpers import mergekit_yaml
from langmerge.cli import main
from langmerge.synthetic import LlamaShape, make_trio

SHAPE = LlamaShape(hidden=48, intermediate=64, layers=4, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("trio"), SHAPE)


def _two(p, method, parameters=None, base=True, ct=None, sft=None, dtype="float32", **extra):
    recipe = {
        "merge_method": method,
        "models": [{"model": str(p["ct"]), "parameters": ct or {}}, {"model": str(p["sft"]), "parameters": sft or {}}],
        "parameters": parameters or {},
        "dtype": dtype,
        **extra,
    }
    if base:
        recipe["base_model"] = str(p["base"])
    return recipe


RECIPES = {
    "slerp": lambda p: {
        "merge_method": "slerp",
        "base_model": str(p["ct"]),
        "models": [{"model": str(p["ct"])}, {"model": str(p["sft"])}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 1.0]}, {"value": 0.6}]},
        "dtype": "float32",
    },
    "slerp_bfloat16": lambda p: {
        "merge_method": "slerp",
        "base_model": str(p["base"]),
        "models": [{"model": str(p["sft"])}],
        "parameters": {"t": 0.35},
        "dtype": "bfloat16",
    },
    "nuslerp_task_vectors": lambda p: _two(p, "nuslerp", ct={"weight": 0.4}, sft={"weight": 0.6}),
    "nuslerp_row_wise": lambda p: _two(
        p,
        "nuslerp",
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        base=False,
        ct={"weight": 1.0},
        sft={"weight": 3.0},
    ),
    "multislerp": lambda p: _two(p, "multislerp", ct={"weight": [0.2, 1.0]}, sft={"weight": 0.7}),
    "karcher": lambda p: _two(p, "karcher", {"max_iter": 5}, base=False),
    "karcher_with_base": lambda p: _two(p, "karcher"),
    "breadcrumbs": lambda p: _two(
        p, "breadcrumbs", ct={"weight": 1.0, "density": 0.6, "gamma": 0.05}, sft={"weight": 0.5, "density": 0.8}
    ),
    "breadcrumbs_ties": lambda p: _two(
        p,
        "breadcrumbs_ties",
        {"normalize": True},
        ct={"weight": 1.0, "density": 0.5, "gamma": 0.1},
        sft={"weight": 1.0, "density": [0.9, 0.4]},
    ),
    "sce": lambda p: _two(p, "sce", {"select_topk": 0.4}),
    "model_stock": lambda p: _two(p, "model_stock", {"filter_wise": True}),
    "nearswap": lambda p: {
        "merge_method": "nearswap",
        "base_model": str(p["base"]),
        "models": [{"model": str(p["sft"])}],
        "parameters": {"t": 0.01},
        "dtype": "float32",
    },
    "passthrough": lambda p: {
        "merge_method": "passthrough",
        "models": [
            {"model": str(p["sft"]), "parameters": {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}
        ],
        "dtype": "float32",
    },
    "arcee_fusion": lambda p: {
        "merge_method": "arcee_fusion",
        "base_model": str(p["base"]),
        "models": [{"model": str(p["ct"])}],
        "dtype": "float32",
    },
    "ram": lambda p: _two(p, "ram", {"epsilon": 0.05}),
    "ramplus_tl": lambda p: _two(p, "ramplus_tl", {"epsilon": 0.05, "r": 0.5, "alpha": 0.3}, out_dtype="bfloat16"),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_whole_model_identical_to_mergekit_yaml(trio, tmp_path, name):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPES[name](trio)))
    run = subprocess.run([mergekit_yaml(), str(recipe), str(tmp_path / "mk")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    theirs, ours = weights(tmp_path / "mk"), weights(tmp_path / "lm")
    assert set(theirs) == set(ours)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize(
    "method,count",
    [
        ("slerp", "exactly 1"),
        ("nearswap", "exactly 1"),
        ("nuslerp", "exactly 2"),
        ("model_stock", "at least 2"),
        ("arcee_fusion", "exactly 1"),
    ],
)
def test_model_counts_refused_in_one_line(trio, tmp_path, capsys, method, count):
    recipe = {
        "merge_method": method,
        "base_model": str(trio["base"]),
        "models": [{"model": str(trio["ct"])}, {"model": str(trio["sft"])}, {"model": str(tmp_path / "third")}]
        if count != "at least 2"
        else [{"model": str(trio["ct"])}],
        "parameters": {"t": 0.5} if method in ("slerp", "nearswap") else {},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"merge_method {method!r} merges {count} model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_check_says_what_the_method_does_with_the_base(trio, tmp_path, capsys):
    for name, says in (
        ("karcher_with_base", "karcher takes no base: base_model {base} is merged as one more input"),
        ("nuslerp_task_vectors", "nuslerp merges the task vectors over base_model {base}"),
        ("breadcrumbs", None),
    ):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(RECIPES[name](trio)))
        assert main(["check", str(recipe)]) == 0
        text = capsys.readouterr().out
        if says:
            assert says.format(base=trio["base"]) in text, text
        else:
            assert "base_model" not in text.split("notes")[-1]
