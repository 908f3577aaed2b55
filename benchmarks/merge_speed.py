"""langmerge vs mergekit-yaml on whole generated trios, side by side in one run; and the kernels alone.

    python benchmarks/merge_speed.py                  # both trios, linear, task_arithmetic, ties, ties_sv
    python benchmarks/merge_speed.py --trios 1b --layers 4 --methods ties   # a quicker, smaller run
    python benchmarks/merge_speed.py --kernels        # the per-chunk kernels alone, against the I/O floor

Two bf16 trios (random weights, sharded at 2 GB), built once into
~/.cache/langmerge/bench (or $LANGMERGE_CACHE/bench), never in the repository:

- ``1b``: the 1.1B Llama shape (hidden 2048, intermediate 5632, 22 layers,
  vocabulary 32000), ~2.2 GB a model;
- ``embedding``: one small layer (hidden 4096) whose only large tensors are a
  128256 x 4096 embedding and output layer (Llama-3-8B's), ~2.2 GB a model.

For each trio and method, each tool runs as its own process (``langmerge
merge`` and ``mergekit-yaml`` on the same recipe; mergekit has no TIES-SV, so
its TIES stands in): wall time and peak resident memory (``ru_maxrss`` from
``wait4``, spawned by a small launcher: a child's figure starts at its spawner's RSS) and their ratios. Beside them:

- the I/O floor: reading every input file of the method once (plain reads
  into one reused buffer) and writing one output of the merged size in the
  output's folder, with the merge's durability (langmerge and mergekit write
  without fsync; so does the floor); each method's time against it, both the
  merge itself (planning, merging, writing, as the CLI reports it) and the
  whole process (with the interpreter's and torch's start-up); and the CPU seconds of each
  (user + system: the launcher's ``wait4`` for the processes, the floor's thread's ``getrusage``),
  which the rest of a shared machine's load inflates far less than wall time;
- cold against warm: the first merge after a fresh install (langmerge's
  bytecode caches, its only compile caches, removed first: the C kernels are
  built at install time and nothing is compiled at run time) against the
  same merge run again, the inputs read once before the first so that both
  find the page cache alike;
- where the merge's time went (the executor's ``Timings``): the reader
  thread reading, the calling thread computing, the writer thread writing,
  the calling thread idle (waiting for a chunk or a write buffer), and the
  rest of the merge (planning, metadata).

Inputs are read from the page cache where it holds them (each method's
floor is measured just before its warm run, in the state that run finds). Before every timed run
(each merge, mergekit's, the floor) the page cache's dirty pages are written out (``sync``, not
timed), so no run pays for the previous run's output being written back to disk. Figures from a
shared machine are rough.

``--kernels`` times each method's merge of one tensor, chunk by chunk as a
merge runs it (statistics passes and merge pass, with the kernel a merge plans;
``--reference`` adds the reference kernel where that is the fused one), on each distinct tensor shape of
the 1.1B trio and on a 128256 x 4096 embedding, from chunks held in memory (a few reused buffers, so the big
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
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

import langmerge
from langmerge.methods import Block, TensorInfo, chunk_ranges, fused_cpu, get_method, run, thread_limit
from langmerge.synthetic import TINYLLAMA_1B, LlamaShape, make_trio


def _models(p: dict[str, Path], params: dict) -> list[dict]:
    return [{"model": str(p[k]), "parameters": dict(params)} for k in ("ct", "sft")]


RECIPES = {
    "linear": lambda p: {"merge_method": "linear", "models": _models(p, {"weight": 0.5}), "dtype": "bfloat16"},
    "task_arithmetic": lambda p: {
        "merge_method": "task_arithmetic",
        "base_model": str(p["base"]),
        "models": _models(p, {"weight": 0.5}),
        "dtype": "bfloat16",
    },
    "ties": lambda p: {
        "merge_method": "ties",
        "base_model": str(p["base"]),
        "models": _models(p, {"weight": 1.0, "density": 0.5}),
        "dtype": "bfloat16",
    },
    "ties_sv": lambda p: {
        "merge_method": "ties_sv",
        "base_model": str(p["base"]),
        "models": _models(p, {"weight": 1.0, "density": 0.5}),
        "parameters": {"slack": 1.0, "protect": [str(p["sft"])]},
        "dtype": "bfloat16",
    },
}
MERGEKIT_STAND_IN = {"ties_sv": "ties"}  # mergekit has no TIES-SV: its TIES does the same work but the slack
DEFAULT_METHODS = "linear,task_arithmetic,ties,ties_sv"
EMBEDDING_TRIO = LlamaShape(
    hidden=4096, intermediate=1024, layers=1, heads=32, kv_heads=8, vocab=128256, max_positions=2048
)


def cache_dir() -> Path:
    root = os.environ.get("LANGMERGE_CACHE") or Path.home() / ".cache" / "langmerge"
    return Path(root) / "bench"


# Runs a command and writes its peak RSS (KiB, from wait4) and CPU seconds (user + system) to argv[1].
# A child's ru_maxrss starts at the RSS of the process that spawned it (Linux keeps the spawner's high-water
# mark across fork/vfork and exec), so each measured command is spawned by this small launcher, not by the
# benchmark process, which holds gigabytes after generating a trio.
LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(cmd: list[str]) -> tuple[float, float, str, float]:
    """Wall seconds, peak RSS (GB), standard output and CPU seconds (user + system) of one command, spawned by
    a small launcher."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r", suffix=".maxrss") as rss,
    ):  # files: a chatty child cannot block
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, rss.name, *cmd], stdout=out, stderr=err)
        proc.wait()
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"failed: {' '.join(cmd)}\n{err.read().decode()[-2000:]}")
        out.seek(0)
        maxrss, cpu = rss.read().split()
        return wall, int(maxrss) * 1024 / 1e9, out.read().decode(), float(cpu)  # ru_maxrss is KiB on Linux


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    wall, rss, _, _ = run_child(cmd)
    return wall, rss


