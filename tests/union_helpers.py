"""mergekit's tokenizer test models, built here: a BPE vocabulary of 64 tokens, with added tokens or more vocabulary."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tokenizers import Tokenizer
from transformers import LlamaTokenizerFast

from langmerge.synthetic import LlamaShape, write_model

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1)


def bpe_tokenizer(vocab_size: int = 64, extra_vocab: list[str] = (), added: list[str] = ()):
    """``<unk> <s> </s> _tok_3 ...`` as a BPE vocabulary (plus ``extra_vocab``), then ``added`` as added tokens."""
    names = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)] + list(extra_vocab)
    data = {
        "version": "1.0",
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(names)}, "merges": []},
        "added_tokens": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        Tokenizer.from_str(json.dumps(data)).save(str(path))
        tok = LlamaTokenizerFast(tokenizer_file=str(path))
    tok.add_tokens(list(added))
    return tok


def union_models(root: Path) -> dict[str, Path]:
    """mergekit's base (64 rows), chatml (two added tokens, 66 rows) and padded (four added tokens at ids 64..67 but
    only 64 rows: unused), and vocab (three more vocabulary tokens, 67 rows)."""
    root = Path(root)
    return {
        "base": write_model(
            root / "base", LlamaShape(**{**SHAPE.__dict__, "vocab": 64}), seed=0, tokenizer=bpe_tokenizer()
        ),
        "chatml": write_model(
            root / "chatml",
            LlamaShape(**{**SHAPE.__dict__, "vocab": 66}),
            seed=0,
            delta_scale=0.3,
            delta_key="chatml",
            tokenizer=bpe_tokenizer(added=["<|im_start|>", "<|im_end|>"]),
        ),
        "padded": write_model(
            root / "padded",
            LlamaShape(**{**SHAPE.__dict__, "vocab": 64}),
            seed=0,
            delta_scale=0.2,
            delta_key="padded",
            tokenizer=bpe_tokenizer(added=[f"<UNUSED_{i}>" for i in range(4)]),
        ),
        "vocab": write_model(
            root / "vocab",
            LlamaShape(**{**SHAPE.__dict__, "vocab": 67}),
            seed=0,
            delta_scale=0.25,
            delta_key="vocab",
            tokenizer=bpe_tokenizer(extra_vocab=["_new_a", "_new_b", "_new_c"]),
        ),
    }
