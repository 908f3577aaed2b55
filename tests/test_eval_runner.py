"""evaluate(): results against independent computations, the language check, outputs, the CLI."""

import json
import math

import pytest
from pydantic import ValidationError

from eval_helpers import MC_DOCS, MC_SPEC, direct_loglikelihood, write_task
from langmerge.cli import main
from langmerge.errors import LangmergeError
from langmerge.evaluation import EvalOptions, evaluate, load_task, metrics, write_results
from langmerge.evaluation.builtin import materialize

TAMIL_GEN_DOCS = [
    {"question": "3 + 4 =", "answer": "ஏழு"},
    {"question": "திங்கள், செவ்வாய்,", "answer": "புதன்"},
    {"question": "நான் எங்கே?", "answer": "நான் பள்ளிக்குச் செல்கிறேன்"},
    {"question": "வானிலை?", "answer": "இன்று வானிலை மிகவும் நன்றாக இருக்கிறது"},
]
GEN_SPEC = {"name": "toy_gen_ta", "kind": "generation", "language": "ta", "prompt": "{question}"}


def test_multiple_choice_accuracy_from_direct_forward_passes(tiny_model, tmp_path):
    model, tok = tiny_model
    task = load_task(write_task(tmp_path, MC_SPEC, MC_DOCS))
    res = evaluate(model, [task], tokenizer=tok, options=EvalOptions(batch_size=5), progress=False)
    hits = hits_norm = 0
    for doc in MC_DOCS:
        ctx = tok.encode(f"Q: {doc['question']}\nA:")
        lls = [direct_loglikelihood(model, ctx, tok.encode(" " + c)) for c in doc["choices"]]
        hits += max(range(len(lls)), key=lls.__getitem__) == doc["answer_index"]
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        hits_norm += max(range(len(lls)), key=normed.__getitem__) == doc["answer_index"]
        sample = next(s for s in res.samples["toy_mc"] if s["context"].endswith(doc["question"] + "\nA:"))
        assert sample["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
    metrics = res.tasks["toy_mc"].metrics
    assert metrics["acc"] == pytest.approx(hits / len(MC_DOCS))
    assert metrics["acc_norm"] == pytest.approx(hits_norm / len(MC_DOCS))


def test_folder_and_loaded_model_give_the_same_deterministic_results(tiny_model, tiny_model_dir, tmp_path):
    model, tok = tiny_model
    path = write_task(tmp_path, {**MC_SPEC, "few_shot": 2}, MC_DOCS)
    a = evaluate(tiny_model_dir, [str(path)], progress=False)
    b = evaluate(model, [str(path)], tokenizer=tok, progress=False)
    c = evaluate(model, [str(path)], tokenizer=tok, progress=False, options=EvalOptions(batch_size=2))
    assert a.tasks["toy_mc"].metrics == b.tasks["toy_mc"].metrics == c.tasks["toy_mc"].metrics
    assert [s["context"] for s in a.samples["toy_mc"]] == [s["context"] for s in b.samples["toy_mc"]]


def _answerer(answers):
    def generate(model, tokenizer, prompts, **kwargs):
        return [answers[p] for p in prompts]

    return generate


def test_an_english_answerer_scores_zero_language_share(tiny_model, tmp_path):
    model, tok = tiny_model
    task = load_task(write_task(tmp_path, GEN_SPEC, TAMIL_GEN_DOCS))
    english = {
        "3 + 4 =": "seven",
        "திங்கள், செவ்வாய்,": "Wednesday",
        "நான் எங்கே?": "I am going to school",
        "வானிலை?": "The weather is very nice today",
    }
    res = evaluate(model, [task], tokenizer=tok, progress=False, generate=_answerer(english))
    m = res.tasks["toy_gen_ta"].metrics
    assert m["lang_share"] == 0.0 and m["exact_match"] == 0.0
    assert m["lang_share_reference"] == 1.0
    tamil = {d["question"]: " " + d["answer"] for d in TAMIL_GEN_DOCS}
    m = evaluate(model, [task], tokenizer=tok, progress=False, generate=_answerer(tamil)).tasks["toy_gen_ta"].metrics
    assert m["lang_share"] == 1.0 and m["exact_match"] == 1.0 and m["chrf"] == pytest.approx(100.0)


def test_generation_with_the_tiny_model_is_scored_on_what_it_generates(tiny_model, tmp_path):
    model, tok = tiny_model
    task = load_task(write_task(tmp_path, {**GEN_SPEC, "max_new_tokens": 5}, TAMIL_GEN_DOCS))
    res = evaluate(model, [task], tokenizer=tok, progress=False)
    preds = [s["prediction"] for s in res.samples["toy_gen_ta"]]
    refs = [d["answer"] for d in TAMIL_GEN_DOCS]
    m = res.tasks["toy_gen_ta"].metrics
    assert m["chrf"] == pytest.approx(metrics.chrf(preds, refs))
    assert m["lang_share"] == pytest.approx(metrics.language_share(preds, ["ta"]))


def test_bits_per_character_task(tiny_model, tmp_path):
    model, tok = tiny_model
    texts = ["மனிதர் அனைவரும் சுதந்திரமாக", "All human beings are born free"]
    task = load_task(write_task(tmp_path, {"name": "toy_bpc", "kind": "bits_per_char"}, [{"text": t} for t in texts]))
    res = evaluate(model, [task], tokenizer=tok, progress=False)
    nll = -sum(direct_loglikelihood(model, [tok.bos_token_id], tok.encode(t)) for t in texts)
    assert res.tasks["toy_bpc"].metrics["bpc"] == pytest.approx(nll / math.log(2) / sum(map(len, texts)), rel=1e-5)


def test_chat_template(tiny_model, tmp_path):
    model, tok = tiny_model
    task = load_task(write_task(tmp_path, MC_SPEC, MC_DOCS))
    with pytest.raises(LangmergeError, match="no chat template"):
        evaluate(model, [task], tokenizer=tok, options=EvalOptions(chat_template=True), progress=False)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    try:
        res = evaluate(model, [task], tokenizer=tok, options=EvalOptions(chat_template=True), progress=False)
    finally:
        tok.chat_template = None
    assert res.samples["toy_mc"][0]["context"] == "<user>Q: a b c\nA:\n<assistant>"


def test_write_results_and_gap_to_english(tiny_model, tmp_path):
    model, tok = tiny_model
    tasks = [load_task(materialize(n, tmp_path / "cache")) for n in ("next_day_ta", "next_day_en")]
    res = evaluate(model, tasks, tokenizer=tok, progress=False, options=EvalOptions(limit=4))
    out = write_results(res, tmp_path / "out")
    summary = json.loads((out / "results.json").read_text())
    assert summary["tasks"]["next_day_ta"]["n"] == 4 and "samples" not in summary
    # results.json keeps its layout: the keys it had when evaluate returned a dict, in that order
    assert list(summary) == ["model", "settings", "tasks"]
    assert list(summary["settings"]) == [
        "few_shot",
        "batch_size",
        "limit",
        "chat_template",
        "max_length",
        "seed",
        "precision",
    ]
    assert list(summary["tasks"]["next_day_ta"]) == [
        "kind",
        "language",
        "family",
        "n",
        "few_shot",
        "metrics",
        "seconds",
        "examples_per_s",
    ]
    assert summary == json.loads(json.dumps(res.summary())) and summary["settings"]["limit"] == 4
    md = (out / "results.md").read_text()
    gap = summary["tasks"]["next_day_ta"]["metrics"]["acc"] - summary["tasks"]["next_day_en"]["metrics"]["acc"]
    assert "| next_day | acc |" in md and f"{gap:+.4f}" in md
    assert (out / "results.png").stat().st_size > 0 and len((out / "samples.jsonl").read_text().splitlines()) == 8
    with pytest.raises(LangmergeError, match="already exists"):
        write_results(res, out)


def _cli_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("langmerge: error: ")
    return err


def test_cli_bad_input_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys):
    assert "unknown task 'bogus'" in _cli_error(capsys, ["eval", str(tiny_model_dir), "--tasks", "bogus"])
    bad = write_task(tmp_path / "bad", MC_SPEC, json.dumps(MC_DOCS[0]) + "\n{oops\n")
    assert "toy_mc.jsonl:2" in _cli_error(capsys, ["eval", str(tiny_model_dir), "--tasks", str(bad)])
    empty = write_task(tmp_path / "empty", MC_SPEC, "")
    assert "no examples" in _cli_error(capsys, ["eval", str(tiny_model_dir), "--tasks", str(empty)])
    missing = write_task(tmp_path / "missing", {**MC_SPEC, "prompt": "{passage}"}, MC_DOCS)
    assert "field 'passage'" in _cli_error(capsys, ["eval", str(tiny_model_dir), "--tasks", str(missing)])
    good = write_task(tmp_path / "good", MC_SPEC, MC_DOCS)
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in _cli_error(capsys, ["eval", str(broken), "--tasks", str(good)])
    (broken / "config.json").write_text("{}")
    assert "cannot load the model" in _cli_error(capsys, ["eval", str(broken), "--tasks", str(good)])
    assert "does not exist" in _cli_error(capsys, ["eval", str(tmp_path / "nowhere"), "--tasks", str(good)])
    (tmp_path / "empty_model").mkdir()
    assert "no config.json" in _cli_error(capsys, ["eval", str(tmp_path / "empty_model"), "--tasks", str(good)])