def _ensure(folder: str, shape: LlamaShape) -> dict[str, Path]:
    trio_dir = cache_dir() / folder
    if not (trio_dir / "sft" / "config.json").exists():
        print(f"building the trio in {trio_dir} (once) ...", flush=True)
        shutil.rmtree(trio_dir, ignore_errors=True)
        t = time.perf_counter()
        make_trio(trio_dir, shape, dtype=torch.bfloat16, shard_bytes=2 * 10**9)
        print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
    return {k: trio_dir / k for k in ("base", "ct", "sft")}


def ensure_trio(layers: int) -> dict[str, Path]:
    """The cached bf16 1.1B-shaped trio with ``layers`` layers, built on first use."""
    paths = _ensure(f"tinyllama-{layers}l-bf16", replace(TINYLLAMA_1B, layers=layers))
    params = sum(p.stat().st_size for p in paths["base"].glob("*.safetensors")) / 2  # bf16: 2 bytes each
    print(f"trio: {params / 1e9:.2f}B parameters per model, bf16, {layers} layers")
    return paths


def ensure_embedding_trio() -> dict[str, Path]:
    """The cached bf16 trio whose only large tensors are a 128256 x 4096 embedding and output layer."""
    return _ensure("embedding-128256x4096-bf16", EMBEDDING_TRIO)


# ----------------------------------------------------------------------------- the kernels alone

TRIO_SHAPES = {  # the 1.1B trio's tensors: shape -> how many
    (32000, 2048): 2,
    (5632, 2048): 44,
    (2048, 5632): 22,
    (2048, 2048): 44,
    (256, 2048): 44,
    (2048,): 45,
}
BIG_EMBEDDING = (128256, 4096)
KERNEL_METHODS = ("linear", "task_arithmetic", "ties", "ties_sv", "dare_ties")
POOL = 3  # distinct chunks of random data per input; chunk k reads buffer k % POOL


