"""A plain PyTorch loop that computes its own loss from the logits, with the margin barrier.

    python examples/custom_loss.py [--steps 20]

Loops that never look at the model's ``loss`` (a custom cross-entropy, label
smoothing, distillation, Lightning's ``training_step``) add the barrier with
``handle.term()``: the differentiable term of the last training forward, the
same tensor the model adds to its own loss. Tiny Llama from a config file,
byte-level ids of this repo's docs, CPU, no downloads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _text import ROOT, byte_ids, training_text  # noqa: E402

import barrier_ops  # noqa: E402


def main(argv=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "examples", "tiny_llama.json"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--weight", type=float, default=0.02)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    with open(args.config, encoding="utf-8") as f:
        config = AutoConfig.for_model(**json.load(f))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    handle = barrier_ops.attach(model, weight=args.weight, coupling="weights")

    data = byte_ids(training_text())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.steps):
        starts = torch.randint(len(data) - args.seq_len - 1, (args.batch_size,), generator=generator)
        x = torch.stack([data[s:s + args.seq_len] for s in starts])
        y = torch.stack([data[s + 1:s + 1 + args.seq_len] for s in starts])
        logits = model(input_ids=x).logits  # no labels: the model returns no loss of its own
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), label_smoothing=args.label_smoothing)
        loss = ce + handle.term()  # <- the barrier, with its gradient
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  ce {ce.item():.4f}  barrier term {handle.stats.loss_term.item():+.3e}  "
                  f"min margin {min(s.margin_min.item() for s in handle.stats.layers):.4f}")
    return model, handle


if __name__ == "__main__":
    main()
