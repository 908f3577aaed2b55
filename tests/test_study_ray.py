"""The Ray executor on a local Ray instance: the same steps, the same results as the local executor."""

from __future__ import annotations

import pytest

from langmerge.study import load_study, run_study
from study_helpers import load_results, study_dict, write_inputs, write_study

ray = pytest.importorskip("ray", reason="the ray executor needs the 'study' extra (pip install 'langmerge[study]')")


def test_ray_executor_matches_local(tmp_path):
    root = tmp_path / "in"
    write_inputs(root)
    d = study_dict(root, tmp_path / "local")
    d["languages"]["ny"]["budgets"] = [300]  # small: every step still runs as a Ray task
    d["methods"] = {k: v for k, v in d["methods"].items() if k in ("ties", "ties_sv")}
    local = run_study(load_study(write_study(tmp_path / "local.yaml", d)), progress=False)
    d["out"] = str(tmp_path / "ray")
    cfg = write_study(tmp_path / "ray.yaml", d)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_study(load_study(cfg), executor="ray", progress=False)
        # A second run finds everything cached and submits nothing.
        again = run_study(load_study(cfg), executor="ray", progress=False)
    finally:
        ray.shutdown()
    assert sorted(remote.ran) == sorted(local.ran)
    a, b = load_results(tmp_path / "local"), load_results(tmp_path / "ray")
    assert a["rows"] == b["rows"] and a["loss"] == b["loss"]
    assert again.ran == []
