"""The training options are one model: every field is a ``train`` flag, a study config key and an API argument.

The tests walk ``TrainOptions.model_fields``, so a field added to the model is covered without a new test.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from langmerge.cli import build_parser, main
from langmerge.cli_options import (
    ALLOW_PICKLE,
    DEVICE,
    FORCE,
    NO_PROGRESS,
    THREADS,
    field_help,
    model_flags,
    model_from_args,
)
from langmerge.study.config import STUDY_OWNED, StudySpec, StudyTrainOptions
from langmerge.training import LoraOptions, TrainOptions
from langmerge.training.options import SFT_ONLY
from output_helpers import error_lines
from study_helpers import study_dict

TRAIN_ARGV = {
    "ct": ["train", "ct", "--base", "b", "--out", "o", "--text", "t.txt", "--tokens", "1k"],
    "sft": ["train", "sft", "--base", "b", "--out", "o", "--data", "d.jsonl"],
}


def _other_value(name: str, info) -> tuple[list[str], object]:
    """A value other than the field's default: (its command-line words, the value the model should hold)."""
    annotation = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = args[0] if len(args) == 1 else annotation
    default = info.get_default(call_default_factory=True)
    if typing.get_origin(kind) is typing.Literal:
        choice = next(c for c in typing.get_args(kind) if c != default)
        return [choice], choice
    if name == "target_modules":
        return ["q_proj", "v_proj"], ("q_proj", "v_proj")
    if kind is bool or (isinstance(kind, type) and issubclass(kind, BaseModel)):
        return [], True
    if kind is int:
        value = (default or 0) + 3
        return [str(value)], value
    if kind is float:
        value = (default or 0.0) + 0.25
        return [repr(value)], value
    raise AssertionError(f"no test value for {name}: {annotation}")


