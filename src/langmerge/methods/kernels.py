"""One tensor merged in memory: the entry point of the engine, the in-memory tuner and the vocabulary alignment.

``merge_tensor`` plans the tensor's merge as a merge plans it (the fused
kernel where it applies, else the reference kernel: ``driver.choose_kernel``)
and runs it over chunks (``driver.merge_in_memory``), so every caller gets the
bits ``langmerge merge`` writes. The numerics are in ``task_vectors`` (and
docs/methods.md).
"""

from __future__ import annotations

import torch

from langmerge.methods.base import Method, MethodParameters, NonFiniteMerge, TensorInfo
from langmerge.methods.driver import choose_kernel, merge_in_memory
from langmerge.methods.task_vectors import TensorParameters, linear, vote_scale, weight_column

__all__ = ["NonFiniteMerge", "TensorParameters", "linear", "merge_tensor", "vote_scale", "weight_column"]


def merge_tensor(
    method: Method,
    base: torch.Tensor | None,
    inputs: list[torch.Tensor],
    p: MethodParameters,
    generators: list[torch.Generator] | None = None,
    fused: bool = True,
    *,
    name: str = "<tensor>",
    layer: int | None = None,
    num_layers: int | None = None,
) -> torch.Tensor:
    """Merge one tensor. ``inputs`` exclude the base; all share one compute dtype.

    ``fused=False`` plans the reference kernel; otherwise the fused CPU kernel
    is planned where it applies. ``name``, ``layer`` and ``num_layers`` tell
    the method which tensor it merges (layer_swap needs them). Raises
    ``NonFiniteMerge`` when the result holds NaN or Inf: every step
    multiplies its masks, so a NaN or Inf in any input always reaches it.
    """
    first = base if base is not None else inputs[0]
    info = TensorInfo(name, tuple(first.shape), first.dtype, first.device, layer, num_layers)
    kernel = choose_kernel(method, p, info, fused=fused)
    return merge_in_memory(
        method, p, base, inputs, kernel=kernel, generators=generators, name=name, layer=layer, num_layers=num_layers
    )
