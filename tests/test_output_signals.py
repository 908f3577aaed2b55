"""Killed runs: real SIGTERM, SIGINT and SIGKILL of a merge in the middle, and what the next run does.

Each merge runs as a child process; the test waits until the child is writing its partial folder,
then signals it, and compares the parent folder's exact contents before and after.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from langmerge.cli import main
from langmerge.io.output import Owner, process_start
from output_helpers import (
    error_lines,
    langmerge,
    listing,
    run_langmerge,
    snapshot,
    wait_for_partial,
    write_recipe,
)


@pytest.fixture
def work(slow_models, tmp_path):
    write_recipe(tmp_path / "r.yaml", slow_models)
    return tmp_path


# signal -> (exit code, stderr)
CLEAN_EXITS = {
    signal.SIGTERM: (143, "langmerge: interrupted (SIGTERM); no partial output was kept"),
    signal.SIGINT: (130, "langmerge: interrupted (SIGINT); no partial output was kept"),
}


@pytest.mark.parametrize("sig", list(CLEAN_EXITS), ids=lambda s: s.name)
def test_signal_in_the_middle_of_a_merge_leaves_the_folder_as_it_was(work, slow_models, sig):
    before, inputs = listing(work), snapshot(slow_models["base"].parent)
    proc = langmerge("merge", work / "r.yaml", work / "out", "--no-progress")
    wait_for_partial(work, "out", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    code, message = CLEAN_EXITS[sig]
    assert (proc.returncode, error_lines(err)) == (code, [message])
    assert listing(work) == before  # no output, no partial folder, no lock file
    assert snapshot(slow_models["base"].parent) == inputs


def test_sigterm_while_replacing_with_force_keeps_the_old_output(work):
    assert run_langmerge("merge", work / "r.yaml", work / "out", "--no-progress")[0] == 0
    old = snapshot(work / "out")
    (work / "out" / "mine.txt").write_text("the previous output")
    old["mine.txt"] = snapshot(work / "out")["mine.txt"]
    proc = langmerge("merge", work / "r.yaml", work / "out", "--no-progress", "--force")
    wait_for_partial(work, "out", proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert listing(work) == ["out", "r.yaml"] and snapshot(work / "out") == old


def test_sigkill_leaves_a_partial_folder_that_the_next_run_removes(work):
    proc = langmerge("merge", work / "r.yaml", work / "out", "--no-progress")
    partial = wait_for_partial(work, "out", proc)
    proc.kill()
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    # The partial folder names its owner: host, pid and the process's start time.
    assert listing(work) == [partial.name, "r.yaml"]
    assert f"-{proc.pid}-" in partial.name and partial.name.startswith(f".out.partial-{Owner.current().host}-")
    code, _, err = run_langmerge("-v", "merge", work / "r.yaml", work / "out", "--no-progress")
    assert code == 0, err
    assert f"removing {partial} (left by process {proc.pid}, which is gone)" in err
    assert listing(work) == ["out", "r.yaml"]


def test_a_live_owners_partial_folder_is_left_alone(work):
    first = langmerge("merge", work / "r.yaml", work / "out", "--no-progress")
    partial = wait_for_partial(work, "out", first)
    first.send_signal(signal.SIGSTOP)  # alive, in the middle of its merge
    try:
        code, _, err = run_langmerge("-v", "merge", work / "r.yaml", work / "out", "--no-progress")
        assert code == 0, err
        assert f"left {partial} alone: process {first.pid} is still running" in err
        assert listing(work) == [partial.name, "out", "r.yaml"]
    finally:
        first.send_signal(signal.SIGCONT)
    # The first run then finds the output taken, keeps it, and removes its own partial folder.
    _, err = first.communicate(timeout=120)
    assert first.returncode == 2 and error_lines(err)[0].startswith(f"langmerge: error: output {work / 'out'} appeared")
    assert listing(work) == ["out", "r.yaml"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _owner_name(out: str, kind: str, host: str, pid: int, start: int) -> str:
    return f".{out}.{kind}-{host}-{pid}-{start}-0123abcd"


# case -> (folder name beside OUT, kept by the next run?)
LEFTOVERS = {
    "dead owner": (lambda: _owner_name("out", "partial", Owner.current().host, _dead_pid(), 12345), False),
    # Our own pid, alive, but started at another time: the pid was reused, the owner is gone.
    "reused pid": (lambda: _owner_name("out", "partial", Owner.current().host, os.getpid(), 1), False),
    "live owner": (
        lambda: _owner_name("out", "partial", Owner.current().host, os.getpid(), process_start(os.getpid())),
        True,
    ),
    "other host": (lambda: _owner_name("out", "partial", "elsewhere.example", _dead_pid(), 1), True),
    "unknown owner": (lambda: ".out.partial-k2j3h4", True),  # not named by langmerge: not ours to remove
    "other output": (lambda: _owner_name("other", "partial", Owner.current().host, _dead_pid(), 1), True),
}


@pytest.mark.parametrize("case", list(LEFTOVERS))
def test_the_next_run_removes_only_dead_owners_partial_folders(work, case, capsys):
    name, kept = LEFTOVERS[case][0](), LEFTOVERS[case][1]
    (work / name).mkdir()
    (work / name / "model.safetensors").write_bytes(b"half")
    assert main(["merge", str(work / "r.yaml"), str(work / "out"), "--no-progress"]) == 0
    assert listing(work) == sorted(["out", "r.yaml"] + ([name] if kept else []))


def test_a_replacement_killed_between_its_renames_is_restored(work, capsys):
    """A dead owner's ``.old-`` folder with no output beside it is the previous output: moved back."""
    old = work / _owner_name("out", "old", Owner.current().host, _dead_pid(), 1)
    old.mkdir()
    (old / "mine.txt").write_text("the previous output")
    assert main(["merge", str(work / "r.yaml"), str(work / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"langmerge: error: output {work / 'out'} already exists; pass --force to replace it"
    assert listing(work) == ["out", "r.yaml"] and (work / "out" / "mine.txt").read_text() == "the previous output"
