"""Which files of a model folder langmerge may read, and how it opens them.

A model folder is untrusted input. An index file or a symlink may point
anywhere on the machine, and a FIFO, socket or device named like a weight or
config file would hang a plain ``open``. Every file read from a model folder
goes through ``model_file`` (where it resolves to) and ``open_regular`` (what
it is); docs/checkpoints.md states the rule for users.

Where a file may resolve to: inside the folder's *root*. The root is the
folder itself, except for a snapshot of the Hugging Face cache
(``<cache>/models--ORG--NAME/snapshots/REVISION/``), whose files are symlinks
into the repository's ``blobs/``: there the root is the cache repository
``models--ORG--NAME/``. A symlink that resolves anywhere else is refused.

A file langmerge needs (weights, an index, config.json) that breaks the rule is
refused with a one-line error (``folder_file``); an optional one that is only
copied into an output (tokenizer files, generation config, chat templates) is
skipped with a warning naming it (``optional_folder_file``). A folder handed to
a library that reads it itself (transformers) is checked whole first
(``check_folder_files``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any, BinaryIO

from langmerge.errors import LangmergeError

log = logging.getLogger(__name__)

# Top-level folders of a huggingface_hub cache repository, by repository type.
CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def cache_repository(folder: Path) -> Path | None:
    """The cache repository (``models--ORG--NAME``) that the resolved ``folder`` is a snapshot of (or lies in).

    None when ``folder`` is not in a Hugging Face cache.
    """
    resolved = folder.resolve()
    for path in (resolved, *resolved.parents):
        snapshots = path.parent
        if snapshots.name == "snapshots" and snapshots.parent.name.startswith(CACHE_REPO_PREFIXES):
            return snapshots.parent
    return None


def symlink_root(folder: Path) -> Path:
    """The folder that files of ``folder`` may resolve into (see the module doc)."""
    return cache_repository(folder) or folder.resolve()


def model_file(folder: Path, relative: str | Path, *, what: str) -> Path:
    """``folder / relative``, resolved; refused when absolute or when it (or a symlink on the way) leaves the root.

    ``what`` starts the error message and names the reference, e.g.
    ``"<index>: weight map entry 'x.safetensors'"``.
    """
    if Path(relative).is_absolute():
        raise LangmergeError(f"{what} is an absolute path; refused")
    root = symlink_root(folder)
    target = (folder / relative).resolve()
    if target != root and root not in target.parents:
        raise LangmergeError(f"{what} points outside the model folder; refused")
    return target


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for binary reading, refusing anything but a regular file.

    The open itself must not block: a FIFO opened for reading waits for a
    writer, so it is opened non-blocking and checked with ``fstat`` before any read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise LangmergeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise LangmergeError(f"{path}: {_kind(mode)}, not a regular file; refused")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_regular_file(path: Path) -> bool:
    """True for a regular file (following symlinks); False for a missing path, a folder, a FIFO, a device."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _require_regular(path: Path, shown: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise LangmergeError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise LangmergeError(f"{shown}: {_kind(mode)}, not a regular file; refused")


def folder_file(folder: Path, name: str) -> Path | None:
    """``folder / name``, checked: None when the folder has no such entry.

    A symlink leaving the folder's root, or an entry that is not a regular file
    (a FIFO, socket, device or folder), is a LangmergeError naming it. The path
    returned is the folder's own spelling (messages name it as the user knows it).
    """
    shown = Path(folder) / name
    if not os.path.lexists(shown):
        return None
    _require_regular(model_file(Path(folder), name, what=str(shown)), shown)
    return shown


def optional_folder_file(folder: Path, name: str) -> Path | None:
    """``folder_file`` for an optional file: one that breaks the rule is skipped with a warning naming it."""
    try:
        return folder_file(folder, name)
    except LangmergeError as exc:
        log.warning("%s; skipped", str(exc).removesuffix("; refused"))
        return None


def read_regular(path: Path) -> bytes:
    """The bytes of the regular file ``path``; a read error is a LangmergeError naming it."""
    with open_regular(path) as f:
        try:
            return f.read()
        except OSError as exc:
            raise LangmergeError(f"{path}: cannot read ({exc.strerror or exc})") from None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, Any]:
    """A JSON object's dict, refusing a key given twice (json.loads would keep the last silently)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def parse_json(data: bytes, source: object, *, problem: str = "not valid JSON", unique_keys: bool = False) -> object:
    """JSON from UTF-8 bytes; bad UTF-8, bad JSON, too deep a nesting (or, with ``unique_keys``, a key given twice)
    is a one-line LangmergeError: ``source: problem (why)``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LangmergeError(f"{source}: {problem} (not UTF-8: {exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
    except _DuplicateKey as exc:
        raise LangmergeError(f"{source}: {problem} (key {exc.args[0]!r} appears twice)") from None
    except RecursionError:
        raise LangmergeError(f"{source}: {problem} (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise LangmergeError(f"{source}: {problem} ({' '.join(str(exc).split())})") from None


def read_json(path: Path) -> object:
    """The JSON a regular file holds (``read_regular`` and ``parse_json``)."""
    return parse_json(read_regular(path), path)


def copy_regular(source: Path, dest: Path) -> None:
    """Copy a regular file's bytes (never blocking on a FIFO, never following a special file)."""
    with open_regular(source) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)


def check_folder_files(folder: Path) -> None:
    """Every entry of ``folder`` keeps to the rule: for a folder that another library (transformers) reads itself.

    Symlinks must resolve inside the root, and every entry that is not a
    folder must be a regular file; the first that breaks the rule is refused by name.
    """
    folder = Path(folder)
    for entry in sorted(folder.iterdir()):
        target = model_file(folder, entry.name, what=str(entry))
        if not target.is_dir():
            _require_regular(target, entry)
