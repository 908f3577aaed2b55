"""The options of a training run: one pydantic model, ``TrainOptions``.

It is what ``train_ct`` / ``train_sft`` take, what the flags of ``langmerge train`` are
generated from (langmerge/cli_options.py), and, through ``StudyTrainOptions``, the
``training`` / ``ct_training`` sections of a study config: an option added here appears
in all three. Each field's ``description`` is its help text; ```json_schema_extra`` gives
its ``unit`` (shown with the default in ``--help``), where the default is computed its
``default_text`` (the default in words), and a ``metavar`` where the flag's name is a poor one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class LoraOptions(BaseModel):
    """PEFT LoRA adapters: trained instead of every parameter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(16, ge=1, description="rank of each adapter's two factors")
    alpha: int = Field(
        32, ge=1, description="LoRA's scale numerator: the update is alpha / rank times the adapter product"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on each adapter's input")
    target_modules: str | tuple[str, ...] = Field(
        "all-linear",
        description="the layers that get adapters: all-linear (every linear layer but the output layer, PEFT's own "
        "rule) or module names",
        json_schema_extra={"metavar": "MODULE"},
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _all_linear(cls, value):
        # From the command line the values come as a list; all-linear is PEFT's word, not a module's name.
        return "all-linear" if value == ["all-linear"] else value


# Fields about SFT examples only: CT packs its text into sequences that all have seq_len, so train_ct and a
# study's ct_training refuse them (``sft_only_problem``).
SFT_ONLY = ("group_by_length",)


def sft_only_problem(options: TrainOptions) -> str | None:
    """What is wrong with ``options`` for CT, if one of them applies to SFT only (``SFT_ONLY``)."""
    given = [name for name in SFT_ONLY if getattr(options, name)]
    if not given:
        return None
    return f"{given[0]} applies to SFT: CT's packed sequences all have the sequence length"


class TrainOptions(BaseModel):
    """Everything about a training run except its data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq_len: int = Field(512, ge=2, description="tokens per sequence", json_schema_extra={"unit": "tokens"})
    batch_size: int = Field(
        8,
        ge=1,
        description="sequences per optimizer step, all processes together",
        json_schema_extra={"unit": "sequences"},
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="sequences per forward pass per process; gradient accumulation makes up the batch",
        json_schema_extra={"unit": "sequences", "default_text": "the batch size"},
    )
    lr: float = Field(3e-5, ge=0.0, description="peak learning rate")
    min_lr: float = Field(0.0, ge=0.0, description="floor of the cosine schedule")
    warmup: float = Field(0.01, ge=0.0, description="warm-up: a fraction of the steps (< 1) or a step count (>= 1)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW's decoupled weight decay")
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping: the largest gradient norm (0: off)")
    seed: int = Field(0, ge=0, description="seed of the data order and of LoRA's initialisation")
    group_by_length: bool = Field(
        False,
        description="SFT: put examples of similar length into the same step, so little of a batch is padding "
        "(each epoch's seeded shuffle is sorted by length within groups of 50 steps, then the steps are shuffled; "
        "transformers' group_by_length)",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory")
    lora: LoraOptions | None = Field(None, description="train LoRA adapters instead of every parameter")
    merge_lora: bool = Field(False, description="write full checkpoints with the adapters merged in")
    checkpoint_every: int = Field(
        100, ge=0, description="steps between resumable states (0: only on stop)", json_schema_extra={"unit": "steps"}
    )
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms(True)")

    @model_validator(mode="before")
    @classmethod
    def _micro_batch(cls, data):
        # Not given: the field's default (a subclass may set one); None: the batch size, so no accumulation.
        if isinstance(data, dict):
            micro = data.get("micro_batch_size", cls.model_fields["micro_batch_size"].default)
            if micro is None:
                micro = data.get("batch_size", cls.model_fields["batch_size"].default)
            data = {**data, "micro_batch_size": micro}
        return data

    @model_validator(mode="after")
    def _lora_to_merge(self) -> TrainOptions:
        if self.merge_lora and self.lora is None:
            raise ValueError("merge_lora needs lora")
        return self
