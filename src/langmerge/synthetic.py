"""Generated model trios (base, CT, SFT) for the demo, the tests and the benchmarks.

Each tensor is drawn from a generator seeded by its name, so a model of any
size is written one tensor at a time and the trio is reproducible:
``ct = base + ct_scale * noise``, ``sft = base + sft_scale * noise'``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from langmerge.io.writer import ShardedWriter
from langmerge.seeds import seeded_generator

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# ASCII plus a few scripts of the languages langmerge is for (Tamil, Telugu, Bengali).
DEFAULT_ALPHABET = (
    [chr(c) for c in range(32, 127)]
    + ["\n"]
    + [chr(c) for c in range(0x0B80, 0x0BFB)]
    + [chr(c) for c in range(0x0C00, 0x0C20)]
    + [chr(c) for c in range(0x0980, 0x09A0)]
)


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 0  # 0: the character tokenizer's size
    tie_embeddings: bool = False
    max_positions: int = 512


TINYLLAMA_1B = LlamaShape(
    hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, max_positions=2048
)


def char_tokenizer(alphabet: list[str] | None = None):
    """A character-level fast tokenizer (no files from any hub needed)."""
    # transformers is slow to import: only where a tokenizer is made (tokenizers comes with it)
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet or DEFAULT_ALPHABET))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def llama_config(shape: LlamaShape, vocab: int, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": shape.max_positions,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": shape.tie_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "rope_theta": 10000.0,
        "dtype": str(dtype).removeprefix("torch."),
    }


def llama_tensor_shapes(shape: LlamaShape, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    h, i = shape.hidden, shape.intermediate
    head_dim = h // shape.heads
    kv = head_dim * shape.kv_heads
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not shape.tie_embeddings:
        out.append(("lm_head.weight", (vocab, h)))
    return out


def _base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1.0 + 0.02 * torch.randn(shape, generator=seeded_generator(seed, name))
    fan_in = shape[-1]
    return torch.randn(shape, generator=seeded_generator(seed, name)) / math.sqrt(fan_in)


def write_model(
    folder: Path,
    shape: LlamaShape,
    *,
    seed: int = 0,
    delta_scale: float = 0.0,
    delta_key: str = "",
    dtype: torch.dtype = torch.float32,
    shard_bytes: int = 5 * 10**9,
    tokenizer=None,
) -> Path:
    """Write a random Llama-shaped model: the base of ``seed``, plus ``delta_scale`` noise keyed by ``delta_key``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or char_tokenizer()
    vocab = shape.vocab or len(tokenizer)
    specs = [(n, s, dtype) for n, s in llama_tensor_shapes(shape, vocab)]
    writer = ShardedWriter(folder, specs, shard_bytes)
    try:
        for name, s, _ in specs:
            t = _base_tensor(name, s, seed)
            if delta_scale:
                scale = delta_scale / math.sqrt(s[-1])
                t += scale * torch.randn(s, generator=seeded_generator(seed, delta_key, name))
            writer.write(name, t.to(dtype))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    (folder / "config.json").write_text(json.dumps(llama_config(shape, vocab, dtype), indent=2) + "\n")
    tokenizer.save_pretrained(folder)
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n"
    )
    return folder


def make_trio(
    root: Path,
    shape: LlamaShape = LlamaShape(),
    *,
    seed: int = 0,
    ct_scale: float = 0.3,
    sft_scale: float = 0.1,
    dtype: torch.dtype = torch.float32,
    shard_bytes: int = 5 * 10**9,
) -> dict[str, Path]:
    """Write ``root/base``, ``root/ct`` and ``root/sft``; returns their paths."""
    root = Path(root)
    tok = char_tokenizer()
    common = dict(seed=seed, dtype=dtype, shard_bytes=shard_bytes, tokenizer=tok)
    return {
        "base": write_model(root / "base", shape, **common),
        "ct": write_model(root / "ct", shape, delta_scale=ct_scale, delta_key="ct", **common),
        "sft": write_model(root / "sft", shape, delta_scale=sft_scale, delta_key="sft", **common),
    }
