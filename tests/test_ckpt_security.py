"""Untrusted checkpoints: index entries leaving the folder, corrupt files, pickle only on request."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch

from ckpt_helpers import SHAPE, load_state
from langmerge.cli import main
from langmerge.errors import LangmergeError
from langmerge.io.reader import CheckpointReader, open_checkpoint
from langmerge.merge import merge
from langmerge.synthetic import make_trio


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("sec"), SHAPE)


def _indexed_copy(src, dst, relative: str):
    """A copy of ``src`` whose index maps every tensor to ``relative``."""
    shutil.copytree(src, dst)
    names = list(load_state(src))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: relative for n in names}}))
    return dst


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_index_entry_leaving_folder_is_refused(trio, tmp_path, kind):
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(trio["base"] / "model.safetensors", outside)
    if kind == "dotdot":
        entry = "../outside.safetensors"
    elif kind == "absolute":
        entry = str(outside)
    else:
        entry = "shard.safetensors"
    folder = _indexed_copy(trio["base"], tmp_path / "model", entry)
    if kind == "symlink":
        os.symlink(outside, folder / "shard.safetensors")
    with pytest.raises(LangmergeError) as err:
        CheckpointReader(folder)
    assert repr(entry) in str(err.value) and "refused" in str(err.value)


def test_index_entry_inside_folder_is_accepted(trio, tmp_path):
    folder = _indexed_copy(trio["base"], tmp_path / "model", "model.safetensors")
    with CheckpointReader(folder) as reader:
        assert torch.equal(reader.get("model.norm.weight"), load_state(trio["base"])["model.norm.weight"])


def test_truncated_file_names_the_file(trio, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(trio["base"], folder)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(LangmergeError) as err:
        CheckpointReader(folder)
    assert str(path) in str(err.value) and "truncated" in str(err.value)


@pytest.mark.parametrize(
    "header", [b"{not json", b"[1, 2]", b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}']
)
def test_corrupt_header_names_the_file(tmp_path, header):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(LangmergeError) as err:
        CheckpointReader(tmp_path)
    assert str(path) in str(err.value) and "corrupt" in str(err.value)


def test_corrupt_file_in_cli_is_one_line_exit_2(trio, tmp_path, capsys):
    folder = tmp_path / "sft"
    shutil.copytree(trio["sft"], folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 12)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {trio['base']}\nmodels:\n  - model: {trio['ct']}\n"
        f"    parameters: {{weight: 1.0}}\n  - model: {folder}\n    parameters: {{weight: 1.0}}\n"
    )
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder / "model.safetensors") in err[0]
    assert not (tmp_path / "out").exists()


def _pickle_copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, dst / f.name)
    torch.save(load_state(src), dst / "pytorch_model.bin")
    return dst


def test_pickle_refused_without_flag_and_loaded_with_it(trio, tmp_path):
    ct_bin = _pickle_copy(trio["ct"], tmp_path / "ct_bin")
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(trio["base"]),
        "models": [
            {"model": str(ct_bin), "parameters": {"weight": 1.0}},
            {"model": str(trio["sft"]), "parameters": {"weight": 1.0}},
        ],
    }
    with pytest.raises(LangmergeError, match="--allow-pickle"):
        merge(recipe, tmp_path / "out", progress=False)
    merge(recipe, tmp_path / "out", progress=False, allow_pickle=True)
    expected_recipe = dict(
        recipe, models=[{"model": str(trio["ct"]), "parameters": {"weight": 1.0}}, recipe["models"][1]]
    )
    merge(expected_recipe, tmp_path / "expected", progress=False)
    got, expected = load_state(tmp_path / "out"), load_state(tmp_path / "expected")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    torch.save({"w": torch.zeros(2), "x": _Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(LangmergeError) as err:
        open_checkpoint(tmp_path, allow_pickle=True)
    assert "pytorch_model.bin" in str(err.value) and "weights_only" in str(err.value)
