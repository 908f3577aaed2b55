"""`langmerge analyze` vs `langmerge merge` (ties) on the benchmark trio of merge_speed.py, side by side.

    python benchmarks/analyze_speed.py                # 1.1B-parameter trio (built once, shared with merge_speed.py)
    python benchmarks/analyze_speed.py --layers 2     # a quicker, smaller trio

The target: analyze takes no longer than the ties merge it describes, within the same
memory bound. Each command runs as its own process; wall time and peak resident memory
(from wait4) are printed with their ratios. analyze runs twice: at the recipe's slack
(one vote per tensor, like the merge) and with several slack values in one pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from langmerge.synthetic import TINYLLAMA_1B  # noqa: E402
from merge_speed import RECIPES, ensure_trio, run_measured  # noqa: E402  (same folder: shared cache and timing)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=TINYLLAMA_1B.layers)
    ap.add_argument("--slack", default="0,0.5,1,2,4", help="slack values of the multi-slack analyze run")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    paths = ensure_trio(args.layers)
    trio_dir = paths["base"].parent

    exe = str(Path(sys.executable).parent / "langmerge")
    threads = ["--threads", str(args.threads)] if args.threads else []
    work = Path(tempfile.mkdtemp(prefix="langmerge-bench-", dir=trio_dir.parent))
    try:
        recipe = work / "ties.yaml"
        recipe.write_text(yaml.safe_dump(RECIPES["ties"](paths)))
        merge = run_measured([exe, "merge", str(recipe), str(work / "merged"), "--no-progress", *threads])
        shutil.rmtree(work / "merged")
        if args.threads:
            os.environ["OMP_NUM_THREADS"] = str(args.threads)  # analyze has no --threads; torch reads this
        one = run_measured([exe, "analyze", str(recipe), "-o", str(work / "a1"), "--no-progress"])
        many = run_measured(
            [
                exe,
                "analyze",
                str(recipe),
                "-o",
                str(work / "a2"),
                "--no-progress",
                "--slack",
                args.slack,
                "--protect",
                "sft",
            ]
        )
        n_slacks = len(args.slack.split(","))
        print(f"\n{'command':<36}{'seconds':>9}{'peak GB':>9}{'time ratio':>12}{'mem ratio':>11}")
        rows = [
            ("merge (ties)", merge),
            ("analyze (recipe's slack)", one),
            (f"analyze ({n_slacks} slacks, one pass)", many),
        ]
        for name, (wall, rss) in rows:
            print(f"{name:<36}{wall:>9.1f}{rss:>9.2f}{wall / merge[0]:>11.2f}x{rss / merge[1]:>10.2f}x")
        print("\ntime ratio = command time / ties merge time; mem ratio = peak RSS / ties merge peak RSS")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
