"""The task-vector family as data: one generic method configured by sparsification x consensus x defaults.

``linear``, ``task_arithmetic``, ``ties``, ``ties_sv``, ``dare_linear``,
``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della`` and
``della_linear`` are entries of ``ENTRIES`` (docs/methods.md gives each one's
definition and numerics). A new method of the family is one entry; one with a
new sparsifier or consensus adds it here.

Per tensor (``TaskVectorMerge``): the statistics passes are the magnitude
selections (TIES's top k; breadcrumbs' top k and its outliers) and, with
``rescale``, the exact L1 norms before and after sparsifying; then the merge
pass. DELLA's per-row ranks need whole rows (``ChunkRule(whole_rows=True)``). Two kernels compute the same bits: the
reference kernel is one torch step per operation, in mergekit's order, on any
dtype and device; the fused kernel (``fused_cpu``) does linear, task
arithmetic, TIES and TIES-SV (without rescale) in float32 or bfloat16 on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import create_model

from langmerge.errors import LangmergeError
from langmerge.methods import fused_cpu
from langmerge.methods.base import (
    BasePolicy,
    Block,
    ChunkRule,
    Kernel,
    Method,
    MethodParameters,
    NonFiniteMerge,
    ParameterSpec,
    Pass,
    TensorInfo,
    TensorMerge,
    global_field,
    model_field,
)
from langmerge.methods.common import finite
from langmerge.methods.consensus import agreement_mask, disjoint_sum, elect_sign
from langmerge.methods.exact import ExactL1
from langmerge.methods.selection import Selection, keep_count, keep_mask, selection_passes
from langmerge.methods.sparsify import (
    dare_work_dtype,
    della_mask,
    draw_mask,
    outlier_counts,
    rescale_factor,
)

# magnitude: TIES's top-k trim; random: DARE's drop; magnitude_outliers: breadcrumbs (drop the largest gamma share
# and the smallest); della: DELLA's drop with a probability that falls with the magnitude's rank in its row
Sparsification = Literal["magnitude", "random", "magnitude_outliers", "della"]
RANDOM_SPARSIFIERS = ("random", "della")

MASK_CACHE_BYTES = 128 << 20  # DARE with rescale: masks up to this size are kept between the passes


class TensorParameters(MethodParameters):
    """Every number one tensor's merge needs in the task-vector family, resolved for that tensor.

    Python names on the left, the recipe's (mergekit's) names as aliases. An
    entry exposes to recipes the fields its composition uses
    (``TaskVectorMethod.fields``); the others keep these defaults.
    """

    weights: list[float] = model_field(alias="weight", help="w_i, the model's weight")
    normalize: bool = global_field(False, help="divide by the sum of weights")
    lam: float = global_field(1.0, alias="lambda", help="scale of the merged task vector")
    int8_mask: bool = global_field(False, help="accepted for mergekit recipes; no numeric effect")
    densities: list[float] = model_field(1.0, alias="density", ge=0.0, le=1.0, help="fraction of the task vector kept")
    rescale: bool = global_field(False, help="restore the L1 norm after dropping")
    gammas: list[float] = model_field(
        0.01, alias="gamma", ge=0.0, le=1.0, help="breadcrumbs: the share of largest magnitudes dropped as outliers"
    )
    epsilons: list[float] = model_field(
        0.15,
        alias="epsilon",
        ge=0.0,
        le=1.0,
        help="DELLA: keep probabilities span density +- epsilon over the magnitude ranks",
    )
    seed: int = global_field(0, help="seed of the random drop masks (DARE, DELLA)")
    slack: float = global_field(0.0, ge=0.0, help="s >= 0: protected models vote with weight 1 + s")
    # From the recipe's ``parameters.protect`` (model references), not a parameter of its own.
    protected: list[bool] = model_field(False, recipe=False, help="the model's kept entries are protected by the slack")


@dataclass(frozen=True, eq=False)
class TaskVectorMethod(Method[TensorParameters]):
    """A method of the family: sparsify each task vector, weight, optionally elect signs, sum, add to the base."""

    name: str
    summary: str
    label: str
    uses_base: bool = True  # task vectors x_i - base; without a base, the weighted sum of the models (linear)
    sparsification: Sparsification | None = None
    consensus: bool = False  # TIES sign election and disjoint merge
    slack: bool = False  # TIES-SV: protected models get (1 + slack) votes
    default_normalize: bool = False
    default_rescale: bool = False
    reference: str = ""

    # ------------------------------------------------------------------ what the method is

    @property
    def has_sign_vote(self) -> bool:
        return self.consensus

    @property
    def sparsifier(self) -> str | None:
        return self.sparsification

    @property
    def randomized(self) -> bool:
        return self.sparsification in RANDOM_SPARSIFIERS

    @property
    def adds_to_base(self) -> bool:
        return self.uses_base

    @property
    def base_policy(self) -> BasePolicy:
        # without a base (linear), a named base_model is one more input, as in mergekit
        return "required" if self.uses_base else "input"

    @property
    def takes_protect(self) -> bool:
        return self.slack

    @property
    def fields(self) -> tuple[str, ...]:
        """The parameter model's fields this entry's recipes may set."""
        names = ["weights", "normalize"]
        if self.uses_base:
            names += ["lam", "int8_mask"]
        if self.sparsification:
            names += ["densities", "rescale"]
        if self.sparsification == "magnitude_outliers":
            names.append("gammas")
        if self.sparsification == "della":
            names.append("epsilons")
        if self.randomized:
            names.append("seed")
        if self.slack:
            names.append("slack")
        return tuple(names)

    @property
    def parameter_model(self) -> type[TensorParameters]:
        return _parameter_model(self.name, self.default_normalize, self.default_rescale)

    @property
    def parameters(self) -> dict[str, ParameterSpec]:
        model = self.parameter_model
        specs = model.specs()
        return {model.recipe_name(f): specs[model.recipe_name(f)] for f in self.fields}

    def tensor_parameters(self, values: dict[str, Any], protected: list[bool] | None = None) -> TensorParameters:
        values = dict(values)
        if self.slack and protected is not None:
            values["protected"] = protected
        p = self.parameter_model.model_validate(values)
        if self.sparsification == "della":
            for i, (d, e) in enumerate(zip(p.densities, p.epsilons)):
                if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
                    raise LangmergeError(
                        f"parameters density {d} and epsilon {e} of model {i}: DELLA keeps entries "
                        "with probabilities from density - epsilon to density + epsilon, which "
                        "must lie inside (0, 1)"
                    )
        return p

    # ------------------------------------------------------------------ planning

    def kernels(self, params: TensorParameters, dtype: torch.dtype, device: torch.device) -> tuple[Kernel, ...]:
        if not fused_cpu.supports(dtype, device):
            return ("reference",)
        if not self.uses_base:  # linear: where the C kernel reproduces torch's addcmul_ on this machine
            fused = fused_cpu.addcmul_fuses() is not None
        else:
            fused = (
                self.sparsification in (None, "magnitude")
                and not (self.sparsification and params.rescale)
                and (self.consensus or not self.sparsification)
            )
        return ("fused", "reference") if fused else ("reference",)

    def plan(
        self,
        params: TensorParameters,
        tensor: TensorInfo,
        kernel: Kernel = "reference",
        generators: list[torch.Generator] | None = None,
    ) -> TensorMerge:
        if kernel not in self.kernels(params, tensor.dtype, tensor.device):
            raise ValueError(
                f"{self.name}: the {kernel} kernel cannot merge {tensor.name!r} "
                f"({tensor.dtype}, {tensor.device}); plan one of {self.kernels(params, tensor.dtype, tensor.device)}"
            )
        if not self.uses_base:
            return LinearMerge(params, kernel)
        if params.n_models == 0:
            return BaseCopy()
        merge = TaskVectorMerge(self, params, tensor, kernel, generators)
        if self.randomized and generators is None:
            # torch's global stream, shared by the models as mergekit draws it: model after model over the
            # whole tensor, so the tensor is one chunk
            device = tensor.device
            shared = (
                torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else torch.default_generator
            )
            merge.generators = [shared] * params.n_models
            merge.chunk_rule = ChunkRule(whole_tensor=True)
        elif self.sparsification == "della":
            # ranks within each row (a 1-D tensor is one row)
            merge.chunk_rule = ChunkRule(whole_rows=True) if len(tensor.shape) >= 2 else ChunkRule(whole_tensor=True)
        return merge


@functools.cache
def _parameter_model(name: str, normalize: bool, rescale: bool) -> type[TensorParameters]:
    """The entry's parameter model: ``TensorParameters`` with the entry's defaults."""
    fields = TensorParameters.model_fields
    return create_model(
        "".join(p.title() for p in name.split("_")) + "Parameters",
        __base__=TensorParameters,
        normalize=(bool, global_field(normalize, help=fields["normalize"].description or "")),
        rescale=(bool, global_field(rescale, help=fields["rescale"].description or "")),
    )


# ----------------------------------------------------------------------------- the steps (reference kernel)


def linear(inputs: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """``sum w_i x_i`` (over ``sum w_i`` with normalize), accumulated in float32 (float64 for float64)."""
    first = inputs[0]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(weights, dtype=acc, device=first.device)
    result = torch.zeros_like(first, dtype=acc)
    for x, coefficient in zip(inputs, w.unbind(0)):
        result.addcmul_(x, coefficient)
    if normalize:
        result.div_(w.sum())
    return result.to(first.dtype)


def weight_column(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    """Weights shaped ``(n, 1, ..., 1)`` to broadcast over a stack like ``like``."""
    return torch.tensor(weights, dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))


def vote_scale(p: TensorParameters) -> torch.Tensor | None:
    """TIES-SV's per-model vote multipliers, or None when the vote is plain TIES."""
    return slack_scale(p.slack, p.protected)


