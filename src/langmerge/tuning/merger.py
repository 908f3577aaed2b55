"""Merging candidates in memory: the inputs read once, each candidate merged by the merge's own executor.

For models that fit in memory. The merge is planned once (``plan_merge``) and
every model's tensors are read once, in the recipe's compute dtype, into
memory (``MemorySource``); a candidate (the same models, other parameters) is
planned again from those (``MergePlan.replan``) and run through the executor
``langmerge merge`` runs (``merge.execute.Executor``) into tensors in memory
(``MemorySink``), which gives the bits ``langmerge merge`` writes for the same
recipe. The merged weights are loaded into one transformers model
(``load_state_dict``) that is reused across candidates, never written to disk.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from langmerge.devices import resolve_device
from langmerge.errors import LangmergeError
from langmerge.io.tensor_source import MemorySource
from langmerge.merge.execute import DEFAULT_MEMORY, Executor, MemorySink, load, write_model_files
from langmerge.merge.plan import plan_merge
from langmerge.merge.recipe import Recipe

if TYPE_CHECKING:  # transformers takes seconds to import: imported where a model is built
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


class InMemoryMerger:
    """The recipe's inputs held in memory; ``state_dict(candidate)`` merges a candidate recipe."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        device: str = "cpu",
        allow_pickle: bool = False,
        progress: bool = True,
        memory: int = DEFAULT_MEMORY,
    ):
        self.recipe = recipe
        self.method = recipe.method
        self.device = resolve_device(device)
        self.memory = memory
        plan = plan_merge(recipe, allow_pickle=allow_pickle, progress=progress, device=self.device)
        self.models = plan.models  # each model reference and what it resolved to (io/hub.py)
        try:
            aligned = [t.name for t in plan.tensors if t.aligned]
            if aligned:
                raise LangmergeError(
                    f"{recipe.source}: the models' vocabularies differ ({aligned[0]!r} needs row alignment); "
                    "tune supports models that share one vocabulary"
                )
            # Every model's tensors as the merge reads them (the compute dtype, on the device); copied
            # (integer) tensors only from the model they are copied from.
            held: list[dict[str, torch.Tensor]] = [{} for _ in plan.views]
            for tensor in plan.tensors:
                task = tensor.tasks[0]
                for k, ref in enumerate(task.refs):
                    held[k if not tensor.copied else 0][tensor.name] = load(ref, task.info.dtype, self.device, memory)
            self.views = [
                MemorySource(view.label, tensors, view.config(), view.folder) for view, tensors in zip(plan.views, held)
            ]
            self.plan = plan
            self.model_dtype = plan.model_dtype or torch.float32
            with tempfile.TemporaryDirectory(prefix="langmerge-tune-") as tmp:
                # The config and tokenizer `langmerge merge` would write, read back by transformers.
                write_model_files(Path(tmp), plan)
                from transformers import (
                    AutoConfig,
                    AutoTokenizer,
                )  # transformers takes seconds to import: not at `langmerge --help`

                self.config = AutoConfig.from_pretrained(tmp)
                self.tokenizer = AutoTokenizer.from_pretrained(tmp)
        finally:
            plan.close()  # the files: what is needed is in memory now
        self._model: PreTrainedModel | None = None  # built on the first candidate

    @property
    def nbytes(self) -> int:
        return sum(view.nbytes for view in self.views)

    def state_dict(self, candidate: Recipe) -> dict[str, torch.Tensor]:
        """The merged weights of ``candidate`` (same models as the recipe, other parameters)."""
        tensors = self.plan.replan(candidate, self.views)
        sink = MemorySink(tensors)
        Executor(self.device, self.memory).run(tensors, sink)
        return sink.tensors

    def model(self, candidate: Recipe) -> PreTrainedModel:
        """The transformers model holding ``candidate``'s merged weights (one model object, reloaded each call)."""
        state = self.state_dict(candidate)
        model = self._model
        if model is None:
            from transformers import (
                AutoModelForCausalLM,
            )  # transformers takes seconds to import: not at `langmerge --help`

            model = self._model = AutoModelForCausalLM.from_config(self.config, dtype=self.model_dtype)
            model.eval()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise LangmergeError(f"the merged tensor {unexpected[0]!r} is not a weight of {type(model).__name__}")
        own = model.state_dict()
        loaded = {own[k].data_ptr() for k in state if k in own}
        untied = [k for k in missing if own[k].data_ptr() not in loaded]
        if untied:
            raise LangmergeError(f"the merge has no tensor for {untied[0]!r} of {type(model).__name__}")
        return model
