"""The progress bars of the libraries langmerge calls: shown or hidden with langmerge's own.

transformers draws "Loading weights" in ``from_pretrained`` and "Writing model shards" in
``save_pretrained``; huggingface_hub and datasets draw theirs. ``--no-progress`` hides them
for the duration of a command (``library_progress_bars(False)``), then restores each
library's setting.
"""

from __future__ import annotations

import contextlib
import sys


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
    from huggingface_hub import utils as hub

    hub_was_on = not hub.are_progress_bars_disabled()
    undo = []
    if hub_was_on:
        hub.disable_progress_bars()
        undo.append(hub.enable_progress_bars)
    transformers_before = "transformers.utils.logging" in sys.modules
    if transformers_before:
        from transformers.utils import logging as tf_logging

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
