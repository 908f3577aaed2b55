"""A tiny study for the tests: a generated Llama-shaped base (character tokenizer), Chichewa-like text."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from langmerge.study.sources import english_task_sft
from langmerge.synthetic import LlamaShape, write_model

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, max_positions=256)
DAYS_NY = ["Lolemba", "Lachiwiri", "Lachitatu", "Lachinayi", "Lachisanu", "Loweruka", "Lamlungu"]
TRAIN = {"seq_len": 64, "batch_size": 4, "micro_batch_size": 4, "lr": 0.002, "warmup": 0, "seed": 0}


def write_inputs(root: Path) -> dict[str, Path]:
    """Base model, CT text (Chichewa day names in running order) and English replay text."""
    root.mkdir(parents=True, exist_ok=True)
    base = write_model(root / "base", SHAPE, seed=0)
    lines = []
    for k in range(60):
        start = k % 7
        lines.append(", ".join(DAYS_NY[(start + j) % 7] for j in range(4)) + ".")
    (root / "ny.txt").write_text("\n".join(lines) + "\n")
    english = [f"The meeting on day {k} was moved to the next week, and everyone agreed." for k in range(40)]
    (root / "en.txt").write_text("\n".join(english) + "\n")

    with (root / "sft.jsonl").open("w") as fh:  # a small part of the built-in English SFT set (calendar, numbers)
        for rec in [r for r in english_task_sft() if not r["prompt"].startswith("Verse: ")][:40]:
            fh.write(json.dumps(rec) + "\n")
    return {"base": base, "text": root / "ny.txt", "replay": root / "en.txt", "sft": root / "sft.jsonl"}


def study_dict(root: Path, out: Path, **changes) -> dict:
    d = {
        "name": "tiny",
        "out": str(out),
        "base": {"path": str(root / "base")},
        "sft": {"data": str(root / "sft.jsonl"), "epochs": 1, "training": TRAIN},
        "replay": [str(root / "en.txt")],
        "replay_ratio": "4:1",
        "ct_training": TRAIN,
        "languages": {
            "ny": {
                "text": [str(root / "ny.txt")],
                "budgets": [300, 600, 1200],
                "validation": ["next_month_ny"],
                "test": ["next_day_ny"],
            },
        },
        "methods": {
            "wavg": {
                "merge_method": "linear",
                "space": {"models[ct].parameters.weight": {"values": [0.3, 0.7]}},
                "sft": {"weight": 1.0},
                "ct": {"weight": 1.0},
            },
            "ties": {
                "merge_method": "ties",
                "ct": {"weight": 1.0},
                "sft": {"weight": 1.0},
                "space": {"parameters.density": {"values": [0.5]}},
            },
            "ties_sv": {
                "merge_method": "ties_sv",
                "ct": {"weight": 1.0},
                "sft": {"weight": 1.0},
                "parameters": {"density": 0.5},
                "space": {"parameters.slack": {"values": [0.0, 1.0]}},
            },
            "ta": {"merge_method": "task_arithmetic", "ct": {"weight": 1.0}, "sft": {"weight": 1.0}},  # nothing to tune
            "swap": {
                "merge_method": "layer_swap",
                "parameters": {"k_bottom": 1, "k_top": 0},
                "space": {"parameters.k_top": {"values": [0, 1]}},
            },
        },
        "tuning": {"limit": 6},
        "evaluation": {"limit": 8, "batch_size": 8},
    }
    d.update(changes)
    return d


def write_study(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def done_markers(cache: Path) -> dict[str, int]:
    """Step folder name -> mtime (ns) of its done.json."""
    return {p.parent.name: p.stat().st_mtime_ns for p in Path(cache).glob("*/done.json")}


def load_results(out: Path) -> dict:
    return json.loads((Path(out) / "report" / "results.json").read_text())
