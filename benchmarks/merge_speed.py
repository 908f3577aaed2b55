"""langmerge vs mergekit-yaml on a 1.1B-parameter Llama-shaped trio, side by side.

    python benchmarks/merge_speed.py                # full size (builds ~6.6 GB of inputs once)
    python benchmarks/merge_speed.py --layers 4     # a quicker, smaller trio

The trio (hidden 2048, intermediate 5632, 22 layers, vocab 32000, bf16,
sharded, random weights) is built once into ~/.cache/langmerge/bench (or
$LANGMERGE_CACHE/bench). Each merge runs as its own process; wall time and
peak resident memory (from wait4) are printed with their ratios, and the time
of a plain copy of the three input folders is the I/O floor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml

from langmerge.synthetic import TINYLLAMA_1B, make_trio

RECIPES = {
    "ties": lambda p: {
        "merge_method": "ties",
        "base_model": str(p["base"]),
        "models": [
            {"model": str(p["ct"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(p["sft"]), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "dtype": "bfloat16",
    },
    "task_arithmetic": lambda p: {
        "merge_method": "task_arithmetic",
        "base_model": str(p["base"]),
        "models": [
            {"model": str(p["ct"]), "parameters": {"weight": 0.5}},
            {"model": str(p["sft"]), "parameters": {"weight": 0.5}},
        ],
        "dtype": "bfloat16",
    },
}


def cache_dir() -> Path:
    root = os.environ.get("LANGMERGE_CACHE") or Path.home() / ".cache" / "langmerge"
    return Path(root) / "bench"


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty child cannot block on it
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"failed: {' '.join(cmd)}\n{err.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1e6  # ru_maxrss is KiB on Linux


def ensure_trio(layers: int) -> dict[str, Path]:
    """The cached bf16 benchmark trio with ``layers`` layers, built on first use."""
    import torch

    trio_dir = cache_dir() / f"tinyllama-{layers}l-bf16"
    if not (trio_dir / "sft" / "config.json").exists():
        print(f"building the trio in {trio_dir} (once) ...", flush=True)
        shutil.rmtree(trio_dir, ignore_errors=True)
        t = time.perf_counter()
        make_trio(trio_dir, replace(TINYLLAMA_1B, layers=layers), dtype=torch.bfloat16, shard_bytes=2 * 10**9)
        print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
    paths = {k: trio_dir / k for k in ("base", "ct", "sft")}
    params = sum(p.stat().st_size for p in paths["base"].glob("*.safetensors")) / 2  # bf16: 2 bytes each
    print(f"trio: {params / 1e9:.2f}B parameters per model, bf16, {layers} layers")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=TINYLLAMA_1B.layers)
    ap.add_argument("--methods", default=",".join(RECIPES))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    shape = replace(TINYLLAMA_1B, layers=args.layers)
    paths = ensure_trio(args.layers)
    trio_dir = paths["base"].parent

    exe = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="langmerge-bench-", dir=trio_dir.parent))
    try:
        t = time.perf_counter()
        for k, p in paths.items():
            shutil.copytree(p, work / f"copy-{k}")
        copy_s = time.perf_counter() - t
        shutil.rmtree(work / "copy-base"), shutil.rmtree(work / "copy-ct"), shutil.rmtree(work / "copy-sft")
        print(f"plain copy of the three inputs: {copy_s:.1f} s\n")

        # Warm numba's on-disk kernel cache so that a one-time JIT compile is not timed.
        warm = make_trio(work / "warm", replace(shape, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=0), dtype=torch.bfloat16)
        for method in args.methods.split(","):
            recipe = work / f"warm-{method}.yaml"
            recipe.write_text(yaml.safe_dump(RECIPES[method](warm)))
            run_measured([str(exe / "langmerge"), "merge", str(recipe), str(work / f"warm-{method}"), "--no-progress"])

        rows = []
        for method in args.methods.split(","):
            recipe = work / f"{method}.yaml"
            recipe.write_text(yaml.safe_dump(RECIPES[method](paths)))
            lm_cmd = [str(exe / "langmerge"), "merge", str(recipe), str(work / f"lm-{method}"), "--no-progress"]
            if args.threads:
                lm_cmd += ["--threads", str(args.threads)]
            lm = run_measured(lm_cmd)
            shutil.rmtree(work / f"lm-{method}")
            mk = None
            if not args.skip_mergekit:
                mk = run_measured([str(exe / "mergekit-yaml"), str(recipe), str(work / f"mk-{method}")])
                shutil.rmtree(work / f"mk-{method}")
            rows.append((method, lm, mk))

        print(f"{'method':<17}{'langmerge s':>12}{'GB':>7}{'mergekit s':>12}{'GB':>7}{'speed-up':>10}{'mem ratio':>11}{'vs copy':>9}")
        for method, (lw, lr), mk in rows:
            mw, mr = mk if mk else (float("nan"), float("nan"))
            print(
                f"{method:<17}{lw:>12.1f}{lr:>7.2f}{mw:>12.1f}{mr:>7.2f}"
                f"{mw / lw:>9.1f}x{lr / mr:>10.2f}x{lw / copy_s:>8.1f}x"
            )
        print("\nspeed-up = mergekit time / langmerge time; mem ratio = langmerge peak RSS / mergekit peak RSS;")
        print("vs copy = langmerge time / time of a plain copy of the three inputs")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
