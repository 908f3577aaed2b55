"""LoRA (PEFT) adapters: wrap a model for training, save an adapter or a merged full checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from langmerge.training.options import LoraOptions


def _peft_config(options: LoraOptions):
    from peft import LoraConfig  # optional (the train extra)

    targets = options.target_modules if isinstance(options.target_modules, str) else list(options.target_modules)
    return LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def wrap_lora(model, options: LoraOptions):
    """The model with trainable LoRA adapters; every base weight frozen."""
    from peft import get_peft_model  # optional (the train extra)

    return get_peft_model(model, _peft_config(options))


def merged_model(base: str | Path, options: LoraOptions, trained_state: dict[str, torch.Tensor], pretrained: dict):
    """A plain model of ``base`` with the adapters in ``trained_state`` merged into its weights.

    ``trained_state`` is the full state dict of the trained PEFT model (base + adapter
    tensors); it is loaded into a fresh CPU copy so the training model is left untouched.
    ``pretrained``: the base's ``from_pretrained`` options (io/reader.pretrained_options).
    """
    from transformers import AutoModelForCausalLM  # transformers takes seconds to import: not at `langmerge --help`

    fresh = wrap_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **pretrained), options)
    fresh.load_state_dict({k: v.to("cpu", torch.float32) for k, v in trained_state.items()}, strict=True)
    return fresh.merge_and_unload()
