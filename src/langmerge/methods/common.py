"""What the methods outside the task-vector family share: the finite check and two shapes of merge.

``ElementwiseMerge`` runs a function of the chunk's entries (any chunk layout
gives the same bits); ``WholeTensorMerge`` runs a function of the whole tensor,
for methods whose mergekit numerics reduce over it with torch (norms, dots,
sorts, a top-k): one chunk, the tensor itself, so the reduction is torch's own
and the bits are mergekit's (docs/methods.md, "How the methods run over chunks").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from langmerge.methods import fused_cpu
from langmerge.methods.base import Block, ChunkRule, NonFiniteMerge, TensorInfo, TensorMerge

Merge = Callable[[torch.Tensor | None, list[torch.Tensor]], torch.Tensor]  # (base or None, inputs) -> merged


def finite(t: torch.Tensor) -> torch.Tensor:
    """``t``, or ``NonFiniteMerge`` where it holds NaN or Inf."""
    if not fused_cpu.all_finite(t):
        raise NonFiniteMerge
    return t


def widened(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a result that mergekit computes against float32 tensors (a float32 mask or coefficient)."""
    return torch.promote_types(dtype, torch.float32)


class ElementwiseMerge(TensorMerge):
    """``fn`` of the chunk's flat base and inputs, entry by entry."""

    def __init__(self, fn: Merge, result_dtype: torch.dtype | None = None):
        self.fn, self.result_dtype = fn, result_dtype

    def merge(self, block: Block) -> torch.Tensor:
        return finite(self.fn(block.base, block.inputs))


class WholeTensorMerge(TensorMerge):
    """``fn`` of the whole tensors in their own shape: one chunk."""

    chunk_rule = ChunkRule(whole_tensor=True)

    def __init__(self, tensor: TensorInfo, fn: Merge, result_dtype: torch.dtype | None = None):
        self.tensor, self.fn, self.result_dtype = tensor, fn, result_dtype

    def merge(self, block: Block) -> torch.Tensor:
        shape = self.tensor.shape
        base = None if block.base is None else block.base.reshape(shape)
        return finite(self.fn(base, [x.reshape(shape) for x in block.inputs]).reshape(-1))
