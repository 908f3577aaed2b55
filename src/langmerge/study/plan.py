"""The study as a graph of steps (``build_plan``), and the budget check that needs the base tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from langmerge.errors import LangmergeError
from langmerge.evaluation.builtin import BUILTIN_VERSION
from langmerge.study.config import Source, Study
from langmerge.study.run_steps import data_path, folder_fingerprint, model_path
from langmerge.study.sources import source_version
from langmerge.study.steps import (
    AnalyzeSettings,
    BaseSettings,
    Context,
    CTSettings,
    EvalSettings,
    FileSettings,
    GivenSettings,
    SFTSettings,
    SourceSettings,
    Step,
    TaskSettings,
    TuneSettings,
    file_digest,
)
from langmerge.training.api import load_tokenizer
from langmerge.training.data import token_stream


@dataclass
class Plan:
    study: Study
    steps: list[Step]  # in dependency order
    prepare: list[Step]  # the steps before the budget check (data and base model; no training)
    base: Step
    ct: dict[str, Step] = field(default_factory=dict)  # language -> CT run (or given checkpoints by budget)
    ct_given: dict[tuple[str, int], Step] = field(default_factory=dict)
    sft: Step | None = None
    evals: dict[tuple[str, int | None, str], Step] = field(default_factory=dict)  # (lang, budget, row) -> eval
    tunes: dict[tuple[str, int, str], Step] = field(default_factory=dict)
    analyses: dict[tuple[str, int], Step] = field(default_factory=dict)
    english: dict[tuple[int, str], Step] = field(default_factory=dict)  # (seed, base|sft) -> eval on sft.test
    # (language, seed, row) -> eval of the smallest budget's runs repeated with another seed
    seeded: dict[tuple[str, int, str], Step] = field(default_factory=dict)

    def ct_step(self, lang: str, budget: int) -> Step:
        return self.ct_given.get((lang, budget)) or self.ct[lang]


def _data_step(study: Study, src: Source, role: str) -> Step:
    if src.builtin is not None:
        return Step(
            "source", f"source {src.builtin}", SourceSettings(builtin=src.builtin, version=source_version(src.builtin))
        )
    assert src.path is not None  # a Source is exactly one of path and builtin
    path = study.path(src.path).resolve()
    return Step("file", f"file {path.name}", FileSettings(path=str(path), sha256=file_digest(path)))


def _given(study: Study, value: str, key: str, label: str) -> Step:
    """A model the study is given: a folder (keyed by its files) or a Hub id (keyed by its commit,
    fetched when the step runs)."""
    model = study.model(value, key)
    if model.from_hub:
        return Step("given", label, GivenSettings(hub=model.repo_id, commit=model.commit))
    path = model.folder.resolve()
    return Step("given", label, GivenSettings(path=str(path), files=folder_fingerprint(path)))


def _task_settings(study: Study, names: list[str]) -> TaskSettings:
    resolved = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            path = study.path(name).resolve()
            resolved.append(str(path))
        else:
            resolved.append(name)
    digests = {n: file_digest(Path(n)) for n in resolved if n.endswith((".yaml", ".yml"))}
    return TaskSettings(
        tasks=resolved, split=study.spec.evaluation.split, builtin_version=BUILTIN_VERSION, task_files=digests
    )


def _add(order: list[Step], seen: set[int], step: Step) -> Step:
    """Append ``step`` after its dependencies (each step object once)."""
    if id(step) in seen:
        return step
    for dep in step.deps.values():
        _add(order, seen, dep)
    seen.add(id(step))
    order.append(step)
    return step


def build_plan(study: Study) -> Plan:
    s = study.spec
    order: list[Step] = []
    seen: set[int] = set()
    sources: dict[str, Step] = {}

    def data(src: Source, role: str) -> Step:
        step = _data_step(study, src, role)
        return sources.setdefault(step.key(), step)

    replay = [data(src, "replay") for src in s.replay]
    texts = {lang: [data(src, "text") for src in ls.text] for lang, ls in s.languages.items()}
    assert s.sft.data is not None  # SFTSpec requires it (one file)
    sft_data = data(s.sft.data[0], "sft")

    if s.base.path is not None:
        base = _given(study, s.base.path, f"{study.source}: base.path", "base model")
    else:
        assert s.base.builtin is not None  # a base is exactly one of path and builtin
        vocab_inputs = [*replay, *[t for ts in texts.values() for t in ts], sft_data]
        tasks = sorted({t for ls in s.languages.values() for t in (*ls.validation, *ls.test)})
        base = Step(
            "base",
            f"base {s.base.builtin}" + (" (vocabulary pruned)" if s.base.prune_vocab else ""),
            BaseSettings(
                builtin=s.base.builtin,
                prune_vocab=s.base.prune_vocab,
                tasks=_task_settings(study, tasks) if s.base.prune_vocab else None,
            ),
            {f"vocab{i}": d for i, d in enumerate(vocab_inputs)} if s.base.prune_vocab else {},
        )
    prepare = [_add(order, seen, d) for d in sources.values()]
    _add(order, seen, base)
    prepare.append(base)
    plan = Plan(study, order, prepare, base)

    def sft_step(seed: int | None) -> Step:
        training = s.sft.training.model_copy(update={"seed": seed} if seed is not None else {})
        return Step(
            "sft",
            "sft" + (f" (seed {seed})" if seed is not None else ""),
            SFTSettings(epochs=s.sft.epochs, training=training),
            {"base": base, "data": sft_data},
            training=True,
        )

    if s.sft.path is not None:
        sft = _given(study, s.sft.path, f"{study.source}: sft.path", "SFT model")
    else:
        sft = sft_step(None)
    plan.sft = _add(order, seen, sft)
    seeded_sft = {seed: _add(order, seen, sft_step(seed)) for seed in s.seeds.extra}
    if s.sft.test:
        english = EvalSettings(
            tasks=_task_settings(study, s.sft.test),
            limit=s.evaluation.limit,
            batch_size=s.evaluation.batch_size,
            lm_eval=[],
            device=s.evaluation.device,
            precision=s.evaluation.precision,
        )
        main_seed = s.sft.training.seed
        plan.english[(main_seed, "base")] = _add(
            order, seen, Step("eval", "eval base on English", english, {"model": base})
        )
        for seed, model in {main_seed: sft, **seeded_sft}.items():
            label = "eval sft on English" + (f" (seed {seed})" if seed != main_seed else "")
            plan.english[(seed, "sft")] = _add(order, seen, Step("eval", label, english, {"model": model}))
    ratio = study.ratio()

    def ct_step(lang: str, budgets: list[int], seed: int | None) -> Step:
        training = s.ct_training.model_copy(update={"seed": seed} if seed is not None else {})
        deps = {"base": base} | {f"text{i}": t for i, t in enumerate(texts[lang])}
        deps |= {f"replay{i}": r for i, r in enumerate(replay)}
        label = f"ct {lang} ({', '.join(f'{b:,}' for b in budgets)} tokens" + (
            f", seed {seed})" if seed is not None else ")"
        )
        return Step(
            "ct",
            label,
            CTSettings(language=lang, budgets=budgets, replay_ratio=ratio, repeat=s.repeat, training=training),
            deps,
            training=True,
        )

    def budget_steps(
        lang: str, b: int, ct: Step, sft: Step, ev: EvalSettings, valid: TaskSettings, tag: str, methods: list[str]
    ) -> dict[str, Step]:
        """CT-then-SFT (where the language's ct_sft_budgets has ``b``) and the tuned merges of one budget, and the
        evaluations of CT, CT-then-SFT and the merges."""
        budget = {"budget": b} if ct.kind == "ct" else {}
        evals = {"ct": _add(order, seen, Step("eval", f"eval ct {tag}", ev.model_copy(update=budget), {"model": ct}))}
        if b in study.ct_sft_budgets(lang):
            # a given SFT model has no training settings: CT-then-SFT trains as the study's sft.training says
            training = sft.settings.training if isinstance(sft.settings, SFTSettings) else s.sft.training
            ct_sft = _add(
                order,
                seen,
                Step(
                    "ct_sft",
                    f"ct-then-sft {tag}",
                    SFTSettings(epochs=s.sft.epochs, training=training, budget=budget.get("budget")),
                    {"base": ct, "data": sft_data},
                    training=True,
                ),
            )
            evals["ct_sft"] = _add(order, seen, Step("eval", f"eval ct-then-sft {tag}", ev, {"model": ct_sft}))
        for name in methods:
            m = s.methods[name]
            tune = _add(
                order,
                seen,
                Step(
                    "tune",
                    f"tune {name} {tag}",
                    TuneSettings(
                        budget=b,
                        method=m,
                        tuning=s.tuning,
                        tasks=valid,
                        batch_size=s.evaluation.batch_size,
                        dtype=s.dtype,
                        device=s.evaluation.device,
                        precision=s.evaluation.precision,
                    ),
                    {"base": base, "ct": ct, "sft": sft},
                ),
            )
            evals[name] = _add(
                order,
                seen,
                Step("eval", f"eval {name} {tag}", ev.model_copy(update={"method_name": name}), {"tune": tune}),
            )
            evals[f"tune:{name}"] = tune
        return evals

    for lang, ls in s.languages.items():
        budgets = study.budgets(lang)
        given = study.checkpoints(lang)
        to_train = [b for b in budgets if b not in given]
        for b, value in given.items():
            key = f"{study.source}: languages.{lang}.checkpoints"
            plan.ct_given[(lang, b)] = _add(order, seen, _given(study, value, key, f"CT {lang} {b:,} (given)"))
        if to_train:
            plan.ct[lang] = _add(order, seen, ct_step(lang, to_train, None))
        test = _task_settings(study, ls.test)
        valid = _task_settings(study, ls.validation)
        ev = EvalSettings(
            tasks=test,
            limit=s.evaluation.limit,
            batch_size=s.evaluation.batch_size,
            lm_eval=list(ls.lm_eval),
            device=s.evaluation.device,
            precision=s.evaluation.precision,
            score_tasks=list(ls.score),
        )
        plan.evals[(lang, None, "base")] = _add(order, seen, Step("eval", f"eval base on {lang}", ev, {"model": base}))
        plan.evals[(lang, None, "sft")] = _add(order, seen, Step("eval", f"eval sft on {lang}", ev, {"model": sft}))
        for b in budgets:
            steps = budget_steps(lang, b, plan.ct_step(lang, b), sft, ev, valid, f"{lang} {b:,}", list(s.methods))
            for row, step in steps.items():
                if row.startswith("tune:"):
                    plan.tunes[(lang, b, row[5:])] = step
                else:
                    plan.evals[(lang, b, row)] = step
            if s.analysis is not None:
                plan.analyses[(lang, b)] = _add(
                    order,
                    seen,
                    Step(
                        "analyze",
                        f"analyze {lang} {b:,}",
                        AnalyzeSettings(),
                        {
                            "ties": plan.tunes[(lang, b, s.analysis.ties)],
                            "ties_sv": plan.tunes[(lang, b, s.analysis.ties_sv)],
                        },
                    ),
                )
        smallest = budgets[0]
        if smallest in given:
            continue  # a given CT checkpoint has no seed to vary
        for seed, seed_sft in seeded_sft.items():
            ct = _add(order, seen, ct_step(lang, [smallest], seed))
            tag = f"{lang} {smallest:,} (seed {seed})"
            plan.seeded[(lang, seed, "sft")] = _add(
                order, seen, Step("eval", f"eval sft on {lang} (seed {seed})", ev, {"model": seed_sft})
            )
            steps = budget_steps(lang, smallest, ct, seed_sft, ev, valid, tag, list(s.seeds.methods))
            for row, step in steps.items():
                if not row.startswith("tune:"):
                    plan.seeded[(lang, seed, row)] = step
    return plan


def check_budgets(plan: Plan, ctx: Context) -> dict[str, dict]:
    """Every CT budget against the tokens its text (and replay) holds; run after the base exists."""
    study = plan.study
    if not plan.ct:
        return {}
    tokenizer = load_tokenizer(model_path(ctx, plan.base))
    counts: dict[str, dict] = {}
    replay_tokens = None
    for lang, step in plan.ct.items():
        texts: list[str | Path] = [data_path(ctx, d) for n, d in step.deps.items() if n.startswith("text")]
        replay: list[str | Path] = [data_path(ctx, d) for n, d in step.deps.items() if n.startswith("replay")]
        available = len(token_stream(tokenizer, texts))
        largest = max(step.settings_as(CTSettings).budgets)
        counts[lang] = {"text_tokens": available}
        if largest > available and not study.spec.repeat:
            raise LangmergeError(
                f"{study.source}: languages.{lang}.budgets: {largest:,} tokens is more than the text holds "
                f"({available:,} tokens with this tokenizer); lower the budget, add text, or set repeat: true"
            )
        if replay:
            if replay_tokens is None:
                replay_tokens = len(token_stream(tokenizer, replay))
            t, r = study.ratio()
            needed = largest * r // t
            counts[lang]["replay_tokens"] = replay_tokens
            if needed > replay_tokens and not study.spec.repeat:
                raise LangmergeError(
                    f"{study.source}: replay: the {largest:,}-token budget of {lang} needs {needed:,} replay tokens "
                    f"at {study.spec.replay_ratio}, the replay text holds {replay_tokens:,}"
                )
    return counts
