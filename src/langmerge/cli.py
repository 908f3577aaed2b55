"""The ``langmerge`` command: one entry point, one subcommand per job.

Each feature package contributes its subcommands through an
``add_commands(subparsers)`` function listed in ``COMMAND_PROVIDERS``; a
handler receives the parsed arguments and returns an exit code. Input errors
(``LangmergeError``) and bad options become one line on stderr and exit code 2.
SIGINT and SIGTERM (what ``timeout``, Slurm and ``docker stop`` send) both
raise ``Interrupted``, so every output folder in progress is removed on the
way out (exit 130 and 143).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading

from langmerge.errors import LangmergeError
from langmerge.io.output import WRITE_ERRORS
from langmerge.progress import library_progress_bars

COMMAND_PROVIDERS = (
    "langmerge.merge.cli",
    "langmerge.training.cli",
    "langmerge.evaluation.cli",
    "langmerge.analysis.cli",
    "langmerge.tuning.cli",
    "langmerge.study.cli",
)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds like Ctrl-C, so every ``atomic_output_dir`` removes its partial folder."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signal_handling():
    """SIGINT/SIGTERM raise ``Interrupted`` (once: the cleanup that follows is not cut short);
    SIGXFSZ is ignored, so a write past the file size limit fails with EFBIG instead of killing us."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def interrupt(signum, frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    if hasattr(signal, "SIGXFSZ"):
        previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Parser(argparse.ArgumentParser):
    """Option errors on one line (and exit 2), like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="langmerge",
        description="Task-solving LLMs for low-resource languages by merging a CT model and an SFT model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for provider in COMMAND_PROVIDERS:
        importlib.import_module(provider).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        with _signal_handling(), library_progress_bars(not getattr(args, "no_progress", False)):
            return args.handler(args)
    except LangmergeError as exc:
        print(f"langmerge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        # Outside an output folder (e.g. a library's cache): still one line, not a traceback.
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"langmerge: error: {WRITE_ERRORS[exc.errno]}{where} ({exc.strerror})", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"langmerge: interrupted ({signal.Signals(signum).name}); no partial output was kept", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
