"""Bridge to lm-evaluation-harness: run ``lm_eval.simple_evaluate`` in process on a loaded model.

Presets name the lm-eval tasks that cover a language of the paper
(docs/evaluation.md); they need the Hugging Face dataset hub. Offline, pass a folder of
task YAMLs with ``dataset_path: json`` and local ``data_files`` as ``include``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from langmerge.errors import LangmergeError
from langmerge.progress import library_progress_bars

LM_EVAL_PRESETS: dict[str, list[str]] = {
    "ta": ["belebele_tam_Taml", "xcopa_ta", "m_mmlu_ta"],
    "te": ["belebele_tel_Telu", "xstorycloze_te", "mgsm_direct_te", "m_mmlu_te"],
    "bn": ["belebele_ben_Beng", "mgsm_direct_bn", "m_mmlu_bn"],
    "or": ["belebele_ory_Orya"],
    "mn": ["belebele_khk_Cyrl"],
    "ne": ["belebele_npi_Deva"],
    "ug": ["global_piqa_parallel_cloze_uig_arab"],
    "bo": ["belebele_bod_Tibt"],
    "sw": ["belebele_swh_Latn", "mgsm_direct_sw"],
    "si": ["belebele_sin_Sinh"],
    "ny": ["belebele_nya_Latn"],
}


def expand_presets(names: Sequence[str]) -> list[str]:
    """lm-eval task names, with preset names (a language code such as ``ta``) expanded."""
    out: list[str] = []
    for name in names:
        name = name.strip()
        if name:
            out.extend(LM_EVAL_PRESETS.get(name, [name]))
    return list(dict.fromkeys(out))


def resolve_lm_eval_tasks(tasks: Sequence[str], include: Sequence[str | Path] = ()):
    """(task names, lm-eval TaskManager) with presets expanded and every name checked.

    Indexing lm-eval's own ~15k task files takes seconds, so when every task is
    found in ``include`` only those folders are indexed.
    """
    try:
        from lm_eval.tasks import TaskManager  # optional (the eval extra) and slow to import
    except ImportError:
        raise LangmergeError("the lm-eval bridge needs lm-eval: pip install 'lm-eval==0.4.13'") from None
    for folder in include:
        if not Path(folder).is_dir():
            raise LangmergeError(f"lm-eval include path {folder} is not a folder")
    names = expand_presets(tasks)
    paths = [str(p) for p in include]
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths or None)
    known = set(manager.all_tasks)
    unknown = [t for t in names if t not in known]
    if unknown:
        raise LangmergeError(f"unknown lm-eval task(s) {unknown}; presets are {sorted(LM_EVAL_PRESETS)}")
    return names, manager


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include: Sequence[str | Path] = (),
    batch_size: int = 16,
    limit: int | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    resolved=None,
    progress: bool = True,
) -> dict:
    """lm-eval's results for ``tasks`` on an in-memory model: ``{"results": ..., "versions": ..., ["samples"]}``.

    ``resolved`` is ``resolve_lm_eval_tasks``'s answer when the caller checked the names already.
    """
    import lm_eval  # optional (the eval extra) and slow to import
    from lm_eval.models.huggingface import HFLM

    names, manager = resolved or resolve_lm_eval_tasks(tasks, include)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with library_progress_bars(progress):  # datasets is imported by now: its bars can be switched off too
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=log_samples,
            bootstrap_iters=0,
        )
    if out is None:
        raise LangmergeError("lm-eval returned no results")
    kept = {"results": out["results"], "versions": out.get("versions", {})}
    if log_samples:
        kept["samples"] = out["samples"]
    return kept
