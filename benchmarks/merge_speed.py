"""langmerge vs mergekit-yaml on a 1.1B-parameter Llama-shaped trio, side by side; and the kernels alone.

    python benchmarks/merge_speed.py                # full size (builds ~6.6 GB of inputs once)
    python benchmarks/merge_speed.py --layers 4     # a quicker, smaller trio
    python benchmarks/merge_speed.py --kernels      # the per-chunk kernels alone, against the I/O floor

The trio (hidden 2048, intermediate 5632, 22 layers, vocab 32000, bf16,
sharded, random weights) is built once into ~/.cache/langmerge/bench (or
$LANGMERGE_CACHE/bench). Each merge runs as its own process; wall time and
peak resident memory (from wait4) are printed with their ratios, and the time
of a plain copy of the three input folders is the I/O floor.

``--kernels`` times each method's merge of one tensor, chunk by chunk as a
merge runs it (statistics passes and merge pass, with the kernel a merge plans;
``--reference`` adds the reference kernel where that is the fused one), on each distinct tensor shape of the 1.1B trio and on a 128256 x
4096 embedding, from chunks held in memory (a few reused buffers, so the big
tensor needs no gigabytes): GB/s of output and CPU seconds per GB. The I/O
floor beside it is reading three inputs and writing one output at this
machine's rates, measured in the same run (a file written with fsync, then
read back); the model line sums the trio's tensors. With ``--mergekit`` the
same tensors go through ``mergekit.merge_methods.merge_tensors`` (whole
tensors; the embedding is skipped: mergekit's argsort of it needs ~12 GB; TIES-SV is timed
against mergekit's TIES).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml

from langmerge.methods import get_method
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


# ----------------------------------------------------------------------------- the kernels alone

TRIO_SHAPES = {  # the 1.1B trio's tensors: shape -> how many
    (32000, 2048): 2, (5632, 2048): 44, (2048, 5632): 22, (2048, 2048): 44, (256, 2048): 44, (2048,): 45,
}
BIG_EMBEDDING = (128256, 4096)
KERNEL_METHODS = ("linear", "task_arithmetic", "ties", "ties_sv", "dare_ties")
POOL = 3  # distinct chunks of random data per input; chunk k reads buffer k % POOL


def io_rates(folder: Path, size: int = 512 << 20) -> tuple[float, float]:
    """(read GB/s, write GB/s) of this machine: a file written with fsync, then read back."""
    import numpy as np

    path = folder / "io-probe.bin"
    data = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    write = size / (time.perf_counter() - t) / 1e9
    buf = bytearray(size)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        f.readinto(buf)
    read = size / (time.perf_counter() - t) / 1e9
    path.unlink()
    return read, write


def _recipe_params(method, n):
    m = get_method(method)
    values = {"weight": [1.0, 0.5][:n], "normalize": m.parameters["normalize"].default}
    if m.sparsifier:
        values["density"] = [0.5] * n
        values["rescale"] = m.parameters["rescale"].default
    return m.tensor_parameters(values, protected=[False, True][:n])


def time_kernel(method: str, kernel: str, shape: tuple[int, ...], chunk_bytes: int, dtype) -> tuple[float, float]:
    """(wall s, CPU s) of one tensor's merge over its chunks: every pass, as a merge runs them."""
    import torch

    from langmerge.methods import Block, TensorInfo, chunk_ranges, run

    m = get_method(method)
    n = 2
    p = _recipe_params(method, n)
    info = TensorInfo("bench", shape, dtype)
    ranges = chunk_ranges(shape, torch.tensor([], dtype=dtype).element_size(), chunk_bytes)
    longest = max(b - a for a, b in ranges)
    g = torch.Generator().manual_seed(0)
    bases = [torch.randn(longest, generator=g).to(dtype) for _ in range(POOL)]
    inputs = [[(b.float() + 0.02 * torch.randn(longest, generator=g)).to(dtype) for b in bases] for _ in range(n)]

    def read(a, b):
        k = (a // longest) % POOL
        return Block(a, bases[k][: b - a] if m.uses_base else None, [x[k][: b - a] for x in inputs])

    gens = [torch.Generator().manual_seed(i) for i in range(n)] if m.randomized else None
    wall, cpu = time.perf_counter(), time.process_time()
    run(m.plan(p, info, kernel, gens), read, lambda a, b, out: None, ranges)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_mergekit(method: str, shape: tuple[int, ...], dtype) -> float:
    import torch
    from mergekit.merge_methods import merge_tensors

    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).to(dtype)
    xs = [(base.float() + 0.02 * torch.randn(shape, generator=g)).to(dtype) for _ in range(2)]
    params = {"weight": {1: 1.0, 2: 0.5}}
    if get_method(method).sparsifier:
        params["density"] = {1: 0.5, 2: 0.5}
    theirs = {"ties_sv": "ties"}.get(method, method)  # mergekit has no TIES-SV: its TIES costs the same
    t = time.perf_counter()
    if method == "linear":
        merge_tensors(xs, theirs, parameters={"weight": [1.0, 0.5]})
    else:
        merge_tensors([base, *xs], theirs, parameters=params, base_index=0)
    return time.perf_counter() - t


