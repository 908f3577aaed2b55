"""Data parallel: two CPU processes (torchrun, gloo, through accelerate's Accelerator) train what one process trains.

``accelerate launch`` starts GPU processes; for several CPU processes it expects
mpirun, so the test launches with torchrun, which sets the same environment.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from langmerge.cli import main
from train_helpers import TAMIL, tiny_base, write_lines


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ARGS = ["--tokens", "1000", "--save-at", "500", "--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--no-progress"]


def test_two_process_ddp_matches_one_process(tmp_path):
    base = tiny_base(tmp_path / "base")
    text = write_lines(tmp_path / "ta.txt", TAMIL, repeat=20)
    common = ["train", "ct", "--base", str(base), "--text", str(text), *ARGS]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "langmerge",
    ]
    # One sequence per forward pass: each process accumulates its two sequences of a step.
    proc = subprocess.run(
        [*launch, *common, "--micro-batch-size", "1", "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "two" / "langmerge_training.json").read_text())
    assert meta["processes"] == 2 and meta["tokens"]["target"] == 1000
    assert (
        json.loads((tmp_path / "two" / "tokens-500" / "langmerge_training.json").read_text())["tokens"]["target"] == 500
    )
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    base_w = load_file(base / "model.safetensors")
    for name in one:
        # Same updates up to float summation order; far from the base weights.
        assert torch.allclose(one[name], two[name], atol=1e-4), name
    assert max((one[n] - base_w[n]).abs().max().item() for n in one) > 1e-2
