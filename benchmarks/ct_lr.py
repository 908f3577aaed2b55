"""How CT's learning rate moves held-out bits per character: the measurement behind the miniature's CT settings.

Trains CT from the miniature's pruned base at a few learning rates (constant, no warm-up, as the
presets do), keeps a checkpoint at each budget, and scores every checkpoint on held-out Chichewa
text (Bible passages of the held-out books, the UDHR) against the base. Prints a table and the
CPU seconds each run took (user + system, so a shared machine inflates them less than wall time).

    python benchmarks/ct_lr.py --study-out runs/miniature-quick --lrs 1e-5,3e-5,1e-4 --budgets 2k,8k,32k

``--study-out`` is a study's output folder whose base step has run (the pruned Gemma and the
``bible-ny`` and ``python-docs-en`` sources are taken from its cache).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from langmerge.evaluation import EvalOptions, evaluate
from langmerge.training import TrainOptions, train_ct
from langmerge.training.data import format_token_count, parse_token_count


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def finished_step(cache: Path, kind: str, name: str | None = None) -> Path:
    """The folder of a finished study step of ``kind`` in a study's cache (a builtin source by ``name``)."""
    for done in sorted(cache.glob(f"{kind}-*/done.json")):
        record = json.loads(done.read_text())
        if name is None or record["settings"].get("builtin") == name:
            return done.parent
    raise SystemExit(f"{cache}: no finished {kind} step{f' for {name}' if name else ''}; run the study first")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study-out", default="runs/miniature-quick")
    ap.add_argument("--lrs", default="1e-5,3e-5,1e-4")
    ap.add_argument("--budgets", default="2k,8k,32k")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tasks", default="bible_bpc_ny,udhr_bpc_ny")
    args = ap.parse_args()
    cache = Path(args.study_out) / "cache"
    base = finished_step(cache, "base") / "model"
    text = finished_step(cache, "source", "bible-ny") / "data.txt"
    replay = finished_step(cache, "source", "python-docs-en") / "data.txt"
    budgets = sorted(parse_token_count(b) for b in args.budgets.split(","))
    tasks = args.tasks.split(",")

    def bpc(model) -> dict:
        r = evaluate(str(model), tasks, options=EvalOptions(precision="bf16"), progress=False)
        return {t: r.tasks[t].metrics["bpc"] for t in tasks}

    rows = [("base", 0, bpc(base), 0.0)]
    for lr in (float(x) for x in args.lrs.split(",")):
        opts = TrainOptions(
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            micro_batch_size=args.batch_size,
            lr=lr,
            min_lr=lr,
            warmup=0,
            precision="bf16",
            checkpoint_every=0,
        )
        with tempfile.TemporaryDirectory(prefix="ct-lr-") as tmp:
            start, wall = cpu_seconds(), time.perf_counter()
            out = Path(tmp) / "ct"
            train_ct(
                base, [text], budgets[-1], out, save_at=budgets[:-1], replay=[replay], options=opts, progress=False
            )
            seconds = cpu_seconds() - start
            for b in budgets:
                folder = out if b == budgets[-1] else out / f"tokens-{format_token_count(b)}"
                rows.append((f"lr {lr:g}", b, bpc(folder), seconds))
            print(
                f"lr {lr:g}: CT to {budgets[-1]:,} tokens took {seconds:.0f} CPU s "
                f"({time.perf_counter() - wall:.0f} s wall)",
                flush=True,
            )
    print("| run | CT tokens | " + " | ".join(tasks) + " |")
    print("|---|---:|" + "---:|" * len(tasks))
    for name, b, values, _ in rows:
        print(
            f"| {name} | {format_token_count(b) if b else '—'} | "
            + " | ".join(f"{values[t]:.3f}" for t in tasks)
            + " |"
        )


if __name__ == "__main__":
    main()
