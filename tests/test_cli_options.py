"""Options on the command line: bad values are one line and exit 2; --no-progress hides the libraries' bars too."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.utils import logging as tf_logging

from langmerge import merge
from langmerge.cli import main
from langmerge.errors import LangmergeError
from langmerge.synthetic import LlamaShape, make_trio, write_model
from output_helpers import error_lines, listing, snapshot, write_recipe

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, max_positions=128)


def _no_cuda(text: str) -> str:
    if not torch.cuda.is_available():
        return f"{text}: no CUDA GPU is available"
    count = torch.cuda.device_count()
    return f"{text}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})"


# (command, option, value) -> the message after "argument OPTION: "
BAD_OPTIONS = {
    ("merge", "--threads", "-1"): "must be at least 1, got -1",
    ("merge", "--threads", "0"): "must be at least 1, got 0",
    ("merge", "--threads", "two"): "expected a whole number of at least 1, got 'two'",
    ("merge", "--device", "foo"): "'foo': not a device; use cpu, cuda, cuda:N or mps",
    ("merge", "--device", "cpu:1"): "'cpu:1': not a device; use cpu, cuda, cuda:N or mps",
    ("merge", "--device", "cuda:99"): _no_cuda("cuda:99"),
    ("eval", "--device", "foo"): "'foo': not a device; use cpu, cuda, cuda:N or mps",
    ("eval", "--batch-size", "0"): "must be at least 1, got 0",
    ("tune", "--device", "tpu"): "'tpu': not a device; use cpu, cuda, cuda:N or mps",
    ("tune", "--limit", "-3"): "must be at least 1, got -3",
    ("analyze", "--device", "foo"): "'foo': not a device; use cpu, cuda, cuda:N or mps",
}
if not torch.cuda.is_available():
    BAD_OPTIONS[("merge", "--device", "cuda")] = _no_cuda("cuda")
    BAD_OPTIONS[("analyze", "--device", "cuda")] = _no_cuda("cuda")

ARGV = {
    "merge": ["merge", "r.yaml", "out"],
    "eval": ["eval", "model", "--tasks", "x", "--out", "out"],
    "tune": ["tune", "r.yaml", "--space", "s.yaml", "--tasks", "x", "-o", "out"],
    "analyze": ["analyze", "r.yaml", "-o", "out"],
}


@pytest.mark.parametrize("key", list(BAD_OPTIONS), ids=" ".join)
def test_bad_option_value_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, key):
    command, option, value = key
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*ARGV[command], option, value])
    assert exit_info.value.code == 2
    assert error_lines(capsys.readouterr().err) == [
        f"langmerge {command}: error: argument {option}: {BAD_OPTIONS[key]} (see langmerge {command} --help)"
    ]
    assert listing(tmp_path) == []


def test_missing_arguments_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "sft", "--base", "b"])
    assert exit_info.value.code == 2
    assert error_lines(capsys.readouterr().err) == [
        "langmerge train sft: error: the following arguments are required: --data, --out "
        "(see langmerge train sft --help)"
    ]


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_the_python_api_checks_threads_and_device_too(tmp_path, threads):
    models = make_trio(tmp_path / "m", SHAPE)
    with pytest.raises(LangmergeError, match=r"^threads .*: expected a whole number of at least 1$"):
        merge(write_recipe(tmp_path / "r.yaml", models), tmp_path / "out", threads=threads, progress=False)
    with pytest.raises(LangmergeError, match=r"^--device 'gpu': not a device; use cpu, cuda, cuda:N or mps$"):
        merge(write_recipe(tmp_path / "r.yaml", models), tmp_path / "out", device="gpu", progress=False)
    assert listing(tmp_path) == ["m", "r.yaml"]


LIBRARY_BARS = ("Loading weights", "Writing model shards")


@pytest.mark.parametrize("quiet", [False, True], ids=["bars", "--no-progress"])
def test_no_progress_hides_the_bars_of_transformers(tmp_path, capsys, quiet):
    """A real training run loads the base (from_pretrained) and saves the model (save_pretrained)."""
    base = write_model(tmp_path / "base", SHAPE)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}?", "response": f"{i}!"}) + "\n" for i in range(4)))
    argv = [
        "train",
        "sft",
        "--base",
        str(base),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--seq-len",
        "32",
        "--batch-size",
        "2",
    ]
    capsys.readouterr()
    assert main(argv + (["--no-progress"] if quiet else [])) == 0
    err = capsys.readouterr().err
    shown = [bar for bar in LIBRARY_BARS if bar in err]
    assert shown == ([] if quiet else list(LIBRARY_BARS)), err[-3000:]
    if quiet:
        assert "it/s" not in err and "step/s" not in err, err[-3000:]
    assert tf_logging.is_progress_bar_enabled()  # the library's setting is restored afterwards


def test_demo_keeps_its_work_folder_without_force(tmp_path, capsys):
    work = tmp_path / "demo"
    assert main(["demo", "--work-dir", str(work), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not [bar for bar in LIBRARY_BARS if bar in err], err[-3000:]
    before = snapshot(work)
    assert listing(work) == ["inputs", "merged"]
    assert main(["demo", "--work-dir", str(work), "--no-progress"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"langmerge: error: output {work / 'inputs'} already exists; pass --force to replace it"
    ]
    assert snapshot(work) == before
    assert main(["demo", "--work-dir", str(work), "--no-progress", "--force"]) == 0
    assert listing(work) == ["inputs", "merged"]
