"""Progress: the reporter that library functions tell, and the libraries' own bars.

Library functions (``merge``, ``analyze``, the in-memory tuner) never draw a bar: they tell a
``Reporter`` passed in (``start(total)``, ``advance(n, nbytes)``, ``close()``), and the CLI
passes ``TqdmReporter``, a bar of tensors with the bytes per second.

transformers draws "Loading weights" in ``from_pretrained`` and "Writing model shards" in
``save_pretrained``; huggingface_hub and datasets draw theirs. ``--no-progress`` hides them
for the duration of a command (``library_progress_bars(False)``), then restores each
library's setting.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from tqdm.auto import tqdm


class Reporter(Protocol):
    """What a long job says about its progress."""

    def start(self, total: int) -> None:
        """``total`` units of work (tensors) to come."""

    def advance(self, n: int, nbytes: int = 0) -> None:
        """``n`` more units done, ``nbytes`` more bytes processed (either may be 0)."""

    def close(self) -> None: ...


class TqdmReporter:
    """A tqdm bar of units (tensors), with the bytes per second processed so far (the CLI's reporter)."""

    def __init__(self, desc: str, unit: str = "tensor"):
        self.desc, self.unit = desc, unit
        self.bar: Any = None  # a tqdm bar once started
        self.nbytes = 0
        self.began = time.perf_counter()

    def start(self, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, unit=self.unit, desc=self.desc)
            self.began = time.perf_counter()

    def advance(self, n: int, nbytes: int = 0) -> None:
        if self.bar is None:
            return
        self.nbytes += nbytes
        if n:
            self.bar.update(n)
        if nbytes:
            rate = self.nbytes / 1e9 / max(time.perf_counter() - self.began, 1e-9)
            self.bar.set_postfix_str(f"{rate:.2f} GB/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def library_progress_bars(enabled: bool):
    """Hide the libraries' progress bars while the block runs, unless ``enabled``.

    huggingface_hub is switched directly (cheap to import; transformers copies its setting
    when it is imported later); transformers and datasets through their own switches when
    they are already imported, and transformers again on the way out if it was imported inside.
    """
    if enabled:
        yield
        return
    # huggingface_hub reads the environment when imported: imported where it is used (io/hub.py says why)
    from huggingface_hub import utils as hub

    hub_was_on = not hub.are_progress_bars_disabled()
    undo: list[Callable[[], object]] = []
    if hub_was_on:
        hub.disable_progress_bars()
        undo.append(hub.enable_progress_bars)
    transformers_before = "transformers.utils.logging" in sys.modules
    if transformers_before:
        from transformers.utils import logging as tf_logging  # imported already (slow to import otherwise)

        if tf_logging.is_progress_bar_enabled():
            tf_logging.disable_progress_bar()
            undo.append(tf_logging.enable_progress_bar)
    ds_tqdm = sys.modules.get("datasets.utils.tqdm")  # the module (datasets.utils.tqdm is also a class's name)
    if ds_tqdm is not None:
        if not ds_tqdm.are_progress_bars_disabled():
            ds_tqdm.disable_progress_bars()
            undo.append(ds_tqdm.enable_progress_bars)
    try:
        yield
    finally:
        if not transformers_before and hub_was_on and "transformers.utils.logging" in sys.modules:
            sys.modules["transformers.utils.logging"].enable_progress_bar()  # it was imported with the bars off
        for restore in reversed(undo):
            restore()
