"""Run tasks on a model and report: ``evaluate`` (an ``EvalResult``) and ``write_results`` (JSON, Markdown, plot)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from langmerge.devices import resolve_device
from langmerge.errors import LangmergeError
from langmerge.evaluation import metrics
from langmerge.evaluation.lm_eval_bridge import resolve_lm_eval_tasks, run_lm_eval
from langmerge.evaluation.options import EvalOptions
from langmerge.evaluation.scoring import encode_pair, generate_greedy, loglikelihoods, texts_nll
from langmerge.evaluation.tasks import Task, answer_text, context, resolve_tasks, with_few_shot
from langmerge.heap import reuse_freed_memory
from langmerge.io.hub import resolve_model
from langmerge.io.output import atomic_output_dir
from langmerge.io.reader import pretrained_options, read_config

log = logging.getLogger(__name__)

MAIN_METRIC = metrics.MAIN_METRIC
METRIC_COLUMNS = ("acc", "acc_norm", "exact_match", "chrf", "lang_share", "lang_share_reference", "bpc")


PRECISIONS = ("fp32", "bf16")


class EvalSettings(BaseModel):
    """How a model was evaluated (``results.json``'s ``settings``): the ``EvalOptions`` it was evaluated with,
    but where the model was placed (``device``, ``dtype``)."""

    model_config = ConfigDict(extra="forbid")
    few_shot: int | None  # None: each task's own count
    batch_size: int
    limit: int | None
    chat_template: bool
    max_length: int | None
    seed: int
    precision: str


class TaskResult(BaseModel):
    """One task's result: its metrics over ``n`` examples."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    language: str | None
    family: str | None
    n: int
    few_shot: int
    metrics: dict[str, int | float]
    seconds: float
    examples_per_s: float | None


class EvalResult(BaseModel):
    """What ``evaluate`` returns: per-task metrics, per-example samples and lm-eval's results.

    ``summary()`` is ``results.json`` (everything but the samples, which ``samples.jsonl`` holds).
    """

    model_config = ConfigDict(extra="forbid")
    model: str
    model_source: dict[str, Any] | None = None  # a model given by Hub id: its resolution (io/hub.py)
    settings: EvalSettings
    tasks: dict[str, TaskResult] = Field(default_factory=dict)
    samples: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)
    lm_eval: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        doc = self.model_dump(exclude={"samples"})
        for key in ("model_source", "lm_eval"):  # written only where there is one
            if doc[key] is None:
                del doc[key]
        return doc


