"""Training the inputs of a merge and its baseline: continual pre-training (CT), SFT, CT-then-SFT.

``train_ct(base, texts, tokens, out)`` and ``train_sft(base, data, out)`` return a
``TrainResult``; the command line is ``langmerge train ct|sft`` (see docs/training.md).
"""

from langmerge.training.api import train_ct, train_sft
from langmerge.training.loop import TrainResult
from langmerge.training.options import LoraOptions, TrainOptions

__all__ = ["train_ct", "train_sft", "TrainOptions", "TrainResult", "LoraOptions"]
