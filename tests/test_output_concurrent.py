"""Two runs into one OUT_DIR: real concurrent processes never silently replace each other's output."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time

import pytest

from langmerge.io import output
from output_helpers import (
    ENV,
    error_lines,
    langmerge,
    listing,
    snapshot,
    wait_for_partial,
    write_recipe,
)


@pytest.fixture
def work(slow_models, tmp_path):
    write_recipe(tmp_path / "r.yaml", slow_models)
    write_recipe(tmp_path / "ta.yaml", slow_models, method="task_arithmetic")  # a different result, to tell them apart
    return tmp_path


def _finish(proc) -> tuple[int, list[str]]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, error_lines(err)


# case -> (--force?, exit code of the run that finishes last, its message)
RACES = {
    "without --force": (
        False,
        2,
        "langmerge: error: output {out} appeared while this run was working (another run?); "
        "it was kept as it is and this run's output discarded; pass --force to replace it",
    ),
    "with --force": (True, 0, None),
}


@pytest.mark.parametrize("case", list(RACES))
def test_a_run_finishing_second(work, case):
    """A starts, B starts and finishes while A is in the middle of its merge, then A finishes."""
    force, code, message = RACES[case]
    flags = ["--no-progress"] + (["--force"] if force else [])
    a = langmerge("merge", work / "r.yaml", work / "out", *flags)
    wait_for_partial(work, "out", a)
    a.send_signal(signal.SIGSTOP)
    try:
        b = langmerge("merge", work / "ta.yaml", work / "out", *flags)
        assert _finish(b) == (0, [])
        b_result = snapshot(work / "out")
    finally:
        a.send_signal(signal.SIGCONT)
    assert _finish(a) == (code, [message.format(out=work / "out")] if message else [])
    assert listing(work) == ["out", "r.yaml", "ta.yaml"]  # no partial, old or lock folder left
    result = snapshot(work / "out")
    if force:  # A replaced B's output as a whole, once complete
        assert result != b_result and "merge_method: ties" in (work / "out" / "langmerge_recipe.yaml").read_text()
    else:  # B's output is intact
        assert result == b_result


def test_two_runs_started_together_without_force(work):
    runs = [langmerge("merge", work / name, work / "out", "--no-progress") for name in ("r.yaml", "ta.yaml")]
    results = [_finish(p) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(lines for code, lines in results if code == 2)
    assert len(loser) == 1 and loser[0].startswith(f"langmerge: error: output {work / 'out'} ")
    assert listing(work) == ["out", "r.yaml", "ta.yaml"]
    winner = "ties" if results[0][0] == 0 else "task_arithmetic"
    assert f"merge_method: {winner}" in (work / "out" / "langmerge_recipe.yaml").read_text()


_HOLD_LOCK = """
import sys
from pathlib import Path
from langmerge.io.output import output_lock
with output_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_forced_runs_take_turns_at_the_lock_beside_the_output(work):
    """A forced commit waits for the lock another process holds on ``.out.lock``."""
    (work / "out").mkdir()
    (work / "out" / "old.txt").write_text("old")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(work / "out")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        run = langmerge("merge", work / "r.yaml", work / "out", "--no-progress", "--force")
        partial = wait_for_partial(work, "out", run, file="README.md")  # the model card: written last
        time.sleep(2)
        assert run.poll() is None and listing(work) == [".out.lock", partial.name, "out", "r.yaml", "ta.yaml"]
        assert (work / "out" / "old.txt").is_file()
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=60)
    assert _finish(run) == (0, [])
    assert listing(work) == ["out", "r.yaml", "ta.yaml"] and not (work / "out" / "old.txt").exists()


@pytest.mark.parametrize("native", [True, False], ids=["renameat2", "fallback"])
def test_rename_noreplace_refuses_even_an_empty_folder(tmp_path, monkeypatch, native):
    """A plain rename(2) would replace an empty folder; the commit must not."""
    if not native:
        monkeypatch.setattr(output, "_renameat2", None)
    elif output._renameat2 is None:
        pytest.skip("this libc has no renameat2 (the fallback case still runs)")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("new")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError) as info:
        output.rename_noreplace(tmp_path / "new", tmp_path / "out")
    assert info.value.errno == errno.EEXIST
    assert listing(tmp_path / "out") == [] and listing(tmp_path / "new") == ["f"]
    output.rename_noreplace(tmp_path / "new", tmp_path / "fresh")
    assert listing(tmp_path) == ["fresh", "out"]
