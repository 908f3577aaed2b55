"""``langmerge train ct|sft``: continual pre-training and supervised fine-tuning.

Many GPUs: ``accelerate launch -m langmerge train ...`` (see docs/training.md).
"""

from __future__ import annotations

import argparse
import os

from langmerge.errors import LangmergeError
from langmerge.training.data import parse_ratio, parse_token_count
from langmerge.training.lora import LoraOptions
from langmerge.training.loop import TrainOptions


def _token_count(text: str) -> int:
    try:
        return parse_token_count(text)
    except LangmergeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _token_list(text: str) -> list[int]:
    return [_token_count(t) for t in text.split(",") if t.strip()]


def _ratio(text: str) -> tuple[int, int]:
    try:
        return parse_ratio(text)
    except LangmergeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _options(args) -> TrainOptions:
    lora = LoraOptions(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout) if args.lora else None
    if args.merge_lora and not args.lora:
        raise LangmergeError("--merge-lora needs --lora")
    return TrainOptions(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size or args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        lora=lora,
        merge_lora=args.merge_lora,
        checkpoint_every=args.checkpoint_every,
        deterministic=args.deterministic,
        progress=not args.no_progress,
    )


def _report(result) -> int:
    if int(os.environ.get("RANK", "0")) != 0:  # one report per run, not one per process
        return 0
    print(result.summary())
    for name, path in result.checkpoints.items():
        print(f"  {name}: {path}")
    return 0


def _ct(args) -> int:
    from langmerge.training.api import train_ct

    return _report(
        train_ct(
            args.base, args.text, args.tokens, args.out,
            save_at=args.save_at or (), replay=args.replay or (), replay_ratio=args.replay_ratio,
            repeat=args.repeat, options=_options(args), force=args.force, resume=args.resume,
            stop_after=args.stop_after, allow_pickle=args.allow_pickle,
        )
    )


def _sft(args) -> int:
    from langmerge.training.api import train_sft

    return _report(
        train_sft(
            args.base, args.data, args.out, epochs=args.epochs, options=_options(args),
            force=args.force, resume=args.resume, stop_after=args.stop_after, allow_pickle=args.allow_pickle,
        )
    )


def _common(p: argparse.ArgumentParser) -> None:
    d = TrainOptions()
    p.add_argument("--base", required=True, help="model to start from: a folder (Hugging Face format) or a Hub id ORG/NAME[@REVISION]")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder / discard an interrupted run")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last saved state")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per optimizer step, all processes together")
    p.add_argument("--micro-batch-size", type=int, default=None, help="sequences per forward pass per process (default: --batch-size)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--min-lr", type=float, default=d.min_lr, help="floor of the cosine schedule")
    p.add_argument("--warmup", type=float, default=d.warmup, help="warm-up: a fraction of the steps (<1) or a step count")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: off)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data order and of LoRA's initialisation")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every parameter")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--merge-lora", action="store_true", help="write full checkpoints with the adapters merged in")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between resumable states (0: only on stop)")
    p.add_argument("--stop-after", type=int, default=None, help="stop (resumably) after this many steps in total")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load a --base with only .bin (pickle) weights, with torch.load(weights_only=True)")


def add_commands(sub) -> None:
    train = sub.add_parser("train", help="continual pre-training (ct) or supervised fine-tuning (sft)")
    tsub = train.add_subparsers(dest="train_command", required=True, metavar="KIND")

    p = tsub.add_parser("ct", help="continual pre-training on raw target-language text")
    p.add_argument("--text", nargs="+", required=True, help="target-language text files (.txt: a document per line; .jsonl: 'text')")
    p.add_argument("--tokens", type=_token_count, required=True, help="target-language tokens to train on, exactly (1M, 500k, 2.5M)")
    p.add_argument("--save-at", type=_token_list, default=None, help="also save at these budgets, e.g. 1M,2M,5M (OUT/tokens-1M/...)")
    p.add_argument("--replay", nargs="+", default=None, help="replay (e.g. English) text files mixed in")
    p.add_argument("--replay-ratio", type=_ratio, default=(4, 1), help="target:replay parts (default 4:1)")
    p.add_argument("--repeat", action="store_true", help="cycle through the text when the budget exceeds it")
    _common(p)
    p.set_defaults(handler=_ct)

    p = tsub.add_parser("sft", help="supervised fine-tuning on prompt/response JSONL (loss on responses only)")
    p.add_argument("--data", required=True, help="JSONL: {prompt, response} or {messages: [{role, content}]} per line")
    p.add_argument("--epochs", type=int, default=1)
    _common(p)
    p.set_defaults(handler=_sft)
