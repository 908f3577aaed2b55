"""The merge subcommands: ``langmerge merge``, ``langmerge check`` and ``langmerge demo``."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from langmerge.cli_options import ALLOW_PICKLE, DEVICE, FORCE, NO_PROGRESS, THREADS, parse_size
from langmerge.io.hub import ResolvedModel
from langmerge.io.output import atomic_output_dir, check_output_free
from langmerge.io.reader import pretrained_options
from langmerge.merge.check import check_recipe
from langmerge.merge.execute import DEFAULT_MEMORY, merge
from langmerge.merge.plan import DEFAULT_SHARD_BYTES
from langmerge.merge.recipe import load_recipe, read_recipe_documents
from langmerge.progress import TqdmReporter
from langmerge.synthetic import LlamaShape, make_trio


def _reporter(args: argparse.Namespace, what: str) -> TqdmReporter | None:
    return None if args.no_progress else TqdmReporter(what)


def _merge(args: argparse.Namespace) -> int:
    several = read_recipe_documents(args.recipe) is not None  # a multi-document recipe: merge reads it
    recipe = args.recipe if several else load_recipe(args.recipe)
    report = merge(
        recipe,
        args.out_dir,
        force=args.force,
        device=args.device,
        threads=args.threads,
        shard_bytes=args.shard_size,
        memory=args.memory,
        progress=not args.no_progress,
        reporter=_reporter(args, "merge" if several else f"merge ({recipe.method.name})"),
        allow_pickle=args.allow_pickle,
    )
    print(report.summary())
    print(f"where the time went: {report.timings.text()}")
    return 0


def _announce(ref: str, model: ResolvedModel) -> None:
    print(f"langmerge check: {ref}: {model.describe()}", file=sys.stderr, flush=True)


def _check(args: argparse.Namespace) -> int:
    report = check_recipe(
        args.recipe, allow_pickle=args.allow_pickle, progress=not args.no_progress, announce=_announce
    )
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else report.text())
    return report.exit_code


def _demo(args: argparse.Namespace) -> int:
    """Merge a small generated trio with TIES-SV and say what happened."""
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="langmerge-demo-"))
    # Both folders are checked before either is written: an existing one needs --force.
    check_output_free(work / "inputs", args.force)
    check_output_free(work / "merged", args.force, [work / "inputs"])
    shape = LlamaShape(hidden=128, intermediate=256, layers=4, heads=4, kv_heads=2)
    with atomic_output_dir(work / "inputs", force=args.force) as tmp:
        make_trio(tmp, shape)
    paths = {name: work / "inputs" / name for name in ("base", "ct", "sft")}
    recipe = {
        "merge_method": "ties_sv",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths["ct"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(paths["sft"]), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "parameters": {"slack": 1.0, "protect": [str(paths["sft"])]},
        "dtype": "float32",
    }
    print(f"generated a base, a CT and an SFT model (Llama-shaped, random) under {work / 'inputs'}")
    report = merge(
        recipe,
        work / "merged",
        force=args.force,
        progress=not args.no_progress,
        reporter=_reporter(args, "merge (ties_sv)"),
    )
    print(report.summary())
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
    )  # transformers takes seconds to import: not at `langmerge --help`

    options = pretrained_options(work / "merged")  # the folder's files by io/files.py's rule, safetensors only
    model = AutoModelForCausalLM.from_pretrained(work / "merged", **options)
    tok = AutoTokenizer.from_pretrained(work / "merged", trust_remote_code=False)
    ids = tok("வணக்கம்", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    print(f"the merged model loads in transformers and generates {out.shape[1] - ids.shape[1]} tokens")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("merge", help="merge models per a mergekit-style YAML recipe")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("out_dir", help="output folder (a Hugging Face model folder)")
    FORCE.add(p)
    DEVICE.add(p)
    THREADS.add(p)
    p.add_argument(
        "--shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES, help="max bytes per shard (default 5GB)"
    )
    p.add_argument(
        "--memory",
        type=parse_size,
        default=DEFAULT_MEMORY,
        help=f"bytes of tensor buffers the merge may hold, which set its chunk size (default "
        f"{DEFAULT_MEMORY >> 20}MiB; the interpreter adds about 0.25GB), e.g. 1GB",
    )
    NO_PROGRESS.add(p)
    ALLOW_PICKLE.add(p)
    p.set_defaults(handler=_merge)

    p = sub.add_parser(
        "check", help="report what a merge would meet (architectures, shapes, vocabularies) before merging"
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    ALLOW_PICKLE.add(p)
    NO_PROGRESS.add(p, "hide the download progress bars")
    p.set_defaults(handler=_check)

    p = sub.add_parser("demo", help="merge a small generated model trio and show the result")
    p.add_argument(
        "--work-dir",
        default=None,
        help="where to put the generated models (WORK/inputs) and the merge (WORK/merged); default: a temp folder",
    )
    FORCE.add(p, "replace WORK/inputs and WORK/merged if they exist")
    NO_PROGRESS.add(p, "hide the progress bars")
    p.set_defaults(handler=_demo)
