"""Whole merges through the executor: a tiny memory budget gives the bits of an unchunked merge, for every method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import langmerge
from ckpt_helpers import make_extended_trio
from langmerge.errors import LangmergeError
from langmerge.merge import execute
from langmerge.methods import METHODS, fused_cpu, get_method
from langmerge.methods.base import ChunkRule
from langmerge.synthetic import LlamaShape, make_trio

# Rows of 48 elements (most tensors) and of 700 (down_proj); the vocabulary (~290 rows) is not a multiple of
# any chunk; norms (48 elements) and the k/v projections are smaller than a chunk.
SHAPE = LlamaShape(hidden=48, intermediate=700, layers=2, heads=4, kv_heads=2)
TINY = 48 << 10  # bytes: chunks of a few hundred elements per input (shorter than down_proj's rows)
WHOLE = 1 << 30  # every tensor of the test models is one chunk (and held between its passes)


@pytest.fixture(scope="module")
def trios(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked")
    return {"same": make_trio(root / "same", SHAPE), "union": make_extended_trio(root / "union", SHAPE)}


# Per-model parameters get two distinct values (ct, sft); global ones one value each; a parameter not named
# here keeps its default.
PER_MODEL = {
    "weight": (0.9, 0.6),
    "density": (0.35, 0.7),
    "gamma": (0.05, 0.1),
    "epsilon": (0.1, 0.2),
    "scale": (1.5, 0.5),
}
GLOBAL = {"slack": 0.8, "seed": 11, "t": 0.3, "k_bottom": 1, "k_top": 0, "transition": 1}


def _recipe(method: str, paths: dict[str, Path], vocab: str) -> dict:
    """A recipe for ``method`` from its parameter specs and model counts."""
    m = get_method(method)
    keys = ("ct",) if m.max_models == 1 else ("ct", "sft")  # slerp, nearswap, arcee_fusion, passthrough: one model
    models = []
    for i, key in enumerate(keys):
        params = {name: PER_MODEL[name][i] for name, spec in m.parameters.items() if spec.scope == "model"}
        models.append({"model": str(paths[key]), "parameters": params})
    params = {name: GLOBAL[name] for name, spec in m.parameters.items() if spec.scope == "global" and name in GLOBAL}
    if m.takes_protect:
        params["protect"] = [str(paths["sft"])]
    for name, role in m.reference_parameters.items():  # layer_swap's language_expert: the CT model
        params[name] = str(paths[role])
    recipe = {"merge_method": method, "models": models, "parameters": params, "dtype": "float32"}
    if m.uses_base:
        recipe["base_model"] = str(paths["base"])
    if vocab == "union":
        recipe["tokenizer_source"] = "union"
    return recipe


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _record_layouts(monkeypatch) -> list[tuple[str, int, int, list[tuple[int, int]], bool, ChunkRule]]:
    """(tensor, row length, elements, chunks, held between passes, the merge's chunk rule) of every task the
    executor opens."""
    seen = []
    real = execute.Executor._open

    def spy(self, tensor, task):
        opened = real(self, tensor, task)
        seen.append((task.name, task.info.row_numel, task.info.numel, opened[1], opened[2], opened[0].chunk_rule))
        return opened

    monkeypatch.setattr(execute.Executor, "_open", spy)
    return seen


# Rows the base lacks come from the models that have them, by their weights: methods without per-model weights,
# or that need both of their two models everywhere, refuse a vocabulary the models do not share.
UNION_REFUSED = {
    "sce",
    "ram",
    "ramplus_tl",
    "model_stock",
    "nuslerp",
    "layer_swap",
    "slerp",
    "nearswap",
    "arcee_fusion",
}


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("vocab", ["same", "union"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_tiny_budget_gives_the_bits_of_an_unchunked_merge(trios, tmp_path, monkeypatch, method, vocab, fused):
    # the floors that keep real merges' chunks large, lowered so that the test models split into many chunks
    monkeypatch.setattr(execute, "MIN_MEMORY", 16 << 10)
    monkeypatch.setattr(execute, "MIN_CHUNK_ELEMENTS", 16)
    monkeypatch.setattr(fused_cpu, "MIN_NUMEL", 1 if fused else 1 << 62)
    recipe = _recipe(method, trios[vocab], vocab)
    if vocab == "union" and method in UNION_REFUSED:
        with pytest.raises(LangmergeError, match="give the models one vocabulary"):
            langmerge.merge(recipe, tmp_path / "whole", progress=False)
        assert not (tmp_path / "whole").exists()
        return
    layouts = _record_layouts(monkeypatch)
    langmerge.merge(recipe, tmp_path / "whole", memory=WHOLE, progress=False)
    assert all(len(chunks) <= 1 and held for *_, chunks, held, _ in layouts)
    layouts.clear()
    langmerge.merge(recipe, tmp_path / "chunked", memory=TINY, progress=False)

    # each tensor's layout follows its merge's rule: one chunk (whole-tensor reductions), whole rows, or free
    for name, row, numel, chunks, _, rule in layouts:
        if rule.whole_tensor:
            assert chunks == [(0, numel)], name
        elif rule.whole_rows:
            assert all(a % row == 0 for a, _ in chunks), name
        assert all(a % rule.multiple_of == 0 for a, _ in chunks), name
    free = [entry for entry in layouts if entry[5] == ChunkRule()]
    # methods free to chunk anywhere (most): the layout the test is about, whole rows split unevenly, rows split
    # within, tensors under one chunk. (Whole-row, whole-tensor and slerp's segment rules are checked above.)
    if any(name == "model.layers.0.mlp.down_proj.weight" for name, *_ in free):
        sizes = [b - a for *_, chunks, _, _ in free for a, b in chunks]
        largest = max(sizes)
        assert largest * 4 <= TINY // 2
        uneven = [
            n
            for n, row, _, chunks, *_ in free
            if len(chunks) > 1
            and row > 1
            and (chunks[0][1] - chunks[0][0]) % row == 0
            and chunks[-1][1] - chunks[-1][0] < chunks[0][1] - chunks[0][0]
        ]
        within = [n for n, row, _, chunks, *_ in free if any(b - a < row for a, b in chunks[:-1])]
        small = [n for n, _, numel, chunks, *_ in free if len(chunks) == 1 and numel < largest]
        assert uneven and small and "model.layers.0.mlp.down_proj.weight" in within
        assert {held for *_, held, _ in free} == {
            True,
            False,
        }  # small tensors held between passes, large ones read again
    if vocab == "union" and len(recipe["models"]) + ("base_model" in recipe) > 1:
        # the vocabulary tensors merged in row groups, each one task
        assert sum(n == "model.embed_tokens.weight" for n, *_ in layouts) > 1

    whole, chunked = _weights(tmp_path / "whole"), _weights(tmp_path / "chunked")
    assert set(whole) == set(chunked)
    for name in whole:
        assert whole[name].dtype == chunked[name].dtype, name
        assert torch.equal(_bits(chunked[name]), _bits(whole[name])), (name, method)
