"""The options of ``eval`` and ``tune`` are models (EvalOptions, TuneOptions): every field is a flag with its
default in --help, the settings both commands (and a study) have are declared once and parse alike.

The tests walk the models' fields, so a field added to a model is covered without a new test.
"""

from __future__ import annotations

import argparse
import json

import pytest

from langmerge.cli import build_parser, main
from langmerge.cli_options import field_help, model_flags, model_from_args
from langmerge.evaluation import EvalOptions
from langmerge.study.config import EvaluationSpec, TuningSpec
from langmerge.tuning.options import TuneOptions
from output_helpers import error_lines

ARGV = {
    "eval": ["eval", "m"],
    "tune": ["tune", "r.yaml", "--space", "s.yaml", "--tasks", "x", "-o", "o"],
}
MODELS = {"eval": EvalOptions, "tune": TuneOptions}


def _compact(text: str) -> str:
    return " ".join(text.split())


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("command", list(MODELS))
def test_help_lists_every_option_with_its_default(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = _compact(capsys.readouterr().out)
    for path, flag in model_flags(MODELS[command]).items():
        info = MODELS[command].model_fields[path[0]]
        assert flag in text, flag
        if flag != "--device":  # the shared --device flag has the help every command gives it
            assert _compact(field_help(info)) in text, flag


def test_eval_help_says_what_it_said_before():
    parser = _commands()["eval"]
    text = _compact(parser.format_help())
    for expected in (
        "--batch-size BATCH_SIZE examples per forward pass (default: 16 examples)",
        "--limit N evaluate only the first N examples of each task (default: every example)",
        "--few-shot N few-shot examples per prompt, for every task (default: each task's own)",
        "--max-length MAX_LENGTH max tokens per sequence (default: the model's)",
        "--seed SEED seed of the few-shot selection (default: 0)",
        "--dtype {float32,bfloat16,float16} dtype the weights are loaded in (default: the checkpoint's)",
        "--precision {fp32,bf16} bf16: matrix products in bfloat16 (torch.autocast)",
        "--device DEVICE cpu, cuda, cuda:N or mps",
    ):
        assert expected in text, expected


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", list(MODELS))
def test_no_flag_gives_the_models_defaults(command):
    assert model_from_args(_parse(ARGV[command]), MODELS[command]) == MODELS[command]()


# A value per field other than its default, as flags.
EVAL_GIVEN = {
    "few_shot": (["--few-shot", "0"], 0),
    "batch_size": (["--batch-size", "3"], 3),
    "limit": (["--limit", "5"], 5),
    "chat_template": (["--chat-template"], True),
    "max_length": (["--max-length", "64"], 64),
    "seed": (["--seed", "7"], 7),
    "device": (["--device", "cpu"], "cpu"),
    "dtype": (["--dtype", "bfloat16"], "bfloat16"),
    "precision": (["--precision", "bf16"], "bf16"),
}
TUNE_GIVEN = {
    "search": (["--search", "tpe"], "tpe"),
    "trials": (["--trials", "12"], 12),
    "seed": (["--seed", "3"], 3),
    "metric": (["--metric", "chrf"], "chrf"),
    "limit": (["--limit", "9"], 9),
    "few_shot": (["--few-shot", "2"], 2),
    "batch_size": (["--batch-size", "4"], 4),
    "device": (["--device", "cpu"], "cpu"),
}


@pytest.mark.parametrize(("command", "given"), [("eval", EVAL_GIVEN), ("tune", TUNE_GIVEN)])
def test_every_flag_reaches_its_field(command, given):
    assert set(given) == set(MODELS[command].model_fields)
    for name, (words, value) in given.items():
        options = model_from_args(_parse([*ARGV[command], *words]), MODELS[command])
        assert getattr(options, name) == value, name
        others = {n for n in MODELS[command].model_fields if n != name}
        assert options.model_dump(include=others) == MODELS[command]().model_dump(include=others), name


def test_tune_scores_each_candidate_with_its_evaluation_options():
    options = TuneOptions(seed=3, limit=9, few_shot=2, batch_size=4)
    assert options.eval_options() == EvalOptions(seed=3, limit=9, few_shot=2, batch_size=4)


# The settings eval, tune and a study's sections share: the same words parse to the same value, and the same
# bad value is refused with the same message, everywhere.
SHARED = {
    "--batch-size": (["5"], 5, ["0"], "must be at least 1, got 0"),
    "--limit": (["7"], 7, ["-3"], "must be at least 1, got -3"),
    "--few-shot": (["2"], 2, ["-1"], "must be at least 0, got -1"),
}


@pytest.mark.parametrize("flag", list(SHARED))
def test_shared_options_parse_and_refuse_alike_in_eval_and_tune(flag, tmp_path, monkeypatch, capsys):
    words, value, bad, message = SHARED[flag]
    dest = flag.lstrip("-").replace("-", "_")
    for command, model in MODELS.items():
        assert getattr(model_from_args(_parse([*ARGV[command], flag, *words]), model), dest) == value
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as exit_info:
            main([*ARGV[command], flag, *bad])
        assert exit_info.value.code == 2
        assert error_lines(capsys.readouterr().err) == [
            f"langmerge {command}: error: argument {flag}: {message} (see langmerge {command} --help)"
        ]
    # A study's evaluation and tuning sections check the same fields the same way.
    for section, key in ((EvaluationSpec, "limit"), (EvaluationSpec, "batch_size"), (TuningSpec, "limit")):
        if key == dest:
            with pytest.raises(ValueError, match=r"greater than or equal to 1"):
                section.model_validate({key: 0})


def test_a_whole_number_flag_refuses_other_words(capsys):
    with pytest.raises(SystemExit):
        main([*ARGV["eval"], "--batch-size", "two"])
    assert error_lines(capsys.readouterr().err) == [
        "langmerge eval: error: argument --batch-size: expected a whole number of at least 1, got 'two' "
        "(see langmerge eval --help)"
    ]


def test_eval_writes_the_options_it_was_given(tiny_model_dir, tmp_path, capsys):
    """The flags reach evaluate: results.json records them (as it did before the flags came from a model)."""
    out = tmp_path / "out"
    argv = ["eval", str(tiny_model_dir), "--tasks", "next_day_en", "--out", str(out), "--no-progress"]
    assert main([*argv, "--limit", "3", "--batch-size", "2", "--few-shot", "1", "--seed", "4"]) == 0
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings == {
        "few_shot": 1,
        "batch_size": 2,
        "limit": 3,
        "chat_template": False,
        "max_length": None,
        "seed": 4,
        "precision": "fp32",
    }
    assert json.loads((out / "results.json").read_text())["tasks"]["next_day_en"]["n"] == 3
