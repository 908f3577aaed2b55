"""Output folders: checked before any work, written beside the target, moved into place when complete.

Every command that writes a folder goes through this module (docs/checkpoints.md, "Output folders"):

- ``check_output_free`` runs before any work. It refuses an OUT_DIR that exists (unless
  ``force``), that is a file, a symlink, the current folder or one of its parents, or that
  equals, contains or lies inside one of the run's inputs (with or without ``force``); it
  tries a real write where the folder will be created, so a read-only or full location fails
  now, not after the work; and it removes the partial folders that killed runs left beside
  OUT_DIR. ``check_space`` adds what a merge knows in advance: the bytes of each file.
- ``atomic_output_dir`` yields a partial folder beside OUT_DIR, named after its owner (host,
  pid, process start time) so that the next run can tell a dead owner's leftovers from a live
  one's. On success it becomes OUT_DIR: without ``force`` by a rename that never replaces
  (``renameat2(RENAME_NOREPLACE)``), so an OUT_DIR that appeared meanwhile (another run) is
  kept and this run fails; with ``force`` under a lock file beside OUT_DIR, in two renames,
  the old output kept until the new one is in place. On any exception (KeyboardInterrupt and
  the CLI's SIGTERM included) the partial folder is removed; a write that fails for lack of
  space or permission becomes a one-line ``LangmergeError`` naming the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from langmerge.errors import LangmergeError
from langmerge.io.files import symlink_root

if sys.platform == "win32":  # not POSIX: no lock; os.rename never replaces a folder there
    fcntl = None
else:
    import fcntl

log = logging.getLogger(__name__)

PROBE_BYTES = 1  # a full disk refuses even one byte; sizes known in advance go through check_space
WRITE_ERRORS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust writer reports an OSError


class OutputAppeared(LangmergeError):
    """OUT_DIR was created by someone else while this run was working (and ``force`` was not given)."""


# ----------------------------------------------------------------------------- owners of partial folders


def _host_tag() -> str:
    # No '-' in the tag: the owner fields of a folder name are split on it.
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def process_start(pid: int) -> int:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22); 0 where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class Owner:
    """Who writes a partial folder: recorded in its name, checked by the next run."""

    host: str
    pid: int
    start: int  # process_start(pid) when the folder was made; 0 where unknown

    @classmethod
    def current(cls) -> Owner:
        return cls(_host_tag(), os.getpid(), process_start(os.getpid()))

    @property
    def tag(self) -> str:
        return f"{self.host}-{self.pid}-{self.start}"

    def state(self) -> str:
        """``dead``, ``alive`` or ``elsewhere`` (another host: cannot tell)."""
        if self.host != _host_tag():
            return "elsewhere"
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return "dead"
        except PermissionError:
            pass  # another user's live process
        if self.start and process_start(self.pid) not in (0, self.start):
            return "dead"  # the pid was reused by a later process
        return "alive"


_LEFTOVER = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+$"
)


def _leftovers(parent: Path, name: str | None) -> Iterator[tuple[Path, str, str, Owner | None]]:
    """``(path, output name, kind, owner)`` of each partial/old folder in ``parent`` (for output ``name`` or all)."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        m = _LEFTOVER.match(entry.name)
        if m:
            if name is None or m["name"] == name:
                yield Path(entry.path), m["name"], m["kind"], Owner(m["host"], int(m["pid"]), int(m["start"]))
        elif ".partial-" in entry.name and (name is None or entry.name.startswith(f".{name}.partial-")):
            yield Path(entry.path), name or "?", "partial", None


_LEFT_ALONE = {
    "alive": "process {owner.pid} is still running",
    "elsewhere": "it belongs to host {owner.host}",
    "unknown": "langmerge did not name it, so its owner is unknown",
}


def remove_dead_partials(parent: str | Path, name: str | None = None) -> list[Path]:
    """Remove the partial folders in ``parent`` whose owner ran on this host and is dead.

    ``name``: only those of the output ``parent/name`` (default: every output in ``parent``).
    A dead owner's ``.old-`` folder (a forced replacement killed between its two renames) is
    removed when its output exists and moved back into place when it does not. A live owner's
    folder, another host's and one of unknown owner are left alone (and logged).
    """
    parent = Path(parent)
    removed = []
    for path, out_name, kind, owner in _leftovers(parent, name):
        state = owner.state() if owner is not None else "unknown"
        if state != "dead":
            log.info("left %s alone: %s", path, _LEFT_ALONE[state].format(owner=owner))
            continue
        out = parent / out_name
        if kind == "old":
            with output_lock(out):
                if not os.path.lexists(out) and os.path.lexists(path):
                    os.rename(path, out)
                    log.warning("restored %s from %s (a forced replacement was killed half-way)", out, path.name)
                    continue
        assert owner is not None  # "dead" is the state of a known owner
        log.info("removing %s (left by process %d, which is gone)", path, owner.pid)
        _remove(path)
        removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def make_partial_dir(out: Path) -> Path:
    """A new folder ``.NAME.partial-<owner>-<random>`` beside ``out``, with the mode a plain mkdir gives."""
    prefix = f".{out.name}.partial-{Owner.current().tag}-"
    while True:
        path = out.parent / (prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)  # mode 0o777 & ~umask (and the parent's default ACL), unlike mkdtemp's 0o700
            return path
        except FileExistsError:
            continue


