"""Passthrough: one model's tensors, optionally scaled (docs/methods.md, "passthrough").

mergekit uses it to stack layer ranges (``slices``), which langmerge does not support; with ``models`` it
copies the one model. A base_model not listed is one more input, as in mergekit, and so refused.
"""

from __future__ import annotations

import torch

from langmerge.methods.base import Kernel, Method, MethodParameters, TensorInfo, TensorMerge, model_field
from langmerge.methods.common import ElementwiseMerge


class PassthroughParameters(MethodParameters):
    # mergekit's default is "no scale" (None); multiplying by 1 gives the same bits, so 1 stands for it
    scales: list[float] = model_field(1.0, alias="scale", help="multiply the model's tensors by this")


class PassthroughMethod(Method[PassthroughParameters]):
    name = "passthrough"
    summary = "the one model's tensors, optionally scaled"
    label = "passthrough"
    base_policy = "input"
    parameter_model = PassthroughParameters
    min_models = max_models = 1

    def plan(
        self,
        params: PassthroughParameters,
        tensor: TensorInfo,
        kernel: Kernel = "reference",
        generators: list[torch.Generator] | None = None,
    ) -> TensorMerge:
        scale = params.scales[0] if params.scales else 1.0  # no per-model list: the default
        return ElementwiseMerge(lambda base, inputs: inputs[0] if scale == 1 else inputs[0] * scale)


PASSTHROUGH = PassthroughMethod()
