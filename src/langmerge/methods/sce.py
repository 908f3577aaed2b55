"""SCE: select the entries whose task vectors vary most across models, weight by energy, TIES's sign consensus.

Per tensor (docs/methods.md, "sce"): with ``select_topk < 1``, keep the
``int(select_topk * count(var != 0))`` entries of largest variance over the
models (the same entries for every model); elect signs by mass as TIES does,
on the unweighted selected task vectors; weight each model by its mean
squared task vector over the sum of them; sum the agreeing entries over their
weights. The top-k and the mean squares are mergekit 0.1.5's torch
reductions over the whole tensor: one chunk.
"""

from __future__ import annotations

import torch

from langmerge.methods.base import (
    Block,
    Kernel,
    Method,
    MethodParameters,
    TensorInfo,
    TensorMerge,
    global_field,
    required_base,
)
from langmerge.methods.common import WholeTensorMerge
from langmerge.methods.consensus import agreement_mask, elect_sign


class SceParameters(MethodParameters):
    int8_mask: bool = global_field(False, help="hold the masks as int8 (no numeric effect)")
    select_topk: float = global_field(1.0, help="the share of entries of largest variance over the models kept")


def variance_mask(vectors: torch.Tensor, share: float, dtype: torch.dtype) -> torch.Tensor:
    """The entries of largest variance over the models (axis 0): ``int(share * count(var != 0))`` of them."""
    if share <= 0:
        return torch.zeros_like(vectors[0], dtype=dtype)
    if share >= 1:
        return torch.ones_like(vectors[0], dtype=dtype)
    var = torch.var(vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * share)
    mask = torch.zeros_like(var, dtype=dtype)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def energy_weights(vectors: torch.Tensor) -> torch.Tensor:
    """Each model's mean squared task vector over their sum (equal weights where the sum is below 1e-6)."""
    energy = vectors.square().reshape(vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


class SceMerge(TensorMerge):
    """The whole tensor at once; ``selected`` is also what ``analyze`` tallies."""

    def __init__(self, p: SceParameters, tensor: TensorInfo):
        self.p, self.tensor = p, tensor
        self.whole = WholeTensorMerge(tensor, self._merge)
        self.chunk_rule = self.whole.chunk_rule

    def selected(self, base: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The stack of task vectors after the variance selection, ``(n_models, *shape)``."""
        vectors = torch.stack([x - base for x in inputs], dim=0)
        if self.p.select_topk < 1:
            vectors = vectors * variance_mask(vectors, self.p.select_topk, self.mask_dtype(base)).unsqueeze(0)
        return vectors

    def mask_dtype(self, base: torch.Tensor) -> torch.dtype:
        return torch.int8 if self.p.int8_mask else base.dtype

    def _merge(self, whole_base: torch.Tensor | None, inputs: list[torch.Tensor]) -> torch.Tensor:
        base = required_base(whole_base)
        vectors = self.selected(base, inputs)
        agree = agreement_mask(vectors, elect_sign(vectors))
        weights = energy_weights(vectors)
        while weights.dim() < vectors.dim():
            weights = weights.unsqueeze(-1)
        erased = weights * agree
        return base + (vectors * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)

    def merge(self, block: Block) -> torch.Tensor:
        return self.whole.merge(block)

    # what ``analyze`` tallies: the selected task vectors and the vote's weights (SCE votes unweighted)
    def sparsified(self, block: Block) -> torch.Tensor:
        shape = self.tensor.shape
        selected = self.selected(block.required_base.reshape(shape), [x.reshape(shape) for x in block.inputs])
        return selected.reshape(len(block.inputs), -1)

    vote_weights = None  # SCE votes on the unweighted task vectors


class SceMethod(Method[SceParameters]):
    name = "sce"
    summary = "select entries of largest variance over the models, weight by energy, TIES sign consensus (SCE)"
    label = "SCE"
    reference = "https://arxiv.org/abs/2408.07990"
    parameter_model = SceParameters
    has_sign_vote = True
    sparsifier = "variance"

    def plan(
        self,
        params: SceParameters,
        tensor: TensorInfo,
        kernel: Kernel = "reference",
        generators: list[torch.Generator] | None = None,
    ) -> TensorMerge:
        return SceMerge(params, tensor)


SCE = SceMethod()
