"""Training steps with and without ``langmerge.heap.reuse_freed_memory``, side by side.

    python benchmarks/heap_reuse.py                  # a Gemma-3-270M-sized Llama (640 wide, 32k vocabulary)
    python benchmarks/heap_reuse.py --lengths 16,128 --steps 6

One process, one generated model (no hub), AdamW, bfloat16 autocast as the study trains: for each
sequence length, ``--steps`` training steps (forward, backward, optimizer step) with glibc's default
allocation and as many inside ``reuse_freed_memory``, alternating, the first step of each run dropped
(allocations warming up). Prints the median seconds a step of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from langmerge.heap import reuse_freed_memory
from langmerge.synthetic import LlamaShape, write_model


def steps(model, opt, ids: torch.Tensor, n: int, reuse: bool) -> list[float]:
    times = []
    with reuse_freed_memory() if reuse else nullcontext():
        for _ in range(n + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=640)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lengths", default="16,64,128")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    shape = LlamaShape(
        hidden=args.hidden,
        intermediate=4 * args.hidden,
        layers=args.layers,
        heads=4,
        kv_heads=1,
        vocab=args.vocab,
        tie_embeddings=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_model(Path(tmp) / "m", shape)
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    params = sum(t.numel() for t in model.parameters()) / 1e6
    print(
        f"model: {params:.0f}M parameters, {args.layers} layers, {args.vocab} vocabulary;",
        f"threads {torch.get_num_threads()}",
    )
    print("| tokens a step | glibc default, s a step | reuse_freed_memory, s a step | speed-up |")
    print("|---|---:|---:|---:|")
    for length in (int(v) for v in args.lengths.split(",")):
        ids = torch.randint(0, args.vocab, (args.batch, length), generator=g)
        plain: list[float] = []
        reuse: list[float] = []
        for _ in range(args.rounds):
            plain += steps(model, opt, ids, args.steps, reuse=False)
            reuse += steps(model, opt, ids, args.steps, reuse=True)
        a, b = statistics.median(plain), statistics.median(reuse)
        print(f"| {args.batch} x {length} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
