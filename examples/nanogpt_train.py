"""nanoGPT-style training loop with the margin barrier, on byte-level text, CPU, < 1 minute.

    python examples/nanogpt_train.py [--config configs/examples/tiny_nanogpt.json] [--compile]

``nanogpt_model.py`` stands for an unmodified nanoGPT ``model.py``; the loop is
the usual one (micro-batches, loss / accumulation steps, AdamW). The
regularizer is the one line marked below: the model's ``(logits, loss)`` then
carries ``loss = CE + weight * mean_over_layers(barrier)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _text import ROOT, byte_ids, training_text  # noqa: E402
from nanogpt_model import GPT, GPTConfig  # noqa: E402

import barrier_ops  # noqa: E402


def get_batch(data, batch_size, block_size, generator):
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s:s + block_size] for s in starts])
    y = torch.stack([data[s + 1:s + 1 + block_size] for s in starts])
    return x, y


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "examples", "tiny_nanogpt.json"))
    parser.add_argument("--max-iters", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (slow to start on CPU)")
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as f:
        cfg = json.load(f)
    train, opts = cfg["train"], cfg["barrier"]
    max_iters = args.max_iters or train["max_iters"]

    torch.manual_seed(train["seed"])
    model = GPT(GPTConfig(**cfg["model"]))

    handle = barrier_ops.attach(model, **opts)  # <- the one line

    data = byte_ids(training_text())
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=train["learning_rate"], weight_decay=0.1)
    step_fn = torch.compile(model) if args.compile else model
    generator = torch.Generator().manual_seed(train["seed"])
    accumulation = train["gradient_accumulation_steps"]
    block = cfg["model"]["block_size"]
    start = time.time()
    for it in range(max_iters + 1):
        if it % train["eval_interval"] == 0 or it == max_iters:
            model.eval()
            with torch.no_grad():
                x, y = get_batch(val_data, train["batch_size"], block, generator)
                _, val_loss = model(x, y)
            model.train()
            print(
                f"iter {it:4d}  val loss {val_loss.item():.4f}  barrier penalty {handle.stats.penalty.item():.5f}  "
                f"min margin {min(s.margin_min.item() for s in handle.stats.layers):.4f}  ({time.time() - start:.1f}s)"
            )
        if it == max_iters:
            break
        for _ in range(accumulation):
            x, y = get_batch(train_data, train["batch_size"], block, generator)
            _, loss = step_fn(x, y)
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, handle


if __name__ == "__main__":
    main()
