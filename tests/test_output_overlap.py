"""An output that equals, contains or lies inside an input is refused, with or without --force.

Every command that writes is tried with an OUT_DIR on top of each kind of input it reads. Each row
asserts the exit code, the one-line message, and that everything under the test's folder (inputs
and all) is byte-for-byte as before: nothing deleted, nothing half-written.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from langmerge.cli import main
from langmerge.synthetic import LlamaShape, make_trio, write_model
from output_helpers import error_lines, snapshot
from study_helpers import study_dict, write_inputs, write_study

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1)
IS, INSIDE, CONTAINS = "is", "is inside", "contains"


def _message(out, relation, given) -> str:
    return (
        f"langmerge: error: output {out} {relation} the input {given}; write the output somewhere apart from the inputs"
    )


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Models, a LoRA adapter folder, a Hugging Face cache snapshot, data files and recipes, under one root."""
    root = tmp_path / "root"
    m = make_trio(root / "models", SHAPE)
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    # A cache snapshot: its files are symlinks into the repository's blobs/.
    repo = root / "hub" / "models--org--ct"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(m["ct"].iterdir()):
        (repo / "blobs" / f.name).write_bytes(f.read_bytes())
        os.symlink(f"../../blobs/{f.name}", snap / f.name)
    os.symlink(m["sft"], root / "sft-link")
    data = root / "data"
    data.mkdir()
    (data / "ta.txt").write_text("வணக்கம் உலகம்\n" * 20)
    (data / "sft.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{i}?", "response": f"{i}!"}) + "\n" for i in range(4))
    )
    (data / "val.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    (data / "val.yaml").write_text(yaml.safe_dump({"name": "val_bpc", "kind": "bits_per_char", "data": "val.jsonl"}))
    (data / "space.yaml").write_text(yaml.safe_dump({"models[0].parameters.density": {"values": [0.5]}}))

    def recipe(name, models, base=m["base"], method="ties"):
        doc = {
            "merge_method": method,
            "base_model": str(base),
            "dtype": "float32",
            "models": [
                {"model": str(p), "parameters": {"weight": 1.0, **({"density": 0.5} if method == "ties" else {})}}
                for p in models
            ],
        }
        (root / name).write_text(yaml.safe_dump(doc))
        return root / name

    w = {
        **m,
        "root": root,
        "adapter": adapter,
        "snapshot": snap,
        "blobs": repo / "blobs",
        "sft_link": root / "sft-link",
        "state_base": write_model(root / "run.train-state", SHAPE),  # a model named like OUT's run state
        "data": data,
        "text": data / "ta.txt",
        "sft_data": data / "sft.jsonl",
        "task": data / "val.yaml",
        "space": data / "space.yaml",
        "recipe": recipe("r.yaml", [m["ct"], m["sft"]]),
        "lora": recipe("lora.yaml", [adapter, m["sft"]], method="linear"),
        "hub": recipe("hub.yaml", [snap, m["sft"]]),
        "link": recipe("link.yaml", [m["ct"], root / "sft-link"]),
    }
    monkeypatch.chdir(tmp_path)
    return w


def _merge(recipe):
    return lambda w, out: ["merge", w[recipe], out, "--no-progress"]


def _analyze(w, out):
    return ["analyze", w["recipe"], "-o", out, "--no-progress"]


def _tune(w, out):
    return ["tune", w["recipe"], "--space", w["space"], "--tasks", w["task"], "-o", out, "--no-progress"]


def _eval(w, out):
    return ["eval", w["base"], "--tasks", w["task"], "--out", out, "--no-progress"]


def _train_ct_from(base):
    return lambda w, out: [
        "train",
        "ct",
        "--base",
        w[base],
        "--text",
        w["text"],
        "--tokens",
        "50",
        "--seq-len",
        "32",
        "--out",
        out,
        "--no-progress",
    ]


_train_ct = _train_ct_from("base")


def _train_sft(w, out):
    return [
        "train",
        "sft",
        "--base",
        w["base"],
        "--data",
        w["sft_data"],
        "--seq-len",
        "32",
        "--out",
        out,
        "--no-progress",
    ]


# case -> (argv(world, OUT), OUT(world), (output named, relation, input named)(world, OUT))
OVERLAPS = {
    "merge: OUT is the base": (_merge("recipe"), lambda w: w["base"], lambda w, o: (o, IS, w["base"])),
    "merge: OUT inside a CT model": (_merge("recipe"), lambda w: w["ct"] / "merged", lambda w, o: (o, INSIDE, w["ct"])),
    "merge: OUT contains the models": (
        _merge("recipe"),
        lambda w: w["base"].parent,
        lambda w, o: (o, CONTAINS, w["base"]),
    ),
    "merge: OUT contains the recipe": (_merge("recipe"), lambda w: w["root"], lambda w, o: (o, CONTAINS, w["recipe"])),
    "merge: OUT is a LoRA adapter": (_merge("lora"), lambda w: w["adapter"], lambda w, o: (o, IS, w["adapter"])),
    "merge: OUT is a LoRA adapter's base": (_merge("lora"), lambda w: w["base"], lambda w, o: (o, IS, w["base"])),
    "merge: OUT is a symlinked model's target": (
        _merge("link"),
        lambda w: w["sft"],
        lambda w, o: (o, IS, w["sft_link"]),
    ),
    "merge: OUT is a cache snapshot's blobs": (
        _merge("hub"),
        lambda w: w["blobs"],
        lambda w, o: (o, INSIDE, w["snapshot"]),
    ),
    "analyze: OUT is the SFT model": (_analyze, lambda w: w["sft"], lambda w, o: (o, IS, w["sft"])),
    "tune: OUT is the base": (_tune, lambda w: w["base"], lambda w, o: (o, IS, w["base"])),
    "tune: OUT contains the space file": (_tune, lambda w: w["data"], lambda w, o: (o, CONTAINS, w["space"])),
    "eval: OUT is the model": (_eval, lambda w: w["base"], lambda w, o: (o, IS, w["base"])),
    "eval: OUT inside the model": (_eval, lambda w: w["base"] / "eval", lambda w, o: (o, INSIDE, w["base"])),
    "train ct: OUT is --base": (_train_ct, lambda w: w["base"], lambda w, o: (o, IS, w["base"])),
    "train ct: OUT contains the text": (_train_ct, lambda w: w["data"], lambda w, o: (o, CONTAINS, w["text"])),
    # OUT's run state, OUT.train-state beside it, would be the base model folder.
    "train ct: OUT's run state is --base": (
        _train_ct_from("state_base"),
        lambda w: w["root"] / "run",
        lambda w, o: (w["state_base"], IS, w["state_base"]),
    ),
    "train sft: OUT contains the data": (_train_sft, lambda w: w["data"], lambda w, o: (o, CONTAINS, w["sft_data"])),
}


@pytest.mark.parametrize("force", [False, True], ids=["", "--force"])
@pytest.mark.parametrize("case", list(OVERLAPS))
def test_output_overlapping_an_input_is_refused(world, capsys, case, force):
    argv, out_of, named = OVERLAPS[case]
    out = out_of(world)
    before = snapshot(world["root"])
    capsys.readouterr()
    code = main([str(a) for a in argv(world, out)] + (["--force"] if force else []))
    assert (code, error_lines(capsys.readouterr().err)) == (2, [_message(*named(world, out))])
    assert snapshot(world["root"]) == before


def test_study_out_overlapping_its_inputs_is_refused(tmp_path, capsys, monkeypatch):
    root = tmp_path / "in"
    write_inputs(root)
    for out, relation, given in [
        (root, CONTAINS, root / "study.yaml"),
        (root / "base", IS, root / "base"),
        (root / "base" / "runs", INSIDE, root / "base"),
    ]:
        cfg = write_study(root / "study.yaml", study_dict(root, out))
        before = snapshot(tmp_path)
        capsys.readouterr()
        assert main(["study", str(cfg), "--no-progress"]) == 2
        assert error_lines(capsys.readouterr().err) == [_message(out, relation, given)]
        assert snapshot(tmp_path) == before
