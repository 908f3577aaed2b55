"""Tiny real-world-shaped checkpoints for the checkpoint tests (extended vocabularies, adapters)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from langmerge.synthetic import LlamaShape, char_tokenizer, write_model

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1)
NEW_TOKENS = ["வணக்கம்", "தமிழ்", "மொழி"]  # whole Tamil words: the CT model's added tokens


def mergekit_yaml() -> str:
    """The ``mergekit-yaml`` of the test environment (next to the interpreter, else on PATH)."""
    exe = Path(sys.executable).parent / "mergekit-yaml"
    return str(exe) if exe.exists() else shutil.which("mergekit-yaml")


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def extend_vocabulary(folder: Path, new_tokens: list[str], seed: int = 7) -> None:
    """Add ``new_tokens`` to a synthetic model's tokenizer with random "trained" embedding rows."""
    tok = char_tokenizer()
    tok.add_tokens(new_tokens)
    state = load_state(folder)
    g = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            old = state[name]
            rows = torch.randn((len(tok) - old.shape[0], old.shape[1]), generator=g, dtype=old.dtype) * 0.2
            state[name] = torch.cat([old, rows])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = len(tok)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(folder)


def make_extended_trio(root: Path, shape: LlamaShape = SHAPE) -> dict[str, Path]:
    """base and sft with the character vocabulary; ct with NEW_TOKENS added (trained rows)."""
    root = Path(root)
    paths = {
        "base": write_model(root / "base", shape, seed=0),
        "ct": write_model(root / "ct", shape, seed=0, delta_scale=0.3, delta_key="ct"),
        "sft": write_model(root / "sft", shape, seed=0, delta_scale=0.1, delta_key="sft"),
    }
    extend_vocabulary(paths["ct"], NEW_TOKENS)
    return paths


def recipe(paths: dict[str, Path], method: str = "task_arithmetic", weights=(0.7, 0.5), **extra) -> dict:
    models = [
        {
            "model": str(paths["ct"]),
            "parameters": {"weight": weights[0], **({"density": 0.5} if "ties" in method else {})},
        },
        {
            "model": str(paths["sft"]),
            "parameters": {"weight": weights[1], **({"density": 0.5} if "ties" in method else {})},
        },
    ]
    return {"merge_method": method, "base_model": str(paths["base"]), "models": models, "dtype": "float32", **extra}
