"""Atomic output folders: write beside the target, move into place when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from langmerge.errors import LangmergeError


def check_output_free(out_dir: str | Path, force: bool) -> Path:
    """Refuse an existing output unless ``force``; call before any work starts."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise LangmergeError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise LangmergeError(f"output {out} exists and is not a folder")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, force: bool = False):
    """Yield a temporary folder beside ``out_dir``; on success it becomes ``out_dir``.

    On any exception (including KeyboardInterrupt) the temporary folder is
    removed and ``out_dir`` is left exactly as it was.
    """
    out = check_output_free(out_dir, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            # Replace in two renames so that a crash never leaves neither folder.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
