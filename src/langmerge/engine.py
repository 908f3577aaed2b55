"""The streaming merge executor: plan every tensor, then merge and write one at a time.

Planning reads only headers and the recipe, so every input error (missing
tensor, shape mismatch, bad parameter) is raised before any output exists.
Execution holds the inputs of one tensor at a time; peak memory is a small
multiple of the largest tensor, whatever the model size.
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from langmerge.errors import LangmergeError
from langmerge.io.hub import ResolvedModel
from langmerge.io.metadata import write_config, write_model_card
from langmerge.io.output import atomic_output_dir, check_output_free, check_space
from langmerge.io.reader import CheckpointReader
from langmerge.io.sources import open_recipe_sources, recipe_input_paths, recipe_models
from langmerge.io.vocab import VocabPlan, merge_aligned_job, plan_vocabulary
from langmerge.io.writer import ShardedWriter, shard_sizes
from langmerge.methods.driver import thread_limit
from langmerge.methods.fused_cpu import all_finite
from langmerge.methods.kernels import NonFiniteMerge, TensorParameters, merge_tensor
from langmerge.recipe import Recipe, load_recipe
from langmerge.seeds import derive_seed, seeded_generator

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 10**9
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's ``t`` for gradients: layer i of n at i/(n-1) (1 when n == 1); tensors outside layers at 0."""
    index = layer_index(name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


@dataclass(frozen=True)
class TensorJob:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    params: TensorParameters | None  # None: an integer or bool tensor, the same in every model, copied
    seed: int = 0


@dataclass
class MergePlan:
    recipe: Recipe
    base: CheckpointReader | None
    inputs: list[CheckpointReader]
    jobs: list[TensorJob]
    compute_dtype: torch.dtype | None
    vocab: VocabPlan | None = None  # output vocabulary and tokenizer (io/vocab.py)
    models: dict[str, ResolvedModel] = field(default_factory=dict)  # each model reference and what it resolved to

    @property
    def reference(self) -> CheckpointReader:
        return self.base if self.base is not None else self.inputs[0]

    def close(self) -> None:
        for reader in [self.base, *self.inputs]:
            if reader is not None:
                reader.close()


@dataclass(frozen=True)
class MergeReport:
    out_dir: Path
    method: str
    tensors: int
    bytes_written: int
    seconds: float

    def summary(self) -> str:
        gb = self.bytes_written / 1e9
        return (
            f"merged {self.tensors} tensors ({gb:.2f} GB) with {self.method} in {self.seconds:.1f} s "
            f"({gb / max(self.seconds, 1e-9):.2f} GB/s) -> {self.out_dir}"
        )


def check_copied_tensor(name: str, reference, others) -> None:
    """An integer or bool tensor is never cast or merged: it is copied, and only when every model holds the same one."""
    dtype = reference.dtype(name)
    rule = "integer and bool tensors are not merged, only copied when every model has the same values"
    for reader in others:
        if reader.dtype(name) != dtype:
            raise LangmergeError(
                f"tensor {name!r}: {str(reader.dtype(name)).removeprefix('torch.')} in {reader.label} but "
                f"{str(dtype).removeprefix('torch.')} in {reference.label}; {rule}"
            )
    values = reference.get(name)
    for reader in others:
        if not torch.equal(reader.get(name), values):
            raise LangmergeError(
                f"tensor {name!r}: the {str(dtype).removeprefix('torch.')} tensor differs between {reader.label} and "
                f"{reference.label}; {rule}"
            )


def plan_merge(
    recipe: Recipe,
    *,
    allow_pickle: bool = False,
    models: dict[str, ResolvedModel] | None = None,
    progress: bool = True,
) -> MergePlan:
    """Open the inputs and resolve every tensor's job; raises LangmergeError on bad input.

    Model references are resolved first (io/hub.py: Hub ids are downloaded as needed, with a
    progress bar); ``models`` holds references resolved already.
    """
    models = recipe_models(recipe, allow_pickle=allow_pickle, progress=progress, resolved=models)
    with ExitStack() as stack:
        # Sources: checkpoints, LoRA adapters applied to the base, and vocabulary-aligned views (io/sources.py).
        base, inputs = open_recipe_sources(recipe, stack, allow_pickle=allow_pickle, models=models)
        vocab = plan_vocabulary(recipe, base, inputs)
        offset = 1 if base is not None else 0
        base = vocab.wrap(base, 0) if base is not None else None
        inputs = [vocab.wrap(reader, offset + i) for i, reader in enumerate(inputs)]
        reference = base if base is not None else inputs[0]
        others = inputs if base is not None else inputs[1:]

        names = reference.names
        known = set(names)
        for reader in others:
            missing = [n for n in names if n not in reader.entries]
            if missing:
                raise LangmergeError(
                    f"model {reader.label}: tensor {missing[0]!r} is missing"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
            extra = [n for n in reader.names if n not in known]
            if extra:
                raise LangmergeError(
                    f"model {reader.label}: tensor {extra[0]!r} is not in {reference.label}"
                    + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                )
            for n in names:
                if reader.shape(n) != reference.shape(n):
                    raise LangmergeError(
                        f"tensor {n!r}: shape {list(reader.shape(n))} in {reader.label} "
                        f"but {list(reference.shape(n))} in {reference.label}"
                    )

        config = reference.config() or {}
        indices = [i for i in (layer_index(n) for n in names) if i is not None]
        num_layers = int(config.get("num_hidden_layers") or (max(indices) + 1 if indices else 1))

        jobs = []
        for n in names:
            native = reference.dtype(n)
            if not all(r.dtype(n).is_floating_point for r in [reference, *others]):
                check_copied_tensor(n, reference, others)
                jobs.append(TensorJob(n, reference.shape(n), native, None))
                continue
            params = recipe.tensor_parameters(n, layer_position(n, num_layers))
            out_dtype = recipe.out_dtype or recipe.dtype or native
            jobs.append(TensorJob(n, reference.shape(n), out_dtype, params, derive_seed(recipe.seed(n), n)))
        stack.pop_all()
    return MergePlan(recipe, base, inputs, jobs, recipe.dtype, vocab, models)


def _load(reader: CheckpointReader, name: str, dtype: torch.dtype | None, device: torch.device, scratch: bool) -> torch.Tensor:
    t = reader.get(name, scratch=scratch)
    return t.to(device=device, dtype=dtype or t.dtype)


def load_inputs(
    plan: MergePlan, job: TensorJob, device: torch.device, scratch: bool = False
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The base (None for linear) and the input tensors of one job, in the compute dtype on ``device``.

    With ``scratch``, the tensors may live in the readers' reused buffers: valid until the next job's load.
    """
    base = _load(plan.base, job.name, plan.compute_dtype, device, scratch) if plan.base is not None else None
    dtype = plan.compute_dtype or (base.dtype if base is not None else None)
    return base, [_load(r, job.name, dtype, device, scratch) for r in plan.inputs]


def input_generators(plan: MergePlan, job: TensorJob, device: torch.device) -> list[torch.Generator] | None:
    """Seeded generators for DARE's drop masks (None for other methods), one per input model."""
    if not plan.recipe.method.randomized:
        return None
    return [seeded_generator(job.seed, i, device=device) for i in range(len(plan.inputs))]


def _raise_nonfinite(plan: MergePlan, job: TensorJob) -> None:
    """Name the input that holds NaN or Inf, or else blame the merge itself.

    Every kernel multiplies its masks, so a NaN or Inf in any input reaches
    the output (``NonFiniteMerge``); checking the output alone keeps the
    inputs' extra pass off the normal path.
    """
    for reader in [plan.base, *plan.inputs]:
        if reader is not None and not all_finite(reader.get(job.name)):
            raise LangmergeError(f"model {reader.label}: tensor {job.name!r} contains NaN or Inf")
    raise LangmergeError(f"tensor {job.name!r}: the merge produced NaN or Inf (weights summing to zero with normalize?)")


def merge_job(plan: MergePlan, job: TensorJob, device: torch.device) -> torch.Tensor:
    """Compute one output tensor (in its output dtype, on the CPU)."""
    if plan.vocab is not None and plan.vocab.is_aligned(job.name):
        return merge_aligned_job(plan, job, device)
    if job.params is None:
        return plan.reference.get(job.name)
    base, inputs = load_inputs(plan, job, device, scratch=True)
    try:
        merged = merge_tensor(plan.recipe.method, base, inputs, job.params, input_generators(plan, job, device))
    except NonFiniteMerge:
        _raise_nonfinite(plan, job)
    out = merged.to(dtype=job.out_dtype).cpu()
    if any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in [base, *inputs] if t is not None):
        out = out.clone()  # never hand out a reader's scratch buffer: the next job's load reuses it
    if out.dtype != merged.dtype and not all_finite(out):  # a narrower output dtype can overflow
        _raise_nonfinite(plan, job)
    return out


def merge(
    recipe,
    out_dir: str | Path,
    *,
    force: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    allow_pickle: bool = False,
) -> MergeReport:
    """Merge per ``recipe`` (path, YAML text, dict or Recipe) into the folder ``out_dir``.

    ``threads``: torch's and the fused kernels' thread count for the duration of the call (restored after).
    """
    from langmerge.devices import resolve_device

    recipe = load_recipe(recipe)
    check_output_free(out_dir, force, recipe_input_paths(recipe))
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise LangmergeError(f"threads {threads!r}: expected a whole number of at least 1")
    dev = resolve_device(device)
    with thread_limit(threads):
        return _merge(recipe, out_dir, force, dev, shard_bytes, progress, allow_pickle)


def _merge(recipe: Recipe, out_dir, force: bool, dev: torch.device, shard_bytes: int, progress: bool,
           allow_pickle: bool) -> MergeReport:
    start = time.perf_counter()
    plan = plan_merge(recipe, allow_pickle=allow_pickle, progress=progress)
    try:
        specs = [(j.name, j.shape, j.out_dtype) for j in plan.jobs]
        check_space(out_dir, shard_sizes(specs, shard_bytes))  # a full disk is found before the merge, not during it
        with atomic_output_dir(out_dir, force=force) as tmp:
            writer = ShardedWriter(tmp, specs, shard_bytes)
            written = 0
            bar = tqdm(total=len(plan.jobs), unit="tensor", desc=f"merge ({recipe.method.name})", disable=not progress)
            # One write in flight on a second thread: the disk writes tensor i while tensor i+1 is computed.
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="langmerge-writer")
            pending = None
            try:
                with torch.no_grad():
                    for job in plan.jobs:
                        out = merge_job(plan, job, dev)
                        if pending is not None:
                            pending.result()
                        pending = pool.submit(writer.write, job.name, out)
                        written += out.numel() * out.element_size()
                        bar.update(1)
                        bar.set_postfix_str(f"{written / 1e9 / max(time.perf_counter() - start, 1e-9):.2f} GB/s")
                if pending is not None:
                    pending.result()
                writer.finish()
            except BaseException:
                if pending is not None:
                    pending.cancel() or pending.exception()  # let an in-flight write end before closing the file
                writer.abort()
                raise
            finally:
                pool.shutdown(wait=True)
                bar.close()
            float_dtypes = {j.out_dtype for j in plan.jobs if j.params is not None}
            write_config(
                tmp,
                plan.reference.config(),
                next(iter(float_dtypes)) if len(float_dtypes) == 1 else None,
                plan.reference.label,
                updates=plan.vocab.config_updates(),
            )
            plan.vocab.write_tokenizer(tmp)
            write_model_card(
                tmp,
                method=recipe.method.name,
                summary=recipe.method.summary,
                base=recipe.base_model,
                inputs=[e.model for e in recipe.inputs],
                recipe=recipe.to_dict({ref: m.pinned for ref, m in plan.models.items()}),
                models=plan.models,
            )
    finally:
        plan.close()
    report = MergeReport(Path(out_dir), recipe.method.name, len(plan.jobs), writer.total_bytes, time.perf_counter() - start)
    log.info(report.summary())
    return report