# ----------------------------------------------------------------------------- the commit


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``out`` (flock); the file is removed on release.

    A waiter that locked a file since unlinked by the holder retries on the new one, so
    removing the file never lets two processes hold the lock.
    """
    if fcntl is None:
        yield
        return
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2: Callable[..., int] | None
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (OSError, AttributeError):  # not glibc >= 2.28 (or not Linux)
    _renameat2 = None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError (nothing renamed) when ``dst`` exists.

    Atomic where the kernel and file system have ``renameat2(RENAME_NOREPLACE)``; elsewhere a
    check then a rename, atomic against other langmerge runs because commits hold ``output_lock``.
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while renames must happen together, then deliver the first one.

    Python runs signal handlers in the main thread whichever thread the kernel picks, so the
    handlers are swapped there (a signal mask would not hold with other threads running).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None:  # None: installed outside Python, left as it is
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])


def _commit(tmp: Path, out: Path, shown: str, force: bool) -> None:
    old = None
    with output_lock(out), _signals_deferred():
        if not force:
            try:
                rename_noreplace(tmp, out)
            except FileExistsError:
                raise OutputAppeared(
                    f"output {shown} appeared while this run was working (another run?); it was kept as it is "
                    "and this run's output discarded; pass --force to replace it"
                ) from None
            return
        if os.path.lexists(out):
            # Two renames, so that a crash never leaves neither folder (remove_dead_partials restores it).
            old = out.parent / f".{out.name}.old-{Owner.current().tag}-{secrets.token_hex(4)}"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
    if old is not None:
        _remove(old)


# ----------------------------------------------------------------------------- checks before any work


def _resolved_roots(path: Path) -> list[Path]:

    roots = [path.resolve()]
    if path.is_dir() and symlink_root(path) != roots[0]:
        roots.append(symlink_root(path))  # a Hugging Face cache snapshot reads its repository's blobs/ too
    return roots


def check_disjoint(outputs: Iterable[str | Path], inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that equals, contains or lies inside an input, comparing resolved paths."""
    outs = [(str(o), Path(o).resolve()) for o in outputs]
    for given in inputs:
        if given is None or not os.path.lexists(given):
            continue  # nothing there to lose (a Hub id, a name, a missing file reported by the command)
        for root in _resolved_roots(Path(given)):
            for shown, out in outs:
                if out == root:
                    relation = "is"
                elif root in out.parents:
                    relation = "is inside"
                elif out in root.parents:
                    relation = "contains"
                else:
                    continue
                raise LangmergeError(
                    f"output {shown} {relation} the input {given}; write the output somewhere apart from the inputs"
                )


def _existing_ancestor(path: Path) -> Path:
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(path.anchor or "/")


def _write_problem(exc: OSError) -> str:
    known = WRITE_ERRORS.get(exc.errno) if exc.errno is not None else None
    return known if known is not None else exc.strerror or str(exc)


def _probe(out: Path, shown: str) -> None:
    """Create a partial folder where ``out`` will go (or its nearest existing ancestor) and write a byte."""
    parent = _existing_ancestor(out.parent)
    if not parent.is_dir():
        raise LangmergeError(f"output {shown}: cannot create it, {parent} is not a folder")
    probe = None
    try:
        probe = make_partial_dir(parent / out.name)
        with open(probe / "probe", "wb") as fh:
            fh.write(b"\0" * PROBE_BYTES)
    except OSError as exc:
        raise LangmergeError(f"output {shown}: cannot write in {parent} ({_write_problem(exc)})") from None
    finally:
        if probe is not None:
            _remove(probe)


