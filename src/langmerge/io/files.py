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
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from langmerge.errors import LangmergeError

# Top-level folders of a huggingface_hub cache repository, by repository type.
CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def cache_repository(folder: Path) -> Path | None:
    """The cache repository (``models--ORG--NAME``) that the resolved ``folder`` is a snapshot of (or lies in), else None."""
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
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
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