def slack_scale(slack: float, protected: list[bool]) -> torch.Tensor | None:
    """Votes scaled by ``1 + slack`` for the protected models (None: every vote counts once, plain TIES)."""
    if slack == 0 or not any(protected):
        return None
    return torch.tensor([1.0 + slack if prot else 1.0 for prot in protected], dtype=torch.float64)


def combine(weighted: torch.Tensor, w: torch.Tensor, p: TensorParameters, consensus: bool) -> torch.Tensor:
    """Sum a stack of weighted task vectors: disjointly after the sign vote, or plainly; normalize, scale by lambda."""
    if consensus:
        agree = agreement_mask(weighted, elect_sign(weighted, vote_scale(p)))
        mixed = disjoint_sum(weighted, w, agree, p.normalize)
    else:
        mixed = weighted.sum(dim=0)
        if p.normalize:
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
            mixed /= divisor
    if p.lam != 1:
        mixed *= p.lam
    return mixed


# ----------------------------------------------------------------------------- per-tensor merges


class LinearMerge(TensorMerge):
    def __init__(self, p: TensorParameters, kernel: Kernel):
        self.p, self.kernel = p, kernel
        self._out: torch.Tensor | None = None

    def merge(self, block: Block) -> torch.Tensor:
        if self.kernel == "reference":
            return finite(linear(block.inputs, self.p.weights, self.p.normalize))
        first = block.inputs[0]
        if self._out is None or self._out.numel() < first.numel():
            self._out = torch.empty(first.numel(), dtype=first.dtype)
        out = self._out[: first.numel()]
        w = torch.tensor(self.p.weights, dtype=torch.float32)  # as the reference holds them
        if fused_cpu.merge_linear(block.inputs, w.numpy(), float(w.sum()), self.p.normalize, out):
            raise NonFiniteMerge
        return out


