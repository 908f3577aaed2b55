"""Planning a merge: every tensor's inputs, parameters, kernel and place in the output, before any is read.

``plan_merge`` reads only headers, configs, tokenizers and the recipe (and
compares integer tensors, which are copied only when every model holds the
same values), and resolves, per output tensor:

- its inputs: a ``TensorRef`` (source and name) per model; a tied model's
  input embedding stands for the output layer the others have, and the rows of
  a vocabulary tensor are merged in groups by which models have each token,
  each group read through ``GatheredRows`` (``merge.vocab``);
- its parameters (scalar, gradient and conditional values resolved at the
  tensor's layer), its compute and output dtypes, the kernel
  (``methods.driver.choose_kernel``), the DARE seed;
- its place in the output: shard file and byte offset (``io.writer.shard_layout``).

Every problem found is collected, not just the first (missing or extra tensors,
shape mismatches, vocabularies the recipe does not reconcile, integer tensors
that differ, parameter values out of range): ``check`` reports them all, and
``merge`` refuses with the first (saying how many more there are) before any
output exists. The chunk layout is the executor's (``merge.execute``): it
follows the memory budget and each method's ``ChunkRule``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from langmerge.errors import LangmergeError
from langmerge.io.hub import ResolvedModel
from langmerge.io.lora import AdapterMismatch
from langmerge.io.sources import open_recipe_sources, recipe_models
from langmerge.io.tensor_source import GatheredRows, TensorSource
from langmerge.io.writer import Placement, shard_layout, shard_sizes
from langmerge.merge.recipe import Recipe, layer_index, layer_position
from langmerge.merge.vocab import (
    MeanRows,
    RowGroup,
    RowMean,
    VocabPlan,
    describe_model,
    plan_vocabulary,
    row_groups,
    sourced_groups,
)
from langmerge.methods.base import Block, Kernel, Method, MethodParameters, TensorInfo, TensorMerge
from langmerge.methods.driver import choose_kernel
from langmerge.seeds import derive_seed, seeded_generator

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 10**9
COMPARE_BYTES = 8 << 20  # integer tensors are compared in pieces of this size
_COPY_RULE = "integer and bool tensors are not merged, only copied when every model has the same values"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- what a plan holds


@dataclass(frozen=True)
class TensorRef:
    """Where one model's values of a (planned) tensor are read: a source and the name it has there."""

    source: TensorSource
    name: str

    @property
    def label(self) -> str:
        return self.source.label


class CopyFirst(TensorMerge):
    """An integer or bool tensor that every model holds the same: the first input, as it is."""

    def merge(self, block: Block) -> torch.Tensor:
        return block.inputs[0]


@dataclass
class TensorTask:
    """One merge over chunks: a whole output tensor, or one row group of a vocabulary tensor.

    ``info`` describes the tensor the method sees (the group's rows, for a
    row group), in the compute dtype on the merge's device. ``rows`` maps the
    task's rows to the output tensor's rows (None: the same rows, in order).
    """

    name: str
    info: TensorInfo
    base: TensorRef | None
    inputs: list[TensorRef]
    method: Method | None  # None: a copy (integer tensors), or RowMean when ``average`` is set
    params: MethodParameters | None
    kernel: Kernel = "reference"
    seed: int = 0
    seed_keys: tuple[str, ...] = ()  # a row group's presence pattern: DARE's generators are seeded with it
    models: tuple[int, ...] = ()  # the recipe input index of each of ``inputs`` (DARE's generators)
    rows: torch.Tensor | None = None
    average: list[float] | None = None  # rows the base lacks: RowMean's weights ([]: rows no model has, zero)

    @property
    def refs(self) -> list[TensorRef]:
        """Every input in the order of a ``Block``: the base (when there is one), then the inputs."""
        return ([self.base] if self.base is not None else []) + self.inputs

    def open(self) -> TensorMerge:
        """The task's merge, with fresh generators (DARE): planning's last step, run just before the task."""
        if self.average is not None:
            return RowMean(self.average)
        if self.method is None:
            return CopyFirst()
        assert self.params is not None  # a task with a method has its parameters
        generators = None
        if self.method.randomized:
            generators = [seeded_generator(self.seed, *self.seed_keys, i, device=self.info.device) for i in self.models]
        return self.method.plan(self.params, self.info, self.kernel, generators)


