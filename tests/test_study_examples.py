"""The bundled study configs parse and their methods, spaces, tasks and languages check out."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from langmerge.study.config import Study, StudySpec, _check_space, _check_tasks, _known_languages

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONFIGS = sorted((EXAMPLES / "paper").glob("*.yaml")) + sorted((EXAMPLES / "miniature").glob("*.yaml"))


def test_there_are_paper_and_miniature_configs():
    names = {p.relative_to(EXAMPLES).as_posix() for p in CONFIGS}
    assert {"paper/released.yaml", "paper/train_ct.yaml", "miniature/quick.yaml", "miniature/full.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_config_checks_out(path):
    spec = StudySpec.model_validate(yaml.safe_load(path.read_text()))
    study = Study(spec, path)
    known = _known_languages()
    for lang, ls in spec.languages.items():
        assert lang in known
        assert study.budgets(lang)
        _check_tasks(study, ls.validation, lang)
        _check_tasks(study, ls.test, lang)
    for name, m in spec.methods.items():
        _check_space(study, name, m)
    assert spec.analysis.ties in spec.methods and spec.analysis.ties_sv in spec.methods