class BaseCopy(TensorMerge):
    """No model besides the base: the base itself."""

    def merge(self, block: Block) -> torch.Tensor:
        return finite(block.required_base)


class _L1Pass(Pass):
    """The exact L1 norms of each sparsified model's task vector before and after sparsifying."""

    def __init__(self, merge: TaskVectorMerge):
        self.merge = merge
        self.models = [i for i in range(merge.m) if merge.sparsifies(i)]
        self.before = {i: ExactL1() for i in self.models}
        self.after = {i: ExactL1() for i in self.models}
        randomized = merge.method.randomized
        self.states = {i: merge.generator(i).get_state() for i in self.models if randomized}
        # DARE's masks are kept for the merge pass where they fit MASK_CACHE_BYTES (one byte an entry),
        # else the merge pass redraws them from the same stream: the same bits either way
        merge.masks = {} if randomized and merge.tensor.numel * len(self.models) <= MASK_CACHE_BYTES else None

    def update(self, block: Block) -> None:
        for i in self.models:
            original, masked = self.merge.masked(block, i)
            self.before[i].add(original)
            self.after[i].add(masked)

    def finish(self) -> None:
        m = self.merge
        for i in self.models:
            if i in self.states and m.masks is None:
                m.generator(i).set_state(self.states[i])  # the merge pass redraws the same masks
            m.factors[i] = rescale_factor(self.before[i], self.after[i], m.work_dtype, m.tensor.device)