@dataclass
class TensorPlan:
    """One output tensor: its tasks (one, or one per row group), dtypes and place in the output."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    tasks: list[TensorTask]
    copied: bool = False  # an integer or bool tensor, copied
    aligned: bool = False  # a vocabulary tensor merged by row groups
    placement: Placement | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.out_dtype).element_size()


@dataclass
class _Static:
    """What planning knows of one output tensor before parameters: shape, dtypes, whether copied or aligned."""

    name: str
    shape: tuple[int, ...]
    native: torch.dtype
    copied: bool
    aligned: bool


@dataclass
class MergePlan:
    """A planned merge. ``problems`` (the merge would fail) and ``unreadable`` (an input cannot be read) are empty
    for a plan that ``plan_merge`` returns; ``survey_merge`` returns them filled."""

    recipe: Recipe
    base: TensorSource | None
    inputs: list[TensorSource]
    tensors: list[TensorPlan]
    device: torch.device
    num_layers: int = 1
    vocab: VocabPlan | None = None
    vocab_problem: LangmergeError | None = None  # why there is no vocabulary plan (the models' vocabularies differ)
    models: dict[str, ResolvedModel] = field(default_factory=dict)  # each model reference and what it resolved to
    problems: list[LangmergeError] = field(default_factory=list)
    unreadable: list[LangmergeError] = field(default_factory=list)
    views: list[TensorSource] = field(default_factory=list)  # per model (base first): tensors under output names
    statics: list[_Static] = field(default_factory=list)
    # config.json changes besides the vocabulary's (slices' layers)
    config_updates: dict[str, Any] = field(default_factory=dict)

    @property
    def sources(self) -> list[TensorSource]:
        return ([self.base] if self.base is not None else []) + self.inputs

    @property
    def reference(self) -> TensorSource:
        return self.base if self.base is not None else self.inputs[0]

    @property
    def specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(t.name, t.shape, t.out_dtype) for t in self.tensors]

    def place(self, shard_bytes: int) -> dict[str, int]:
        """Fix every tensor's shard and byte offset; returns each shard's size less its header (for check_space)."""
        layout = shard_layout(self.specs, shard_bytes)
        for t in self.tensors:
            t.placement = layout[t.name]
        return shard_sizes(self.specs, shard_bytes)

    def merged(self) -> list[TensorPlan]:
        """The tensors a method merges (not copied)."""
        return [t for t in self.tensors if not t.copied]

    @property
    def model_dtype(self) -> torch.dtype | None:
        """The merged model's dtype (config.json's): the one output dtype of its merged tensors, None where they
        differ."""
        dtypes = {t.out_dtype for t in self.merged()}
        return next(iter(dtypes)) if len(dtypes) == 1 else None

    def replan(self, recipe: Recipe, views: Sequence[TensorSource] | None = None) -> list[TensorPlan]:
        """The tensors planned again with another recipe's parameters (the same models: the tuner's candidates),
        optionally reading from other views of the models (held in memory). Raises the first problem."""
        problems = _Problems()
        tensors = [_plan_tensor(s, recipe, views or self.views, self, problems) for s in self.statics]
        problems.raise_first()
        return tensors

    def close(self) -> None:
        for source in self.sources:
            source.close()


# ----------------------------------------------------------------------------- problems


class _Problems:
    """Problems in the order found; the same problem for many tensors is one entry with a count."""

    def __init__(self) -> None:
        self._first: dict[str, LangmergeError] = {}
        self._count: dict[str, int] = {}
        self._named: dict[str, bool] = {}

    def add(self, exc: LangmergeError, tensor: str | None = None) -> None:
        text = str(exc)
        named = tensor is not None and tensor in text
        key = text.replace(tensor, "\0") if tensor is not None and named else text
        if key not in self._first:
            self._first[key], self._count[key], self._named[key] = exc, 0, named
        self._count[key] += 1

    def __bool__(self) -> bool:
        return bool(self._first)

    def errors(self) -> list[LangmergeError]:
        out = []
        for key, exc in self._first.items():
            more = self._count[key] - 1
            out.append(type(exc)(f"{exc} (and {more} more tensors)") if more and self._named[key] else exc)
        return out

    def raise_first(self) -> None:
        errors = self.errors()
        if errors:
            first = errors[0]
            if len(errors) > 1:
                raise type(first)(f"{first} (and {len(errors) - 1} more problems: langmerge check lists them all)")
            raise first


# ----------------------------------------------------------------------------- planning


def plan_merge(
    recipe: Recipe,
    *,
    allow_pickle: bool = False,
    models: dict[str, ResolvedModel] | None = None,
    progress: bool = True,
    device: torch.device = torch.device("cpu"),
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> MergePlan:
    """Open the inputs and plan every tensor; raises the first problem (a LangmergeError) on bad input.

    Model references are resolved first (io/hub.py: Hub ids are downloaded as
    needed, huggingface_hub's bars shown with ``progress``); ``models`` holds
    references resolved already. The caller closes the plan.
    """
    plan = _build(
        recipe,
        allow_pickle=allow_pickle,
        models=models,
        progress=progress,
        device=device,
        shard_bytes=shard_bytes,
        collect=False,
    )
    return plan


def survey_merge(
    recipe: Recipe, *, allow_pickle: bool = False, models: dict[str, ResolvedModel] | None = None, progress: bool = True
) -> MergePlan:
    """``plan_merge`` that collects every problem instead of raising (``langmerge check``).

    An input that cannot be opened is in ``unreadable`` (an adapter for
    another base in ``problems``), and the plan then holds the sources that
    opened and no tensors. The caller closes the plan.
    """
    return _build(
        recipe,
        allow_pickle=allow_pickle,
        models=models,
        progress=progress,
        device=torch.device("cpu"),
        shard_bytes=DEFAULT_SHARD_BYTES,
        collect=True,
    )


def _build(
    recipe: Recipe,
    *,
    allow_pickle: bool,
    models: Mapping[str, ResolvedModel] | None,
    progress: bool,
    device: torch.device,
    shard_bytes: int,
    collect: bool,
) -> MergePlan:
    resolved = recipe_models(recipe, allow_pickle=allow_pickle, progress=progress, resolved=models)
    if recipe.slices is not None:  # each slice planned as a whole-model merge of its layers, then stacked
        from langmerge.merge.slices import build_sliced  # here: slices imports this module

        sliced = build_sliced(
            recipe,
            _build,
            allow_pickle=allow_pickle,
            models=resolved,
            progress=progress,
            device=device,
            shard_bytes=shard_bytes,
            collect=True,
        )
        if not collect and (sliced.problems or sliced.unreadable):
            sliced.close()
            problems = _Problems()
            for exc in sliced.unreadable + sliced.problems:
                problems.add(exc)
            problems.raise_first()
        return sliced
    problems = _Problems()
    unreadable: list[LangmergeError] = []
    with ExitStack() as stack:

        def failed(ref: str, exc: LangmergeError) -> None:  # with collect: report, and plan what opened
            (problems.add(exc) if isinstance(exc, AdapterMismatch) else unreadable.append(exc))

        base, inputs = open_recipe_sources(
            recipe, stack, allow_pickle=allow_pickle, models=resolved, on_error=failed if collect else None
        )
        base = recipe.view_source(None, base) if base is not None else None
        inputs = [recipe.view_source(i, s) if s is not None else None for i, s in enumerate(inputs)]
        plan = MergePlan(recipe, base, [s for s in inputs if s is not None], [], device, models=resolved)
        if unreadable or (base is None and recipe.has_base) or any(s is None for s in inputs):
            plan.problems, plan.unreadable = problems.errors(), unreadable
            stack.pop_all()
            return plan
        sources = plan.sources
        try:
            plan.vocab = plan_vocabulary(recipe, base, plan.inputs)  # every input opened (checked above)
        except LangmergeError as exc:
            plan.vocab_problem = exc
            problems.add(exc)
        views = [plan.vocab.view(k, s) if plan.vocab is not None else s for k, s in enumerate(sources)]
        plan.views = views
        config = plan.reference.config() or {}
        names = views[0].names
        indices = [i for i in (layer_index(n) for n in names) if i is not None]
        plan.num_layers = int(config.get("num_hidden_layers") or (max(indices) + 1 if indices else 1))
        vocab_names = _vocab_names(plan, sources)
        bad = _compare_models(views, vocab_names, plan.vocab, problems)
        for name in names:
            if name in bad:
                continue
            static = _static(name, views, recipe, plan.vocab, problems)
            if static is not None:
                plan.statics.append(static)
        plan.tensors = [_plan_tensor(s, recipe, views, plan, problems) for s in plan.statics]
        if not problems:
            plan.place(shard_bytes)
        plan.problems, plan.unreadable = problems.errors(), unreadable
        if not collect and plan.problems:
            problems.raise_first()
        stack.pop_all()
    return plan


def _vocab_names(plan: MergePlan, sources: list[TensorSource]) -> set[str]:
    """The vocabulary tensors of any model (their rows may legitimately differ in number)."""
    if plan.vocab is not None:
        return {n for m in plan.vocab.models for n in m.vocab_names}

    names: set[str] = set()
    for s in sources:
        try:
            names |= set(describe_model(s).vocab_names)
        except LangmergeError:
            pass  # reported by the vocabulary step already
    return names


def _listed_more(items: list[str]) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _compare_models(
    views: list[TensorSource], vocab_names: set[str], vocab: VocabPlan | None, problems: _Problems
) -> set[str]:
    """Missing and extra tensors, and shapes that differ, model by model; returns the names not to plan."""
    reference, others = views[0], views[1:]
    names = reference.names
    bad: set[str] = set()
    aligned = vocab.aligned_names if vocab is not None else set()
    for other in others:
        missing = [n for n in names if n not in other]
        if missing:
            problems.add(
                LangmergeError(f"model {other.label}: tensor {missing[0]!r} is missing{_listed_more(missing)}")
            )
            bad |= set(missing)
        known = set(names)
        extra = [n for n in other.names if n not in known]
        if extra:
            problems.add(
                LangmergeError(
                    f"model {other.label}: tensor {extra[0]!r} is not in {reference.label}{_listed_more(extra)}"
                )
            )
        differ = []
        for n in names:
            if n not in other:
                continue
            mine, theirs = tuple(other.shape(n)), tuple(reference.shape(n))
            if n in aligned:  # rows follow the vocabulary; the rest of the shape must agree
                mine, theirs = mine[1:], theirs[1:]
            elif n in vocab_names and vocab is None:
                continue  # the vocabulary step reported why the rows differ
            if mine != theirs:
                differ.append(n)
        if differ:
            n = differ[0]
            problems.add(
                LangmergeError(
                    f"tensor {n!r}: shape {list(other.shape(n))} in {other.label} but {list(reference.shape(n))} in "
                    f"{reference.label}" + (f" (and {len(differ) - 1} more tensors)" if len(differ) > 1 else "")
                )
            )
            bad |= set(differ)
    if vocab is None:
        bad |= vocab_names
    return bad


def _static(
    name: str, views: list[TensorSource], recipe: Recipe, vocab: VocabPlan | None, problems: _Problems
) -> _Static | None:
    reference = views[0]
    native = reference.dtype(name)
    out_rows = vocab.out_rows if vocab is not None and vocab.is_aligned(name) else None
    aligned = out_rows is not None  # aligned rows exist only where the vocabularies differ (out_rows is set then)
    shape = (out_rows, *reference.shape(name)[1:]) if out_rows is not None else tuple(reference.shape(name))
    if all(v.dtype(name).is_floating_point for v in views):
        return _Static(name, shape, native, False, aligned)
    try:
        check_copied_tensor(name, reference, views[1:])
    except LangmergeError as exc:
        problems.add(exc, name)
        return None
    return _Static(name, shape, native, True, False)


def check_copied_tensor(name: str, reference: TensorSource, others: list[TensorSource]) -> None:
    """An integer or bool tensor is never cast or merged: it is copied, and only when every model holds the same one.

    Compared piece by piece (``COMPARE_BYTES``), so a large one costs no more memory than a merge's chunk.
    """
    dtype = reference.dtype(name)
    for other in others:
        if other.dtype(name) != dtype:
            raise LangmergeError(
                f"tensor {name!r}: {_dtype_name(other.dtype(name))} in {other.label} but "
                f"{_dtype_name(dtype)} in {reference.label}; {_COPY_RULE}"
            )
    n = reference.numel(name)
    step = max(1, COMPARE_BYTES // torch.empty((), dtype=dtype).element_size())
    mine = torch.empty(min(n, step), dtype=dtype)
    theirs = torch.empty(min(n, step), dtype=dtype)
    for other in others:
        for a in range(0, n, step):
            b = min(n, a + step)
            if not torch.equal(reference.read(name, a, b, mine), other.read(name, a, b, theirs)):
                raise LangmergeError(
                    f"tensor {name!r}: the {_dtype_name(dtype)} tensor differs between {other.label} "
                    f"and {reference.label}; {_COPY_RULE}"
                )


def _info(name: str, shape: tuple[int, ...], dtype: torch.dtype, plan: MergePlan) -> TensorInfo:
    return TensorInfo(name, tuple(shape), dtype, plan.device, layer=layer_index(name), num_layers=plan.num_layers)


def _plan_tensor(
    static: _Static, recipe: Recipe, views: Sequence[TensorSource], plan: MergePlan, problems: _Problems
) -> TensorPlan:
    name = static.name
    offset = 1 if plan.base is not None else 0
    refs = [TensorRef(v, name) for v in views]
    if static.copied:
        info = _info(name, static.shape, static.native, plan)
        task = TensorTask(name, info, None, [refs[0]], None, None)
        return TensorPlan(name, static.shape, static.native, [task], copied=True)
    compute = recipe.dtype or static.native
    out_dtype = recipe.out_dtype or recipe.dtype or static.native
    try:
        params = recipe.tensor_parameters(name, layer_position(name, plan.num_layers))
        seed = derive_seed(recipe.seed(name), name)
    except LangmergeError as exc:
        problems.add(exc, name)
        return TensorPlan(name, static.shape, out_dtype, [])
    method = recipe.method
    base_ref = refs[0] if offset else None
    try:
        method.check(params, _info(name, static.shape, compute, plan))  # refused here, before any output
    except LangmergeError as exc:
        problems.add(exc, name)
        return TensorPlan(name, static.shape, out_dtype, [])
    if not static.aligned:
        info = _info(name, static.shape, compute, plan)
        task = TensorTask(
            name,
            info,
            base_ref,
            refs[offset:],
            method,
            params,
            choose_kernel(method, params, info),
            seed,
            (),
            tuple(range(len(refs) - offset)),
        )
        return TensorPlan(name, static.shape, out_dtype, [task])
    vocab = plan.vocab
    assert vocab is not None  # an aligned tensor has a vocabulary plan
    tasks = []
    for group in row_groups(vocab):
        group_task = _group_task(name, static, group, views, compute, method, params, seed, vocab, plan, offset)
        if isinstance(group_task, LangmergeError):
            problems.add(group_task, name)
        else:
            tasks.append(group_task)
    for key, rows, model_rows in sourced_groups(vocab):
        tasks.append(
            _sourced_task(
                name, static, key, rows, model_rows, views, compute, method, params, seed, vocab, plan, offset
            )
        )
    return TensorPlan(name, static.shape, out_dtype, tasks, aligned=True)


def _sourced_task(
    name: str,
    static: _Static,
    key: tuple[Any, ...],  # ("row", k), ("zero",) or ("mean",)
    rows: torch.Tensor,
    model_rows: torch.Tensor,
    views: Sequence[TensorSource],
    compute: torch.dtype,
    method: Method,
    params: MethodParameters,
    seed: int,
    vocab: VocabPlan,
    plan: MergePlan,
    offset: int,
) -> TensorTask:
    """Rows with a source of their own: a named model's row as is (``row``), zero (a token no model has a row
    for), or padding rows (``mean``: each model's mean row, merged by the method, as mergekit pads)."""
    info = _info(name, (int(rows.numel()), *static.shape[1:]), compute, plan)
    if key[0] == "row":
        ref = TensorRef(GatheredRows(views[key[1]], {name: (name, model_rows)}), name)
        return TensorTask(name, info, None, [ref], None, None, rows=rows, average=[1.0])
    if key[0] == "zero":  # the input only gives the shape: any row of the first model
        ref = TensorRef(GatheredRows(views[0], {name: (name, torch.zeros_like(rows))}), name)
        return TensorTask(name, info, None, [ref], None, None, rows=rows, average=[])
    refs = [TensorRef(MeanRows(views[k], name, vocab.own_rows(k), int(rows.numel())), name) for k in range(len(views))]
    return TensorTask(
        name,
        info,
        refs[0] if offset else None,
        refs[offset:],
        method,
        params,
        choose_kernel(method, params, info),
        seed,
        ("mean",),
        tuple(range(len(refs) - offset)),
        rows=rows,
    )


def _group_task(
    name: str,
    static: _Static,
    group: RowGroup,
    views: Sequence[TensorSource],
    compute: torch.dtype,
    method: Method,
    params: MethodParameters,
    seed: int,
    vocab: VocabPlan,
    plan: MergePlan,
    offset: int,
) -> TensorTask | LangmergeError:
    """One row group of a vocabulary tensor as a task of its own (or the problem that stops it)."""
    shape = (int(group.rows.numel()), *static.shape[1:])
    info = _info(name, shape, compute, plan)

    def ref(k: int) -> TensorRef:
        return TensorRef(GatheredRows(views[k], {name: (name, group.model_rows(vocab, k))}), name)

    present = [i for i in range(len(plan.inputs)) if group.present[offset + i]]
    inputs = [ref(offset + i) for i in present]
    if offset and not group.present[0]:  # the base lacks these tokens: the mean of the models that have them
        if not hasattr(params, "weights"):
            return LangmergeError(
                f"tensor {name!r}: rows the base lacks are a weighted average of the models that "
                f"have them, and {method.name} has no per-model weights; give the models one "
                "vocabulary (tokenizer_source: base)"
            )
        weights = [params.weights[i] for i in present]
        if sum(weights) == 0:
            return LangmergeError(
                f"tensor {name!r}: rows the base lacks are a weighted average, but the weights of "
                f"{', '.join(plan.inputs[i].label for i in present)} sum to zero"
            )
        return TensorTask(name, info, None, inputs, None, None, rows=group.rows, average=weights)
    if len(present) < min(method.min_models, len(plan.inputs)):
        return LangmergeError(
            f"tensor {name!r}: {method.name} merges {method.min_models} models, but {len(present) or 'none'} of them "
            f"{'has' if len(present) == 1 else 'have'} some of its vocabulary rows; give the models one vocabulary "
            "(tokenizer_source: base)"
        )
    p = params.restrict(present)
    return TensorTask(
        name,
        info,
        ref(0) if offset else None,
        inputs,
        method,
        p,
        choose_kernel(method, p, info),
        seed,
        (group.key,),
        tuple(present),
        rows=group.rows,
    )


def iter_tasks(tensors: list[TensorPlan]) -> Iterator[tuple[TensorPlan, TensorTask]]:
    for tensor in tensors:
        for task in tensor.tasks:
            yield tensor, task


def with_params(task: TensorTask, update: Callable[[MethodParameters], MethodParameters]) -> TensorTask:
    """The task with its parameters changed (``analyze``'s protected models), the kernel chosen again."""
    assert task.method is not None and task.params is not None  # merged, not copied
    params = update(task.params)
    kernel = choose_kernel(task.method, params, task.info)
    return dataclasses.replace(task, params=params, kernel=kernel)
