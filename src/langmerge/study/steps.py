"""Steps of a study: small records whose key is the hash of their settings and their inputs' keys.

A step's output is the folder ``cache/<kind>-<key>/``, written atomically with a
``done.json`` marker; a step whose folder exists is finished and is never run
again. Changing a setting changes the key of that step and of every step that
depends on it, and of nothing else.

A step's settings are a model per kind (``FileSettings`` ... ``AnalyzeSettings``);
the key hashes their dump, which is the dict the steps were keyed by before they
were models (a field in ``absent_when_none`` is left out of the dump when None),
so a study's cache stays valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, SerializerFunctionWrapHandler, model_serializer

from langmerge.errors import LangmergeError
from langmerge.evaluation.options import Precision
from langmerge.io.output import atomic_output_dir
from langmerge.methods.registry import get_method
from langmerge.progress import library_progress_bars
from langmerge.study.config import MethodSpec, StudyTrainOptions, TuningSpec, as_written
from langmerge.tuning.space import SpaceEntry

log = logging.getLogger(__name__)

DONE = "done.json"
STEP_VERSION = 1  # bump when what a step writes changes


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def file_digest(path: Path) -> str:
    """sha256 of a file's content: an input file is part of the key by what it holds, not where it is."""
    h = hashlib.sha256()
    try:
        with Path(path).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise LangmergeError(f"cannot read {path} ({exc.strerror or exc})") from exc
    return h.hexdigest()


# ----------------------------------------------------------------------------- settings of each kind of step


class StepSettings(BaseModel):
    """What a step's output depends on besides its inputs (hashed into its key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    absent_when_none: ClassVar[tuple[str, ...]] = ()  # fields that only some steps of the kind have

    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        doc = handler(self)
        for name in self.absent_when_none:
            if doc.get(name, 0) is None:
                del doc[name]
        return doc


class FileSettings(StepSettings):
    """A file the study names, by its content."""

    path: str
    sha256: str


class SourceSettings(StepSettings):
    """A built-in corpus, made offline (study.sources)."""

    builtin: str
    version: int


class GivenSettings(StepSettings):
    """A model the study is given: a Hub id at a commit, or a folder by its files (``folder_fingerprint``)."""

    absent_when_none = ("hub", "commit", "path", "files")
    hub: str | None = None
    commit: str | None = None
    path: str | None = None
    files: list[tuple[str, int, int]] | None = None


class TaskSettings(StepSettings):
    """The tasks of an evaluation or a tuning: names or task files (by content), how they are split."""

    tasks: list[str]
    split: str
    builtin_version: str
    task_files: dict[str, str]  # task file -> sha256


class BaseSettings(StepSettings):
    """A built-in base model, its vocabulary pruned to the study's texts and tasks or not."""

    builtin: str
    prune_vocab: bool
    tasks: TaskSettings | None


# A training step's options, dumped as the settings study caches began with (study.config.KEYED_TRAINING).
KeyedTraining = Annotated[StudyTrainOptions, PlainSerializer(lambda training: training.step_settings())]


class CTSettings(StepSettings):
    """One language's continued pre-training, saved at each budget."""

    language: str
    budgets: list[int]
    replay_ratio: tuple[int, int]
    repeat: bool
    training: KeyedTraining


class SFTSettings(StepSettings):
    """Supervised fine-tuning (of the base: ``sft``; of a CT checkpoint at ``budget``: ``ct_sft``)."""

    absent_when_none = ("budget",)
    epochs: int
    training: KeyedTraining
    budget: int | None = None


class EvalSettings(StepSettings):
    """An evaluation of a model, a CT checkpoint at ``budget``, or a tuned merge (``method_name``)."""

    absent_when_none = ("score_tasks", "budget", "method_name")
    tasks: TaskSettings
    limit: int | None
    batch_size: int
    lm_eval: list[str]
    device: str
    precision: Precision
    score_tasks: list[str] | None = None  # the tasks the score averages ([]: all); absent for English evaluations
    budget: int | None = None
    method_name: str | None = None


class TuneSettings(StepSettings):
    """The tuning of one method's merge of the CT checkpoint at ``budget`` and the SFT model."""

    budget: int
    method: MethodSpec
    tuning: TuningSpec
    tasks: TaskSettings
    batch_size: int
    dtype: str
    device: str
    precision: Precision


class AnalyzeSettings(StepSettings):
    """The sign-conflict analysis of the tuned TIES and TIES-SV merges (its inputs are all it depends on)."""


SettingsT = TypeVar("SettingsT", bound=StepSettings)

# ----------------------------------------------------------------------------- steps


