"""A study killed between steps resumes without redoing finished steps and ends as a clean run does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from langmerge.study import load_study, run_study
from study_helpers import done_markers, load_results, study_dict, write_inputs, write_study


def _comparable(doc: dict) -> dict:
    return {"rows": doc["rows"], "loss": doc["loss"], "findings": doc["findings"]}


def test_killed_study_resumes_without_redoing_steps(tmp_path):
    root = tmp_path / "in"
    write_inputs(root)
    d = study_dict(root, tmp_path / "killed")
    d["languages"]["ny"]["budgets"] = [300, 1200]
    cfg = write_study(tmp_path / "study.yaml", d)
    cache = tmp_path / "killed" / "cache"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "langmerge", "study", str(cfg), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    try:
        while len(done_markers(cache)) < 12 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group: no chance to clean up
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    before = done_markers(cache)
    assert len(before) >= 12
    assert not (tmp_path / "killed" / "report").exists()

    resumed = run_study(load_study(cfg), progress=False)
    after = done_markers(cache)
    # Finished steps were not redone (their markers are untouched), the rest ran once.
    assert {k: after[k] for k in before} == before
    assert len(after) == len(resumed.plan.steps)
    ran = {r.label for r in resumed.records if not r.cached}
    assert ran and len(ran) == len(after) - len(before)
    assert not list(cache.glob(".*.partial-*"))  # a half-written step folder was cleaned up

    d["out"] = str(tmp_path / "clean")
    clean = run_study(load_study(write_study(tmp_path / "clean.yaml", d)), progress=False)
    assert _comparable(load_results(tmp_path / "killed")) == _comparable(load_results(tmp_path / "clean"))
    assert clean.ran and len(clean.ran) == len(clean.plan.steps)
