"""Layer swapping: the task expert with its outer transformer layers taken from the language expert.

Bandarkar et al., *Layer Swapping for Zero-Shot Cross-Lingual Transfer in
Large Language Models* (ICLR 2025): two experts fine-tuned from one base, a
language expert (here the CT model) and a task expert (the SFT model); the
merged model is the task expert whose bottom ``k_bottom`` and top ``k_top``
layers are the language expert's, with an optional transition zone of
``transition`` layers on the inner side of each swapped block where the two
are averaged with linearly changing weights. docs/methods.md, "layer_swap",
states exactly what is followed and what langmerge chose.

Per tensor, the language expert's share ``a`` in [0, 1] follows from the
tensor's layer (``TensorInfo.layer`` of ``TensorInfo.num_layers``) or, outside
the layers, from its role (embeddings, output layer and final norm); the merge
is ``a x_language + (1 - a) x_task``, elementwise (any chunk layout), and a
tensor with ``a`` = 0 or 1 is the expert's tensor bit for bit.
"""

from __future__ import annotations

import re
from fractions import Fraction

import torch
from pydantic import model_validator

from langmerge.errors import LangmergeError
from langmerge.methods.base import Kernel, Method, MethodParameters, TensorInfo, TensorMerge, global_field, model_field
from langmerge.methods.common import ElementwiseMerge
from langmerge.methods.task_vectors import linear

# Outside the layers: input embeddings, and the output layer with the norm before it (names across architectures)
_EMBEDDING = re.compile(
    r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|embed_in|tok_embeddings|embed_positions|"
    r"position_embeddings|token_type_embeddings)(?:\.|$)"
)
_OUTPUT = re.compile(r"(?:^|\.)(?:lm_head|embed_out|output|norm|final_layernorm|final_layer_norm|ln_f|norm_f)(?:\.|$)")


class LayerSwapParameters(MethodParameters):
    # From the recipe's ``parameters.language_expert`` (a model reference), not a parameter of its own.
    language: list[bool] = model_field(
        False,
        alias="language_expert",
        recipe=False,
        help="the model is the language expert (the other is the task expert)",
    )
    k_bottom: int = global_field(ge=0, help="bottom transformer layers taken from the language expert")
    k_top: int = global_field(ge=0, help="top transformer layers taken from the language expert")
    transition: int = global_field(0, ge=0, help="layers on the inner side of each swapped block blended linearly")
    embeddings: bool = global_field(True, help="take the input embeddings from the language expert")
    output_layer: bool = global_field(True, help="take the output layer and the final norm from the language expert")

    @model_validator(mode="after")
    def _one_language_expert(self) -> LayerSwapParameters:
        if len(self.language) == 2 and sum(self.language) != 1:
            raise ValueError(
                "parameters.language_expert must name exactly one of the two models "
                "(the language expert, e.g. the CT model; the other is the task expert)"
            )
        return self


def tensor_role(name: str, layer: int | None) -> str:
    """``layer``, ``embeddings``, ``output`` (output layer, final norm) or ``other``."""
    if layer is not None:
        return "layer"
    if _EMBEDDING.search(name):
        return "embeddings"
    if _OUTPUT.search(name):
        return "output"
    return "other"


def language_share(p: LayerSwapParameters, tensor: TensorInfo) -> Fraction:
    """The language expert's share of the tensor, exactly (a fraction of the transition width + 1)."""
    role = tensor_role(tensor.name, tensor.layer)
    if role == "embeddings":
        return Fraction(int(p.embeddings))
    if role == "output":
        return Fraction(int(p.output_layer))
    if role == "other":
        return Fraction(0)
    n, i, w = tensor.num_layers, tensor.layer, p.transition
    assert n is not None and i is not None  # a layer's tensor, with the layer count check() requires
    shares = [Fraction(0)]
    if p.k_bottom:
        # layers 0 .. k_bottom - 1 swapped; k_bottom .. k_bottom + w - 1 blended w/(w+1), ..., 1/(w+1)
        shares.append(Fraction(1) if i < p.k_bottom else Fraction(max(0, w + 1 - (i - p.k_bottom + 1)), w + 1))
    if p.k_top:
        first = n - p.k_top  # layers first .. n - 1 swapped; first - 1 down to first - w blended
        shares.append(Fraction(1) if i >= first else Fraction(max(0, w + 1 - (first - i)), w + 1))
    return max(shares)


class LayerSwapMethod(Method[LayerSwapParameters]):
    name = "layer_swap"
    summary = "the task expert with its bottom and top layers from the language expert, blended in transition zones"
    label = "layer swapping"
    reference = "https://arxiv.org/abs/2410.01335"
    base_policy = "unused"
    parameter_model = LayerSwapParameters
    min_models = max_models = 2
    reference_parameters = {"language_expert": "ct"}

    def check(self, params: LayerSwapParameters, tensor: TensorInfo) -> None:
        if tensor.layer is None:
            return
        n = tensor.num_layers
        if n is None:
            raise LangmergeError(f"tensor {tensor.name!r}: layer_swap needs the model's layer count")
        if params.k_bottom + params.k_top > n:
            raise LangmergeError(
                f"tensor {tensor.name!r}: parameters k_bottom ({params.k_bottom}) + k_top ({params.k_top}) "
                f"exceed the model's {n} layers"
            )
        if tensor.layer >= n:
            raise LangmergeError(f"tensor {tensor.name!r}: layer {tensor.layer} of a model of {n} layers")

    def plan(
        self,
        params: LayerSwapParameters,
        tensor: TensorInfo,
        kernel: Kernel = "reference",
        generators: list[torch.Generator] | None = None,
    ) -> TensorMerge:
        self.check(params, tensor)
        share = language_share(params, tensor)
        lang = params.language.index(True)
        task = 1 - lang
        if share in (0, 1):
            pick = lang if share == 1 else task
            return ElementwiseMerge(lambda base, inputs: inputs[pick])
        weights = [0.0, 0.0]
        weights[lang], weights[task] = float(share), float(1 - share)
        return ElementwiseMerge(lambda base, inputs: linear(inputs, weights, normalize=False))

    def describe(self, tensors: list[tuple[TensorInfo, LayerSwapParameters]]) -> list[str]:
        """Which layers (and embeddings, output layer) come from which expert, as ``langmerge check`` prints it."""
        by_part: dict[str, set[Fraction]] = {}
        for info, p in tensors:
            if p.n_models != 2:
                continue
            role = tensor_role(info.name, info.layer)
            part = f"layer {info.layer}" if role == "layer" else role
            by_part.setdefault(part, set()).add(language_share(p, info))
        if not by_part:
            return []

        def source(shares: set[Fraction]) -> str:
            if len(shares) > 1:
                return "mixed (per-tensor parameters)"
            (a,) = shares
            names = {Fraction(0): "task expert", Fraction(1): "language expert"}
            return names.get(a, f"blend: {float(a):.3g} language expert")

        layers = sorted((int(k.split()[1]), source(v)) for k, v in by_part.items() if k.startswith("layer "))
        runs: list[tuple[int, int, str]] = []
        for i, what in layers:
            if runs and runs[-1][2] == what and runs[-1][1] == i - 1:
                runs[-1] = (runs[-1][0], i, what)
            else:
                runs.append((i, i, what))
        parts = [f"layers {a}-{b}: {w}" if a != b else f"layer {a}: {w}" for a, b, w in runs]
        parts += [f"{k}: {source(v)}" for k, v in by_part.items() if not k.startswith("layer ")]
        return ["layer_swap takes " + "; ".join(parts)]


LAYER_SWAP = LayerSwapMethod()