@dataclass
class Step:
    kind: str
    label: str  # for people: "ct ny", "tune ties ny 8k"
    settings: StepSettings
    deps: dict[str, Step] = field(default_factory=dict)
    training: bool = False  # runs a training loop (gets GPUs on a cluster)

    def key(self) -> str:
        doc = {
            "kind": self.kind,
            "version": STEP_VERSION,
            "settings": self.settings.model_dump(),
            "deps": {name: dep.key() for name, dep in sorted(self.deps.items())},
        }
        return hashlib.sha256(canonical(doc).encode()).hexdigest()[:16]

    def settings_as(self, kind: type[SettingsT]) -> SettingsT:
        """The settings, which a step of this kind holds as ``kind`` (a runner's typed view of them)."""
        if not isinstance(self.settings, kind):
            raise TypeError(f"step {self.label}: settings are {type(self.settings).__name__}, not {kind.__name__}")
        return self.settings

    def folder(self, cache: Path) -> Path:
        return Path(cache) / f"{self.kind}-{self.key()}"

    def done(self, cache: Path) -> bool:
        return (self.folder(cache) / DONE).is_file()


class StepRecord(BaseModel):
    """A finished step: its ``done.json`` (``cached``, not written: whether this run found it done)."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    label: str
    key: str
    settings: dict[str, Any]  # the step's settings as hashed into its key
    deps: dict[str, str]  # input name -> the input step's folder
    seconds: float
    cpu_seconds: float | None = None  # absent from records written before it was measured
    finished: str  # UTC, ISO 8601
    info: dict[str, Any]  # what the step's runner reports
    cached: bool = Field(False, exclude=True)


@dataclass(frozen=True)
class Context:
    cache: Path
    progress: bool = True
    allow_pickle: bool = False  # given models with only .bin weights may load (--allow-pickle)

    def out(self, step: Step) -> Path:
        folder = step.folder(self.cache)
        if not (folder / DONE).is_file():
            raise LangmergeError(f"step {step.label} ({folder.name}) has not run; its output is needed")
        return folder


Runner = Callable[[Step, Context, Path], dict]


def runners() -> dict[str, Runner]:
    from langmerge.study import run_steps  # import cycle: the runners take this module's steps and settings

    return run_steps.RUNNERS


def _cpu_seconds() -> float:
    import resource  # POSIX only: imported here, the study's modules still import on Windows

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_step(step: Step, ctx: Context, force: bool = False) -> StepRecord:
    """Run ``step`` unless it is done (or ``force``); returns its done.json record."""
    folder = step.folder(ctx.cache)
    marker = folder / DONE
    if marker.is_file() and not force:
        return StepRecord.model_validate({**json.loads(marker.read_text()), "cached": True})
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    fn = runners()[step.kind]
    # A Ray worker is a process of its own: the CLI's --no-progress does not reach its libraries.
    with library_progress_bars(ctx.progress), atomic_output_dir(folder, force=True) as tmp:
        info = fn(step, ctx, tmp)
        record = StepRecord(
            kind=step.kind,
            label=step.label,
            key=step.key(),
            settings=step.settings.model_dump(),
            deps={name: dep.folder(ctx.cache).name for name, dep in step.deps.items()},
            seconds=round(time.perf_counter() - start, 3),
            # user + system time of this process's threads: what the step costs on a machine shared with other work
            cpu_seconds=round(_cpu_seconds() - cpu_start, 3),
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            info=info,
        )
        # Written last: a folder without it is never taken for a finished step.
        (tmp / DONE).write_text(json.dumps(record.model_dump(), indent=1, default=str) + "\n")
    return record


# ----------------------------------------------------------------------------- recipes


def method_recipe(method: MethodSpec, base: str, ct: str, sft: str, dtype: str) -> dict[str, Any]:
    """The mergekit-format recipe of a study method over (base, CT, SFT)."""
    kind = get_method(method.merge_method)
    written = method.model_dump()  # plain data, as a recipe file holds (best_recipe.yaml is written from it)
    recipe: dict[str, Any] = {
        "merge_method": method.merge_method,
        "models": [
            {"model": ct, "parameters": written["ct"]},
            {"model": sft, "parameters": written["sft"]},
        ],
        "parameters": written["parameters"],
        "dtype": dtype,
    }
    if kind.max_models == 1:
        # One model besides the base (slerp, nearswap, arcee_fusion): the CT model merged into the SFT model,
        # which takes the base's place, as mergekit recipes of these methods name one of the two models;
        # passthrough, which takes one model and no base: the CT model (docs/study.md, "Methods").
        if kind.base_policy == "required":
            recipe["base_model"] = sft
        else:
            recipe["models"] = recipe["models"][:1]
    elif kind.base_policy in ("required", "optional"):  # over the base: task vectors
        recipe["base_model"] = base
    if kind.takes_protect:  # TIES-SV protects the SFT model
        recipe["parameters"].setdefault("protect", [sft])
    for name, role in kind.reference_parameters.items():  # layer_swap's language_expert: the CT model
        recipe["parameters"].setdefault(name, {"ct": ct, "sft": sft}[role])
    return recipe


def space_for_recipe(space: dict[str, SpaceEntry]) -> dict[str, Any]:
    """A method's space as a search space (plain data, as written) with models[ct] / models[sft] as the recipe's
    indices (0 and 1)."""
    return {
        key.replace("models[ct]", "models[0]").replace("models[sft]", "models[1]"): as_written(entry)
        for key, entry in space.items()
    }
