"""Whole-model merges: agreement with mergekit-yaml, the output folder, bad input, atomicity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import langmerge
from ckpt_helpers import mergekit_yaml
from langmerge.cli import main
from langmerge.io.reader import CheckpointReader
from langmerge.io.safetensors_format import read_header
from langmerge.io.writer import ShardedWriter, write_state_dict
from langmerge.merge import execute
from langmerge.methods import fused_cpu
from langmerge.synthetic import LlamaShape, make_trio

SHAPE = LlamaShape(hidden=64, intermediate=96, layers=3, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("trio"), SHAPE)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


RECIPES = {
    "ties_gradients_filters": lambda p: {
        "merge_method": "ties",
        "base_model": str(p["base"]),
        "models": [
            {"model": str(p["ct"]), "parameters": {"weight": [0.2, 1.0], "density": 0.4}},
            {
                "model": str(p["sft"]),
                "parameters": {"weight": 0.8, "density": [{"filter": "mlp", "value": 0.7}, {"value": 0.3}]},
            },
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
    "task_arithmetic": lambda p: {
        "merge_method": "task_arithmetic",
        "base_model": str(p["base"]),
        "models": [
            {"model": str(p["base"])},
            {"model": str(p["ct"]), "parameters": {"weight": 0.6}},
            {"model": str(p["sft"]), "parameters": {"weight": [1.0, 0.5, -0.25]}},
        ],
        "parameters": {"lambda": 0.9},
        "dtype": "float32",
    },
    "linear": lambda p: {
        "merge_method": "linear",
        "models": [
            {"model": str(p["ct"]), "parameters": {"weight": 0.3}},
            {"model": str(p["sft"]), "parameters": {"weight": 0.7}},
        ],
        "dtype": "float32",
    },
}


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_whole_model_identical_to_mergekit_yaml(trio, tmp_path, name, fused, monkeypatch):
    # the test model's tensors are small: lower the size from which the fused CPU kernel takes over
    monkeypatch.setattr(fused_cpu, "MIN_NUMEL", 1 if fused else 1 << 62)
    recipe = _write_recipe(tmp_path / "recipe.yaml", RECIPES[name](trio))
    subprocess.run([mergekit_yaml(), str(recipe), str(tmp_path / "mk")], check=True, capture_output=True)
    assert main(["merge", str(recipe), str(tmp_path / "lm"), "--no-progress"]) == 0
    theirs, ours = _weights(tmp_path / "mk"), _weights(tmp_path / "lm")
    assert set(theirs) == set(ours)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


def test_output_folder_loads_generates_and_describes_itself(trio, tmp_path):
    recipe = {
        "merge_method": "ties_sv",
        "base_model": str(trio["base"]),
        "models": [
            {"model": str(trio["ct"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(trio["sft"]), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "parameters": {"slack": 0.5, "protect": [str(trio["sft"])]},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    out = tmp_path / "merged"
    # a tiny shard size forces several shards and an index
    report = langmerge.merge(recipe, out, shard_bytes=20_000, progress=False)
    assert report.tensors == len(_weights(trio["base"]))
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert name in files, name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert (
        "base_model" not in front
    )  # local folders are not Hub ids; the Hub's model tree needs ids (tests/test_hub.py)
    assert f"Base model: `{trio['base']}`" in card and f"- `{trio['ct']}`" in card
    assert "ties_sv" in front["tags"]
    assert yaml.safe_load((out / "langmerge_recipe.yaml").read_text())["merge_method"] == "ties_sv"

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ids = tok("abc", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 5
    # the loaded weights are the ones written
    state = model.state_dict()
    for key, value in _weights(out).items():
        assert torch.equal(state[key], value), key


def test_dare_is_reproducible_by_seed(trio, tmp_path):
    def recipe(seed):
        return {
            "merge_method": "dare_ties",
            "base_model": str(trio["base"]),
            "models": [
                {"model": str(trio["ct"]), "parameters": {"weight": 1.0, "density": 0.3}},
                {"model": str(trio["sft"]), "parameters": {"weight": 1.0, "density": 0.6}},
            ],
            "parameters": {"seed": seed},
        }

    langmerge.merge(recipe(1), tmp_path / "a", progress=False)
    langmerge.merge(recipe(1), tmp_path / "b", progress=False)
    langmerge.merge(recipe(2), tmp_path / "c", progress=False)
    a, b, c = (_weights(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # DARE keeps about `density` of each task vector
    base, ct = _weights(trio["base"]), _weights(trio["ct"])
    key = "model.layers.1.mlp.up_proj.weight"
    langmerge.merge(
        {**recipe(1), "merge_method": "dare_linear", "models": recipe(1)["models"][:1]}, tmp_path / "d", progress=False
    )
    kept = (_weights(tmp_path / "d")[key] != base[key]).float().mean()
    assert abs(float(kept) - 0.3) < 0.03
    assert not torch.equal(ct[key], base[key])


def _run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _base_recipe(trio, **over):
    recipe = {
        "merge_method": "ties",
        "base_model": str(trio["base"]),
        "models": [
            {"model": str(trio["ct"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(trio["sft"]), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
    }
    recipe.update(over)
    return recipe


def _broken_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    weights = _weights(dst)
    edit(weights)
    (dst / "model.safetensors").unlink()
    write_state_dict(dst, weights)
    return dst


BAD_INPUT = {
    "missing model": (lambda t, d: _base_recipe(t, base_model=str(d / "nope")), "does not exist"),
    "unknown method": (lambda t, d: _base_recipe(t, merge_method="slerpy"), "unknown method 'slerpy'"),
    "unknown key": (lambda t, d: {**_base_recipe(t), "colour": 1}, "'colour'"),
    "missing key": (lambda t, d: {k: v for k, v in _base_recipe(t).items() if k != "models"}, "'models' is required"),
    "slices": (lambda t, d: {**_base_recipe(t), "slices": []}, "'slices'"),
    "density above 1": (
        lambda t, d: _base_recipe(t, models=[{"model": str(t["ct"]), "parameters": {"weight": 1, "density": 1.5}}]),
        "density",
    ),
    "negative slack": (
        lambda t, d: _base_recipe(t, merge_method="ties_sv", parameters={"slack": -1, "protect": [str(t["sft"])]}),
        "slack",
    ),
    "slack without protect": (lambda t, d: _base_recipe(t, merge_method="ties_sv", parameters={"slack": 1}), "protect"),
    "protect unknown model": (
        lambda t, d: _base_recipe(t, merge_method="ties_sv", parameters={"slack": 1, "protect": ["sft"]}),
        "'sft' is not one of the merged models",
    ),
    "weight not a number": (
        lambda t, d: _base_recipe(t, models=[{"model": str(t["ct"]), "parameters": {"weight": "heavy"}}]),
        "weight",
    ),
    "unknown parameter": (lambda t, d: _base_recipe(t, parameters={"densty": 0.5}), "densty"),
    "bad dtype": (lambda t, d: _base_recipe(t, dtype="float8"), "dtype"),
    "missing tensor": (
        lambda t, d: _base_recipe(
            t,
            models=[
                {
                    "model": str(_broken_copy(t["ct"], d / "ct_missing", lambda w: w.pop("model.norm.weight"))),
                    "parameters": {"weight": 1.0},
                }
            ],
        ),
        "'model.norm.weight' is missing",
    ),
    "shape mismatch": (
        lambda t, d: _base_recipe(
            t,
            models=[
                {
                    "model": str(
                        _broken_copy(t["ct"], d / "ct_shape", lambda w: w.update({"model.norm.weight": torch.ones(65)}))
                    ),
                    "parameters": {"weight": 1.0},
                }
            ],
        ),
        "shape [65]",
    ),
    "nan input": (
        lambda t, d: _base_recipe(
            t,
            models=[
                {
                    "model": str(
                        _broken_copy(
                            t["sft"],
                            d / "sft_nan",
                            lambda w: w["model.layers.1.mlp.up_proj.weight"].__setitem__((0, 0), float("nan")),
                        )
                    ),
                    "parameters": {"weight": 1.0, "density": 0.5},
                }
            ],
        ),
        "'model.layers.1.mlp.up_proj.weight' contains NaN or Inf",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(trio, tmp_path, capsys, case):
    make, expected = BAD_INPUT[case]
    recipe = _write_recipe(tmp_path / "recipe.yaml", make(trio, tmp_path))
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    code, err = _run_cli(["merge", str(recipe), str(out), "--no-progress"], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("langmerge: error:"), err
    assert expected in err[0], err[0]
    assert not out.exists()
    assert set(tmp_path.iterdir()) == before  # no temporary folder left behind


def test_malformed_yaml_names_the_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: [ties\n")
    code, err = _run_cli(["merge", str(recipe), str(tmp_path / "o")], capsys)
    assert code == 2 and str(recipe) in err[0]


def test_existing_output_needs_force(trio, tmp_path, capsys):
    recipe = _write_recipe(tmp_path / "r.yaml", _base_recipe(trio))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = _run_cli(["merge", str(recipe), str(out), "--no-progress"], capsys)
    assert code == 2 and "--force" in err[0]
    assert (out / "keep.txt").read_text() == "precious"
    assert _run_cli(["merge", str(recipe), str(out), "--no-progress", "--force"], capsys)[0] == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]


def test_interrupted_merge_leaves_no_output(trio, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = execute.FileSink.commit

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 10:  # ^C with chunks read ahead and writes in flight
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(execute.FileSink, "commit", flaky)
    with pytest.raises(KeyboardInterrupt):
        langmerge.merge(_base_recipe(trio), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_index_and_header_are_read_lazily(trio, tmp_path, monkeypatch):
    """Opening a sharded folder reads its index and headers only; each tensor's bytes are read when asked for."""
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in trio["base"].iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, sharded / f.name)
    direct = _weights(trio["base"])
    write_state_dict(sharded, direct, max_shard_bytes=50_000)
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1
    read_bytes = []
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset):
        got = real_preadv(fd, buffers, offset)
        read_bytes.append(got)
        return got

    monkeypatch.setattr(os, "preadv", counting_preadv)  # the reader's only way to a tensor's bytes
    reader = CheckpointReader(sharded)
    assert read_bytes == []  # opening read no tensor data
    assert len({e.file for e in reader.entries.values()}) == len(shards)
    assert set(reader.names) == set(direct)
    for name, t in direct.items():
        assert reader.shape(name) == tuple(t.shape) and reader.dtype(name) == t.dtype
    assert read_bytes == []  # nor did asking for shapes and dtypes
    # New values written in place after opening are what the reader returns: it kept no tensor bytes.
    changed = {name: t + 1 for name, t in direct.items()}
    for shard in shards:
        with open(shard, "r+b") as f:
            for name, entry in read_header(shard).items():
                f.seek(entry.begin)
                f.write(changed[name].reshape(-1).view(torch.uint8).numpy().tobytes())
    for name, t in changed.items():
        before = sum(read_bytes)
        assert torch.equal(reader.get(name), t), name
        assert sum(read_bytes) - before == t.numel() * t.element_size(), name  # this tensor's bytes, no more
    reader.close()


