"""How much writing the same bytes into a new file costs, from one repetition to the next, on this machine.

    python benchmarks/page_cache_writes.py            # 2.2 GB (a 1.1B bf16 model), 8 MiB pieces, 3 rounds

Each round writes ``--gigabytes`` into a new file twice, after a ``sync`` (untimed): once with
positional ``os.pwrite`` calls (as langmerge's writer does) and once with plain ``os.write`` calls
(as the I/O floor of benchmarks/merge_speed.py does), and prints wall and CPU seconds (user +
system) of each. The file is deleted after each write. Where the figures vary from round to round
for identical work, the machine's page cache (not the merge) sets the pace of a merge's writes and
of its floor alike.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from merge_speed import cache_dir  # same folder: the trios' disk, where merges write


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_once(path: Path, data: memoryview, total: int, positional: bool) -> tuple[float, float]:
    """Wall and CPU seconds to write ``total`` bytes into a new file at ``path``, ``data`` at a time."""
    os.sync()
    cpu, start = _cpu(), time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        offset = 0
        while offset < total:
            piece = data[: min(len(data), total - offset)]
            offset += os.pwrite(fd, piece, offset) if positional else os.write(fd, piece)
    finally:
        os.close(fd)
    seconds, cpu = time.perf_counter() - start, _cpu() - cpu
    path.unlink()
    return seconds, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gigabytes", type=float, default=2.2)
    ap.add_argument("--piece-mib", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    folder = cache_dir() if cache_dir().exists() else Path(tempfile.gettempdir())
    data = memoryview(np.random.default_rng(0).integers(0, 255, args.piece_mib << 20, dtype=np.uint8).tobytes())
    total = int(args.gigabytes * 1e9)
    print(f"{total / 1e9:.2f} GB into a new file in {folder}, {args.piece_mib} MiB a call, after a sync")
    print(f"{'round':<7}{'pwrite s':>9}{'CPU s':>7}{'write s':>9}{'CPU s':>7}")
    for r in range(args.rounds):
        pw = write_once(folder / "page-cache-writes.bin", data, total, positional=True)
        w = write_once(folder / "page-cache-writes.bin", data, total, positional=False)
        print(f"{r:<7}{pw[0]:>9.2f}{pw[1]:>7.2f}{w[0]:>9.2f}{w[1]:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
