"""Training throughput: langmerge's loop vs a plain transformers Trainer, same model and data.

    python benchmarks/train_speed.py                 # small Llama on the CPU
    python benchmarks/train_speed.py --device cuda   # on a GPU (bf16 for both)

Both train the same freshly generated Llama-shaped model on the same packed sequences
(langmerge's own packing of a generated Tamil/English corpus) with AdamW, a cosine
schedule and the same batch size; tokens/s is input tokens over the training time
(model loading and saving excluded on both sides). Each side runs ``--repeats`` times,
alternating, and the best time counts. Prints the two rates side by side and their ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

from langmerge.synthetic import LlamaShape, write_model
from langmerge.training import TrainOptions, train_ct
from langmerge.training.api import load_tokenizer
from langmerge.training.data import plan_ct, token_stream

LINES = [
    "மனிதப் பிறவியினர் சகலரும் சுதந்திரமாகவே பிறக்கின்றனர்; அவர்கள் மதிப்பிலும் உரிமைகளிலும் சமமானவர்கள்.",
    "அவர்கள் நியாயத்தையும் மனச்சாட்சியையும் இயற்பண்பாகப் பெற்றவர்கள்.",
    "All human beings are born free and equal in dignity and rights.",
    "They are endowed with reason and conscience.",
]


def run_langmerge(base: Path, text: Path, tokens: int, args, work: Path, repeat_index: int) -> float:
    opts = TrainOptions(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        micro_batch_size=args.batch_size,
        lr=1e-4,
        warmup=0.1,
        checkpoint_every=0,
        precision="bf16" if args.device == "cuda" else "fp32",
    )
    result = train_ct(base, [text], tokens, work / f"lm-{repeat_index}", options=opts, force=True, progress=False)
    return result.tokens_seen / result.seconds


def run_trainer(base: Path, text: Path, tokens: int, args, work: Path, repeat_index: int) -> float:
    tokenizer = load_tokenizer(base)
    plan = plan_ct(token_stream(tokenizer, [text]), [tokens], seq_len=args.seq_len, batch_size=args.batch_size, seed=0)
    rows = [plan.sequence(j) for j in range(len(plan.source))]

    class Packed(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            ids = torch.as_tensor(rows[i], dtype=torch.long)
            return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        out = {k: torch.zeros(len(batch), width, dtype=torch.long) for k in ("input_ids", "attention_mask")}
        out["labels"] = torch.full((len(batch), width), -100, dtype=torch.long)
        for r, b in enumerate(batch):
            n = len(b["input_ids"])
            for k in out:
                out[k][r, :n] = b[k]
        return out

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targs = TrainingArguments(
        output_dir=str(work / f"hf-{repeat_index}"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=1e-4,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, plan.steps // 10),
        weight_decay=0.0,
        max_grad_norm=1.0,
        save_strategy="no",
        report_to=[],
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=args.device == "cpu",
        bf16=args.device == "cuda",
        seed=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=Packed(), data_collator=collate)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return plan.tokens() / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU here")

    work = Path(tempfile.mkdtemp(prefix="langmerge-train-speed-"))
    shape = LlamaShape(
        hidden=args.hidden,
        intermediate=args.hidden * 11 // 4,
        layers=args.layers,
        heads=max(1, args.hidden // 64),
        kv_heads=max(1, args.hidden // 128),
        max_positions=max(512, args.seq_len),
    )
    base = write_model(work / "base", shape, seed=0)
    tokens = args.steps * args.batch_size * args.seq_len
    text = work / "corpus.txt"
    text.write_text("\n".join(LINES * (tokens // sum(len(x) + 2 for x in LINES) + 2)) + "\n", encoding="utf-8")

    n_params = sum(t.numel() for t in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).parameters())

    rates: dict[str, list[float]] = {"langmerge": [], "transformers.Trainer": []}
    for r in range(args.repeats):
        rates["transformers.Trainer"].append(run_trainer(base, text, tokens, args, work, r))
        rates["langmerge"].append(run_langmerge(base, text, tokens, args, work, r))
    best = {k: max(v) for k, v in rates.items()}
    ratio = best["langmerge"] / best["transformers.Trainer"]
    print(
        f"model: Llama-shaped, {n_params / 1e6:.1f}M parameters, hidden {args.hidden}, {args.layers} layers; "
        f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens = {tokens:,} tokens; device {args.device}; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'loop':<22}{'tokens/s (best)':>16}   all runs")
    for name, values in rates.items():
        print(f"{name:<22}{best[name]:>16,.0f}   " + ", ".join(f"{v:,.0f}" for v in values))
    print(f"ratio langmerge / Trainer: {ratio:.3f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "parameters": n_params,
                    "tokens": tokens,
                    "rates": rates,
                    "best": best,
                    "ratio": ratio,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
