"""The training loop on a tiny Llama: loss falls, exact token accounting, resume, SFT, LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from langmerge.errors import LangmergeError
from langmerge.merge import merge
from langmerge.training import LoraOptions, train_ct, train_sft
from langmerge.training import loop as loop_module
from langmerge.training.data import IGNORE_INDEX
from train_helpers import ENGLISH, TAMIL, fast_options, tiny_base, write_lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "base": tiny_base(root / "base"),
        "ta": write_lines(root / "ta.txt", TAMIL, repeat=20),
        "en": write_lines(root / "en.txt", ENGLISH, repeat=10),
    }


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_ct_loss_falls_and_checkpoint_loads(corpus, tmp_path):
    result = train_ct(corpus["base"], [corpus["ta"]], 2000, tmp_path / "ct", options=fast_options(), progress=False)
    assert result.completed and result.steps == len(result.losses)
    first, last = result.losses[0], float(np.mean(result.losses[-3:]))
    assert last < first - 1.0, result.losses
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert model.config.vocab_size > 0
    meta = json.loads((tmp_path / "ct" / "langmerge_training.json").read_text())
    assert meta["tokens"]["target"] == 2000 and meta["steps"] == result.steps and meta["seed"] == 0
    assert meta["kind"] == "ct" and meta["data"]["text"] == [str(corpus["ta"])]


def test_token_budgets_are_exact_when_counted_in_the_loop(corpus, tmp_path):
    # Budgets that are multiples of neither the sequence length nor the batch size.
    result = train_ct(
        corpus["base"],
        [corpus["ta"]],
        "1.001k",
        tmp_path / "ct",
        save_at=["333", "700"],
        replay=[corpus["en"]],
        replay_ratio=(4, 1),
        options=fast_options(),
        progress=False,
    )
    assert (result.target_tokens, result.replay_tokens) == (1001, 1001 // 4)
    for name, budget in (("tokens-333", 333), ("tokens-700", 700)):
        meta = json.loads((tmp_path / "ct" / name / "langmerge_training.json").read_text())
        assert meta["tokens"] == {
            "target": budget,
            "replay": budget // 4,
            "total": budget + budget // 4,
            "trained": meta["tokens"]["trained"],
        }
    # A budget checkpoint is the state after its steps: it differs from the final weights.
    early, final = _weights(tmp_path / "ct" / "tokens-333"), _weights(tmp_path / "ct")
    assert any(not torch.equal(early[k], final[k]) for k in final)


def test_counted_tokens_are_the_tokens_fed_to_the_model(corpus, tmp_path, monkeypatch):
    """Count the attention mask of every batch the model receives, independently of the loop's counters."""
    fed = []
    real_collate = loop_module._collate

    def counting_collate(items, pad_id, device):
        batch = real_collate(items, pad_id, device)
        fed.append(int(batch["attention_mask"].sum()))
        return batch

    monkeypatch.setattr(loop_module, "_collate", counting_collate)
    result = train_ct(
        corpus["base"],
        [corpus["ta"]],
        517,
        tmp_path / "ct",
        replay=[corpus["en"]],
        replay_ratio=(3, 2),
        options=fast_options(),
        progress=False,
    )
    assert sum(fed) == 517 + 517 * 2 // 3 == result.tokens_seen


