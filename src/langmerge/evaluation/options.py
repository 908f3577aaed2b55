"""How a model is evaluated: one pydantic model, ``EvalOptions``.

It is what ``evaluate`` takes and what the option flags of ``langmerge eval`` are generated
from (langmerge/cli_options.py). The settings that ``langmerge tune`` and a study's
``evaluation`` section share with it are declared once here, as annotated types
(``BatchSize``, ``ExampleLimit``, ``FewShot``, ``Device``, ``Precision``), so a check or a help text
changed here changes in all of them. Each field's ``description`` is its help text;
``json_schema_extra`` gives its ``unit``, ``default_text`` and ``metavar`` (as in
training/options.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from langmerge.cli_options import DEVICE

BatchSize = Annotated[int, Field(ge=1, description="examples per forward pass", json_schema_extra={"unit": "examples"})]
ExampleLimit = Annotated[
    int | None,
    Field(
        ge=1,
        description="only the first N examples of each task",
        json_schema_extra={"metavar": "N", "default_text": "every example"},
    ),
]
FewShot = Annotated[
    int | None,
    Field(
        ge=0,
        description="few-shot examples per prompt, for every task",
        json_schema_extra={"metavar": "N", "default_text": "each task's own"},
    ),
]
# The flag is the shared --device (cli_options.DEVICE), which checks the device is on this machine.
Device = Annotated[str, Field(description=DEVICE.help)]
Precision = Annotated[
    Literal["fp32", "bf16"],
    Field(description="bf16: matrix products in bfloat16 (torch.autocast), about twice as fast on AVX-512 BF16 CPUs"),
]


class EvalOptions(BaseModel):
    """Everything about an evaluation except the model and the tasks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    few_shot: FewShot = None
    batch_size: BatchSize = 16
    limit: ExampleLimit = Field(None, description="evaluate only the first N examples of each task")
    chat_template: bool = Field(False, description="wrap prompts in the tokenizer's chat template")
    max_length: int | None = Field(
        None,
        ge=1,
        description="max tokens per sequence",
        json_schema_extra={"unit": "tokens", "default_text": "the model's"},
    )
    seed: int = Field(0, description="seed of the few-shot selection")
    device: Device = DEVICE.options["default"]
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype the weights are loaded in", json_schema_extra={"default_text": "the checkpoint's"}
    )
    precision: Precision = "fp32"
