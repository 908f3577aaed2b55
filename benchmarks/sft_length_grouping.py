"""SFT tokens per CPU second with and without ``group_by_length``: the measurement behind the quick preset's SFT.

Trains SFT from a study's pruned base on its SFT data for a few steps with the quick preset's
training settings, once with the shuffled order as it is and once grouped by length, and prints
for each the input tokens, the padded positions, the CPU seconds of the training steps (user +
system of this process, so a shared machine inflates them less than wall time) and tokens per
CPU second, then the ratio of the two. Run it with one thread (``OMP_NUM_THREADS=1``), as the
study's timings are.

    OMP_NUM_THREADS=1 python benchmarks/sft_length_grouping.py --study-out runs/miniature-quick --steps 20

``--study-out`` is a study's output folder whose base step has run (the pruned Gemma and the
``english-tasks-sft-small`` source are taken from its cache).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ct_lr import finished_step  # same folder: the study cache's layout, read once
from langmerge.training import TrainOptions, train_sft
from langmerge.training import loop as loop_module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study-out", default="runs/miniature-quick")
    ap.add_argument("--data", default="english-tasks-sft-small", help="the study's builtin SFT source")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    cache = Path(args.study_out) / "cache"
    base = finished_step(cache, "base") / "model"
    data = finished_step(cache, "source", args.data) / "data.jsonl"

    # The CPU time of the training steps alone (not the model's loading), and the padding the model is fed.
    step_cpu, padded = [0.0], [0]
    real_step, real_collate = loop_module._Trainer.train_step, loop_module._collate

    def timed_step(self, step):
        start = time.process_time()
        out = real_step(self, step)
        step_cpu[0] += time.process_time() - start
        return out

    def counting_collate(items, pad_id, device):
        batch = real_collate(items, pad_id, device)
        padded[0] += int((batch["attention_mask"] == 0).sum())
        return batch

    loop_module._Trainer.train_step, loop_module._collate = timed_step, counting_collate
    rows = {}
    for grouped in (False, True):
        step_cpu[0], padded[0] = 0.0, 0
        options = TrainOptions(
            seq_len=256,
            batch_size=8,
            micro_batch_size=8,
            lr=1e-4,
            min_lr=1e-5,
            warmup=0.05,
            precision="bf16",
            group_by_length=grouped,
            checkpoint_every=0,
        )
        with tempfile.TemporaryDirectory(prefix="langmerge-bench-sft-") as tmp:
            result = train_sft(base, data, Path(tmp) / "sft", options=options, stop_after=args.steps, progress=False)
        rows[grouped] = (result.steps, result.tokens_seen, padded[0], step_cpu[0])
    print("| group_by_length | steps | tokens | padded positions | step CPU s | tokens / CPU s |")
    print("|---|---:|---:|---:|---:|---:|")
    for grouped, (steps, tokens, pad, cpu) in rows.items():
        print(f"| {'on' if grouped else 'off'} | {steps} | {tokens:,} | {pad:,} | {cpu:.1f} | {tokens / cpu:.1f} |")
    (_, t_off, _, c_off), (_, t_on, _, c_on) = rows[False], rows[True]
    print(f"\ngrouped / plain tokens per CPU second: {(t_on / c_on) / (t_off / c_off):.2f}x")


if __name__ == "__main__":
    main()
