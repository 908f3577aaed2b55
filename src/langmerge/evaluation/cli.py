"""The ``langmerge eval`` subcommand."""

from __future__ import annotations

from langmerge.cli_options import ALLOW_PICKLE, BATCH_SIZE, DEVICE, FEW_SHOT, FORCE, LIMIT, NO_PROGRESS
from langmerge.errors import LangmergeError
from langmerge.evaluation.builtin import builtin_tasks
from langmerge.evaluation.lm_eval_bridge import LM_EVAL_PRESETS
from langmerge.evaluation.runner import evaluate, results_markdown, write_results
from langmerge.io.hub import hub_repository_folder
from langmerge.io.output import check_output_free


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _list_tasks() -> int:
    print("built-in tasks (name  kind  language):")
    for name, task in sorted(builtin_tasks().items()):
        print(f"  {name:28s} {task.spec['kind']:16s} {task.spec['language']}")
    print("lm-eval presets (--lm-eval LANG):")
    for lang, names in LM_EVAL_PRESETS.items():
        print(f"  {lang}: {', '.join(names)}")
    return 0


def _eval(args) -> int:
    if args.list_tasks:
        return _list_tasks()
    if not args.model_dir:
        raise LangmergeError("give a model folder or Hub id (langmerge eval MODEL --tasks ...)")
    tasks, lm_tasks = _split(args.tasks), _split(args.lm_eval)
    if not tasks and not lm_tasks:
        raise LangmergeError("give --tasks NAME[,NAME...] and/or --lm-eval TASKS (see --list-tasks)")
    if args.out:
        # Refuse before any work, not after it; the output may not overlap what is read.
        model = hub_repository_folder(args.model_dir) or args.model_dir  # a Hub id's files lie in its cache repository
        check_output_free(args.out, args.force, [model, *tasks, *(args.lm_eval_include or [])])
    results = evaluate(
        args.model_dir,
        tasks,
        few_shot=args.few_shot,
        batch_size=args.batch_size,
        limit=args.limit,
        chat_template=args.chat_template,
        max_length=args.max_length,
        seed=args.seed,
        progress=not args.no_progress,
        device=args.device,
        dtype=args.dtype,
        precision=args.precision,
        lm_eval_tasks=lm_tasks,
        lm_eval_include=args.lm_eval_include or [],
        allow_pickle=args.allow_pickle,
    )
    print(results_markdown(results), end="")
    if args.out:
        out = write_results(results, args.out, force=args.force)
        print(f"\nwrote {out}/results.json, results.md, results.png, samples.jsonl")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on target-language tasks (and lm-eval tasks)")
    p.add_argument("model_dir", nargs="?", metavar="MODEL", help="model folder, or Hub id ORG/NAME[@REVISION]")
    p.add_argument("--tasks", help="built-in task names or patterns (next_day_*), or task YAML paths, comma-separated")
    p.add_argument("--lm-eval", help="lm-eval task names or language presets (ta, te, bn, ...), comma-separated")
    p.add_argument("--lm-eval-include", action="append", help="folder of extra lm-eval task YAMLs (repeatable)")
    p.add_argument("--out", help="write results.json, results.md, results.png and samples.jsonl into this new folder")
    FORCE.add(p, "replace an existing --out folder")
    FEW_SHOT.add(p)
    BATCH_SIZE.add(p)
    LIMIT.add(p, "evaluate only the first N examples of each task")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--max-length", type=int, default=None, help="max tokens per sequence (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot selection")
    DEVICE.add(p)
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's"
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: matrix products in bfloat16 (torch.autocast), about twice as fast on AVX-512 BF16 CPUs",
    )
    NO_PROGRESS.add(p, "hide the progress bars")
    p.add_argument("--list-tasks", action="store_true", help="list the built-in tasks and lm-eval presets")
    ALLOW_PICKLE.add(p, "load .bin (pickle) weights, with torch.load(weights_only=True)")
    p.set_defaults(handler=_eval)