def _stop_or_kill_then_resume(corpus, tmp_path, monkeypatch, kill: bool):
    opts = fast_options(checkpoint_every=2, deterministic=True)
    args = (corpus["base"], [corpus["ta"]], 1200)
    full = train_ct(*args, tmp_path / "full", replay=[corpus["en"]], options=opts, progress=False)
    out = tmp_path / "resumed"
    if kill:
        real_step = loop_module._Trainer.train_step

        def dying_step(self, step):
            if step == 5:
                raise KeyboardInterrupt  # like ^C or a killed job: no state is saved at this point
            return real_step(self, step)

        monkeypatch.setattr(loop_module._Trainer, "train_step", dying_step)
        with pytest.raises(KeyboardInterrupt):
            train_ct(*args, out, replay=[corpus["en"]], options=opts, progress=False)
        monkeypatch.undo()
    else:
        partial = train_ct(*args, out, replay=[corpus["en"]], options=opts, stop_after=3, progress=False)
        assert not partial.completed and partial.steps == 3
    assert not out.exists() and loop_module.state_dir_for(out).is_dir()
    with pytest.raises(LangmergeError, match="--resume"):
        train_ct(*args, out, replay=[corpus["en"]], options=opts, progress=False)
    resumed = train_ct(*args, out, replay=[corpus["en"]], options=opts, resume=True, progress=False)
    assert resumed.completed and resumed.steps == full.steps
    assert (resumed.target_tokens, resumed.replay_tokens) == (full.target_tokens, full.replay_tokens)
    a, b = _weights(tmp_path / "full"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.losses == full.losses
    assert not loop_module.state_dir_for(out).exists()


def test_stopped_run_resumes_to_identical_weights(corpus, tmp_path, monkeypatch):
    _stop_or_kill_then_resume(corpus, tmp_path, monkeypatch, kill=False)


def test_killed_run_resumes_to_identical_weights(corpus, tmp_path, monkeypatch):
    _stop_or_kill_then_resume(corpus, tmp_path, monkeypatch, kill=True)


def test_resume_with_other_data_is_refused(corpus, tmp_path):
    out = tmp_path / "ct"
    train_ct(corpus["base"], [corpus["ta"]], 600, out, options=fast_options(), stop_after=1, progress=False)
    with pytest.raises(LangmergeError, match="other data or options"):
        train_ct(corpus["base"], [corpus["ta"]], 700, out, options=fast_options(), resume=True, progress=False)


def _sft_file(path):
    rows = [{"prompt": f"{a} + {b} =", "response": f" {a + b}"} for a in range(6) for b in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_learns_responses_only_and_ct_then_sft_chains(corpus, tmp_path):
    data = _sft_file(tmp_path / "sft.jsonl")
    ct = train_ct(corpus["base"], [corpus["ta"]], 500, tmp_path / "ct", options=fast_options(), progress=False)
    result = train_sft(ct.out, data, tmp_path / "ct_sft", epochs=3, options=fast_options(lr=5e-3), progress=False)
    # Trained tokens: each response's characters plus </s>, counted by hand.
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert result.trained_tokens == 3 * sum(len(r["response"]) + 1 for r in rows)
    assert result.target_tokens == 3 * sum(1 + len(r["prompt"]) + len(r["response"]) + 1 for r in rows)
    assert np.mean(result.losses[-3:]) < result.losses[0] - 0.5
    meta = json.loads((tmp_path / "ct_sft" / "langmerge_training.json").read_text())
    assert meta["kind"] == "sft" and meta["base"] == str(tmp_path / "ct")


def test_sft_loss_ignores_prompt_tokens(corpus, tmp_path):
    """With a zero learning rate the first step's loss equals a hand computation over response tokens only.

    Two examples of different lengths share one micro-batch, so the shorter one is padded: neither its
    padding nor any prompt token (labelled IGNORE_INDEX) may add to the loss or to the token count.
    """
    rows = [{"prompt": "abc", "response": "de"}, {"prompt": "b", "response": "cab"}]
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    options = fast_options(lr=0.0, warmup=0, batch_size=2, micro_batch_size=2)
    result = train_sft(corpus["base"], data, tmp_path / "sft", options=options, progress=False)
    model = AutoModelForCausalLM.from_pretrained(corpus["base"])
    tok = AutoTokenizer.from_pretrained(corpus["base"])
    response_terms, all_terms = [], []
    for row in rows:
        ids = [tok.bos_token_id, *tok.convert_tokens_to_ids(list(row["prompt"] + row["response"])), tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        terms = [-logp[t - 1, ids[t]].item() for t in range(1, len(ids))]  # position t predicts token t
        all_terms += terms
        response_terms += terms[len(row["prompt"]) :]  # the response's characters and </s>
    expected = float(np.mean(response_terms))
    assert result.trained_tokens == len(response_terms) == 2 + 1 + 3 + 1
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)
    # The comparison can tell: a loss that also took the prompt tokens is another number.
    assert abs(float(np.mean(all_terms)) - expected) > 1e-3


def test_group_by_length_pads_less_and_trains_on_the_same_tokens(corpus, tmp_path, monkeypatch):
    """Short and long examples mixed: every batch the model receives is padded (attention mask zeros) far less
    with group_by_length, and the same tokens are trained on."""
    rows = [{"prompt": "a" * (1 if k % 2 else 20), "response": "b"} for k in range(16)]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    real_collate = loop_module._collate
    padded: list[int] = []

    def counting_collate(items, pad_id, device):
        batch = real_collate(items, pad_id, device)
        padded.append(int((batch["attention_mask"] == 0).sum()))
        return batch

    monkeypatch.setattr(loop_module, "_collate", counting_collate)
    results = {}
    for grouped in (False, True):
        padded.clear()
        options = fast_options(batch_size=4, micro_batch_size=4, group_by_length=grouped)
        result = train_sft(corpus["base"], data, tmp_path / f"sft-{grouped}", options=options, progress=False)
        results[grouped] = (sum(padded), result.tokens_seen, result.trained_tokens)
    # Examples are bos + prompt + "b" + eos: 4 and 23 tokens. Grouped, each step holds one length: no padding.
    assert results[True] == (0, 8 * 4 + 8 * 23, 16 * 2)
    assert results[False][1:] == results[True][1:] and results[False][0] >= 19


def test_group_by_length_is_refused_for_ct(corpus, tmp_path):
    with pytest.raises(LangmergeError, match="group_by_length applies to SFT"):
        train_ct(corpus["base"], [corpus["ta"]], 100, tmp_path / "ct", options=fast_options(group_by_length=True))


def test_padding_and_prompt_positions_are_labelled_ignore_index():
    """The collated batch: labels of padding are IGNORE_INDEX (and the mask 0), prompt labels are kept as given."""
    items = [
        loop_module.Item(np.array([1, 5, 6, 7]), np.array([IGNORE_INDEX, IGNORE_INDEX, 6, 7]), 0),
        loop_module.Item(np.array([1, 8]), np.array([IGNORE_INDEX, 8]), 0),
    ]
    batch = loop_module._collate(items, pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 6, 7],
        [IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert [loop_module._predicted(it) for it in items] == [2, 1]


def test_lora_adapter_and_merged_checkpoint_agree(corpus, tmp_path):
    lora = LoraOptions(rank=4, alpha=8)
    opts = fast_options(lora=lora, lr=1e-2)
    adapter = train_ct(corpus["base"], [corpus["ta"]], 400, tmp_path / "adapter", options=opts, progress=False)
    merged = train_ct(
        corpus["base"],
        [corpus["ta"]],
        400,
        tmp_path / "merged",
        options=fast_options(lora=lora, lr=1e-2, merge_lora=True),
        progress=False,
    )
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    assert adapter.losses == merged.losses
    base_w, merged_w = _weights(corpus["base"]), _weights(tmp_path / "merged")
    assert "lm_head.weight" in merged_w and any(not torch.equal(base_w[k], merged_w[k]) for k in base_w)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        via_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(corpus["base"]), tmp_path / "adapter")
        expected = via_peft(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
    assert torch.allclose(expected, got, atol=1e-5)


def test_trained_checkpoints_are_merge_inputs(corpus, tmp_path):
    data = _sft_file(tmp_path / "sft.jsonl")
    ct = train_ct(
        corpus["base"], [corpus["ta"]], 600, tmp_path / "ct", save_at=[300], options=fast_options(), progress=False
    )
    sft = train_sft(corpus["base"], data, tmp_path / "sft", options=fast_options(), progress=False)
    recipe = {
        "merge_method": "ties",
        "base_model": str(corpus["base"]),
        "models": [
            {"model": str(ct.checkpoints["tokens-300"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(sft.out), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "dtype": "float32",
    }
    merge(recipe, tmp_path / "merged", progress=False)
    assert (tmp_path / "merged" / "config.json").is_file()
