"""Tiny models and corpora for the training tests (built offline, in the test)."""

from __future__ import annotations

from pathlib import Path

from langmerge.synthetic import LlamaShape, write_model
from langmerge.training import TrainOptions

TINY = LlamaShape(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, max_positions=128)

TAMIL = [
    "தமிழ் ஒரு செம்மொழி ஆகும்.",
    "இது இந்தியாவிலும் இலங்கையிலும் பேசப்படுகிறது.",
    "மனிதர் அனைவரும் சம உரிமை உடையவர்.",
    "ஒவ்வொருவருக்கும் கல்வி பெறும் உரிமை உண்டு.",
]
ENGLISH = [
    "All human beings are born free and equal in dignity and rights.",
    "Everyone has the right to education.",
    "The quick brown fox jumps over the lazy dog.",
]


def tiny_base(folder: Path) -> Path:
    return write_model(folder, TINY, seed=0)


def write_lines(path: Path, lines: list[str], repeat: int = 1) -> Path:
    path.write_text("\n".join(lines * repeat) + "\n", encoding="utf-8")
    return path


def fast_options(**changes) -> TrainOptions:
    base = dict(seq_len=32, batch_size=4, micro_batch_size=2, lr=3e-3, warmup=0.1, seed=0)
    base.update(changes)
    return TrainOptions(**base)