def test_cli_writes_results(tiny_model_dir, tmp_path, capsys):
    good = write_task(tmp_path / "good", MC_SPEC, MC_DOCS)
    out = tmp_path / "out"
    assert main(["eval", str(tiny_model_dir), "--tasks", str(good), "--out", str(out), "--no-progress"]) == 0
    assert "| toy_mc |" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["tasks"]["toy_mc"]["n"] == 6
    assert "already exists" in _cli_error(
        capsys, ["eval", str(tiny_model_dir), "--tasks", str(good), "--out", str(out)]
    )


def test_per_example_outcomes_and_bf16_precision(tiny_model, tmp_path):
    """Each sample says whether it was right; bf16 autocast gives nearly the fp32 log-likelihoods."""
    model, tok = tiny_model
    task = load_task(write_task(tmp_path, MC_SPEC, MC_DOCS))
    fp32 = evaluate(model, [task], tokenizer=tok, progress=False)
    bf16 = evaluate(model, [task], tokenizer=tok, progress=False, options=EvalOptions(precision="bf16"))
    samples = fp32.samples["toy_mc"]
    assert [s["correct"] for s in samples] == [int(s["predicted"] == s["gold"]) for s in samples]
    assert sum(s["correct"] for s in samples) / len(samples) == fp32.tasks["toy_mc"].metrics["acc"]
    for a, b in zip(samples, bf16.samples["toy_mc"]):
        assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], abs=0.1)
        assert b["loglikelihoods"] != a["loglikelihoods"]  # the products did run in bfloat16
    assert bf16.settings.precision == "bf16"
    with pytest.raises(ValidationError, match=r"precision\n  Input should be 'fp32' or 'bf16'"):
        EvalOptions(precision="fp16")