def autocast(device, precision: str):
    """The context that runs a model's matrix products in ``precision`` (bf16: torch.autocast; fp32: as stored)."""
    if precision not in PRECISIONS:
        raise LangmergeError(f"precision {precision!r}: use {' or '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def load_model(
    model_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    progress: bool = True,
    allow_pickle: bool = False,
):
    """(model, tokenizer) from a model folder or Hub id (io/hub.py); never runs code from the folder.

    The folder is checked first (io/reader.pretrained_options): its files keep to
    io/files.py's rule, and pickle-only weights need ``allow_pickle``.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
    )  # transformers takes seconds to import: not at `langmerge --help`

    dev = resolve_device(device)
    path = resolve_model(model_dir, allow_pickle=allow_pickle, progress=progress).folder
    if not path.is_dir() or read_config(path) is None:
        raise LangmergeError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
    options = pretrained_options(path, allow_pickle=allow_pickle)
    torch_dtype = getattr(torch, dtype) if dtype else "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **options)
    except Exception as exc:  # transformers raises many types for a broken folder
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LangmergeError(f"cannot load the model in {path}: {first}") from None
    model.to(dev).eval()
    return model, tokenizer


class _Progress:
    """One tqdm bar per task, counting examples."""

    def __init__(self, enabled: bool, name: str, total: int) -> None:
        # Counts can be fractional (a choice scored is part of an example): show them rounded.
        fmt = "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
        self.bar = tqdm(total=total, desc=name, unit="ex", disable=not enabled, leave=False, bar_format=fmt)

    def scaled(self, per_unit: float):
        return lambda n: self.bar.update(n * per_unit)

    def close(self) -> None:
        self.bar.close()


def _prompts(task: Task, indices: Sequence[int], seed: int, tokenizer, chat: bool) -> list[str]:
    texts = [context(task, i, seed) for i in indices]
    if not chat:
        return texts
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]


def _run_multiple_choice(task, idx, model, tokenizer, opts, progress) -> tuple[dict, list[dict]]:
    spec = task.spec
    prompts = _prompts(task, idx, opts["seed"], tokenizer, opts["chat"])
    delimiter = "" if opts["chat"] else spec.target_delimiter
    owners, pairs = [], []
    for k, (i, prompt) in enumerate(zip(idx, prompts)):
        for choice in task.examples[i].doc[spec.choices_field]:
            owners.append(k)
            pairs.append(encode_pair(tokenizer, prompt, delimiter + choice, add_special_tokens=not opts["chat"]))
    lls = loglikelihoods(
        model,
        tokenizer,
        pairs,
        batch_size=opts["batch_size"],
        max_length=opts["max_length"],
        progress=progress.scaled(len(idx) / len(pairs)),
    )
    per_example: list[list[float]] = [[] for _ in idx]
    for k, ll in zip(owners, lls, strict=True):
        per_example[k].append(ll)
    choices = [task.examples[i].doc[spec.choices_field] for i in idx]
    golds = [task.examples[i].doc[spec.answer_field] for i in idx]
    scores = {
        "acc": metrics.accuracy(per_example, golds),
        "acc_norm": metrics.accuracy_norm(per_example, choices, golds),
    }
    samples = [
        {
            "where": task.examples[i].where,
            "context": p,
            "choices": c,
            "loglikelihoods": ll,
            "gold": g,
            "predicted": metrics.argmax(ll),
            "correct": int(metrics.argmax(ll) == g),
        }
        for i, p, c, ll, g in zip(idx, prompts, choices, per_example, golds)
    ]
    return scores, samples


def _run_generation(task, idx, model, tokenizer, opts, progress, generate) -> tuple[dict, list[dict]]:
    spec = task.spec
    prompts = _prompts(task, idx, opts["seed"], tokenizer, opts["chat"])
    raw = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=spec.max_new_tokens,
        stop=spec.stop,
        batch_size=opts["batch_size"],
        add_special_tokens=not opts["chat"],
        max_length=opts["max_length"],
        progress=progress.scaled(1.0),
    )
    predictions = [r.strip() for r in raw]
    references = [answer_text(task, task.examples[i]) for i in idx]
    scores = {
        "exact_match": metrics.exact_match(predictions, references),
        "chrf": metrics.chrf(predictions, references),
    }
    languages = [metrics.identify_language(p) for p in predictions]
    if spec.language:
        labels = spec.accepted_labels
        scores["lang_share"] = metrics.accepted_share(languages, labels)
        # The check's own hit rate on the correct answers: how far the language share can be trusted here.
        scores["lang_share_reference"] = metrics.language_share(references, labels)
    samples = [
        {
            "where": task.examples[i].where,
            "prompt": p,
            "prediction": pred,
            "reference": ref,
            "language": lang,
            "correct": int(metrics.normalize_answer(pred) == metrics.normalize_answer(ref)),
        }
        for i, p, pred, ref, lang in zip(idx, prompts, predictions, references, languages)
    ]
    return scores, samples


def _run_bits_per_char(task, idx, model, tokenizer, opts, progress) -> tuple[dict, list[dict]]:
    texts = [task.examples[i].doc[task.spec.text_field] for i in idx]
    nlls = texts_nll(
        model,
        tokenizer,
        texts,
        batch_size=opts["batch_size"],
        max_length=opts["max_length"],
        progress=progress.scaled(1.0),
    )
    n_chars = sum(len(t) for t in texts)
    scores = {"bpc": metrics.bits_per_character(sum(nlls), n_chars), "characters": n_chars}
    samples = [
        {
            "where": task.examples[i].where,
            "characters": len(t),
            "bpc": metrics.bits_per_character(nll, len(t)),
            "bits": nll / math.log(2),
        }
        for i, t, nll in zip(idx, texts, nlls)
    ]
    return scores, samples


def _run_task(task, idx, model, tokenizer, opts, bar, generate) -> tuple[dict, list[dict]]:
    if task.spec.kind == "multiple_choice":
        return _run_multiple_choice(task, idx, model, tokenizer, opts, bar)
    if task.spec.kind == "generation":
        return _run_generation(task, idx, model, tokenizer, opts, bar, generate)
    return _run_bits_per_char(task, idx, model, tokenizer, opts, bar)


@reuse_freed_memory()  # the same large tensors every batch: their pages kept (langmerge.heap)
def evaluate(
    model,
    tasks: Sequence[str | Task] | str,
    *,
    tokenizer=None,
    options: EvalOptions = EvalOptions(),
    progress: bool = True,
    cache_dir: Path | None = None,
    lm_eval_tasks: Sequence[str] = (),
    lm_eval_include: Sequence[str | Path] = (),
    generate=generate_greedy,
    allow_pickle: bool = False,
) -> EvalResult:
    """Evaluate a model on langmerge tasks (and optionally lm-eval tasks).

    ``model`` is a model folder or Hub id, or an already-loaded causal LM with its
    ``tokenizer`` (as the tuner passes in-memory merged candidates). ``tasks``
    are built-in task names, shell patterns of them (``next_day_*``), task YAML
    paths or loaded ``Task`` objects. ``options`` (``EvalOptions``, the flags of
    ``langmerge eval``): ``few_shot`` overrides every task's own count; ``limit``
    keeps the first N examples of each task; ``chat_template`` wraps each prompt in
    the tokenizer's chat template (an error if it has none); ``precision="bf16"``
    runs the model's matrix products in bfloat16 (``torch.autocast``; about twice as
    fast on CPUs with AVX-512 BF16), the weights staying as loaded; ``device`` and
    ``dtype`` place a model loaded from a folder. ``generate`` is the greedy
    generation function (replaceable, e.g. to test the language check with a fixed
    answerer). The result holds ``tasks`` (per-task metrics), ``samples``
    (per-example outputs) and, with ``lm_eval_tasks``, ``lm_eval`` (lm-eval's
    results). ``allow_pickle`` lets a model folder with only pickle (.bin) weights
    load (with ``weights_only=True``).
    """
    if not isinstance(model, (str, Path)) and tokenizer is None:
        raise LangmergeError("evaluate: an already-loaded model needs its tokenizer (tokenizer=...)")
    o = options
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    task_list = resolve_tasks(names, cache_dir) if names else []
    if not task_list and not lm_eval_tasks:
        raise LangmergeError("no tasks given")
    task_list = [with_few_shot(t, o.few_shot) for t in task_list]
    # Tasks are checked before the model loads, so that bad input fails at once.
    lm_resolved = None
    if lm_eval_tasks:
        lm_resolved = resolve_lm_eval_tasks(lm_eval_tasks, lm_eval_include)
    source = None
    if isinstance(model, (str, Path)):
        model_name = str(model)
        source = resolve_model(model, allow_pickle=allow_pickle, progress=progress)
        model, tokenizer = load_model(source.folder, device=o.device, dtype=o.dtype, allow_pickle=allow_pickle)
    else:
        model_name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        model.eval()
    if o.chat_template and not getattr(tokenizer, "chat_template", None):
        raise LangmergeError(f"the tokenizer of {model_name} has no chat template; drop --chat-template")
    model_device = next(model.parameters()).device
    opts = {"seed": o.seed, "chat": o.chat_template, "batch_size": o.batch_size, "max_length": o.max_length}
    results = EvalResult(
        model=model_name,
        model_source=source.to_json() if source is not None and source.repo_id else None,
        settings=EvalSettings.model_validate(o.model_dump(include=set(EvalSettings.model_fields))),
    )
    for task in task_list:
        idx = list(range(len(task.examples)))[: o.limit]
        bar = _Progress(progress, task.name, len(idx))
        start = time.perf_counter()
        try:
            with autocast(model_device, o.precision):
                scores, samples = _run_task(task, idx, model, tokenizer, opts, bar, generate)
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        results.tasks[task.name] = TaskResult(
            kind=task.spec.kind,
            language=task.spec.language,
            family=task.spec.family,
            n=len(idx),
            few_shot=task.spec.few_shot,
            metrics=scores,
            seconds=round(seconds, 3),
            examples_per_s=round(len(idx) / seconds, 2) if seconds else None,
        )
        results.samples[task.name] = samples
        log.info("%s: %s", task.name, scores)
    if lm_eval_tasks:
        results.lm_eval = run_lm_eval(
            model,
            tokenizer,
            lm_eval_tasks,
            batch_size=o.batch_size,
            limit=o.limit,
            num_fewshot=o.few_shot,
            resolved=lm_resolved,
            progress=progress,
        )
    return results


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"
    return str(value)


def results_markdown(results: EvalResult) -> str:
    """Markdown tables: per-task metrics, the gap to English per task family, lm-eval's metrics."""
    lines = [f"# Evaluation of `{results.model}`", ""]
    rows = results.tasks
    if rows:
        cols = [c for c in METRIC_COLUMNS if any(c in r.metrics for r in rows.values())]
        lines += [
            "| task | language | kind | n | " + " | ".join(cols) + " | examples/s |",
            "|---|---|---|---:|" + "---:|" * len(cols) + "---:|",
        ]
        for name, r in rows.items():
            cells = [_fmt(r.metrics.get(c)) for c in cols]
            lines.append(
                f"| {name} | {r.language or ''} | {r.kind} | {r.n} | "
                + " | ".join(cells)
                + f" | {_fmt(r.examples_per_s)} |"
            )
        gaps = english_gaps(results)
        if gaps:
            lines += [
                "",
                "## Gap to English (same task family)",
                "",
                "| family | metric | English | language | value | gap |",
                "|---|---|---:|---|---:|---:|",
            ]
            for g in gaps:
                lines.append(
                    f"| {g['family']} | {g['metric']} | {_fmt(g['english'])} | {g['language']} | "
                    f"{_fmt(g['value'])} | {g['gap']:+.4f} |"
                )
    if results.lm_eval is not None:
        lines += ["", "## lm-evaluation-harness", "", "| task | metric | value |", "|---|---|---:|"]
        for task, scores in results.lm_eval["results"].items():
            for metric, value in scores.items():
                if isinstance(value, (int, float)) and metric != "alias":
                    lines.append(f"| {task} | {metric} | {_fmt(float(value))} |")
    return "\n".join(lines) + "\n"


