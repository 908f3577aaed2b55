"""``langmerge train ct|sft`` on the command line: a run, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from langmerge.cli import main
from train_helpers import ENGLISH, TAMIL, tiny_base, write_lines

FAST = ["--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"{i}?", "response": f"{i}!"}) + "\n" for i in range(8)))
    return {
        "base": tiny_base(root / "base"),
        "ta": write_lines(root / "ta.txt", TAMIL, repeat=10),
        "en": write_lines(root / "en.txt", ENGLISH, repeat=10),
        "sft": sft,
    }


def _error(capsys, argv) -> str:
    capsys.readouterr()  # drop what earlier commands wrote
    assert main([*argv, "--seq-len", "32"] if argv[0] == "train" and "--seq-len" not in argv else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("langmerge: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_ct_then_sft_on_the_command_line(files, tmp_path, capsys):
    ct = tmp_path / "ct"
    argv = [
        "train",
        "ct",
        "--base",
        str(files["base"]),
        "--text",
        str(files["ta"]),
        "--tokens",
        "0.6k",
        "--save-at",
        "200,400",
        "--replay",
        str(files["en"]),
        "--replay-ratio",
        "4:1",
        "--out",
        str(ct),
        *FAST,
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "600 target, 150 replay" in out and "tokens-200" in out
    assert json.loads((ct / "tokens-400" / "langmerge_training.json").read_text())["tokens"]["total"] == 500
    assert (
        main(["train", "sft", "--base", str(ct), "--data", str(files["sft"]), "--out", str(tmp_path / "ct_sft"), *FAST])
        == 0
    )
    assert json.loads((tmp_path / "ct_sft" / "langmerge_training.json").read_text())["base"] == str(ct)
    # The existing output is refused without --force, and replaced with it.
    err = _error(capsys, argv)
    assert f"output {ct} already exists; pass --force" in err
    assert main([*argv, "--force"]) == 0


def test_python_dash_m_runs_the_command(files, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "langmerge",
            "train",
            "ct",
            "--base",
            str(files["base"]),
            "--text",
            str(files["ta"]),
            "--tokens",
            "100",
            "--out",
            str(tmp_path / "ct"),
            *FAST,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ct" / "model.safetensors").is_file()


def test_bad_input_is_one_line_and_exit_code_2(files, tmp_path, capsys):
    base, out = str(files["base"]), str(tmp_path / "out")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "empty.txt: no text" in _error(
        capsys, ["train", "ct", "--base", base, "--text", str(empty), "--tokens", "10", "--out", out]
    )
    assert "missing.txt: unreadable" in _error(
        capsys, ["train", "ct", "--base", base, "--text", str(tmp_path / "missing.txt"), "--tokens", "10", "--out", out]
    )
    err = _error(capsys, ["train", "ct", "--base", base, "--text", str(files["ta"]), "--tokens", "1M", "--out", out])
    held = sum(len(line) + 2 for line in TAMIL * 10)  # one token per character, plus <s> and </s> per line
    assert "1,000,000 tokens is larger than the data" in err and f"hold {held:,} tokens" in err and "--repeat" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"question": "a"}) + "\n")
    assert f"{bad}:2: needs string fields 'prompt' and 'response'" in _error(
        capsys, ["train", "sft", "--base", base, "--data", str(bad), "--out", out]
    )
    (tmp_path / "not_a_model").mkdir()  # beside the output: an output inside --base is refused before this check
    assert "not a model folder" in _error(
        capsys, ["train", "sft", "--base", str(tmp_path / "not_a_model"), "--data", str(files["sft"]), "--out", out]
    )
    assert "--merge-lora needs --lora" in _error(
        capsys, ["train", "sft", "--base", base, "--data", str(files["sft"]), "--out", out, "--merge-lora"]
    )
    assert "sequence length 512 exceeds" in _error(
        capsys,
        ["train", "ct", "--base", base, "--text", str(files["ta"]), "--tokens", "10", "--out", out, "--seq-len", "512"],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.txt", "not_a_model"]


def test_repeat_lets_the_budget_exceed_the_data(files, tmp_path, capsys):
    argv = [
        "train",
        "ct",
        "--base",
        str(files["base"]),
        "--text",
        str(files["en"]),
        "--tokens",
        "2k",
        "--repeat",
        "--out",
        str(tmp_path / "ct"),
        *FAST,
    ]
    assert main(argv) == 0
    assert "2,000 target" in capsys.readouterr().out
