"""Studies: one config reproduces the paper's experiment (``langmerge study STUDY.yaml``, docs/study.md).

Public API: ``load_study(path)`` (checked config), ``build_plan(study)`` (the
steps), ``run_study(study, ...)`` (run them, cached, and write the report).
"""

from langmerge.study.config import Study, load_study
from langmerge.study.plan import Plan, build_plan
from langmerge.study.runner import StudyResult, run_study

__all__ = ["Plan", "Study", "StudyResult", "build_plan", "load_study", "run_study"]
