"""Steps of a study: small records whose key is the hash of their settings and their inputs' keys.

A step's output is the folder ``cache/<kind>-<key>/``, written atomically with a
``done.json`` marker; a step whose folder exists is finished and is never run
again. Changing a setting changes the key of that step and of every step that
depends on it, and of nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from langmerge.errors import LangmergeError
from langmerge.io.output import atomic_output_dir
from langmerge.methods.registry import get_method

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


@dataclass
class Step:
    kind: str
    label: str  # for people: "ct ny", "tune ties ny 8k"
    settings: dict
    deps: dict[str, Step] = field(default_factory=dict)
    training: bool = False  # runs a training loop (gets GPUs on a cluster)

    def key(self) -> str:
        doc = {"kind": self.kind, "version": STEP_VERSION, "settings": self.settings,
               "deps": {name: dep.key() for name, dep in sorted(self.deps.items())}}
        return hashlib.sha256(canonical(doc).encode()).hexdigest()[:16]

    def folder(self, cache: Path) -> Path:
        return Path(cache) / f"{self.kind}-{self.key()}"

    def done(self, cache: Path) -> bool:
        return (self.folder(cache) / DONE).is_file()


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
    from langmerge.study import run_steps

    return run_steps.RUNNERS


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_step(step: Step, ctx: Context, force: bool = False) -> dict:
    """Run ``step`` unless it is done (or ``force``); returns its done.json record."""
    folder = step.folder(ctx.cache)
    marker = folder / DONE
    if marker.is_file() and not force:
        return json.loads(marker.read_text()) | {"cached": True}
    from langmerge.progress import library_progress_bars

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    fn = runners()[step.kind]
    # A Ray worker is a process of its own: the CLI's --no-progress does not reach its libraries.
    with library_progress_bars(ctx.progress), atomic_output_dir(folder, force=True) as tmp:
        info = fn(step, ctx, tmp)
        record = {
            "kind": step.kind, "label": step.label, "key": step.key(), "settings": step.settings,
            "deps": {name: dep.folder(ctx.cache).name for name, dep in step.deps.items()},
            "seconds": round(time.perf_counter() - start, 3),
            # user + system time of this process's threads: what the step costs on a machine shared with other work
            "cpu_seconds": round(_cpu_seconds() - cpu_start, 3),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "info": info,
        }
        # Written last: a folder without it is never taken for a finished step.
        (tmp / DONE).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return record | {"cached": False}


# ----------------------------------------------------------------------------- recipes


def method_recipe(method, base: str, ct: str, sft: str, dtype: str) -> dict:
    """The mergekit-format recipe of a study method over (base, CT, SFT)."""
    from langmerge.methods.registry import get_method

    kind = get_method(method.merge_method)
    recipe = {
        "merge_method": method.merge_method,
        "models": [
            {"model": ct, "parameters": dict(method.ct)},
            {"model": sft, "parameters": dict(method.sft)},
        ],
        "parameters": dict(method.parameters),
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


def space_for_recipe(space: dict) -> dict:
    """Space keys with models[ct] / models[sft] as the recipe's indices (0 and 1)."""
    return {key.replace("models[ct]", "models[0]").replace("models[sft]", "models[1]"): spec
            for key, spec in space.items()}
