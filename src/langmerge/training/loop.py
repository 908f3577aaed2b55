"""One training loop for CT and SFT, on one CPU or many GPUs (accelerate: DDP, FSDP).

The data order is fixed up front (a plan of steps, from the seed), so a resumed run
feeds exactly the same batches; the learning rate is a pure function of the step.
Per optimizer step the loss is the mean over every predicted token of the global
batch (all micro-batches, all processes), whatever the padding.

Run state lives beside the output, in ``OUT.train-state/``: ``resume/`` (model,
optimizer, RNG, progress) and the finished budget checkpoints; the output folder
appears only when the run completes, with the budget checkpoints inside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from langmerge import __version__
from langmerge.errors import LangmergeError
from langmerge.heap import reuse_freed_memory
from langmerge.io.hub import ResolvedModel
from langmerge.io.metadata import TRAINING_METADATA
from langmerge.io.output import atomic_output_dir, check_disjoint, check_output_free
from langmerge.io.reader import read_config
from langmerge.training.data import IGNORE_INDEX, TARGET
from langmerge.training.lora import merged_model, wrap_lora
from langmerge.training.options import TrainOptions
from langmerge.training.schedule import cosine_lr, warmup_steps_for

log = logging.getLogger(__name__)

METADATA_FILE = TRAINING_METADATA
PROGRESS_FILE = "progress.json"


@dataclass
class Item:
    input_ids: np.ndarray
    labels: np.ndarray  # IGNORE_INDEX where no loss is taken
    source: int  # TARGET or REPLAY


@dataclass
class Job:
    """What to train: a base model and the items of each step, in order."""

    kind: str  # "ct" or "sft"
    base: Path  # the folder
    steps: int
    step_items: Callable[[int], list[Item]]
    save_steps: dict[str, int]  # budget folder name -> steps after which it is complete
    fingerprint: str  # identifies the data and plan, checked on resume
    pretrained: dict  # from_pretrained options of the base (io/reader.pretrained_options)
    metadata: dict = field(default_factory=dict)  # data description for langmerge_training.json
    base_model: ResolvedModel | None = (
        None  # where the base came from (io/hub.py): recorded as its ``pinned`` reference
    )


@dataclass
class TrainResult:
    out: Path
    checkpoints: dict[str, Path]
    completed: bool  # False when stopped early (resumable)
    steps: int
    target_tokens: int
    replay_tokens: int
    trained_tokens: int  # tokens that carried a loss (SFT: response tokens)
    final_loss: float | None
    losses: list[float]
    seconds: float

    @property
    def tokens_seen(self) -> int:
        return self.target_tokens + self.replay_tokens

    def summary(self) -> str:
        state = "done" if self.completed else "stopped (resume with --resume)"
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"
        return (
            f"{state}: {self.steps} steps, {self.tokens_seen:,} tokens ({self.target_tokens:,} target, "
            f"{self.replay_tokens:,} replay), final loss {loss}, {self.seconds:.1f}s -> {self.out}"
        )


def state_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}.train-state"


def fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _collate(items: list[Item], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        ids[row, :n] = torch.from_numpy(np.asarray(it.input_ids, dtype=np.int64))
        labels[row, :n] = torch.from_numpy(np.asarray(it.labels, dtype=np.int64))
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def _predicted(item: Item) -> int:
    """Tokens that carry a loss: labels after the first position (position t predicts t from < t)."""
    return int((np.asarray(item.labels[1:]) != IGNORE_INDEX).sum())


def _micro_batches(items: list[Item], rank: int, world: int, micro: int) -> list[list[Item]]:
    """This process's share of a step, in micro-batches; every process gets the same count (maybe empty ones)."""
    mine = items[rank::world]
    per_rank = -(-len(items) // world)
    count = max(1, -(-per_rank // micro))
    return [mine[i * micro : (i + 1) * micro] for i in range(count)]


def _base_dtype(base: Path) -> torch.dtype:
    config = read_config(base)
    if config is None:
        raise LangmergeError(f"{base}: not a model folder (no config.json)")
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise LangmergeError(f"{base / 'config.json'}: key 'dtype': {name!r} is not a torch dtype")
    return dtype


class _Trainer:
    def __init__(self, job: Job, out: Path, options: TrainOptions, tokenizer, progress: bool):
        from accelerate import Accelerator  # optional (the train extra)

        self.job, self.out, self.opt, self.tokenizer, self.progress = job, out, options, tokenizer, progress
        cuda = torch.cuda.is_available()
        precision = options.precision if options.precision != "auto" else ("bf16" if cuda else "fp32")
        self.accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else "bf16", cpu=not cuda)
        self.precision = precision
        self.state_dir = state_dir_for(out)
        self.save_dtype = _base_dtype(job.base)

    # ------------------------------------------------------------------ setup

    def build(self) -> None:
        from transformers import AutoModelForCausalLM  # transformers takes seconds to import: not at `langmerge --help`

        torch.manual_seed(self.opt.seed)
        if self.opt.deterministic:
            torch.use_deterministic_algorithms(True)
        model = AutoModelForCausalLM.from_pretrained(self.job.base, dtype=torch.float32, **self.job.pretrained)
        if self.opt.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.opt.lora:
            if self.opt.gradient_checkpointing:
                model.enable_input_require_grads()
            model = wrap_lora(model, self.opt.lora)
            hub = self.job.base_model
            if hub is not None and hub.from_hub:
                # The adapter records the base's Hub id and commit, not the cache folder it was read from.
                for config in model.peft_config.values():
                    config.base_model_name_or_path, config.revision = hub.repo_id, hub.commit
        params = [p for p in model.parameters() if p.requires_grad]
        # torch's fused AdamW (the same update, within float rounding): on the CPU a third of the for-loop's time
        # (a Gemma-3-270M-sized step 0.25 -> 0.085 s, with the miniature's small SFT steps ~1.3 s in all)
        fused = self.accelerator.device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(params, lr=self.opt.lr, weight_decay=self.opt.weight_decay, fused=fused or None)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.warmup = warmup_steps_for(self.job.steps, self.opt.warmup)

    # ------------------------------------------------------------------ one step

    def train_step(self, step: int) -> tuple[float, int, int, int]:
        """Run optimizer step ``step``; returns (mean loss, target tokens, replay tokens, predicted tokens)."""
        acc = self.accelerator
        items = self.job.step_items(step)
        step_predicted = sum(_predicted(it) for it in items)
        if step_predicted == 0:
            raise LangmergeError(f"step {step} has no token to learn (sequences of one token?)")
        # Every process holds the whole step, so the step's token counts need no communication.
        target = sum(len(it.input_ids) for it in items if it.source == TARGET)
        replay = sum(len(it.input_ids) for it in items) - target
        micro_size = self.opt.micro_batch_size
        assert micro_size is not None  # TrainOptions' validator puts the batch size where none is given
        batches = _micro_batches(items, acc.process_index, acc.num_processes, micro_size)
        self.model.train()
        losses = []  # stays on the device: one copy to the CPU per step, not one per micro-batch
        for i, micro in enumerate(batches):
            # A process without sequences in this step runs a weightless pad so collectives line up.
            weight = 1.0 if micro else 0.0
            micro = micro or [Item(np.array([self.pad_id, self.pad_id]), np.array([IGNORE_INDEX] * 2), TARGET)]
            batch = _collate(micro, self.pad_id, acc.device)
            sync = i == len(batches) - 1
            ctx = acc.no_sync(self.model) if not sync else contextlib.nullcontext()
            with ctx:
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                token_loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                    batch["labels"][:, 1:].reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                # Gradients are averaged over processes, hence the factor: the result is the global mean.
                acc.backward(token_loss * weight * acc.num_processes / step_predicted)
            losses.append(token_loss.detach() * weight)
        lr = cosine_lr(step, self.job.steps, self.opt.lr, self.warmup, self.opt.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.opt.max_grad_norm > 0:
            acc.clip_grad_norm_(self.model.parameters(), self.opt.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = sum(torch.stack(losses).cpu().double().tolist())  # in float64, in micro-batch order
        total = acc.reduce(torch.tensor([loss_sum], dtype=torch.float64, device=acc.device), reduction="sum")
        return float(total.cpu()[0]) / step_predicted, target, replay, step_predicted

    # ------------------------------------------------------------------ saving

    def write_model(self, folder: Path, progress: dict, force: bool = True) -> None:
        """An HF folder of the current weights (or the LoRA adapter) plus tokenizer and metadata."""
        acc = self.accelerator
        state = acc.get_state_dict(self.model)  # collective under FSDP
        if acc.is_main_process:
            with atomic_output_dir(folder, force=force) as tmp:
                self._write_into(tmp, state, progress)
        acc.wait_for_everyone()

    def write_final(self, progress: dict, budget_names: list[str], force: bool) -> None:
        """OUT itself: the final weights, with the finished budget checkpoints moved inside."""
        acc = self.accelerator
        state = acc.get_state_dict(self.model)
        if acc.is_main_process:
            with atomic_output_dir(self.out, force=force) as tmp:
                self._write_into(tmp, state, progress)
                for name in budget_names:
                    # Hard links: no second copy on disk, and a commit that fails keeps the run state whole.
                    shutil.copytree(self.state_dir / name, tmp / name, copy_function=_link_or_copy)
            shutil.rmtree(self.state_dir, ignore_errors=True)
        acc.wait_for_everyone()

    def _write_into(self, tmp: Path, state: dict, progress: dict) -> None:
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.opt.lora and self.opt.merge_lora:
            merged = merged_model(self.job.base, self.opt.lora, state, self.job.pretrained).to(self.save_dtype)
            merged.save_pretrained(tmp, safe_serialization=True)
        elif self.opt.lora:
            unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        else:
            state = {k: v.to(self.save_dtype) for k, v in state.items()}
            unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(self.metadata(progress), indent=2) + "\n")

    def metadata(self, progress: dict) -> dict:
        return {
            "produced_by": f"langmerge {__version__} train {self.job.kind}",
            "kind": self.job.kind,
            "base": self.job.base_model.pinned if self.job.base_model is not None else str(self.job.base),
            "data": self.job.metadata,
            "tokens": {
                "target": progress["target_tokens"],
                "replay": progress["replay_tokens"],
                "total": progress["target_tokens"] + progress["replay_tokens"],
                "trained": progress["trained_tokens"],
            },
            "steps": progress["step"],
            "seed": self.opt.seed,
            "final_loss": progress["losses"][-1] if progress["losses"] else None,
            # progress: a field of the options until it became run()'s argument; the file keeps it
            "options": self.opt.model_dump(mode="json") | {"progress": self.progress},
            "processes": self.accelerator.num_processes,
            "precision": self.precision,
            "seconds": round(progress["seconds"], 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "output": "lora-adapter" if self.opt.lora and not self.opt.merge_lora else "full-model",
        }

    def save_resume_state(self, progress: dict) -> None:
        acc = self.accelerator
        partial, final = self.state_dir / "resume.partial", self.state_dir / "resume"
        if acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(partial))
        if acc.is_main_process:
            (partial / PROGRESS_FILE).write_text(json.dumps(progress) + "\n")
            old = self.state_dir / "resume.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                final.rename(old)
            partial.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def load_resume_state(self) -> dict | None:
        final = self.state_dir / "resume"
        if not (final / PROGRESS_FILE).is_file():
            return None
        progress = json.loads((final / PROGRESS_FILE).read_text())
        if progress.get("fingerprint") != self.job.fingerprint:
            raise LangmergeError(
                f"{final}: the interrupted run used other data or options; "
                "resume with the same command, or pass --force to start over"
            )
        self.accelerator.load_state(str(final))
        return progress


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def prepare_output(out: Path, force: bool, resume: bool, inputs: Sequence[str | Path] = ()) -> Path:
    """Check OUT and its run state before any work: refuse what would be overwritten.

    ``inputs`` (the base, the text and data files) may not overlap OUT or its run state.
    """
    check_output_free(out, force, inputs)
    state = state_dir_for(out)
    check_disjoint([state], inputs)
    if state.exists() and not resume:
        if not force:
            raise LangmergeError(
                f"an interrupted run left its state in {state}; pass --resume to continue it, or --force to start over"
            )
        shutil.rmtree(state)
    return state


@reuse_freed_memory()  # the same large tensors every batch: their pages kept (langmerge.heap)
def run(
    job: Job,
    out: str | Path,
    options: TrainOptions,
    tokenizer,
    *,
    force: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``job`` into ``out``; with ``stop_after`` stop resumably after that many steps in total.
    ``progress``: show a progress bar."""
    out = Path(out)
    state_dir = prepare_output(out, force, resume)
    trainer = _Trainer(job, out, options, tokenizer, progress)
    acc = trainer.accelerator
    trainer.build()
    # The run's counts, resumed or new (``progress``, the flag, is the trainer's now).
    counts = trainer.load_resume_state() if resume else None
    if counts is None:
        counts = {
            "step": 0,
            "target_tokens": 0,
            "replay_tokens": 0,
            "trained_tokens": 0,
            "losses": [],
            "seconds": 0.0,
            "fingerprint": job.fingerprint,
        }
    else:
        log.info("resuming at step %d of %d", counts["step"], job.steps)
    budget_at = {steps: name for name, steps in job.save_steps.items() if steps < job.steps}
    end = job.steps if stop_after is None else min(job.steps, stop_after)
    bar = tqdm(
        total=job.steps,
        initial=counts["step"],
        unit="step",
        disable=not (trainer.progress and acc.is_main_process),
        desc=f"train {job.kind}",
    )
    started = time.perf_counter()
    seconds_before = counts["seconds"]
    last_state_step = counts["step"]
    try:
        while counts["step"] < end:
            step = counts["step"]
            loss, target, replay, predicted = trainer.train_step(step)
            counts["step"] = step + 1
            counts["target_tokens"] += target
            counts["replay_tokens"] += replay
            counts["trained_tokens"] += predicted
            counts["losses"].append(loss)
            counts["seconds"] = seconds_before + time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss:.4f}",
                tok_s=f"{(counts['target_tokens'] + counts['replay_tokens']) / max(counts['seconds'], 1e-9):,.0f}",
            )
            if counts["step"] in budget_at:
                trainer.write_model(state_dir / budget_at[counts["step"]], counts)
            if (
                options.checkpoint_every
                and counts["step"] % options.checkpoint_every == 0
                and counts["step"] < job.steps
            ):
                trainer.save_resume_state(counts)
                last_state_step = counts["step"]
    finally:
        bar.close()
    if counts["step"] < job.steps:
        if last_state_step != counts["step"]:
            trainer.save_resume_state(counts)
        done = {n: state_dir / n for s, n in budget_at.items() if s <= counts["step"]}
        return _result(state_dir, counts, job, completed=False, checkpoints=done)
    # Complete: the final model becomes OUT, with the budget checkpoints inside it.
    names = list(budget_at.values())
    trainer.write_final(counts, names, force)
    return _result(out, counts, job, completed=True, checkpoints={n: out / n for n in names})


def _result(out: Path, counts: dict[str, Any], job: Job, completed: bool, checkpoints: dict[str, Path]) -> TrainResult:
    losses = list(counts["losses"])
    return TrainResult(
        out=out,
        checkpoints=checkpoints,
        completed=completed,
        steps=counts["step"],
        target_tokens=counts["target_tokens"],
        replay_tokens=counts["replay_tokens"],
        trained_tokens=counts["trained_tokens"],
        final_loss=losses[-1] if losses else None,
        losses=losses,
        seconds=counts["seconds"],
    )
