"""Merging candidates in memory: task vectors computed once, each candidate merged by the engine's kernels.

For models that fit in memory. The inputs are loaded in the recipe's compute
dtype and ``x_i - base`` is computed once per tensor, exactly as
``sparsified_task_vectors`` computes it; a candidate is then merged by
``langmerge.methods.merge_tensor`` over those task vectors with a zero base
and the base added back, which gives the bits ``langmerge merge`` writes for
the same recipe. The merged weights are loaded into one transformers model
(``load_state_dict``) that is reused across candidates, never written to disk.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from langmerge.engine import layer_index, layer_position, plan_merge
from langmerge.errors import LangmergeError
from langmerge.io.metadata import write_config
from langmerge.methods.fused_cpu import all_finite
from langmerge.methods.kernels import NonFiniteMerge, merge_tensor
from langmerge.recipe import Recipe
from langmerge.seeds import derive_seed, seeded_generator

log = logging.getLogger(__name__)


def _load(reader, name: str, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    t = reader.get(name)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise LangmergeError(f"model {reader.label}: tensor {name!r} contains NaN or Inf")
    return t.to(device=device, dtype=dtype or t.dtype)


class InMemoryMerger:
    """The recipe's inputs held in memory as task vectors; ``state_dict(candidate)`` merges a candidate recipe."""

    def __init__(self, recipe: Recipe, *, device: str = "cpu", allow_pickle: bool = False, progress: bool = True):
        self.recipe = recipe
        self.method = recipe.method
        from langmerge.devices import resolve_device

        self.device = resolve_device(device)
        plan = plan_merge(recipe, allow_pickle=allow_pickle, progress=progress)
        self.models = plan.models  # each model reference and what it resolved to (io/hub.py)
        try:
            aligned = [j.name for j in plan.jobs if plan.vocab is not None and plan.vocab.is_aligned(j.name)]
            if aligned:
                raise LangmergeError(
                    f"{recipe.source}: the models' vocabularies differ ({aligned[0]!r} needs row alignment); "
                    "tune supports models that share one vocabulary"
                )
            self.jobs = plan.jobs
            config = plan.reference.config() or {}
            indices = [i for i in (layer_index(j.name) for j in plan.jobs) if i is not None]
            # The same layer count plan_merge uses for gradients (num_hidden_layers, else the highest index + 1).
            self.num_layers = int(config.get("num_hidden_layers") or (max(indices) + 1 if indices else 1))
            self.fixed: dict[str, torch.Tensor] = {}
            self.bases: dict[str, torch.Tensor] = {}
            self.vectors: dict[str, list[torch.Tensor]] = {}
            for job in plan.jobs:
                if job.params is None:
                    self.fixed[job.name] = plan.reference.get(job.name)
                    continue
                base = _load(plan.base, job.name, plan.compute_dtype, self.device) if plan.base is not None else None
                dtype = plan.compute_dtype or (base.dtype if base is not None else None)
                inputs = [_load(r, job.name, dtype, self.device) for r in plan.inputs]
                if self.method.uses_base:
                    self.bases[job.name] = base
                    self.vectors[job.name] = [x - base for x in inputs]
                else:
                    self.vectors[job.name] = inputs
            float_dtypes = {j.out_dtype for j in plan.jobs if j.params is not None}
            self.model_dtype = next(iter(float_dtypes)) if len(float_dtypes) == 1 else torch.float32
            with tempfile.TemporaryDirectory(prefix="langmerge-tune-") as tmp:
                # The config and tokenizer `langmerge merge` would write, read back by transformers.
                write_config(Path(tmp), plan.reference.config(), self.model_dtype, plan.reference.label,
                             updates=plan.vocab.config_updates())
                plan.vocab.write_tokenizer(Path(tmp))
                from transformers import AutoConfig, AutoTokenizer

                self.config = AutoConfig.from_pretrained(tmp)
                self.tokenizer = AutoTokenizer.from_pretrained(tmp)
        finally:
            plan.close()
        self._model = None

    @property
    def nbytes(self) -> int:
        tensors = list(self.fixed.values()) + list(self.bases.values()) + [v for vs in self.vectors.values() for v in vs]
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self, candidate: Recipe) -> dict[str, torch.Tensor]:
        """The merged weights of ``candidate`` (same models as the recipe, other parameters)."""
        out = dict(self.fixed)
        with torch.no_grad():
            for job in self.jobs:
                if job.params is None:
                    continue
                p = candidate.tensor_parameters(job.name, layer_position(job.name, self.num_layers))
                generators = self._generators(candidate, job.name)
                vectors = self.vectors[job.name]
                try:
                    if self.method.uses_base:
                        base = self.bases[job.name]
                        zero = torch.zeros((), dtype=base.dtype, device=base.device).expand(base.shape)
                        merged = (base + merge_tensor(self.method, zero, vectors, p, generators)).to(base.dtype)
                    else:
                        merged = merge_tensor(self.method, None, vectors, p, generators)
                    merged = merged.to(dtype=job.out_dtype).cpu()
                    if not all_finite(merged):
                        raise NonFiniteMerge
                except NonFiniteMerge:
                    raise LangmergeError(
                        f"tensor {job.name!r}: the merge produced NaN or Inf (weights summing to zero with normalize?)"
                    ) from None
                out[job.name] = merged
        return out

    def _generators(self, candidate: Recipe, name: str) -> list[torch.Generator] | None:
        if not self.method.randomized:
            return None
        # seeded as the engine seeds a merge (plan_merge's job seed, then input_generators)
        seed = derive_seed(candidate.seed(name), name)
        return [seeded_generator(seed, i, device=self.device) for i in range(len(self.recipe.inputs))]

    def model(self, candidate: Recipe):
        """The transformers model holding ``candidate``'s merged weights (one model object, reloaded each call)."""
        state = self.state_dict(candidate)
        if self._model is None:
            from transformers import AutoModelForCausalLM

            self._model = AutoModelForCausalLM.from_config(self.config, dtype=self.model_dtype)
            self._model.eval()
        missing, unexpected = self._model.load_state_dict(state, strict=False)
        if unexpected:
            raise LangmergeError(f"the merged tensor {unexpected[0]!r} is not a weight of {type(self._model).__name__}")
        own = self._model.state_dict()
        loaded = {own[k].data_ptr() for k in state if k in own}
        untied = [k for k in missing if own[k].data_ptr() not in loaded]
        if untied:
            raise LangmergeError(f"the merge has no tensor for {untied[0]!r} of {type(self._model).__name__}")
        return self._model