def io_rates(folder: Path, size: int = 512 << 20) -> tuple[float, float]:
    """(read GB/s, write GB/s) of this machine: a file written with fsync, then read back."""
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
    from mergekit.merge_methods import merge_tensors  # the test extra: only for the side-by-side timing

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
    dtype = torch.bfloat16
    read_gbs, write_gbs = io_rates(cache_dir().parent if cache_dir().parent.exists() else Path(tempfile.gettempdir()))
    print(
        f"I/O: read {read_gbs:.2f} GB/s (page cache), write {write_gbs:.2f} GB/s (fsync); "
        f"chunks of {args.chunk_mb} MiB per input; {torch.get_num_threads()} threads; fused kernels "
        f"{'built' if fused_cpu.available() else 'NOT built'}\n"
    )
    methods = args.methods.split(",") if args.methods != DEFAULT_METHODS else list(KERNEL_METHODS)
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
                        print(
                            f"{'':<16}{kernel:<10}first call in the process {cold:.3f} s, second {wall:.3f} s "
                            f"({cold / wall:.2f}x)"
                        )
                        first = False
                    floor = (3 if m.uses_base else 2) * out_bytes / read_gbs / 1e9 + out_bytes / write_gbs / 1e9
                    mk = ""
                    if args.mergekit and shape != BIG_EMBEDDING:
                        mk = f"{time_mergekit(method, shape, dtype) / wall:.1f}x"
                    print(
                        f"{method:<16}{kernel:<10}{'x'.join(map(str, shape)):<15}{out_bytes / wall / 1e9:>7.2f}"
                        f"{cpu / (out_bytes / 1e9):>9.2f}{wall / floor:>8.2f}x{mk:>10}"
                    )
                    if shape in TRIO_SHAPES:
                        k = model.setdefault((method, kernel), [0.0, 0.0, 0])
                        k[0] += TRIO_SHAPES[shape] * wall
                        k[1] += TRIO_SHAPES[shape] * floor
                        k[2] += TRIO_SHAPES[shape] * out_bytes
    print("\nthe 1.1B trio (every tensor, kernels only, no I/O):")
    for (method, kernel), (wall, floor, out_bytes) in model.items():
        print(
            f"  {method:<16}{kernel:<10}{wall:7.1f} s  {out_bytes / wall / 1e9:5.2f} GB/s of output  "
            f"{wall / floor:5.2f}x the I/O floor ({floor:.1f} s)"
        )
    print(
        "\nvs floor = kernel time / (read the inputs + write the output at the rates above);"
        " mergekit = mergekit time / langmerge time, same tensor"
    )


# ----------------------------------------------------------------------------- whole merges