def check_output_free(
    out_dir: str | Path, force: bool, inputs: Iterable[str | Path | None] = (), *, probe: bool = True
) -> Path:
    """Refuse what the output folder cannot be, before any work starts (see the module doc).

    ``inputs``: every path the run reads (model folders, data files, the recipe); the output
    may not equal, contain or lie inside any of them, with or without ``force``. Removes the
    partial folders that dead runs left beside the output. Returns the output, resolved.
    """
    shown = str(out_dir)
    given = Path(out_dir)
    if given.is_symlink():
        target = os.readlink(given)
        missing = "" if given.exists() else ", which does not exist"
        raise LangmergeError(f"output {shown} is a symlink to {target}{missing}; name a real folder")
    out = given.resolve()
    try:
        cwd = Path.cwd().resolve()
    except FileNotFoundError:  # the current folder was deleted: nothing of it to protect
        cwd = None
    if cwd is not None and (out == cwd or out in cwd.parents):
        raise LangmergeError(f"output {shown} is the current folder or one of its parents; name a new folder")
    check_disjoint([out_dir], inputs)
    if out.parent.is_dir():
        remove_dead_partials(out.parent, out.name)
    if out.exists() and not out.is_dir():
        raise LangmergeError(f"output {shown} exists and is not a folder")
    if out.exists() and not force:
        raise LangmergeError(f"output {shown} already exists; pass --force to replace it")
    if probe:
        _probe(out, shown)
    return out


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def check_space(out_dir: str | Path, file_bytes: Mapping[str, int]) -> None:
    """Refuse, before the work, an output whose files (name -> at least this many bytes) cannot fit.

    Checks the free space of the file system (statvfs) and the largest file against the
    process's file size limit (RLIMIT_FSIZE, ``ulimit -f``).
    """
    if not file_bytes:
        return
    out = Path(out_dir).resolve()
    where = _existing_ancestor(out.parent)
    name, largest = max(file_bytes.items(), key=lambda kv: kv[1])
    limit = _file_size_limit()
    if limit is not None and largest > limit:
        raise LangmergeError(
            f"output {out_dir}: {name} will be {largest:,} bytes but this process may write files of at most "
            f"{limit:,} bytes (RLIMIT_FSIZE, ulimit -f)"
        )
    try:
        st = os.statvfs(where)
    except (OSError, AttributeError):
        return
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    need = sum(file_bytes.values())
    if need > free:
        raise LangmergeError(
            f"output {out_dir}: not enough disk space in {where} (the output needs {need:,} bytes, {free:,} are free)"
        )


# ----------------------------------------------------------------------------- the output folder


def _newest_file(folder: Path) -> Path | None:
    newest, when = None, -1.0
    for root, _, files in os.walk(folder):
        for f in files:
            p = Path(root) / f
            with contextlib.suppress(OSError):
                t = p.stat().st_mtime_ns
                if t > when:
                    newest, when = p, t
    return newest


def write_error(exc: BaseException, tmp: Path, shown: str) -> LangmergeError | None:
    """A one-line error for a write that failed for lack of space or permission, naming the output file."""
    if isinstance(exc, OSError):
        code, filename = exc.errno, exc.filename
    elif isinstance(exc, Exception) and (m := _RUST_OS_ERROR.search(str(exc))):
        code, filename = int(m.group(1)), None
    else:
        return None
    if code not in WRITE_ERRORS:
        return None
    path = Path(os.fsdecode(filename)) if filename else _newest_file(tmp)
    try:
        name = str(Path(shown) / path.resolve().relative_to(tmp.resolve())) if path else shown
    except ValueError:
        return None  # a file outside the output (an input, a cache): not this folder's write error
    return LangmergeError(f"{WRITE_ERRORS[code]} writing {name} ({os.strerror(code)}); no partial output was kept")


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created (outermost first)."""
    missing = []
    for p in (folder, *folder.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    created: list[Path] = []
    for p in reversed(missing):
        try:
            os.mkdir(p)
        except FileExistsError:
            continue
        except OSError:
            _remove_empty(created)
            raise
        created.append(p)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for p in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(p)


@contextlib.contextmanager
def atomic_output_dir(
    out_dir: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """Yield a partial folder beside ``out_dir``; on success it becomes ``out_dir``.

    On any exception (including KeyboardInterrupt) the partial folder is removed, with
    the parent folders this call created, and ``out_dir`` is left exactly as it was.
    Without ``force``, an ``out_dir`` that appeared meanwhile is kept and ``OutputAppeared``
    raised; with it, the old output is replaced once the new one is complete.
    """
    shown = str(out_dir)
    inputs = list(inputs)
    out = check_output_free(out_dir, force, inputs, probe=False)
    try:
        created = _make_parents(out.parent)
        tmp = make_partial_dir(out)
    except OSError as exc:
        raise LangmergeError(f"output {shown}: cannot create it ({_write_problem(exc)})") from None
    try:
        yield tmp
        _commit(tmp, out, shown, force)
    except BaseException as exc:
        translated = write_error(exc, tmp, shown)
        _remove(tmp)
        _remove_empty(created)
        if translated is not None:
            raise translated from exc
        raise
