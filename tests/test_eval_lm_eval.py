"""The lm-eval bridge, run offline in process on a local JSON task, against langmerge's own scorer."""

import json

import pytest
import yaml

from eval_helpers import MC_DOCS, MC_SPEC, write_task
from langmerge.cli import main
from langmerge.errors import LangmergeError
from langmerge.evaluation import evaluate, load_task
from langmerge.evaluation.lm_eval_bridge import expand_presets, run_lm_eval


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def lm_eval_json_task(folder, docs) -> str:
    """An lm-eval task YAML over local JSONL data, asking what langmerge's toy_mc asks."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    spec = {
        "task": "langmerge_toy_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "toy.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Q: {{question}}\nA:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer_index}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    (folder / "toy.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return str(folder)


def test_lm_eval_agrees_with_langmerge_on_the_same_items(tiny_model, tmp_path, offline):
    model, tok = tiny_model
    include = lm_eval_json_task(tmp_path / "lm", MC_DOCS)
    theirs = run_lm_eval(model, tok, ["langmerge_toy_mc"], include=[include], batch_size=4, log_samples=True)
    ours = evaluate(model, [load_task(write_task(tmp_path / "ours", MC_SPEC, MC_DOCS))], tokenizer=tok, progress=False)
    result = theirs["results"]["langmerge_toy_mc"]
    assert result["acc,none"] == pytest.approx(ours.tasks["toy_mc"].metrics["acc"])
    assert result["acc_norm,none"] == pytest.approx(ours.tasks["toy_mc"].metrics["acc_norm"])
    # per item, the log-likelihoods themselves agree
    their_ll = {s["doc"]["question"]: [r[0][0] for r in s["resps"]] for s in theirs["samples"]["langmerge_toy_mc"]}
    for sample, doc in zip(ours.samples["toy_mc"], MC_DOCS):
        assert sample["loglikelihoods"] == pytest.approx(their_ll[doc["question"]], abs=1e-4)


def test_presets_and_unknown_tasks(tiny_model, tmp_path, offline):
    assert expand_presets(["ta", "xcopa_ta"]) == ["belebele_tam_Taml", "xcopa_ta", "m_mmlu_ta"]
    model, tok = tiny_model
    with pytest.raises(LangmergeError, match="unknown lm-eval task"):
        run_lm_eval(model, tok, ["no_such_lm_eval_task"], include=[lm_eval_json_task(tmp_path, MC_DOCS)])


def test_cli_lm_eval(tiny_model_dir, tmp_path, capsys, offline):
    include = lm_eval_json_task(tmp_path / "lm", MC_DOCS)
    code = main(
        [
            "eval",
            str(tiny_model_dir),
            "--lm-eval",
            "langmerge_toy_mc",
            "--lm-eval-include",
            include,
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 0
    assert "| langmerge_toy_mc | acc,none |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "acc,none" in saved["lm_eval"]["results"]["langmerge_toy_mc"]
