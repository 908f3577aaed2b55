"""Merge methods as data: each is a combination of sparsification and consensus.

A new method of the task-vector family is one ``MergeMethod`` entry below;
its parameters follow from its fields (see ``MergeMethod.parameters``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from langmerge.errors import LangmergeError

Scope = Literal["model", "global"]


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    scope: Scope
    type: type
    default: object = None  # None means required (where it applies)
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    uses_base: bool  # task-vector family (x_i - base) vs. plain weighted average
    sparsification: Literal["magnitude", "random"] | None = None
    consensus: bool = False  # TIES sign election and disjoint merge
    slack: bool = False  # TIES-SV: protected models get (1 + slack) votes
    default_normalize: bool = False
    default_rescale: bool = False
    reference: str = ""

    @property
    def parameters(self) -> dict[str, ParameterSpec]:
        specs = [
            ParameterSpec("weight", "model", float, help="w_i, the model's weight"),
            ParameterSpec("normalize", "global", bool, self.default_normalize, help="divide by the sum of weights"),
        ]
        if self.uses_base:
            specs += [
                ParameterSpec("lambda", "global", float, 1.0, help="scale of the merged task vector"),
                ParameterSpec("int8_mask", "global", bool, False, help="accepted for mergekit recipes; no numeric effect"),
            ]
        if self.sparsification:
            specs += [
                ParameterSpec("density", "model", float, 1.0, 0.0, 1.0, help="fraction of the task vector kept"),
                ParameterSpec("rescale", "global", bool, self.default_rescale, help="restore the L1 norm after dropping"),
            ]
        if self.sparsification == "random":
            specs.append(ParameterSpec("seed", "global", int, 0, help="seed of the DARE drop masks"))
        if self.slack:
            specs += [
                ParameterSpec("slack", "global", float, 0.0, 0.0, help="s >= 0: protected models vote with weight 1 + s"),
                # ``protect`` is a list of model references, resolved by the recipe, not per tensor.
            ]
        return {s.name: s for s in specs}


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "linear",
            "weighted average of the models: sum w_i x_i / sum w_i",
            uses_base=False,
            default_normalize=True,
            reference="https://arxiv.org/abs/2203.05482",
        ),
        MergeMethod(
            "task_arithmetic",
            "base + lambda * sum w_i (x_i - base)",
            uses_base=True,
            reference="https://arxiv.org/abs/2212.04089",
        ),
        MergeMethod(
            "ties",
            "trim, elect sign by mass, disjoint merge (TIES-Merging)",
            uses_base=True,
            sparsification="magnitude",
            consensus=True,
            default_normalize=True,
            reference="https://arxiv.org/abs/2306.01708",
        ),
        MergeMethod(
            "ties_sv",
            "TIES whose sign vote gives protected (SFT) models 1 + slack times the say",
            uses_base=True,
            sparsification="magnitude",
            consensus=True,
            slack=True,
            default_normalize=True,
            reference="https://arxiv.org/abs/2407.03994",
        ),
        MergeMethod(
            "dare_linear",
            "random drop with rescale, then task arithmetic (DARE)",
            uses_base=True,
            sparsification="random",
            default_rescale=True,
            reference="https://arxiv.org/abs/2311.03099",
        ),
        MergeMethod(
            "dare_ties",
            "random drop with rescale, then TIES sign election (DARE-TIES)",
            uses_base=True,
            sparsification="random",
            consensus=True,
            default_rescale=True,
            reference="https://arxiv.org/abs/2311.03099",
        ),
    )
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise LangmergeError(
            f"recipe key 'merge_method': unknown method {name!r}; choose one of {', '.join(METHODS)}"
        ) from None