def _fields(model: type[BaseModel], prefix: tuple[str, ...] = ()):
    for name, info in model.model_fields.items():
        yield (*prefix, name), info
        inner = [a for a in typing.get_args(info.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner:
            yield from _fields(inner[0], (*prefix, name))


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _get(model: BaseModel, path: tuple[str, ...]):
    for part in path:
        model = getattr(model, part)
    return model


@pytest.mark.parametrize("kind", ["ct", "sft"])
@pytest.mark.parametrize("path", [p for p, _ in _fields(TrainOptions)], ids=".".join)
def test_every_field_is_a_train_flag_and_reaches_the_model(kind, path):
    info = dict(_fields(TrainOptions))[path]
    words, value = _other_value(path[-1], info)
    flag = "--" + "-".join(path).replace("_", "-")
    assert model_flags(TrainOptions)[path] == flag
    needs = ["--lora"] if path[0] == "lora" and len(path) > 1 else []
    needs += ["--lora"] if path == ("merge_lora",) else []
    options = model_from_args(_parse([*TRAIN_ARGV[kind], *needs, flag, *words]), TrainOptions)
    got = _get(options, path)
    assert got is not None if value is True and path == ("lora",) else got == value, (path, got, value)
    # The Python API takes the same value under the same name.
    api = {path[0]: {path[1]: value}} if len(path) > 1 else {path[0]: {} if path == ("lora",) else value}
    if path == ("merge_lora",):
        api["lora"] = {}
    assert _get(TrainOptions.model_validate(api), path) == got


def test_no_flag_given_is_the_model_defaults():
    for argv in TRAIN_ARGV.values():
        assert model_from_args(_parse(argv), TrainOptions) == TrainOptions()
    assert TrainOptions().micro_batch_size == 8 and TrainOptions(batch_size=16).micro_batch_size == 16


@pytest.mark.parametrize("path", [p for p, _ in _fields(TrainOptions)], ids=".".join)
def test_every_field_is_a_study_training_key(tmp_path, path):
    info = dict(_fields(TrainOptions))[path]
    _, value = _other_value(path[-1], info)
    if path == ("lora",):
        value = {}
    section = {path[0]: {path[1]: value}} if len(path) > 1 else {path[0]: value}
    d = study_dict(tmp_path, tmp_path / "out", ct_training=section)
    d["sft"]["training"] = section
    if path[0] in STUDY_OWNED:
        with pytest.raises(ValidationError, match=f"{path[0]}: set by the study"):
            StudySpec.model_validate(d)
        return
    if path[0] in SFT_ONLY:
        with pytest.raises(ValidationError, match=f"{path[0]} applies to SFT"):
            StudySpec.model_validate(d)
        d["ct_training"] = {}
    spec = StudySpec.model_validate(d)
    for training in (spec.sft.training,) if path[0] in SFT_ONLY else (spec.ct_training, spec.sft.training):
        assert isinstance(training, TrainOptions)
        got = _get(training, path)
        assert got is not None if path == ("lora",) else got == value
        # What a step keeps as its settings reads back as the same options.
        assert StudyTrainOptions.model_validate(training.step_settings()) == training


def test_the_study_sets_merge_lora_and_checkpointing_and_keeps_its_micro_batch():
    plain = StudyTrainOptions(batch_size=16)
    assert plain.micro_batch_size == 8 and plain.checkpoint_every == 0 and not plain.merge_lora
    lora = StudyTrainOptions(lora={"rank": 4})
    assert lora.merge_lora and lora.lora == LoraOptions(rank=4) and lora.checkpoint_every == 0
    assert StudyTrainOptions(micro_batch_size=None, batch_size=4).micro_batch_size == 4


def test_step_settings_keep_the_keys_of_existing_caches():
    """The settings study caches were keyed by (the study's TrainSpec.model_dump()), written out by hand."""
    v1 = {
        "seq_len": 512,
        "batch_size": 8,
        "micro_batch_size": 8,
        "lr": 3e-5,
        "min_lr": 0.0,
        "warmup": 0.01,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": 0,
        "precision": "auto",
        "gradient_checkpointing": False,
        "lora": None,
        "deterministic": False,
    }
    assert StudyTrainOptions().step_settings() == v1
    lora = StudyTrainOptions(lora={"rank": 4, "alpha": 8}).step_settings()
    assert lora == v1 | {"lora": {"rank": 4, "alpha": 8, "dropout": 0.0}}
    # A field added since enters the settings (and so the key) only when it is not at its default.
    targeted = StudyTrainOptions(lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj"]}).step_settings()
    assert targeted["lora"] == {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ("q_proj",)}


def _compact(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("kind", ["ct", "sft"])
def test_train_help_lists_every_option_with_its_default_and_unit(kind, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", kind, "--help"])
    assert exit_info.value.code == 0
    text = _compact(capsys.readouterr().out)
    for path, info in _fields(TrainOptions):
        flag = model_flags(TrainOptions)[path]
        assert flag in text and _compact(field_help(info)) in text, flag
    for expected in (
        "--seq-len SEQ_LEN tokens per sequence (default: 512 tokens)",
        "all processes together (default: 8 sequences)",
        "gradient accumulation makes up the batch (default: the batch size)",
        "--lr LR peak learning rate (default: 3e-05)",
        "--precision {auto,fp32,bf16} auto: bf16 on GPU, fp32 on CPU (default: auto)",
        "--lora train LoRA adapters instead of every parameter (default: off)",
        "--lora-rank LORA_RANK rank of each adapter's two factors (default: 16)",
        "(0: only on stop) (default: 100 steps)",
    ):
        assert expected in text, expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seq-len", "1"], "argument --seq-len: must be at least 2, got 1"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["--lora", "--lora-dropout", "1.0"], "argument --lora-dropout: must be less than 1.0, got 1.0"),
        (["--seq-len", "two"], "argument --seq-len: expected a whole number of at least 2, got 'two'"),
        (["--lr", "fast"], "argument --lr: expected a number of at least 0.0, got 'fast'"),
    ],
)
def test_a_value_a_field_refuses_is_refused_while_parsing(tmp_path, monkeypatch, capsys, argv, message):
    """As argparse refuses any bad value: one line naming the command and the flag, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*TRAIN_ARGV["sft"], *argv])
    assert exit_info.value.code == 2
    assert error_lines(capsys.readouterr().err) == [
        f"langmerge train sft: error: {message} (see langmerge train sft --help)"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--merge-lora"], "--merge-lora needs --lora"),
        (["--lora-rank", "4"], "--lora-rank needs --lora"),
    ],
)
def test_a_check_across_fields_is_one_line_naming_the_flags(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main([*TRAIN_ARGV["sft"], *argv]) == 2
    assert error_lines(capsys.readouterr().err) == [f"langmerge: error: {message}"]
    assert list(tmp_path.iterdir()) == []


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _commands(sub, f"{prefix}{name} ")
                out |= nested or {f"{prefix}{name}": sub}
    return out


# Which commands take each shared flag.
SHARED = {
    FORCE.name: {"merge", "demo", "eval", "analyze", "tune", "study", "train ct", "train sft"},
    NO_PROGRESS.name: {"merge", "check", "demo", "eval", "analyze", "tune", "study", "train ct", "train sft"},
    ALLOW_PICKLE.name: {"merge", "check", "eval", "analyze", "tune", "study", "train ct", "train sft"},
    DEVICE.name: {"merge", "eval", "analyze", "tune"},
    THREADS.name: {"merge"},
}
SHARED_VALUES = {
    "--force": [],
    "--no-progress": [],
    "--allow-pickle": [],
    "--device": ["cpu"],
    "--threads": ["3"],
}
FLAGS = [FORCE, NO_PROGRESS, ALLOW_PICKLE, DEVICE, THREADS]


@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: f.name)
def test_shared_flags_parse_identically_in_every_command(flag):
    commands = _commands(build_parser())
    having = {}
    for name, parser in commands.items():
        actions = [a for a in parser._actions if flag.name in a.option_strings]
        if actions:
            having[name] = actions[0]
    assert set(having) == SHARED[flag.name]
    dest = flag.name.lstrip("-").replace("-", "_")
    parsed = set()
    for name, action in having.items():
        assert (action.dest, action.type, action.default, action.nargs, action.const) == (
            dest,
            flag.options.get("type"),
            flag.options.get("default", False),
            action.nargs,
            action.const,
        )
        assert type(action) is type(having[next(iter(having))])  # the same action everywhere
        words = _minimal_argv(name)
        absent = vars(commands[name].parse_args(words))[dest]
        given = vars(commands[name].parse_args([*words, flag.name, *SHARED_VALUES[flag.name]]))[dest]
        parsed.add((absent, given))
    assert len(parsed) == 1, parsed  # every command reads the flag, and its absence, as the same value


def _minimal_argv(command: str) -> list[str]:
    """Arguments that satisfy the command's required ones (after its name)."""
    return {
        "merge": ["r.yaml", "out"],
        "check": ["r.yaml"],
        "demo": [],
        "eval": ["m"],
        "analyze": ["r.yaml", "-o", "o"],
        "tune": ["r.yaml", "--space", "s.yaml", "--tasks", "x", "-o", "o"],
        "study": ["s.yaml"],
        "train ct": TRAIN_ARGV["ct"][2:],
        "train sft": TRAIN_ARGV["sft"][2:],
    }[command]


def test_docs_list_every_training_flag():
    text = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    missing = [flag for flag in model_flags(TrainOptions).values() if f"`{flag}`" not in text]
    assert missing == []
