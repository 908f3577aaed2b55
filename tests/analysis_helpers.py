"""Shared fixtures for the analysis and tuning tests: a tiny trio and recipes over it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from langmerge.synthetic import LlamaShape, make_trio, write_model

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, max_positions=128)


def tiny_trio(root: Path, **kw) -> dict[str, Path]:
    return make_trio(root, SHAPE, **kw)


def ct_model(root: Path, scale: float, tokens: int | None = None) -> Path:
    """A CT model of the trio's base with task-vector scale ``scale`` (optionally with training metadata)."""
    folder = write_model(root, SHAPE, delta_scale=scale, delta_key="ct")
    if tokens is not None:
        (folder / "langmerge_training.json").write_text(json.dumps({"kind": "ct", "tokens": {"target": tokens}}))
    return folder


def recipe(
    paths: dict[str, Path],
    method: str = "ties_sv",
    *,
    slack: float | None = 1.0,
    ct_density: float = 0.5,
    sft_density: float = 0.5,
    weights=(1.0, 1.0),
    dtype: str = "float32",
    ct: Path | None = None,
) -> dict:
    out = {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(ct or paths["ct"]), "parameters": {"weight": weights[0], "density": ct_density}},
            {"model": str(paths["sft"]), "parameters": {"weight": weights[1], "density": sft_density}},
        ],
        "dtype": dtype,
    }
    if method == "ties_sv":
        out["parameters"] = {"protect": [str(paths["sft"])]}
        if slack is not None:
            out["parameters"]["slack"] = slack
    return out


def write_recipe(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out