def english_gaps(results: EvalResult) -> list[dict]:
    """For each task family with an English task: every other language's main metric minus English's."""
    rows = results.tasks
    english = {r.family: r for r in rows.values() if r.family and r.language == "en"}
    gaps = []
    for r in rows.values():
        if not r.family or r.language in (None, "en") or r.family not in english:
            continue
        metric = MAIN_METRIC[r.kind]
        en_value = english[r.family].metrics[metric]
        gaps.append(
            {
                "family": r.family,
                "metric": metric,
                "english": en_value,
                "language": r.language,
                "value": r.metrics[metric],
                "gap": r.metrics[metric] - en_value,
            }
        )
    return gaps


def plot_results(results: EvalResult, path: Path) -> None:
    """Bar chart of each task's main metric."""
    import matplotlib  # optional (the tune extra), imported only to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.tasks
    names = list(rows)
    values = [rows[n].metrics[MAIN_METRIC[rows[n].kind]] for n in names]
    labels = [f"{n} ({MAIN_METRIC[rows[n].kind]})" for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.2))
    ax.barh(labels, values, color=["#4477aa" if rows[n].kind != "bits_per_char" else "#cc6677" for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("accuracy / exact match (higher is better); bits per character (lower is better)")
    ax.set_title(f"langmerge eval: {Path(results.model).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(results: EvalResult, out_dir: str | Path, force: bool = False) -> Path:
    """Write results.json, samples.jsonl, results.md and results.png into a new folder (atomically)."""
    with atomic_output_dir(out_dir, force) as tmp:
        (tmp / "results.json").write_text(
            json.dumps(results.summary(), indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
        )
        with (tmp / "samples.jsonl").open("w", encoding="utf-8") as fh:
            for task, samples in results.samples.items():
                for s in samples:
                    fh.write(json.dumps({"task": task, **s}, ensure_ascii=False) + "\n")
        (tmp / "results.md").write_text(results_markdown(results), encoding="utf-8")
        if results.tasks:
            plot_results(results, tmp / "results.png")
    return Path(out_dir)