class _Recorder:
    """A reporter that keeps what it was told."""

    def __init__(self):
        self.calls = []

    def start(self, total):
        self.calls.append(("start", total))

    def advance(self, n, nbytes=0):
        self.calls.append(("advance", n, nbytes))

    def close(self):
        self.calls.append(("close",))


def test_progress_goes_to_the_reporter_passed_in(trio, tmp_path, capsys):
    recipe = RECIPES["ties_gradients_filters"](trio)
    recorder = _Recorder()
    report = langmerge.merge(recipe, tmp_path / "out", progress=False, reporter=recorder, memory=4 << 20)
    calls = recorder.calls
    tensors = len(_weights(trio["base"]))
    assert calls[0] == ("start", tensors) and calls[-1] == ("close",)
    advances = [c for c in calls if c[0] == "advance"]
    assert sum(c[1] for c in advances) == tensors == report.tensors
    # the bytes told are the merged tensors' bytes, chunk by chunk (bfloat16 out)
    merged = _weights(tmp_path / "out")
    assert sum(c[2] for c in advances) == sum(t.numel() * t.element_size() for t in merged.values())
    assert capsys.readouterr() == ("", "")  # nothing drawn by the library itself


def test_timings_count_waiting_for_the_writer_once(trio, tmp_path, monkeypatch):
    """With a slow disk the caller waits for write buffers: that is waiting, not computing, and counted once."""
    real = ShardedWriter.write_at

    def slow(self, name, start, values):
        time.sleep(0.004)
        return real(self, name, start, values)

    monkeypatch.setattr(ShardedWriter, "write_at", slow)
    monkeypatch.setattr(execute, "MIN_MEMORY", 64 << 10)
    monkeypatch.setattr(execute, "MIN_CHUNK_ELEMENTS", 64)
    report = langmerge.merge(RECIPES["task_arithmetic"](trio), tmp_path / "out", progress=False, memory=64 << 10)
    t = report.timings
    writes = t.write / 0.004  # at least this many chunks were written, each after a sleep
    assert writes > 50 and t.wait > 0.3 * t.write  # the caller did wait for the writer
    assert t.compute + t.wait <= report.seconds  # the caller's time, each second counted once
