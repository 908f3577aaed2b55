"""What a merge with a sign vote or a sparsifier loses, per tensor, layer, module type and in total.

docs/methods.md, "The loss diagnostic", defines it for every such method
(``analyzable``: TIES, TIES-SV, DARE, breadcrumbs, DELLA, SCE); a method
without a vote loses nothing to one (``L_i`` = 0) and is tallied for what its
sparsifier keeps. For each input model ``i`` (sparsified task vector
``trimmed_i``, weighted ``v_i = w_i * trimmed_i``, elected sign ``g``):

- kept after trim ``K_i = count(trimmed_i != 0)``;
- lost to the vote ``L_i = count(trimmed_i != 0 and sign(v_i) != g)``;
- loss rate ``L_i / K_i`` and mass loss ``sum |trimmed_i| over lost / sum |trimmed_i| over kept``.

Also, for each pair of models, the sign-conflict rate (entries both keep
whose weighted signs differ, over entries both keep), and each model's
task-vector norm ``||x_i - base||``. Several slack values are analysed in
one pass: the inputs are read and trimmed once per chunk, then only the vote
and the masks are redone for each slack. ``analyze`` runs the merge's own plan
through the merge's executor (``langmerge.merge.execute``), with a tally pass
(``TallyPass``) in place of the merge pass, so the numbers describe exactly
the merge ``langmerge merge`` would write, in the same flat memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from langmerge.devices import resolve_device
from langmerge.errors import LangmergeError
from langmerge.merge.execute import DEFAULT_MEMORY, Executor, nonfinite_input
from langmerge.merge.plan import TensorTask, plan_merge, with_params
from langmerge.merge.recipe import Recipe, layer_index, load_recipe
from langmerge.methods import fused_cpu
from langmerge.methods.base import Block, Method, MethodParameters, Pass, TensorInfo, TensorMerge
from langmerge.methods.consensus import agreement_mask, elect_sign
from langmerge.methods.driver import DEFAULT_CHUNK_BYTES, choose_kernel, chunk_ranges, memory_reader, run_statistics
from langmerge.methods.registry import METHODS
from langmerge.methods.task_vectors import slack_scale, weight_column
from langmerge.progress import Reporter

log = logging.getLogger(__name__)

RECIPE_SLACK = None  # a slack entry of None means "the recipe's own (per-tensor) slack"


def module_type(name: str) -> str:
    """``self_attn.q_proj``, ``mlp.up_proj``, ``embed_tokens``...: the name's part after the layer index.

    Outside layers it is the last component; a trailing ``weight`` is dropped
    (a ``bias`` is kept, so biases are their own type).
    """
    parts = name.split(".")
    if parts and parts[-1] == "weight":
        parts = parts[:-1]
    index = layer_index(name)
    if index is not None:
        for k in range(len(parts) - 1):
            if parts[k + 1] == str(index) and parts[k] in ("layers", "h", "blocks", "layer"):
                return ".".join(parts[k + 2 :]) or name
    if parts and parts[-1] == "bias" and len(parts) > 1:
        return ".".join(parts[-2:])
    return parts[-1] if parts else name


@dataclass
class Tally:
    """Additive counts over one tensor or many (add them up, then read rates)."""

    n_models: int
    n_slacks: int
    numel: int = 0
    tensors: int = 0
    # zeros of these shapes to begin with (__post_init__)
    kept: np.ndarray = field(init=False)  # (models,)
    kept_mass: np.ndarray = field(init=False)  # (models,)
    lost: np.ndarray = field(init=False)  # (slacks, models)
    lost_mass: np.ndarray = field(init=False)  # (slacks, models)
    squared_norm: np.ndarray = field(init=False)  # (models,)
    both_kept: np.ndarray = field(init=False)  # (pairs,)
    conflicts: np.ndarray = field(init=False)  # (pairs,)

    def __post_init__(self) -> None:
        n, s, pairs = self.n_models, self.n_slacks, len(self.pairs)
        for name, shape, dtype in (
            ("kept", (n,), np.int64),
            ("kept_mass", (n,), np.float64),
            ("lost", (s, n), np.int64),
            ("lost_mass", (s, n), np.float64),
            ("squared_norm", (n,), np.float64),
            ("both_kept", (pairs,), np.int64),
            ("conflicts", (pairs,), np.int64),
        ):
            setattr(self, name, np.zeros(shape, dtype=dtype))

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(combinations(range(self.n_models), 2))

    def add(self, other: Tally) -> None:
        self.numel += other.numel
        self.tensors += other.tensors
        for name in ("kept", "kept_mass", "lost", "lost_mass", "squared_norm", "both_kept", "conflicts"):
            getattr(self, name).__iadd__(getattr(other, name))

    def loss_rate(self) -> np.ndarray:
        """``L_i / K_i`` per (slack, model); NaN where a model keeps nothing."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.kept > 0, self.lost / np.maximum(self.kept, 1), np.nan)

    def mass_loss(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(
                self.kept_mass > 0, self.lost_mass / np.where(self.kept_mass > 0, self.kept_mass, 1), np.nan
            )

    def conflict_rate(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.both_kept > 0, self.conflicts / np.maximum(self.both_kept, 1), np.nan)

    def to_dict(self, labels: list[str]) -> dict:
        rate, mass = self.loss_rate(), self.mass_loss()
        models = {}
        for i, label in enumerate(labels):
            models[label] = {
                "kept": int(self.kept[i]),
                "kept_mass": float(self.kept_mass[i]),
                "task_vector_norm": float(np.sqrt(self.squared_norm[i])),
                "lost": [int(v) for v in self.lost[:, i]],
                "loss_rate": [_num(v) for v in rate[:, i]],
                "mass_loss": [_num(v) for v in mass[:, i]],
            }
        conflict = self.conflict_rate()
        conflicts = {
            f"{labels[i]}|{labels[j]}": {
                "both_kept": int(self.both_kept[k]),
                "conflicts": int(self.conflicts[k]),
                "rate": _num(conflict[k]),
            }
            for k, (i, j) in enumerate(self.pairs)
        }
        return {"tensors": self.tensors, "numel": self.numel, "models": models, "sign_conflicts": conflicts}


def _num(v: float) -> float | None:
    return None if v != v else float(v)


class TallyPass(Pass):
    """The diagnostic of one tensor, chunk by chunk: the pass ``analyze`` runs in place of the merge pass.

    ``merge`` is the tensor's planned merge after its statistics passes (the
    selection is done), so the trimmed values, weighted values and votes are
    the merge's own. With ``task``, an input chunk holding NaN or Inf is
    refused naming the model (every count would be meaningless).
    """

    def __init__(
        self,
        merge: TensorMerge,
        p: MethodParameters,
        slacks: list[float | None],
        tally: Tally,
        kernel: str,
        task: TensorTask | None = None,
        voted: bool = True,
    ):
        # a merge with a sign vote: it has sparsified() (and the task-vector family's trim_arrays and
        # weights32, for the fused kernel), whatever its class
        self.merge: Any = merge
        self.p, self.tally, self.task, self.voted = p, tally, task, voted
        protected = list(getattr(p, "protected", [False] * tally.n_models))
        own = getattr(p, "slack", 0.0)
        self.scales = [slack_scale(own if slack is None else slack, protected) for slack in slacks]
        # the weights the vote multiplies the sparsified task vectors by (SCE votes unweighted: None)
        weights = getattr(merge, "vote_weights", None)
        self.weights = list(weights) if weights is not None else [1.0] * tally.n_models
        self.fused = kernel == "fused"
        n = tally.n_models
        if self.fused:
            self.totals = {
                k: getattr(tally, k)
                for k in ("kept", "kept_mass", "squared_norm", "both_kept", "conflicts", "lost", "lost_mass")
            }
            self.vote_scales = np.asarray(
                [s.tolist() if s is not None else [1.0] * n for s in self.scales], dtype=np.float32
            )
            self.round_vote = np.asarray([s is None for s in self.scales], dtype=np.uint8)
            self.pair_a = np.asarray([i for i, _ in tally.pairs], dtype=np.int32)
            self.pair_b = np.asarray([j for _, j in tally.pairs], dtype=np.int32)

    def update(self, block: Block) -> None:
        if self.task is not None and (found := nonfinite_input(self.task, block)) is not None:
            raise found
        if self.fused:
            trim, thresholds, cutoffs = self.merge.trim_arrays(block)
            fused_cpu.tally(
                block.required_base,
                block.inputs,
                block.start,
                trim,
                thresholds,
                cutoffs,
                self.merge.weights32,
                self.vote_scales,
                self.round_vote,
                self.pair_a,
                self.pair_b,
                self.totals,
            )
        else:
            _tally_block(self.tally, block, self.merge.sparsified(block), self.weights, self.scales, self.voted)


def tensor_tally(
    method: Method,
    base: torch.Tensor,
    inputs: list[torch.Tensor],
    p: MethodParameters,
    slacks: list[float | None],
    generators: list[torch.Generator] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tally:
    """The diagnostic of one tensor held in memory, for each slack (None: ``p.slack``); ``p.protected`` names the
    protected models.

    The tensor's merge is planned as ``langmerge merge`` plans it (same kernel,
    same selection passes over the chunks); then ``TallyPass`` runs over the
    chunks in place of the merge pass.
    """
    tally = Tally(len(inputs), len(slacks), numel=base.numel(), tensors=1)
    info = TensorInfo("<tensor>", tuple(base.shape), base.dtype, base.device)
    kernel = choose_kernel(method, p, info)
    merge = method.plan(p, info, kernel, generators)
    read = memory_reader(base, inputs)
    ranges = chunk_ranges(info.shape, base.element_size(), chunk_bytes, merge.chunk_rule)
    run_statistics(merge, read, ranges)
    counting = TallyPass(merge, p, slacks, tally, kernel, voted=method.has_sign_vote)
    for a, b in ranges:
        counting.update(read(a, b))
    return tally


def _tally_block(tally: Tally, block, trimmed: torch.Tensor, weights_: list[float], scales, voted: bool = True) -> None:
    """The reference kernel's tally of one chunk; sums in float64, as the fused kernel's."""
    for i, x in enumerate(block.inputs):
        tally.squared_norm[i] += float(torch.linalg.vector_norm(x - block.base, dtype=torch.float64)) ** 2
    kept = trimmed != 0
    magnitude = trimmed.abs()
    tally.kept += torch.count_nonzero(kept, dim=1).cpu().numpy()
    tally.kept_mass += magnitude.sum(dim=1, dtype=torch.float64).cpu().numpy()
    weighted = trimmed * weight_column(weights_, trimmed)  # the bits merge_tensor votes with
    signs = weighted.sign()
    for k, (i, j) in enumerate(tally.pairs):
        both = kept[i] & kept[j]
        tally.both_kept[k] += int(torch.count_nonzero(both))
        tally.conflicts[k] += int(torch.count_nonzero(both & (signs[i] != signs[j])))
    for s, scale in enumerate(scales if voted else ()):  # nothing is lost to a vote that is not held
        lost = kept & ~agreement_mask(weighted, elect_sign(weighted, scale))
        tally.lost[s] += torch.count_nonzero(lost, dim=1).cpu().numpy()
        tally.lost_mass[s] += torch.where(lost, magnitude, 0).sum(dim=1, dtype=torch.float64).cpu().numpy()


@dataclass
class AnalysisReport:
    """Tallies of one recipe: per tensor, layer, module type and in total."""

    recipe: str
    method: str
    models: list[str]  # recipe model references
    labels: list[str]  # short names (folder names) used as keys
    protected: list[bool]
    slacks: list[float | None]
    total: Tally
    by_layer: dict[str, Tally]
    by_module: dict[str, Tally]
    by_tensor: dict[str, Tally]
    skipped: dict[str, str]  # tensor -> why it is not in the tallies
    recipe_slacks: list[float]  # distinct per-tensor slacks of the recipe itself
    seconds: float = 0.0

    @property
    def slack_labels(self) -> list[float | str]:
        if all(s is not None for s in self.slacks):
            return [s for s in self.slacks if s is not None]
        own = self.recipe_slacks[0] if len(self.recipe_slacks) == 1 else "recipe"
        return [own if s is None else s for s in self.slacks]

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "method": self.method,
            "models": [
                {"model": m, "label": lab, "protected": prot}
                for m, lab, prot in zip(self.models, self.labels, self.protected)
            ],
            "slacks": self.slack_labels,
            "seconds": round(self.seconds, 3),
            "total": self.total.to_dict(self.labels),
            "by_layer": {k: v.to_dict(self.labels) for k, v in self.by_layer.items()},
            "by_module": {k: v.to_dict(self.labels) for k, v in self.by_module.items()},
            "by_tensor": {k: v.to_dict(self.labels) for k, v in self.by_tensor.items()},
            "skipped": self.skipped,
        }

    def table(self) -> str:
        """A short text table: per model and slack, kept, lost, loss rate and mass loss in total."""
        rows = [f"{self.recipe} ({self.method})"]
        rows.append(
            f"  {'model':<24}{'slack':>8}{'kept':>14}{'lost':>14}{'loss rate':>11}{'mass loss':>11}{'||t||':>10}"
        )
        rate, mass = self.total.loss_rate(), self.total.mass_loss()
        for i, label in enumerate(self.labels):
            name = label + (" *" if self.protected[i] else "")
            for s, slack in enumerate(self.slack_labels):
                rows.append(
                    f"  {name:<24}{_fmt_slack(slack):>8}{self.total.kept[i]:>14,}{self.total.lost[s, i]:>14,}"
                    f"{percent(rate[s, i]):>11}{percent(mass[s, i]):>11}{np.sqrt(self.total.squared_norm[i]):>10.3g}"
                )
        conflict = self.total.conflict_rate()
        for k, (i, j) in enumerate(self.total.pairs):
            rows.append(
                f"  sign conflicts {self.labels[i]} vs {self.labels[j]}: {percent(conflict[k])} of entries both keep"
            )
        if any(self.protected):
            rows.append("  * protected model")
        return "\n".join(rows)


def _fmt_slack(s) -> str:
    return s if isinstance(s, str) else f"{s:g}"


def percent(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.2f}%"


def model_labels(models: list[str]) -> list[str]:
    """Folder names where they are unique, else the full references."""
    names = [Path(m.rstrip("/")).name or m for m in models]
    return names if len(set(names)) == len(names) else list(models)


def resolve_protected(recipe: Recipe, protect: list[str] | None) -> list[bool]:
    """The recipe's protected models, or those named in ``protect`` (model references or folder names)."""
    if protect is None:
        return list(recipe.protected)
    models = [e.model for e in recipe.inputs]
    labels = model_labels(models)
    out = [False] * len(models)
    for ref in protect:
        hits = [i for i, (m, lab) in enumerate(zip(models, labels)) if ref in (m, lab)]
        if not hits:
            raise LangmergeError(
                f"{recipe.source}: --protect {ref!r} is not one of the merged models ({', '.join(models)})"
            )
        for i in hits:
            out[i] = True
    return out


def analyzable(method: Method) -> bool:
    """The loss diagnostic applies: the method sparsifies task vectors or elects signs (or both)."""
    return method.has_sign_vote or method.sparsifier is not None


def check_analyzable(recipe: Recipe, protected: list[bool], slacks: Sequence[float | None]) -> None:
    """Bad input, before any tensor is read."""
    method = recipe.method
    if not analyzable(method):
        applicable = ", ".join(name for name, m in METHODS.items() if analyzable(m))
        raise LangmergeError(
            f"{recipe.source}: the loss diagnostic is not applicable to merge_method {method.name!r}: it has no sign "
            f"vote and no sparsifier, so no entry of a task vector is dropped or outvoted; it applies to {applicable}"
        )
    slack_votes = method.has_sign_vote and "protected" in method.parameter_model.model_fields
    if any(s for s in slacks if s is not None) and not slack_votes:
        what = "holds no sign vote" if not method.has_sign_vote else "has a sign vote without protected models"
        raise LangmergeError(
            f"--slack: merge_method {method.name!r} {what} for a slack to change; analyse it without --slack"
        )
    for s in slacks:
        if s is not None and (s != s or s < 0 or s == float("inf")):
            raise LangmergeError(f"--slack: {s!r} is not a finite number >= 0")
    if any(s for s in slacks if s is not None) and not any(protected):
        raise LangmergeError(
            f"{recipe.source}: a slack > 0 needs a protected model; name the SFT model with --protect "
            "(or 'parameters.protect' in a ties_sv recipe)"
        )


def analyze(
    recipe,
    *,
    slacks: list[float] | None = None,
    protect: list[str] | None = None,
    device: str = "cpu",
    memory: int = DEFAULT_MEMORY,
    progress: bool = True,
    reporter: Reporter | None = None,
    allow_pickle: bool = False,
) -> AnalysisReport:
    """Stream the recipe's inputs through the merge's executor and tally what the merge keeps and loses.

    ``slacks``: slack values to analyse in one pass (default: the recipe's
    own). ``protect``: model references (or folder names) given ``1 + slack``
    votes, replacing the recipe's ``protect``; with a plain ``ties`` recipe
    it shows what TIES-SV would keep. ``reporter`` hears the progress
    (tensors); ``progress`` shows huggingface_hub's download bars.
    """
    recipe = load_recipe(recipe)
    recipe.require_whole_models("analyze")
    protected = resolve_protected(recipe, protect)
    slack_list: list[float | None] = [RECIPE_SLACK] if slacks is None else [float(s) for s in slacks]
    if not slack_list:
        raise LangmergeError("--slack: no value given")
    check_analyzable(recipe, protected, slack_list)

    dev = resolve_device(device)
    start = time.perf_counter()
    plan = plan_merge(recipe, allow_pickle=allow_pickle, progress=progress, device=dev)
    models = [e.model for e in recipe.inputs]
    labels = model_labels(models)
    n = len(models)
    by_tensor: dict[str, Tally] = {}
    skipped: dict[str, str] = {}
    recipe_slacks: set[float] = set()
    tensors = []
    for tensor in plan.tensors:
        if tensor.copied:
            skipped[tensor.name] = "not floating point (copied, not merged)"
        elif tensor.aligned:
            skipped[tensor.name] = "vocabulary-aligned rows (merged per row group, not analysed)"
        else:
            if "protected" in recipe.method.parameter_model.model_fields:  # the methods with a slack
                tensor.tasks = [
                    with_params(task, lambda p: p.model_copy(update={"protected": protected})) for task in tensor.tasks
                ]
            recipe_slacks.update(getattr(task.params, "slack", 0.0) for task in tensor.tasks)
            tensors.append(tensor)

    def tally_pass(tensor, task, merge):
        tally = by_tensor[tensor.name] = Tally(n, len(slack_list), numel=task.info.numel, tensors=1)
        return TallyPass(merge, task.params, slack_list, tally, task.kernel, task, recipe.method.has_sign_vote).update

    try:
        Executor(dev, memory, reporter).run(tensors, final=tally_pass)
    finally:
        if reporter is not None:
            reporter.close()
        plan.close()
    total = Tally(n, len(slack_list))
    by_layer: dict[str, Tally] = {}
    by_module: dict[str, Tally] = {}
    for name, tally in by_tensor.items():
        total.add(tally)
        layer = layer_index(name)
        by_layer.setdefault("other" if layer is None else str(layer), Tally(n, len(slack_list))).add(tally)
        by_module.setdefault(module_type(name), Tally(n, len(slack_list))).add(tally)
    layer_keys = sorted((k for k in by_layer if k != "other"), key=int) + (["other"] if "other" in by_layer else [])
    return AnalysisReport(
        recipe=recipe.source,
        method=recipe.method.name,
        models=models,
        labels=labels,
        protected=protected,
        slacks=slack_list,
        total=total,
        by_layer={k: by_layer[k] for k in layer_keys},
        by_module=by_module,
        by_tensor=by_tensor,
        skipped=skipped,
        recipe_slacks=sorted(recipe_slacks),
        seconds=time.perf_counter() - start,
    )
