"""Hostile input is refused, never trusted, and never hangs or crashes (issue 11, inputs).

One table per class of fault. Every row runs the real command line on real
files (real FIFOs, real symlinks) and asserts the exit code, the first line of
the message, and the exact contents of the parent folder afterwards: no output,
no partial folder, every input byte-identical. Rows that would hang if the
fault were not caught run in a subprocess with a timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from ckpt_helpers import SHAPE, load_state
from eval_helpers import MC_DOCS, MC_SPEC, write_task
from langmerge.cli import main
from langmerge.errors import LangmergeError
from langmerge.evaluation import EvalOptions, evaluate
from langmerge.evaluation.tasks import Example, render
from langmerge.io.reader import pretrained_options
from langmerge.merge.recipe import model_key
from langmerge.study.run_steps import run_given
from langmerge.study.steps import Context, GivenSettings, Step
from langmerge.synthetic import make_trio

TIMEOUT = 240  # a hang fails the row instead of the whole run


@pytest.fixture(scope="module")
def trio_source(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("hostile"), SHAPE)


@pytest.fixture
def models(trio_source, tmp_path):
    """Fresh copies of base, ct and sft under ``tmp_path/fx`` (the folder a row may plant faults in)."""
    return {k: Path(shutil.copytree(v, tmp_path / "fx" / k)) for k, v in trio_source.items()}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: its kind and contents (a file's hash, a link's target), never opening a FIFO."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                out[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif stat.S_ISREG(mode):
                out[str(path.relative_to(root))] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                out[str(path.relative_to(root))] = ("dir" if stat.S_ISDIR(mode) else "special", stat.S_IFMT(mode))
    return out


def recipe_for(models, *, ct=None, sft=None, **extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(ct or models["ct"]), "parameters": {"weight": 0.7}},
            {"model": str(sft or models["sft"]), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
        **extra,
    }


def write_recipe(tmp_path: Path, recipe: dict | str | bytes, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    if isinstance(recipe, dict):
        recipe = yaml.safe_dump(recipe)
    path.write_bytes(recipe if isinstance(recipe, bytes) else recipe.encode("utf-8"))
    return path


def run(argv: list[str], capsys, *, subprocess_: bool = False) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``langmerge argv``; in a subprocess (with a timeout) for a row that
    could hang."""
    if subprocess_:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.run(
            [sys.executable, "-m", "langmerge", *argv], capture_output=True, text=True, timeout=TIMEOUT, env=env
        )
        return proc.returncode, proc.stdout, proc.stderr
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(code: int, out: str, err: str, command: str, expected: str) -> None:
    """merge: exit 2, one line on stderr; check: exit 2 and the reason under 'unreadable input'."""
    assert "Traceback" not in err, err
    if command == "merge":
        lines = [line for line in err.splitlines() if not line.startswith("WARNING ")]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("langmerge: error: "), err
        assert expected in lines[0], lines[0]
    else:
        assert code == 2, out + err
        assert "unreadable input:" in out or err.startswith("langmerge: error: "), out + err
        reason = out.split("unreadable input:", 1)[1].splitlines()[1] if "unreadable input:" in out else err
        assert expected in reason, reason


