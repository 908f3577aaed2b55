"""``langmerge study STUDY.yaml``: run a whole study (cached, resumable) and write its report."""

from __future__ import annotations

import json
import sys

from langmerge.cli_options import ALLOW_PICKLE, FORCE, NO_PROGRESS
from langmerge.study.config import check_study, load_study
from langmerge.study.plan import build_plan
from langmerge.study.runner import cache_dir, run_study, select
from langmerge.study.steps import Step, StepRecord


def _print_step(i: int, total: int, step: Step, record: StepRecord) -> None:
    state = "cached" if record.cached else f"done in {record.seconds:.1f}s"
    print(f"[{i}/{total}] {step.label}: {state}", file=sys.stderr, flush=True)


def run_study_command(args) -> int:
    study = load_study(args.study)
    if args.executor:
        study.spec.executor.kind = args.executor
        check_study(study)
    if args.dry_run:
        plan = build_plan(study)
        steps = select(plan, args.only) if args.only else plan.steps
        cache = cache_dir(study)
        for step in steps:
            state = "done" if step.done(cache) else "to run"
            print(f"{state:>7}  {step.kind:<8} {step.key()}  {step.label}")
        return 0
    result = run_study(
        study,
        only=args.only or (),
        force=args.force,
        executor=args.executor,
        progress=not args.no_progress,
        report=_print_step,
        allow_pickle=args.allow_pickle,
    )
    assert result.report_dir is not None  # run_study writes the report unless told not to
    ran = len(result.ran)
    print(
        f"{len(result.records)} steps ({ran} run, {len(result.records) - ran} cached); "
        f"report: {result.report_dir / 'report.md'}"
    )
    doc = json.loads((result.report_dir / "results.json").read_text())
    for f in doc["findings"]:
        print(f"  {f['finding']}: {f['verdict']}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("study", help="run a whole study (CT, SFT, CT-then-SFT, tuned merges, evaluation, analysis)")
    p.add_argument("study", help="study YAML file (see docs/study.md)")
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        default=None,
        help="local: steps in order on this machine; ray: Ray tasks (default: the config's)",
    )
    FORCE.add(p, "rerun the selected steps even if they are cached")
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="PATTERN",
        help="run only steps whose label or kind matches (shell pattern; repeatable), and what they need",
    )
    p.add_argument("--dry-run", action="store_true", help="list the steps, their keys and whether they are done")
    NO_PROGRESS.add(p, "hide the progress bars")
    ALLOW_PICKLE.add(p, "let given models with only .bin (pickle) weights load, with torch.load(weights_only=True)")
    p.set_defaults(handler=run_study_command)