def kernels_main(args) -> None:
    import torch

    from langmerge.methods import fused_cpu, thread_limit

    dtype = torch.bfloat16
    read_gbs, write_gbs = io_rates(cache_dir().parent if cache_dir().parent.exists() else Path(tempfile.gettempdir()))
    print(f"I/O: read {read_gbs:.2f} GB/s (page cache), write {write_gbs:.2f} GB/s (fsync); "
          f"chunks of {args.chunk_mb} MiB per input; {torch.get_num_threads()} threads; fused kernels "
          f"{'built' if fused_cpu.available() else 'NOT built'}\n")
    methods = args.methods.split(",") if args.methods != ",".join(RECIPES) else list(KERNEL_METHODS)
    shapes = list(TRIO_SHAPES) + ([] if args.skip_big else [BIG_EMBEDDING])
    chunk_bytes = args.chunk_mb << 20
    header = f"{'method':<16}{'kernel':<10}{'shape':<15}{'GB/s':>7}{'CPU s/GB':>9}{'vs floor':>9}{'mergekit':>10}"
    print(header)
    model = {}
    with thread_limit(args.threads):
        for method in methods:
            m = get_method(method)
            p = _recipe_params(method, 2)
            kernels = m.kernels(p, dtype, torch.device("cpu"))
            for kernel in kernels if args.reference else kernels[:1]:
                first = True
                for shape in shapes:
                    out_bytes = math.prod(shape) * 2
                    if first:  # the first call of a kernel in this process, then the timed one
                        cold = time_kernel(method, kernel, shape, chunk_bytes, dtype)[0]
                    wall, cpu = time_kernel(method, kernel, shape, chunk_bytes, dtype)
                    if first:
                        print(f"{'':<16}{kernel:<10}first call in the process {cold:.3f} s, second {wall:.3f} s "
                              f"({cold / wall:.2f}x)")
                        first = False
                    floor = (3 if m.uses_base else 2) * out_bytes / read_gbs / 1e9 + out_bytes / write_gbs / 1e9
                    mk = ""
                    if args.mergekit and shape != BIG_EMBEDDING:
                        mk = f"{time_mergekit(method, shape, dtype) / wall:.1f}x"
                    print(f"{method:<16}{kernel:<10}{'x'.join(map(str, shape)):<15}{out_bytes / wall / 1e9:>7.2f}"
                          f"{cpu / (out_bytes / 1e9):>9.2f}{wall / floor:>8.2f}x{mk:>10}")
                    if shape in TRIO_SHAPES:
                        k = model.setdefault((method, kernel), [0.0, 0.0, 0])
                        k[0] += TRIO_SHAPES[shape] * wall
                        k[1] += TRIO_SHAPES[shape] * floor
                        k[2] += TRIO_SHAPES[shape] * out_bytes
    print(f"\nthe 1.1B trio (every tensor, kernels only, no I/O):")
    for (method, kernel), (wall, floor, out_bytes) in model.items():
        print(f"  {method:<16}{kernel:<10}{wall:7.1f} s  {out_bytes / wall / 1e9:5.2f} GB/s of output  "
              f"{wall / floor:5.2f}x the I/O floor ({floor:.1f} s)")
    print("\nvs floor = kernel time / (read the inputs + write the output at the rates above);"
          " mergekit = mergekit time / langmerge time, same tensor")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=TINYLLAMA_1B.layers)
    ap.add_argument("--methods", default=",".join(RECIPES))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kernels", action="store_true", help="time the per-chunk kernels alone (no trio is built)")
    ap.add_argument("--chunk-mb", type=int, default=8, help="--kernels: chunk size per input, MiB")
    ap.add_argument("--skip-big", action="store_true", help="--kernels: leave out the 128256 x 4096 embedding")
    ap.add_argument("--mergekit", action="store_true", help="--kernels: time mergekit's merge_tensors on the same tensors")
    ap.add_argument("--reference", action="store_true",
                    help="--kernels: time the reference kernel too where a merge plans the fused one (slow)")
    args = ap.parse_args()
    if args.kernels:
        kernels_main(args)
        return

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

        # A tiny merge first, so that the page cache holds langmerge's own files when timing starts.
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
