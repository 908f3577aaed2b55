"""mergekit's command-line tools as golden references, and reading a merged folder's rows by token."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from langmerge.cli import main


def mergekit_exe(name: str = "mergekit-yaml") -> str:
    """The mergekit command ``name`` of this interpreter's environment (else the one on PATH)."""
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else shutil.which(name)


def vocab(folder: Path) -> dict[str, int]:
    """The vocabulary transformers loads from a model folder's tokenizer."""
    return AutoTokenizer.from_pretrained(folder).get_vocab()


def merge_both(recipe: dict, tmp_path: Path) -> tuple[Path, Path]:
    """``recipe`` merged by mergekit-yaml into ``tmp_path/mk`` and by ``langmerge merge`` into ``tmp_path/lm``."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    subprocess.run([mergekit_exe("mergekit-yaml"), str(path), str(tmp_path / "mk")], check=True, capture_output=True)
    assert main(["merge", str(path), str(tmp_path / "lm"), "--no-progress"]) == 0
    return tmp_path / "mk", tmp_path / "lm"
