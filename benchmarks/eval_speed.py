"""Multiple-choice scoring speed: langmerge's evaluator vs lm-evaluation-harness, side by side.

Both score the same items of the same multiple-choice task on the same
in-memory model with the same batch size; the script prints examples/s of
each, the ratio, and checks that both give the same accuracy.

    python benchmarks/eval_speed.py                      # a generated Llama-shaped model, 32k vocabulary
    python benchmarks/eval_speed.py --model MODEL_DIR --task next_day_ta
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml

from langmerge.evaluation import EvalOptions, evaluate, resolve_tasks
from langmerge.evaluation.lm_eval_bridge import resolve_lm_eval_tasks, run_lm_eval
from langmerge.synthetic import LlamaShape, write_model

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def lm_eval_task_folder(task, folder: Path) -> Path:
    """The langmerge task as an lm-eval task over local JSONL (same prompt, choices and answers)."""
    spec = task.spec
    docs = [ex.doc for ex in task.examples]
    (folder / "data.jsonl").write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
    )
    jinja_prompt = spec.prompt.replace("{", "{{").replace("}", "}}")
    (folder / "task.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "langmerge_bench",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(folder / "data.jsonl")}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": jinja_prompt,
                "doc_to_choice": "{{" + spec.choices_field + "}}",
                "doc_to_target": "{{" + spec.answer_field + "}}",
                "target_delimiter": spec.target_delimiter,
                "metric_list": [{"metric": "acc"}],
            },
            allow_unicode=True,
        ),
        encoding="utf-8",
    )
    return folder


def main() -> None:
    # after HF_HUB_OFFLINE is set above: huggingface_hub (imported by transformers) reads it when imported
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: generate a random Llama-shaped model)")
    ap.add_argument("--task", default="next_month_en", help="a multiple-choice task (built-in name or YAML)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each; the best time counts")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="langmerge-evalbench-") as tmp:
        tmp = Path(tmp)
        model_dir = (
            Path(args.model)
            if args.model
            else write_model(
                tmp / "model",
                LlamaShape(hidden=512, intermediate=1024, layers=4, heads=8, kv_heads=4, vocab=32000),
                seed=0,
            )
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        (task,) = resolve_tasks([args.task])
        if task.spec.kind != "multiple_choice":
            raise SystemExit(f"{args.task} is not a multiple-choice task")
        n = len(task.examples)
        n_requests = sum(len(ex.doc[task.spec.choices_field]) for ex in task.examples)
        (tmp / "lm").mkdir()
        resolved = resolve_lm_eval_tasks(["langmerge_bench"], [lm_eval_task_folder(task, tmp / "lm")])

        def ours():
            options = EvalOptions(batch_size=args.batch_size)
            result = evaluate(model, [task], tokenizer=tok, options=options, progress=False)
            return result.tasks[task.name].metrics["acc"]

        def theirs():
            return run_lm_eval(model, tok, [], batch_size=args.batch_size, resolved=resolved)["results"][
                "langmerge_bench"
            ]["acc,none"]

        timings = {}
        accs = {}
        for name, fn in (("langmerge", ours), ("lm-eval", theirs)):
            fn()  # warm-up: first-call costs (dataset building, kernels) are not scoring speed
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                accs[name] = fn()
                best = min(best, time.perf_counter() - start)
            timings[name] = best

    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {model_dir if args.model else 'generated Llama-shaped'} ({params / 1e6:.1f}M parameters, "
        f"vocabulary {model.config.vocab_size}), task {task.name}: {n} examples, {n_requests} scored choices, "
        f"batch size {args.batch_size}, torch threads {torch.get_num_threads()}"
    )
    for name in ("langmerge", "lm-eval"):
        print(f"{name:10s} {timings[name]:7.2f} s  {n / timings[name]:8.1f} examples/s  acc {accs[name]:.4f}")
    print(f"ratio (langmerge speed / lm-eval speed): {timings['lm-eval'] / timings['langmerge']:.2f}x")
    if abs(accs["langmerge"] - accs["lm-eval"]) > 1e-9:
        print("WARNING: the two accuracies differ")


if __name__ == "__main__":
    main()