SUMMARY = re.compile(r"merged (\d+) tensors \(([\d.]+) GB\) with \S+ in ([\d.]+) s")
TIMINGS = re.compile(r"read ([\d.]+) s, compute ([\d.]+) s, write ([\d.]+) s, waiting ([\d.]+) s")
FLOOR_BUFFER = 64 << 20


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_inputs(inputs: list[Path], buf: memoryview | None = None) -> None:
    """Read every shard of ``inputs`` once (plain reads into one buffer)."""
    buf = buf if buf is not None else memoryview(bytearray(FLOOR_BUFFER))
    for model in inputs:
        for shard in _shards(model):
            with open(shard, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def settle() -> None:
    """Write out the page cache's dirty pages (the last run's output), untimed, so that each timed run
    starts from the same state and none pays for the one before it."""
    os.sync()


def _thread_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def io_floor(inputs: list[Path], out_bytes: int, folder: Path) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) to read every shard of ``inputs`` once and write ``out_bytes``
    into ``folder`` (no fsync, as the merges)."""
    buf = memoryview(bytearray(FLOOR_BUFFER))
    target = folder / "io-floor.bin"
    settle()
    cpu = _thread_cpu()
    start = time.perf_counter()
    read_inputs(inputs, buf)
    with open(target, "wb", buffering=0) as f:
        left = out_bytes
        while left:
            left -= f.write(buf[: min(left, FLOOR_BUFFER)])
    seconds, cpu = time.perf_counter() - start, _thread_cpu() - cpu
    target.unlink()
    return seconds, cpu


def clear_compile_caches() -> None:
    """A fresh install's state: langmerge's bytecode caches removed (the C kernels are built at install, not at run)."""
    for cache in Path(langmerge.__file__).parent.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)


def langmerge_run(recipe: Path, out: Path, args) -> dict:
    cmd = [str(Path(sys.executable).parent / "langmerge"), "merge", str(recipe), str(out), "--no-progress"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.memory:
        cmd += ["--memory", args.memory]
    settle()
    wall, rss, stdout, cpu = run_child(cmd)
    shutil.rmtree(out)
    summary, timings = SUMMARY.search(stdout), TIMINGS.search(stdout)
    if summary is None or timings is None:
        raise SystemExit(f"cannot read the merge's report from its output:\n{stdout}")
    read, compute, write, wait = map(float, timings.groups())
    return {
        "wall": wall,
        "rss": rss,
        "cpu": cpu,
        "merge": float(summary.group(3)),
        "read": read,
        "compute": compute,
        "write": write,
        "idle": wait,
    }


def mergekit_run(recipe: Path, out: Path, args) -> dict:
    settle()
    wall, rss, _, cpu = run_child([str(Path(sys.executable).parent / "mergekit-yaml"), str(recipe), str(out)])
    shutil.rmtree(out)
    return {"wall": wall, "rss": rss, "cpu": cpu}


def bench_trio(name: str, paths: dict[str, Path], methods: list[str], with_mergekit: bool, args) -> None:
    params = sum(p.stat().st_size for p in _shards(paths["base"])) / 2  # bf16: 2 bytes a parameter
    out_bytes = sum(p.stat().st_size for p in _shards(paths["ct"]))
    work = Path(tempfile.mkdtemp(prefix="langmerge-bench-", dir=paths["base"].parent.parent))
    try:
        inputs = {b: [paths[k] for k in (("base", "ct", "sft") if b else ("ct", "sft"))] for b in (False, True)}
        print(
            f"\ntrio {name}: {params / 1e9:.2f}B parameters a model, bf16, {out_bytes / 1e9:.2f} GB a model", flush=True
        )
        rows, theirs_done = [], {}
        for method in methods:
            recipe = work / f"{method}.yaml"
            recipe.write_text(yaml.safe_dump(RECIPES[method](paths)))
            method_inputs = inputs[get_method(method).uses_base]
            read_inputs(method_inputs)  # the page cache as the warm run finds it
            clear_compile_caches()
            cold = langmerge_run(recipe, work / "lm", args)
            # the floor just before the warm run, in the state it finds (the inputs cached where they fit)
            floor, floor_cpu = io_floor(method_inputs, out_bytes, work)
            warm = langmerge_run(recipe, work / "lm", args)
            mk = None
            if with_mergekit:
                theirs = MERGEKIT_STAND_IN.get(method, method)
                if theirs not in theirs_done:  # ties_sv's stand-in is the ties run, measured once
                    mk_recipe = work / f"mk-{theirs}.yaml"
                    mk_recipe.write_text(yaml.safe_dump(RECIPES[theirs](paths)))
                    theirs_done[theirs] = mergekit_run(mk_recipe, work / "mk", args)
                mk = theirs_done[theirs]
            rows.append((method, cold, warm, mk, floor, floor_cpu))
            print(
                f"  {method}: langmerge {warm['wall']:.1f} s (cold {cold['wall']:.1f} s), I/O floor {floor:.1f} s"
                + (f", mergekit {mk['wall']:.1f} s" if mk else ""),
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    nan = float("nan")
    print(
        f"\n{'method':<16}{'langmerge s':>12}{'GB':>6}{'mergekit s':>11}{'GB':>6}{'speed-up':>9}{'mem':>7}"
        f"{'floor s':>8}{'merge/floor':>12}{'wall/floor':>11}{'cold/warm':>10}"
    )
    for method, cold, warm, mk, floor, _ in rows:
        mw, mr = (mk["wall"], mk["rss"]) if mk else (nan, nan)
        print(
            f"{method:<16}{warm['wall']:>12.1f}{warm['rss']:>6.2f}{mw:>11.1f}{mr:>6.2f}{mw / warm['wall']:>8.1f}x"
            f"{warm['rss'] / mr:>6.2f}x{floor:>8.1f}{warm['merge'] / floor:>11.2f}x{warm['wall'] / floor:>10.2f}x"
            f"{cold['wall'] / warm['wall']:>9.2f}x"
        )
    print(
        "\nCPU seconds (user + system; what other work on the machine inflates least): whole processes, and the"
        " floor's thread"
    )
    print(f"{'method':<16}{'langmerge':>10}{'mergekit':>9}{'ratio':>7}{'floor':>7}{'langmerge/floor':>16}")
    for method, _, warm, mk, _, floor_cpu in rows:
        mc = mk["cpu"] if mk else nan
        print(
            f"{method:<16}{warm['cpu']:>10.1f}{mc:>9.1f}{mc / warm['cpu']:>6.1f}x{floor_cpu:>7.1f}"
            f"{warm['cpu'] / floor_cpu:>15.2f}x"
        )
    print("\nwhere langmerge's time went (warm run, seconds): the executor's threads, then the rest")
    print(
        f"{'method':<16}{'process':>8}{'merge':>7}{'read':>7}{'compute':>8}{'write':>7}{'idle':>6}{'plan+meta':>10}"
        f"{'start-up':>9}"
    )
    for method, _, warm, _, _, _ in rows:
        rest = warm["merge"] - warm["compute"] - warm["idle"]
        print(
            f"{method:<16}{warm['wall']:>8.1f}{warm['merge']:>7.1f}{warm['read']:>7.1f}{warm['compute']:>8.1f}"
            f"{warm['write']:>7.1f}{warm['idle']:>6.1f}{rest:>10.1f}{warm['wall'] - warm['merge']:>9.1f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trios", default="1b,embedding", help="which trios: 1b, embedding (comma-separated)")
    ap.add_argument("--layers", type=int, default=TINYLLAMA_1B.layers, help="layers of the 1b trio")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument(
        "--mergekit-trios",
        default=None,
        help="run mergekit on these trios only (default: all; its TIES on the embedding trio peaks near 20 GB)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory", default=None, help="langmerge merge --memory (default: its default)")
    ap.add_argument("--kernels", action="store_true", help="time the per-chunk kernels alone (no trio is built)")
    ap.add_argument("--chunk-mb", type=int, default=8, help="--kernels: chunk size per input, MiB")
    ap.add_argument("--skip-big", action="store_true", help="--kernels: leave out the 128256 x 4096 embedding")
    ap.add_argument(
        "--mergekit", action="store_true", help="--kernels: time mergekit's merge_tensors on the same tensors"
    )
    ap.add_argument(
        "--reference",
        action="store_true",
        help="--kernels: time the reference kernel too where a merge plans the fused one (slow)",
    )
    args = ap.parse_args()
    if args.kernels:
        kernels_main(args)
        return
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in RECIPES]
    if unknown:
        raise SystemExit(f"--methods: no benchmark recipe for {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    trios = args.trios.split(",")
    mergekit_trios = (
        set() if args.skip_mergekit else set(args.mergekit_trios.split(",") if args.mergekit_trios else trios)
    )
    builders = {"1b": lambda: ensure_trio(args.layers), "embedding": ensure_embedding_trio}
    for name in trios:
        if name not in builders:
            raise SystemExit(f"--trios: unknown trio {name!r}; choose from {', '.join(builders)}")
        bench_trio(name, builders[name](), methods, name in mergekit_trios, args)
    print("\nspeed-up = mergekit time / langmerge time (whole processes); mem = langmerge peak RSS / mergekit's;")
    print("merge/floor = the merge (as langmerge reports it: planning, merging, writing) / the I/O floor;")
    print("wall/floor = the whole process (with start-up) / the floor; cold/warm = first run after clearing")
    print("langmerge's compile caches / the run after it. ties_sv's mergekit column is mergekit's ties.")


if __name__ == "__main__":
    main()