def st_bytes(header: str | dict, data: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _entry(dtype="F32", shape=(1,), offsets=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _plant_weights(content: bytes):
    def plant(m, tmp):
        (m["ct"] / "model.safetensors").write_bytes(content)

    return plant


def _plant_fifo(name: str, model: str = "ct"):
    def plant(m, tmp):
        (m[model] / name).unlink(missing_ok=True)
        os.mkfifo(m[model] / name)

    return plant


def _plant_outside_link(name: str, model: str = "ct"):
    def plant(m, tmp):
        secret = tmp / "secret.txt"
        if not secret.exists():
            secret.write_text('{"secret": "do not copy me"}')
        (m[model] / name).unlink(missing_ok=True)
        os.symlink(secret, m[model] / name)

    return plant


def _plant_config(text: str):
    def plant(m, tmp):
        (m["ct"] / "config.json").write_text(text)

    return plant


def _plant_deep_index(m, tmp):
    (m["ct"] / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")


def _config_with(**updates):
    def plant(m, tmp):
        config = json.loads((m["ct"] / "config.json").read_text())
        (m["ct"] / "config.json").write_text(json.dumps({**config, **updates}))

    return plant


# ---------------------------------------------------------------- checkpoint files that must be refused

CKPT = "fx/ct/model.safetensors"
CHECKPOINT_FAULTS = {
    "negative offsets": (
        _plant_weights(st_bytes({"w": _entry(offsets=(-4, 0))}, b"")),
        f"{CKPT}: corrupt safetensors entry for tensor 'w' (data_offsets [-4, 0] is not two non-negative",
    ),
    "overlapping offsets": (
        _plant_weights(st_bytes({"a": _entry(), "b": _entry(offsets=(2, 6))}, b"\0" * 6)),
        f"{CKPT}: corrupt safetensors entry for tensor 'b' (data_offsets 2..6 overlaps the tensor before it",
    ),
    "gap between tensors": (
        _plant_weights(st_bytes({"a": _entry(), "b": _entry(offsets=(8, 12))}, b"\0" * 12)),
        "(data_offsets 8..12 leaves a gap before it; expected to start at 4)",
    ),
    "duplicate names": (
        _plant_weights(st_bytes('{"a": ' + json.dumps(_entry()) + ', "a": ' + json.dumps(_entry()) + "}", b"\0" * 4)),
        f"{CKPT}: corrupt safetensors header (key 'a' appears twice)",
    ),
    "byte length not shape x dtype": (
        _plant_weights(st_bytes({"a": _entry(shape=(2,))}, b"\0" * 4)),
        "corrupt safetensors entry for tensor 'a' (offsets 0..4 for 8 bytes of F32 [2])",
    ),
    "bytes after the last tensor": (
        _plant_weights(st_bytes({"a": _entry()}, b"\0" * 5)),
        f"{CKPT}: corrupt safetensors file (the data region holds 5 bytes but its tensors cover 4)",
    ),
    "fp8 tensor": (
        _plant_weights(st_bytes({"a": _entry("F8_E4M3", (4,))}, b"\0" * 4)),
        f"{CKPT}: tensor 'a' has dtype F8_E4M3, which langmerge does not support",
    ),
    "header nested 100,000 deep": (
        _plant_weights(st_bytes('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", b"")),
        f"{CKPT}: corrupt safetensors header (nested too deeply)",
    ),
    "metadata not strings": (
        _plant_weights(st_bytes({"__metadata__": {"format": 1}}, b"")),
        "'__metadata__' must map strings to strings",
    ),
    "header not an object": (
        _plant_weights(st_bytes("[1, 2]", b"")),
        f"{CKPT}: corrupt safetensors header (not a JSON object)",
    ),
    "index nested 100,000 deep": (
        _plant_deep_index,
        "model.safetensors.index.json: not valid JSON (nested too deeply)",
    ),
    "weights are a FIFO": (_plant_fifo("model.safetensors"), f"{CKPT}: a FIFO, not a regular file; refused"),
    "config.json is a FIFO": (_plant_fifo("config.json"), "fx/ct/config.json: a FIFO, not a regular file; refused"),
    "weights link outside the folder": (
        _plant_outside_link("model.safetensors"),
        f"{CKPT} points outside the model folder; refused",
    ),
    "config.json links outside the folder": (
        _plant_outside_link("config.json"),
        "fx/ct/config.json points outside the model folder; refused",
    ),
    "config.json is a list": (_plant_config("[1, 2]"), "fx/ct/config.json: expected a JSON object, got an array"),
    "num_hidden_layers is a word": (
        _config_with(num_hidden_layers="two"),
        "fx/ct/config.json: key 'num_hidden_layers' must be a positive whole number, got 'two'",
    ),
    "config.json is not JSON": (_plant_config("{oops"), "fx/ct/config.json: not valid JSON (Expecting property name"),
}
HANGS = {"weights are a FIFO", "config.json is a FIFO"}


@pytest.mark.parametrize("command", ["merge", "check"])
@pytest.mark.parametrize("case", list(CHECKPOINT_FAULTS))
def test_checkpoint_fault_is_refused_and_nothing_is_written(models, tmp_path, capsys, command, case):
    plant, expected = CHECKPOINT_FAULTS[case]
    plant(models, tmp_path)
    recipe = write_recipe(tmp_path, recipe_for(models))
    before = snapshot(tmp_path)
    argv = (
        ["merge", str(recipe), str(tmp_path / "out"), "--no-progress"] if command == "merge" else ["check", str(recipe)]
    )
    code, out, err = run(argv, capsys, subprocess_=case in HANGS)
    assert_refused(code, out.replace(str(tmp_path) + "/", ""), err.replace(str(tmp_path) + "/", ""), command, expected)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- optional files: skipped with a warning

OPTIONAL_FAULTS = {
    "tokenizer_config.json links outside": (
        _plant_outside_link("tokenizer_config.json", "base"),
        "tokenizer_config.json",
    ),
    "chat_template.jinja links outside": (_plant_outside_link("chat_template.jinja", "base"), "chat_template.jinja"),
    "generation_config.json is a FIFO": (_plant_fifo("generation_config.json", "base"), "generation_config.json"),
    "tokenizer.json of ct is a FIFO": (_plant_fifo("tokenizer.json", "ct"), None),
}


@pytest.mark.parametrize("case", list(OPTIONAL_FAULTS))
def test_optional_file_that_breaks_the_rule_is_skipped_with_a_warning(models, tmp_path, capsys, case):
    plant, skipped = OPTIONAL_FAULTS[case]
    plant(models, tmp_path)
    recipe = write_recipe(tmp_path, recipe_for(models))
    before = snapshot(tmp_path)
    code, out, err = run(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"], capsys, subprocess_=True)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert warnings and all("; skipped" in w for w in warnings), err
    name = skipped or "tokenizer.json"
    assert any(name in w for w in warnings), err
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before  # inputs untouched
    if skipped:
        assert not (tmp_path / "out" / skipped).exists()
    written = b"".join(p.read_bytes() for p in (tmp_path / "out").iterdir())
    assert b"do not copy me" not in written


def test_check_does_not_hang_on_a_fifo_tokenizer(models, tmp_path, capsys):
    _plant_fifo("tokenizer.json", "ct")(models, tmp_path)
    recipe = write_recipe(tmp_path, recipe_for(models))
    before = snapshot(tmp_path)
    code, out, err = run(["check", str(recipe)], capsys, subprocess_=True)
    assert code == 0, out + err
    assert f"{models['ct']}/tokenizer.json: a FIFO, not a regular file; skipped" in err
    assert f"[input] {models['ct']}: safetensors checkpoint" in out and "no tokenizer.json" in out
    assert snapshot(tmp_path) == before


def test_symlinks_inside_the_folder_are_followed(models, trio_source, tmp_path, capsys):
    """The rule refuses links that leave the folder, not links: weights linked within the folder merge as usual."""
    inner = models["ct"] / "weights"
    inner.mkdir()
    os.rename(models["ct"] / "model.safetensors", inner / "model.safetensors")
    os.symlink("weights/model.safetensors", models["ct"] / "model.safetensors")
    recipe = write_recipe(tmp_path, recipe_for(models))
    assert run(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"], capsys)[0] == 0
    expected = write_recipe(tmp_path, recipe_for(trio_source), "expected.yaml")
    assert run(["merge", str(expected), str(tmp_path / "expected"), "--no-progress"], capsys)[0] == 0
    got, want = load_state(tmp_path / "out"), load_state(tmp_path / "expected")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------- recipes that must not hang or crash


def _alias_bomb(m, levels: int) -> str:
    """A few KB of YAML whose conditional weight has 2^levels paths once its aliases are expanded."""
    chain = "&v0 [{filter: q, value: 1.0}, {value: 0.5}]"
    for i in range(1, levels + 1):
        chain = f"&v{i} [{{filter: f{i}, value: {chain}}}, {{value: *v{i - 1}}}]"
    return (
        f"merge_method: task_arithmetic\nbase_model: {m['base']}\nmodels:\n  - model: {m['ct']}\n"
        f"    parameters:\n      weight: {chain}\n  - model: {m['sft']}\n    parameters: {{weight: 0.5}}\n"
        "dtype: float32\n"
    )


RECIPE_FAULTS = {
    "alias bomb, 2^40 paths": (
        lambda m: _alias_bomb(m, 40),
        "recipe.yaml: key 'models.0.parameters.weight.0.value.0.value...': nested more than 64 levels deep",
        True,
    ),
    "alias bomb, 2^24 paths": (
        lambda m: _alias_bomb(m, 24),
        "recipe.yaml: key 'models.0.parameters.weight.0.value.0"
        ".value...': more than 100000 entries once YAML aliases are expanded",
        True,
    ),
    "nested 100,000 deep": (
        lambda m: "merge_method: linear\nmodels: " + "[" * 100_000 + "]" * 100_000 + "\n",
        "recipe.yaml: not valid YAML (nested too deeply)",
        False,
    ),
    "binary file": (
        lambda m: b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
        "recipe.yaml: a binary file (it holds NUL bytes), not a recipe file",
        False,
    ),
    "not UTF-8": (
        lambda m: "merge_method: linear\n# caf\xe9\n".encode("latin-1"),
        "recipe.yaml: not UTF-8 text (invalid continuation byte at byte 26); a recipe file must be UTF-8",
        False,
    ),
    "400-digit weight": (
        lambda m: (
            recipe_for(m)
            | {
                "models": [
                    {"model": str(m["ct"]), "parameters": {"weight": 10**400}},
                    {"model": str(m["sft"]), "parameters": {"weight": 0.5}},
                ]
            }
        ),
        "recipe key 'models[0].parameters.weight': a 401-digit number is out of range",
        False,
    ),
    "two YAML documents": (
        lambda m: yaml.safe_dump(recipe_for(m)) + "---\n" + yaml.safe_dump(recipe_for(m)),
        "recipe.yaml: holds 2 YAML documents",
        False,
    ),  # check: one document; merge: names them
    "python tag": (
        lambda m: "merge_method: !!python/object/apply:os.system ['echo pwned']\n",
        "recipe.yaml: line 1, column 15: the YAML tag !!python/object/apply:os.system is not allowed",
        False,
    ),
    "one model spelt twice": (
        lambda m: recipe_for(m, sft=str(m["ct"].parent) + "/./ct"),
        "recipe key 'models[1].model': '{fx}/./ct' is listed twice (the same model as '{fx}/ct')",
        False,
    ),
}


def _refs(text: str, tmp_path: Path) -> str:
    return text.replace("{fx}", str(tmp_path / "fx"))


@pytest.mark.parametrize("command", ["merge", "check"])
@pytest.mark.parametrize("case", list(RECIPE_FAULTS))
def test_recipe_fault_is_one_line_and_nothing_is_written(models, tmp_path, capsys, command, case):
    make, expected, hangs = RECIPE_FAULTS[case]
    recipe = write_recipe(tmp_path, make(models))
    before = snapshot(tmp_path)
    argv = (
        ["merge", str(recipe), str(tmp_path / "out"), "--no-progress"] if command == "merge" else ["check", str(recipe)]
    )
    code, out, err = run(argv, capsys, subprocess_=hangs)
    assert_refused(code, out, err, command, _refs(expected, tmp_path))
    assert snapshot(tmp_path) == before


RECIPE_FILES = {
    "missing .json": (None, "recipe.json", "recipe file {tmp}/recipe.json does not exist"),
    "missing path without suffix": (None, "recipes/ties", "recipe file {tmp}/recipes/ties does not exist"),
    "bad JSON": (
        '{"merge_method": "linear",, }',
        "recipe.json",
        "{tmp}/recipe.json: not valid JSON (Expecting "
        "property name enclosed in double quotes: line 1 column 27 (char 26))",
    ),
    "a folder": ("folder", "recipe.yaml", "{tmp}/recipe.yaml: a folder, not a regular file; refused"),
    "a FIFO": ("fifo", "recipe.yaml", "{tmp}/recipe.yaml: a FIFO, not a regular file; refused"),
}


@pytest.mark.parametrize("case", list(RECIPE_FILES))
def test_recipe_argument_names_the_file(tmp_path, capsys, case):
    content, name, expected = RECIPE_FILES[case]
    path = tmp_path / name
    if content == "folder":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)
    elif content is not None:
        path.write_text(content)
    before = snapshot(tmp_path)
    code, _, err = run(
        ["merge", str(path), str(tmp_path / "out"), "--no-progress"], capsys, subprocess_=content == "fifo"
    )
    assert_refused(code, "", err, "merge", expected.replace("{tmp}", str(tmp_path)))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["recipe.txt", "recipe.json", "recipe"])
def test_a_recipe_file_is_a_file_whatever_its_extension(models, tmp_path, capsys, name):
    recipe = recipe_for(models)
    write_recipe(tmp_path, recipe, "recipe.yaml")
    path = tmp_path / name
    path.write_text(json.dumps(recipe) if name.endswith(".json") else yaml.safe_dump(recipe))
    assert run(["merge", str(tmp_path / "recipe.yaml"), str(tmp_path / "expected"), "--no-progress"], capsys)[0] == 0
    assert run(["merge", str(path), str(tmp_path / "out"), "--no-progress"], capsys)[0] == 0
    got, expected = load_state(tmp_path / "out"), load_state(tmp_path / "expected")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_spellings_of_one_folder_are_one_model(models, tmp_path, capsys, monkeypatch):
    """protect, tokenizer_source and the base listed under models compare resolved paths; messages keep the spelling."""
    monkeypatch.chdir(tmp_path)
    os.symlink(models["sft"], tmp_path / "sft-link")
    plain = {
        "merge_method": "ties_sv",
        "base_model": "fx/base",
        "models": [
            {"model": "fx/base"},
            {"model": "fx/ct", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "fx/sft", "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "parameters": {"slack": 1.0, "protect": ["fx/sft"]},
        "tokenizer_source": "fx/ct",
        "dtype": "float32",
    }
    spelt = json.loads(json.dumps(plain))
    spelt["models"][0]["model"] = "fx/./base"  # the base under models: not a task vector
    spelt["models"][2]["model"] = "sft-link"
    spelt["parameters"]["protect"] = ["./fx/sft"]
    spelt["tokenizer_source"] = "fx//ct/"
    assert run(["merge", str(write_recipe(tmp_path, plain, "plain.yaml")), "plain", "--no-progress"], capsys)[0] == 0
    assert run(["merge", str(write_recipe(tmp_path, spelt, "spelt.yaml")), "spelt", "--no-progress"], capsys)[0] == 0
    got, expected = load_state(tmp_path / "spelt"), load_state(tmp_path / "plain")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    card = (tmp_path / "spelt" / "README.md").read_text()
    assert "`sft-link`" in card and "`fx/ct`" in card  # the user's spelling, as written


def test_hub_ids_that_are_not_local_paths_compare_as_strings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert model_key("org/name") == "org/name" and model_key("org/./name") == "org/./name"
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert model_key("org/./name") == model_key("org/name") == str((tmp_path / "org" / "name").resolve())


# ---------------------------------------------------------------- integer and bool tensors


def _add_tensor(folder: Path, name: str, tensor: torch.Tensor) -> None:
    state = load_state(folder)
    state[name] = tensor
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


INTEGER_CASES = {
    "differs between models": (
        {
            "base": torch.arange(6, dtype=torch.int8),
            "ct": torch.arange(6, dtype=torch.int8) * 2,
            "sft": torch.arange(6, dtype=torch.int8),
        },
        "tensor 'model.extra': the int8 tensor differs between {fx}/ct and {fx}/base; integer and "
        "bool tensors are not merged, only copied when every model has the same values",
    ),
    "integer in one model only": (
        {"base": torch.ones(6), "ct": torch.ones(6, dtype=torch.int8), "sft": torch.ones(6)},
        "tensor 'model.extra': int8 in {fx}/ct but float32 in {fx}/base; integer and bool",
    ),
    "bool mask differs": (
        {"base": torch.tensor([True, False]), "ct": torch.tensor([True, False]), "sft": torch.tensor([False, False])},
        "tensor 'model.extra': the bool tensor differs between {fx}/sft and {fx}/base",
    ),
}


@pytest.mark.parametrize("case", list(INTEGER_CASES))
def test_integer_tensors_that_differ_are_refused_and_check_says_so(models, tmp_path, capsys, case):
    tensors, expected = INTEGER_CASES[case]
    for role, t in tensors.items():
        _add_tensor(models[role], "model.extra", t)
    recipe = write_recipe(tmp_path, recipe_for(models))
    before = snapshot(tmp_path)
    code, _, err = run(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"], capsys)
    assert_refused(code, "", err, "merge", _refs(expected, tmp_path))
    code, out, _ = run(["check", str(recipe)], capsys)
    assert code == 1 and _refs(expected, tmp_path) in out.split("problems (the merge would fail):", 1)[1]
    assert snapshot(tmp_path) == before


def test_identical_integer_tensors_are_copied_and_check_notes_it(models, tmp_path, capsys):
    ids = torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4)
    for role in models:
        _add_tensor(models[role], "model.extra", ids)
    recipe = write_recipe(tmp_path, recipe_for(models))
    code, out, _ = run(["check", str(recipe)], capsys)
    assert (
        code == 0
        and "1 integer or bool tensors are the same in every model and are copied as is: model.extra (int64)" in out
    )
    assert run(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"], capsys)[0] == 0
    got = load_state(tmp_path / "out")["model.extra"]
    assert got.dtype == torch.int64 and torch.equal(got, ids)


# ---------------------------------------------------------------- folders loaded by transformers: eval, train


def _pickle_only(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, dst / f.name)
    torch.save(load_state(src), dst / "pytorch_model.bin")
    return dst


@pytest.fixture
def task_file(tmp_path):
    return write_task(tmp_path / "tasks", MC_SPEC, MC_DOCS)


def _eval_argv(model: Path, task: Path, *extra) -> list[str]:
    return ["eval", str(model), "--tasks", str(task), "--no-progress", "--limit", "2", *extra]


TRANSFORMERS_FAULTS = {
    "eval of pickle-only weights": (
        lambda m, tmp, task: _eval_argv(_pickle_only(m["base"], tmp / "fx" / "bin"), task),
        "only pickle (.bin) weights in {fx}/bin; pickle files can run code",
        False,
    ),
    "train of pickle-only weights": (
        lambda m, tmp, task: [
            "train",
            "ct",
            "--base",
            str(_pickle_only(m["base"], tmp / "fx" / "bin")),
            "--text",
            str(task.parent / "toy_mc.jsonl"),
            "--tokens",
            "100",
            "--out",
            str(tmp / "out"),
            "--no-progress",
        ],
        "only pickle (.bin) weights in {fx}/bin; pickle files can run code",
        False,
    ),
    "eval of a planted symlink": (
        lambda m, tmp, task: (
            _plant_outside_link("tokenizer_config.json", "base")(m, tmp),
            _eval_argv(m["base"], task),
        )[1],
        "{fx}/base/tokenizer_config.json points outside the model folder; refused",
        False,
    ),
    "train of a planted symlink": (
        lambda m, tmp, task: (
            _plant_outside_link("special_tokens_map.json", "base")(m, tmp),
            [
                "train",
                "sft",
                "--base",
                str(m["base"]),
                "--data",
                str(task.parent / "toy_mc.jsonl"),
                "--out",
                str(tmp / "out"),
            ],
        )[1],
        "{fx}/base/special_tokens_map.json points outside the model folder; refused",
        False,
    ),
    "eval of a FIFO tokenizer": (
        lambda m, tmp, task: (_plant_fifo("tokenizer.json", "base")(m, tmp), _eval_argv(m["base"], task))[1],
        "{fx}/base/tokenizer.json: a FIFO, not a regular file; refused",
        True,
    ),
}


@pytest.mark.parametrize("case", list(TRANSFORMERS_FAULTS))
def test_folder_handed_to_transformers_is_checked_first(models, tmp_path, capsys, task_file, case):
    make, expected, hangs = TRANSFORMERS_FAULTS[case]
    argv = make(models, tmp_path, task_file)
    before = snapshot(tmp_path)
    code, _, err = run(argv, capsys, subprocess_=hangs)
    assert_refused(code, "", err, "merge", _refs(expected, tmp_path))
    assert snapshot(tmp_path) == before


def test_eval_loads_pickle_only_weights_with_allow_pickle(models, tmp_path, task_file):
    folder = _pickle_only(models["base"], tmp_path / "fx" / "bin")
    with pytest.raises(LangmergeError, match="--allow-pickle"):
        evaluate(folder, [str(task_file)], options=EvalOptions(limit=3), progress=False)
    got = evaluate(folder, [str(task_file)], options=EvalOptions(limit=3), progress=False, allow_pickle=True)
    want = evaluate(models["base"], [str(task_file)], options=EvalOptions(limit=3), progress=False)
    assert got.tasks["toy_mc"].metrics == want.tasks["toy_mc"].metrics
    assert got.samples == want.samples  # the same weights: the same log-likelihood of every choice


def test_pretrained_options_never_fall_back_to_pickle(models, tmp_path):
    safe = {"use_safetensors": True, "trust_remote_code": False}
    assert pretrained_options(models["base"]) == safe
    torch.save(load_state(models["base"]), models["base"] / "pytorch_model.bin")  # beside the safetensors file
    assert pretrained_options(models["base"], allow_pickle=True) == safe
    folder = _pickle_only(models["ct"], tmp_path / "fx" / "bin")
    with pytest.raises(LangmergeError, match="only pickle"):
        pretrained_options(folder)
    assert pretrained_options(folder, allow_pickle=True) == {
        "use_safetensors": False,
        "weights_only": True,
        "trust_remote_code": False,
    }


def test_study_given_model_with_pickle_weights_needs_allow_pickle(models, tmp_path):
    folder = _pickle_only(models["base"], tmp_path / "fx" / "bin")
    step = Step("given", "base", GivenSettings(path=str(folder)), {})
    with pytest.raises(LangmergeError, match="only pickle"):
        run_given(step, Context(tmp_path, progress=False), tmp_path)
    assert run_given(step, Context(tmp_path, progress=False, allow_pickle=True), tmp_path) == {"path": str(folder)}


# ---------------------------------------------------------------- task files


def _task(tmp_path: Path, **spec) -> Path:
    return write_task(tmp_path / "tasks", {**MC_SPEC, **spec}, MC_DOCS)


def _raw_task(content: bytes):
    def make(tmp_path):
        path = _task(tmp_path)
        path.write_bytes(content)
        return path

    return make


TASK_FAULTS = {
    "absurd format spec": (
        lambda tmp: _task(tmp, prompt="Q: {question:>99999999999}"),
        "toy_mc.yaml: key 'prompt': template field {question:>99999999999}: format specs and "
        "conversions are not supported; write {question}",
    ),
    "attribute access": (
        lambda tmp: _task(tmp, prompt="{0.__class__}"),
        "toy_mc.yaml: key 'prompt': template field {0.__class__} must be a plain name",
    ),
    "nested format field": (
        lambda tmp: _task(tmp, description="{question:{question.__class__}}"),
        "toy_mc.yaml: key 'description': template field {question:{question.__class__}}: format specs",
    ),
    "conversion": (
        lambda tmp: _task(tmp, prompt="{question!r}"),
        "toy_mc.yaml: key 'prompt': template field {question!r}: format specs and conversions",
    ),
    "binary task file": (_raw_task(b"\0\1\2\3"), "toy_mc.yaml: a binary file (it holds NUL bytes), not a task file"),
    "non-UTF-8 task file": (_raw_task("name: caf\xe9\n".encode("latin-1")), "toy_mc.yaml: not UTF-8 text"),
    "python tag in a task file": (
        _raw_task(b"name: !!python/name:os.system\n"),
        "toy_mc.yaml: line 1, column 7: the YAML tag !!python/name:os.system is not allowed",
    ),
    "non-UTF-8 task data": (
        lambda tmp: (_task(tmp), (tmp / "tasks" / "toy_mc.jsonl").write_bytes(b'{"q": "\xe9"}\n'))[0],
        "toy_mc.jsonl: not UTF-8 text",
    ),
}


@pytest.mark.parametrize("case", list(TASK_FAULTS))
def test_task_fault_is_one_line_naming_the_file_and_key(models, tmp_path, capsys, case):
    make, expected = TASK_FAULTS[case]
    task = make(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run(_eval_argv(models["base"], task, "--out", str(tmp_path / "out")), capsys)
    assert_refused(code, "", err, "merge", expected)
    assert snapshot(tmp_path) == before


def test_a_plain_template_renders_as_str_format_would(tmp_path):
    doc = {"question": "x", "n": 3, "items": ["a", "b"]}
    template = "{{literal}} Q: {question} ({n}) {items}\nA:"
    assert render(template, Example(doc, "f:1"), "t") == template.format(**doc)