class TaskVectorMerge(TensorMerge):
    """One tensor of a task-vector method with a base (see the module doc)."""

    def __init__(
        self,
        method: TaskVectorMethod,
        p: TensorParameters,
        tensor: TensorInfo,
        kernel: Kernel,
        generators: list[torch.Generator] | None,
    ):
        self.method, self.p, self.tensor, self.kernel = method, p, tensor, kernel
        self.m = p.n_models
        self.generators = generators
        numel = tensor.numel
        self.selections: dict[int, Selection] = {}  # the k largest magnitudes each model keeps
        self.outliers: dict[int, Selection] = {}  # breadcrumbs: the largest of those, dropped
        exact = tensor.dtype != torch.bfloat16
        if method.sparsification == "magnitude":
            for i, d in enumerate(p.densities):
                s = Selection(numel, keep_count(numel, d), exact)
                if s.trims:
                    self.selections[i] = s
        elif method.sparsification == "magnitude_outliers":
            for i, (d, gamma) in enumerate(zip(p.densities, p.gammas)):
                if d < 1:
                    kept, dropped = outlier_counts(numel, d, gamma)
                    self.selections[i] = Selection(numel, kept, exact)
                    self.outliers[i] = Selection(numel, dropped, exact)
        # DARE masks and multiplies in its work dtype; magnitude trimming in the compute dtype
        self.work_dtype = dare_work_dtype(tensor.dtype, tensor.device) if method.randomized else tensor.dtype
        self.factors: dict[int, torch.Tensor | None] = {}
        self.masks: dict[tuple[int, int], torch.Tensor] | None = None  # DARE's masks kept by the L1 pass
        # the weights as the reference holds them (a tensor of the compute dtype), for the fused kernels
        self.weights32 = torch.tensor(p.weights, dtype=tensor.dtype).float().numpy()
        self._out: torch.Tensor | None = None

    @property
    def vote_weights(self) -> list[float] | None:
        """The weights the sign vote multiplies the sparsified task vectors by (``analyze`` tallies with them)."""
        return self.p.weights

    def generator(self, i: int) -> torch.Generator:
        """Model ``i``'s random stream (a randomized sparsification is planned with one per model)."""
        assert self.generators is not None, "a randomized merge is planned with its generators"
        return self.generators[i]

    def sparsifies(self, i: int) -> bool:
        if self.method.sparsification in ("magnitude", "magnitude_outliers"):
            return i in self.selections
        return self.method.randomized and self.p.densities[i] < 1

    # ------------------------------------------------------------------ passes

    def statistics(self) -> Iterator[Pass]:
        yield from selection_passes(self.selections, fused=self.kernel == "fused")
        yield from selection_passes(self.outliers, fused=False)
        if self.p.rescale and any(self.sparsifies(i) for i in range(self.m)):
            yield _L1Pass(self)

    def cutoffs(self, block: Block) -> dict[int, int]:
        """Per trimmed model, the tie cutoff valid for ``block`` (call once per block per pass, in order)."""
        fused = self.kernel == "fused"
        return {i: s.cutoff(block, i, fused) for i, s in self.selections.items()}

    def _kept(self, block: Block, i: int, delta: torch.Tensor, cutoff: int | None) -> torch.Tensor:
        """Which entries a magnitude selection keeps (breadcrumbs: the top k less its outliers)."""
        s = self.selections[i]
        if cutoff is None:
            cutoff = s.cutoff(block, i, fused=self.kernel == "fused")
        keep = keep_mask(delta, s.key_threshold, cutoff, block.start)
        if i in self.outliers:
            o = self.outliers[i]
            keep &= ~keep_mask(delta, o.key_threshold, o.cutoff(block, i, fused=False), block.start)
        return keep

    def masked(self, block: Block, i: int, cutoff: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Model i's task vector on ``block`` in the work dtype, and its sparsified values before any rescale."""
        delta = block.inputs[i] - block.required_base
        if self.method.sparsification in ("magnitude", "magnitude_outliers"):
            return delta, delta * self._kept(block, i, delta, cutoff)
        density = self.p.densities[i]
        if self.method.sparsification == "della" and density <= 0:
            return delta.to(self.work_dtype), torch.zeros_like(delta, dtype=self.work_dtype)  # mergekit: zeros
        if self.masks is not None and (i, block.start) in self.masks:  # drawn by the L1 pass
            mask = self.masks.pop((i, block.start)).to(self.work_dtype)
        else:
            if self.method.sparsification == "della":
                rows = (
                    delta.reshape(-1, *self.tensor.shape[1:]) if len(self.tensor.shape) >= 2 else delta.reshape(1, -1)
                )
                mask = della_mask(rows, density, self.p.epsilons[i], self.generator(i)).reshape(-1)
            else:
                mask = draw_mask(delta, density, self.generator(i))
            if self.masks is not None:
                self.masks[(i, block.start)] = mask.bool()
        original = delta.to(mask.dtype)
        return original, original * mask

    def sparsified(self, block: Block) -> torch.Tensor:
        """The stack of sparsified (unweighted) task vectors of ``block``: ``(n_models, numel)``."""
        cutoffs = self.cutoffs(block)
        base = block.required_base
        deltas = base.new_empty((self.m, block.numel))
        for i, x in enumerate(block.inputs):
            if not self.sparsifies(i):
                deltas[i] = x - base
                continue
            _, masked = self.masked(block, i, cutoffs.get(i))
            factor = self.factors.get(i)
            if factor is not None:
                masked = masked * factor
            deltas[i] = masked.to(base.dtype)
        return deltas

    # ------------------------------------------------------------------ the merge pass

    def merge(self, block: Block) -> torch.Tensor:
        if self.kernel == "fused":
            return self._merge_fused(block)
        weighted = self.sparsified(block)
        w = weight_column(self.p.weights, weighted)
        weighted.mul_(w)
        mixed = combine(weighted, w, self.p, self.method.consensus)
        base = block.required_base
        return finite((base + mixed).to(base.dtype))

    def trim_arrays(self, block: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The fused kernels' view of the trim for ``block``: trimmed per model, key threshold, flat tie cutoff."""
        trim = np.zeros(self.m, dtype=np.uint8)
        thresholds = np.zeros(self.m, dtype=np.uint32)
        cutoffs = np.zeros(self.m, dtype=np.int64)
        for i, cut in self.cutoffs(block).items():
            s = self.selections[i]
            trim[i], thresholds[i], cutoffs[i] = 1, s.key_threshold, cut
        return trim, thresholds, cutoffs

    def _merge_fused(self, block: Block) -> torch.Tensor:
        base, xs = block.required_base, block.inputs
        if self._out is None or self._out.numel() < base.numel():
            self._out = torch.empty(base.numel(), dtype=base.dtype)
        out = self._out[: base.numel()]
        p = self.p
        if self.method.consensus:
            trim, thresholds, cutoffs = self.trim_arrays(block)
            scale = vote_scale(p)
            scales = np.asarray(scale.tolist() if scale is not None else [1.0] * self.m, dtype=np.float32)
            # TIES rounds the vote to the compute dtype (a torch sum); TIES-SV's scaled vote stays float32
            bad = fused_cpu.merge_ties(
                base,
                xs,
                block.start,
                trim,
                thresholds,
                cutoffs,
                self.weights32,
                scales,
                scale is None,
                p.normalize,
                p.lam,
                out,
            )
        else:
            bad = fused_cpu.merge_sum(base, xs, self.weights32, self._divisor(), p.normalize, p.lam, out)
        if bad:
            raise NonFiniteMerge
        return out

    def _divisor(self) -> float:
        """Task arithmetic's normalizing divisor, as the reference computes it (a sum in the compute dtype)."""
        divisor = torch.tensor(self.p.weights, dtype=self.tensor.dtype).sum(dim=0)
        return float(torch.where(divisor.abs() < 1e-8, 1, divisor))


# ----------------------------------------------------------------------------- the entries

ENTRIES: tuple[TaskVectorMethod, ...] = (
    TaskVectorMethod(
        "linear",
        "weighted average of the models: sum w_i x_i / sum w_i",
        "weighted averaging",
        uses_base=False,
        default_normalize=True,
        reference="https://arxiv.org/abs/2203.05482",
    ),
    TaskVectorMethod(
        "task_arithmetic",
        "base + lambda * sum w_i (x_i - base)",
        "task arithmetic",
        reference="https://arxiv.org/abs/2212.04089",
    ),
    TaskVectorMethod(
        "ties",
        "trim, elect sign by mass, disjoint merge (TIES-Merging)",
        "TIES",
        sparsification="magnitude",
        consensus=True,
        default_normalize=True,
        reference="https://arxiv.org/abs/2306.01708",
    ),
    TaskVectorMethod(
        "ties_sv",
        "TIES whose sign vote gives protected (SFT) models 1 + slack times the say",
        "TIES-SV",
        sparsification="magnitude",
        consensus=True,
        slack=True,
        default_normalize=True,
        reference="https://arxiv.org/abs/2407.03994",
    ),
    TaskVectorMethod(
        "dare_linear",
        "random drop with rescale, then task arithmetic (DARE)",
        "DARE (linear)",
        sparsification="random",
        default_rescale=True,
        reference="https://arxiv.org/abs/2311.03099",
    ),
    TaskVectorMethod(
        "dare_ties",
        "random drop with rescale, then TIES sign election (DARE-TIES)",
        "DARE-TIES",
        sparsification="random",
        consensus=True,
        default_rescale=True,
        reference="https://arxiv.org/abs/2311.03099",
    ),
    TaskVectorMethod(
        "breadcrumbs",
        "drop the largest gamma share and the smallest magnitudes, then task arithmetic (Model Breadcrumbs)",
        "breadcrumbs",
        sparsification="magnitude_outliers",
        reference="https://arxiv.org/abs/2312.06795",
    ),
    TaskVectorMethod(
        "breadcrumbs_ties",
        "breadcrumbs' outlier and small-magnitude drop, then TIES sign election",
        "breadcrumbs-TIES",
        sparsification="magnitude_outliers",
        consensus=True,
        reference="https://arxiv.org/abs/2312.06795",
    ),
    TaskVectorMethod(
        "della",
        "random drop that spares large magnitudes, rescale, TIES sign election (DELLA)",
        "DELLA",
        sparsification="della",
        consensus=True,
        default_normalize=True,
        default_rescale=True,
        reference="https://arxiv.org/abs/2406.11617",
    ),
    TaskVectorMethod(
        "della_linear",
        "DELLA's magnitude-ranked random drop with rescale, then task arithmetic",
        "DELLA (linear)",
        sparsification="della",
        default_rescale=True,
        reference="https://arxiv.org/abs/2406.11617",
    ),
)
