"""Real faults for the output tests: langmerge in a subprocess, folder snapshots, a merge worth interrupting."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from langmerge.synthetic import LlamaShape, make_trio

# About 5 MB per model: a merge that runs long enough (a second or more) to be stopped or killed in
# the middle, yet quick on a 2-core machine.
SLOW_SHAPE = LlamaShape(hidden=128, intermediate=256, layers=8, heads=4, kv_heads=2)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def trio(root: Path, shape: LlamaShape = SLOW_SHAPE) -> dict[str, Path]:
    return make_trio(root, shape)


@pytest.fixture(scope="module")
def slow_models(tmp_path_factory) -> dict[str, Path]:
    """A base, CT and SFT model of SLOW_SHAPE (import this fixture into a test module to use it)."""
    return trio(tmp_path_factory.mktemp("slow-trio"))


def write_recipe(path: Path, models: dict[str, Path], method: str = "ties") -> Path:
    params = {"weight": 1.0, **({"density": 0.5} if "ties" in method else {})}
    recipe = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["ct"]), "parameters": params},
            {"model": str(models["sft"]), "parameters": params},
        ],
        "dtype": "float32",
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too): a file's sha256, 'dir', or a symlink's target."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def langmerge(*args, **popen) -> subprocess.Popen:
    """``python -m langmerge ARGS`` as a child process (stdout and stderr captured)."""
    return subprocess.Popen(
        [sys.executable, "-m", "langmerge", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        **popen,
    )


def run_langmerge(*args, timeout: float = 600, **popen) -> tuple[int, str, str]:
    proc = langmerge(*args, **popen)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for_partial(
    parent: Path, out_name: str, proc: subprocess.Popen, file: str = "model.safetensors", timeout: float = 300
) -> Path:
    """The partial folder of ``proc``'s output, once ``file`` has appeared in it (the merge is writing)."""
    deadline = time.monotonic() + timeout
    prefix = f".{out_name}.partial-"
    while time.monotonic() < deadline:
        for name in os.listdir(parent):
            if name.startswith(prefix) and f"-{proc.pid}-" in name and (parent / name / file).exists():
                return parent / name
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before writing: {proc.stderr.read()[-2000:]}")
        time.sleep(0.002)
    raise AssertionError(f"no partial folder of process {proc.pid} in {parent}")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]
