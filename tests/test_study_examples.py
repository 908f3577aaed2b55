"""The bundled study configs parse and their methods, spaces, tasks and languages check out."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from langmerge.errors import LangmergeError
from langmerge.io.hub import parse_hub_id
from langmerge.study.config import Study, StudySpec, _check_space, _check_tasks, _known_languages, load_study

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PAPER = sorted((EXAMPLES / "paper").glob("*.yaml"))
CONFIGS = PAPER + sorted((EXAMPLES / "miniature").glob("*.yaml"))
# The models of the paper, as their Hub ids (Tao et al. released the CT and SFT models as pkupie/...).
PAPER_IDS = {
    "meta-llama/Llama-2-7b-hf",
    "pkupie/Llama-2-7b-FLAN-step884",
    *(f"pkupie/Llama-2-7b-{lang}" for lang in ("tam", "tel", "ben", "bod", "uig", "mon")),
}


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


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_configs_name_their_models_by_hub_id(path, tmp_path, monkeypatch):
    spec = StudySpec.model_validate(yaml.safe_load(path.read_text()))
    study = Study(spec, path)
    given = [spec.base.path, spec.sft.path] + [v for ls in spec.languages.values() for v in ls.checkpoints.values()]
    assert "meta-llama/Llama-2-7b-hf" in given and set(given) <= PAPER_IDS
    for value in given:  # no folder of that name beside the config: each resolves through the Hub
        assert parse_hub_id(value) == (value, None) and study.model_ref(value) == value
    # Offline with an empty cache the study stops at its first model, naming it, and fetches nothing.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LangmergeError, match=r"base\.path: model meta-llama/Llama-2-7b-hf: .*offline mode is on"):
        load_study(path)
