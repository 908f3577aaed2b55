"""Multi-document recipes as mergekit-multi runs them: named intermediates in sub-folders of OUT_DIR, referred to by
name, in dependency order; compared with mergekit-multi tensor for tensor; killed after its first document and rerun."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from langmerge.cli import main
from langmerge.errors import LangmergeError
from langmerge.merge import execute, merge
from langmerge.synthetic import LlamaShape, make_trio
from mergekit_helpers import mergekit_exe

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return {k: str(v) for k, v in make_trio(tmp_path_factory.mktemp("multi"), SHAPE).items()}


def _documents(p) -> list[dict]:
    return [  # the final first: the order is the dependencies', not the file's
        {
            "merge_method": "ties",
            "base_model": p["base"],
            "dtype": "float32",
            "models": [
                {"model": "ta", "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": "ct_sft", "parameters": {"weight": 0.6, "density": 0.7}},
            ],
        },
        {
            "name": "ta",
            "merge_method": "task_arithmetic",
            "base_model": p["base"],
            "dtype": "float32",
            "models": [
                {"model": "ct_sft", "parameters": {"weight": 0.8}},
                {"model": p["sft"], "parameters": {"weight": 0.3}},
            ],
        },
        {
            "name": "ct_sft",
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": p["ct"], "parameters": {"weight": 0.5}},
                {"model": p["sft"], "parameters": {"weight": 0.5}},
            ],
        },
    ]


def _write(path: Path, documents: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(documents))
    return path


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def test_equal_to_mergekit_multi(trio, tmp_path):
    recipe = _write(tmp_path / "multi.yaml", _documents(trio))
    subprocess.run(
        [
            mergekit_exe("mergekit-multi"),
            str(recipe),
            "--intermediate-dir",
            str(tmp_path / "mk-int"),
            "--out-path",
            str(tmp_path / "mk"),
        ],
        check=True,
        capture_output=True,
    )
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    out = tmp_path / "lm"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["ct_sft", "ta"]
    for ours, theirs in (
        (out, tmp_path / "mk"),
        (out / "ta", tmp_path / "mk-int" / "ta"),
        (out / "ct_sft", tmp_path / "mk-int" / "ct_sft"),
    ):
        a, b = _tensors(ours), _tensors(theirs)
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (ours, key)

    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # the final model loads from OUT_DIR
    pinned = yaml.safe_load((out / "langmerge_recipe.yaml").read_text())
    assert pinned["models"][0]["model"] == str(out / "ta")


KILL_SECOND = textwrap.dedent("""
    import os, signal, sys
    from langmerge.merge import execute
    real, calls = execute._merge, []
    def killing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    execute._merge = killing
    from langmerge.cli import main
    sys.exit(main(["merge", sys.argv[1], sys.argv[2], "--no-progress"]))
""")


def test_killed_after_the_first_document_and_rerun(trio, tmp_path, monkeypatch):
    recipe = _write(tmp_path / "multi.yaml", _documents(trio))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", KILL_SECOND, str(recipe), str(out)], capture_output=True)
    assert run.returncode == -9
    assert (
        (out / "ct_sft" / "config.json").exists() and not (out / "ta").exists() and not (out / "config.json").exists()
    )
    first = (out / "ct_sft" / "model.safetensors").stat()

    real, merged = execute._merge, []
    monkeypatch.setattr(
        execute, "_merge", lambda recipe, out_dir, *a: merged.append(out_dir) or real(recipe, out_dir, *a)
    )
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0
    assert merged == [out / "ta", out]  # the finished intermediate is reused
    assert (out / "ct_sft" / "model.safetensors").stat().st_ino == first.st_ino
    golden = tmp_path / "golden"
    merge(str(recipe), golden, progress=False)
    for key, value in _tensors(golden).items():
        assert torch.equal(_tensors(out)[key], value), key

    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 2  # finished: replaced only with --force
    merged.clear()
    assert main(["merge", str(recipe), str(out), "--no-progress", "--force"]) == 0
    assert merged == [out / "ct_sft", out / "ta", out]


def test_documents_are_checked_together_before_any_merge(trio, tmp_path):
    docs = _documents(trio)
    docs[1]["models"][0]["parameters"]["weight"] = "x"
    docs[2]["dtype"] = "f8"
    with pytest.raises(LangmergeError) as info:
        merge(str(_write(tmp_path / "bad.yaml", docs)), tmp_path / "out", progress=False)
    assert "2 recipe errors" in str(info.value) and "[ta]" in str(info.value) and "[ct_sft]" in str(info.value)
    assert not (tmp_path / "out").exists()
    cycle = [
        {**docs[1], "models": [{"model": "ct_sft", "parameters": {"weight": 1.0}}]},
        {**_documents(trio)[2], "models": [{"model": "ta", "parameters": {"weight": 1.0}}]},
    ]
    with pytest.raises(LangmergeError, match=r"cycle \((ta -> ct_sft -> ta|ct_sft -> ta -> ct_sft)\)"):
        merge(str(_write(tmp_path / "cycle.yaml", cycle)), tmp_path / "out", progress=False)
    two = [{k: v for k, v in d.items() if k != "name"} for d in _documents(trio)[1:]]
    with pytest.raises(LangmergeError, match="both have no 'name'"):
        merge(str(_write(tmp_path / "two.yaml", two)), tmp_path / "out", progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(
        LangmergeError, match=r"already exists and holds files this recipe does not write \(notes.txt\)"
    ):
        merge(str(_write(tmp_path / "ok.yaml", _documents(trio))), foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine" and not (foreign / "ct_sft").exists()


def test_named_documents_only_fill_out_dir_and_a_finished_rerun_needs_force(trio, tmp_path):
    docs = _documents(trio)[1:]  # ta and ct_sft, no final merge
    recipe = _write(tmp_path / "named.yaml", docs)
    merge(str(recipe), tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ct_sft", "ta"]
    with pytest.raises(LangmergeError, match="already holds every document's merge; pass --force"):
        merge(str(recipe), tmp_path / "out", progress=False)
    inside = tmp_path / "out" / "again.yaml"
    shutil.copy(recipe, inside)
    with pytest.raises(LangmergeError, match="again.yaml"):  # the recipe file may not lie inside OUT_DIR
        merge(str(inside), tmp_path / "out", progress=False, force=True)
