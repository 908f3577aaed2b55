"""OUT_DIR problems found before the work, write failures during it, and the finished folder's mode.

The faults are real: a dangling symlink, a read-only folder, a file size limit (RLIMIT_FSIZE) and a
small tmpfs. Each case asserts the exit code, the message's first line and the parent folder's exact
contents afterwards.
"""

from __future__ import annotations

import os
import resource
import shutil
import stat
import struct
import subprocess
import sys

import pytest

from langmerge.cli import main
from langmerge.synthetic import LlamaShape
from output_helpers import (
    ENV,
    error_lines,
    listing,
    run_langmerge,
    snapshot,
    trio,
    write_recipe,
)

SMALL = LlamaShape(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return trio(tmp_path_factory.mktemp("trio"), SMALL)


def _tensor_bytes(folder) -> int:
    """Bytes of tensor data in a model's one safetensors file (the file less its header)."""
    path = folder / "model.safetensors"
    with open(path, "rb") as fh:
        (header,) = struct.unpack("<Q", fh.read(8))
    return path.stat().st_size - 8 - header


def _cli(capsys, *args) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, error_lines(capsys.readouterr().err)


def _dangling_symlink(w):
    os.symlink("nowhere", w / "out")
    return w / "out", []


def _symlink_to_folder(w):
    (w / "real").mkdir()
    os.symlink("real", w / "out")
    return w / "out", ["--force"]


def _current_folder(w):
    os.chdir(w)
    return ".", ["--force"]


def _parent_of_current_folder(w):
    (w / "sub").mkdir()
    os.chdir(w / "sub")
    return "..", ["--force"]


def _existing_file(force: bool):
    def prepare(w):
        (w / "out").write_text("x")
        return w / "out", ["--force"] if force else []

    return prepare


def _parent_is_a_file(w):
    (w / "f").write_text("x")
    return w / "f" / "out", []


# case -> (prepare(work) -> (OUT as given, extra flags), expected message)
LOCATIONS = {
    "dangling symlink": (
        _dangling_symlink,
        "output {out} is a symlink to nowhere, which does not exist; name a real folder",
    ),
    "symlink to a folder": (_symlink_to_folder, "output {out} is a symlink to real; name a real folder"),
    "current folder": (_current_folder, "output . is the current folder or one of its parents; name a new folder"),
    "parent of the current folder": (
        _parent_of_current_folder,
        "output .. is the current folder or one of its parents; name a new folder",
    ),
    "existing file": (_existing_file(False), "output {out} exists and is not a folder"),
    "existing file, --force": (_existing_file(True), "output {out} exists and is not a folder"),
    "parent is a file": (_parent_is_a_file, "output {out}: cannot create it, {work}/f is not a folder"),
}


@pytest.mark.parametrize("command", ["merge", "analyze", "train"])
@pytest.mark.parametrize("case", list(LOCATIONS))
def test_bad_output_location_is_one_line_before_any_work(models, tmp_path, capsys, monkeypatch, case, command):
    work = tmp_path / "work"
    work.mkdir()
    recipe = write_recipe(work / "r.yaml", models)
    data = work / "sft.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    monkeypatch.chdir(tmp_path)
    prepare, expected = LOCATIONS[case]
    out, flags = prepare(work)
    before, inputs = snapshot(work), snapshot(models["base"].parent)
    argv = {
        "merge": ["merge", recipe, out, "--no-progress"],
        "analyze": ["analyze", recipe, "-o", out, "--no-progress"],
        "train": ["train", "sft", "--base", models["base"], "--data", data, "--out", out, "--seq-len", "32"],
    }[command]
    code, err = _cli(capsys, *argv, *flags)
    assert (code, err[:1]) == (2, ["langmerge: error: " + expected.format(out=out, work=work)])
    assert len(err) == 1
    assert snapshot(work) == before and snapshot(models["base"].parent) == inputs


def _as_unprivileged() -> list[str]:
    """A command prefix under which a chmod'ed folder stops writes.

    Root ignores a folder's permissions; in a new user namespace root's files are not root's to
    override, so ``unshare --user`` makes the chmod count again (util-linux; skipped without it).
    """
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--user", "true"]).returncode != 0:
        pytest.skip("running as root and no user namespace (unshare --user) to drop the privilege that ignores chmod")
    return ["unshare", "--user"]


def test_read_only_parent_is_refused_before_the_merge(models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", models)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for out in (ro / "out", ro / "deeper" / "out"):
            proc = subprocess.run(
                [
                    *_as_unprivileged(),
                    sys.executable,
                    "-m",
                    "langmerge",
                    "merge",
                    str(recipe),
                    str(out),
                    "--no-progress",
                ],
                capture_output=True,
                text=True,
                env=ENV,
                timeout=600,
            )
            assert (proc.returncode, error_lines(proc.stderr)) == (
                2,
                [f"langmerge: error: output {out}: cannot write in {ro} (permission denied)"],
            )
            assert listing(ro) == [] and listing(tmp_path) == ["r.yaml", "ro"]
    finally:
        ro.chmod(0o755)


def _file_size_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_file_size_limit_below_a_shard_is_refused_before_the_merge(slow_models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", slow_models)
    need = _tensor_bytes(slow_models["base"])
    code, _, err = run_langmerge("merge", recipe, tmp_path / "out", "--no-progress", preexec_fn=_file_size_limit(10**6))
    assert (code, error_lines(err)) == (
        2,
        [
            f"langmerge: error: output {tmp_path / 'out'}: model.safetensors will be {need:,} bytes "
            "but this process may write files of at most 1,000,000 bytes (RLIMIT_FSIZE, ulimit -f)"
        ],
    )
    assert listing(tmp_path) == ["r.yaml"]


def test_a_write_past_the_file_size_limit_during_the_merge_is_one_line(slow_models, tmp_path):
    """The limit is the tensor bytes exactly: the check passes, the shard's header makes the write fail."""
    recipe = write_recipe(tmp_path / "r.yaml", slow_models)
    inputs = snapshot(slow_models["base"].parent)
    limit = _tensor_bytes(slow_models["base"])
    code, _, err = run_langmerge("merge", recipe, tmp_path / "out", "--no-progress", preexec_fn=_file_size_limit(limit))
    assert (code, error_lines(err)) == (
        2,
        [
            f"langmerge: error: file too large writing {tmp_path / 'out' / 'model.safetensors'} (File too large); "
            "no partial output was kept"
        ],
    )
    assert listing(tmp_path) == ["r.yaml"] and snapshot(slow_models["base"].parent) == inputs


_ON_TMPFS = (
    'mount -t tmpfs -o "$0" tmpfs "$1" || exit 99; mnt="$1"; shift; "$@"; code=$?; '
    'echo "LISTING:$(ls -A "$mnt" | tr "\\n" " ")"; exit $code'
)


def _merge_on_tmpfs(recipe, size: int, tmp_path, options: str = "") -> tuple[int, list[str], list[str]]:
    """Merge into a fresh tmpfs of ``size`` bytes (in a private mount namespace); exit code, stderr, the tmpfs' entries.

    The mount needs no privilege beyond a user namespace (``unshare -rm``), and binds root too.
    """
    mnt = tmp_path / "small"
    mnt.mkdir()
    cmd = [
        "unshare",
        "-rm",
        "sh",
        "-c",
        _ON_TMPFS,
        f"size={size}{options}",
        str(mnt),
        sys.executable,
        "-m",
        "langmerge",
        "merge",
        str(recipe),
        str(mnt / "out"),
        "--no-progress",
    ]
    if shutil.which("unshare") is None:
        pytest.skip("no unshare (util-linux) to mount a private tmpfs; the RLIMIT_FSIZE cases cover disk full")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    if proc.returncode == 99 or "unshare failed" in proc.stderr:
        pytest.skip(
            f"cannot mount a private tmpfs here ({proc.stderr.strip()[:200]}); the RLIMIT_FSIZE cases cover disk full"
        )
    listing_line = next(line for line in proc.stdout.splitlines() if line.startswith("LISTING:"))
    return proc.returncode, error_lines(proc.stderr), listing_line.removeprefix("LISTING:").split()


def test_a_full_disk_is_refused_before_the_merge(slow_models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", slow_models)
    need = _tensor_bytes(slow_models["base"])
    code, err, entries = _merge_on_tmpfs(recipe, 2**20, tmp_path)
    mnt = tmp_path / "small"
    assert (code, err) == (
        2,
        [
            f"langmerge: error: output {mnt / 'out'}: not enough disk space in {mnt} "
            f"(the output needs {need:,} bytes, 1,048,576 are free)"
        ],
    )
    assert entries == []


def test_a_disk_that_fills_during_the_merge_is_one_line(slow_models, tmp_path):
    """Room for the tensor bytes only: the check passes and the shard's header fills the disk."""
    recipe = write_recipe(tmp_path / "r.yaml", slow_models)
    size = -(-_tensor_bytes(slow_models["base"]) // 4096) * 4096
    code, err, entries = _merge_on_tmpfs(recipe, size, tmp_path)
    out = tmp_path / "small" / "out"
    assert (code, err) == (
        2,
        [
            f"langmerge: error: disk full writing {out / 'model.safetensors'} "
            "(No space left on device); no partial output was kept"
        ],
    )
    assert entries == []


def test_a_read_only_file_system_is_refused_before_the_merge(models, tmp_path):
    """A read-only mount stops root as well as anyone else."""
    recipe = write_recipe(tmp_path / "r.yaml", models)
    code, err, entries = _merge_on_tmpfs(recipe, 2**20, tmp_path, options=",ro")
    mnt = tmp_path / "small"
    assert (code, err) == (
        2,
        [f"langmerge: error: output {mnt / 'out'}: cannot write in {mnt} (read-only file system)"],
    )
    assert entries == []


def _modes(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_finished_output_has_the_mode_of_a_plain_mkdir(models, tmp_path, umask):
    recipe = write_recipe(tmp_path / "r.yaml", models)
    code, _, err = run_langmerge("merge", recipe, tmp_path / "out", "--no-progress", preexec_fn=lambda: os.umask(umask))
    assert code == 0, err
    modes = _modes(tmp_path / "out")
    assert modes.pop(".") == 0o777 & ~umask  # not mkdtemp's 0o700
    assert modes and set(modes.values()) == {0o666 & ~umask}


def test_every_writer_gives_the_same_mode(models, tmp_path, capsys):
    umask = os.umask(0o022)
    os.umask(umask)
    recipe = write_recipe(tmp_path / "r.yaml", models)
    assert _cli(capsys, "analyze", recipe, "-o", tmp_path / "analysis", "--no-progress")[0] == 0
    assert _modes(tmp_path / "analysis")["."] == 0o777 & ~umask
