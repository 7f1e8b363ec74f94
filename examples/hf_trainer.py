"""Train a tiny Hugging Face model with transformers.Trainer and the margin barrier.

    python examples/hf_trainer.py [--config configs/examples/tiny_llama.json] [--steps 20]

The model comes from a config file (no download), the text is byte-level ids
of this repo's docs. Runs on CPU in well under a minute. The regularizer is
the one line marked below; the rest is a stock Trainer script.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _text import ROOT, byte_ids, training_text  # noqa: E402

import barrier_ops  # noqa: E402


class ByteChunks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, length: int):
        self.ids, self.length = ids, length

    def __len__(self):
        return (len(self.ids) - 1) // self.length

    def __getitem__(self, i):
        chunk = self.ids[i * self.length:(i + 1) * self.length]
        # Variable-length rows padded at the end, so the padding mask path is exercised.
        keep = self.length - (i % 4) * (self.length // 8)
        mask = torch.zeros(self.length, dtype=torch.long)
        mask[:keep] = 1
        return {"input_ids": chunk, "attention_mask": mask, "labels": chunk.masked_fill(mask == 0, -100)}


def main(argv=None):
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "examples", "tiny_llama.json"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--weight", type=float, default=0.02)
    parser.add_argument("--coupling", choices=("identity", "weights"), default="weights")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = AutoConfig.for_model(**_load_json(args.config))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")

    barrier_ops.attach(model, weight=args.weight, coupling=args.coupling)  # <- the one line

    dataset = ByteChunks(byte_ids(training_text()), args.seq_len)
    out = args.output_dir or tempfile.mkdtemp(prefix="barrier_hf_")
    training_args = TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=max(1, min(5, args.steps)), save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, dataloader_drop_last=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    barrier_ops.integrations.add_stats_callback(trainer)  # optional: margin statistics in the logs
    trainer.train()
    last = [e for e in trainer.state.log_history if "barrier/penalty" in e][-1]
    print(
        f"step {last['step']}: loss {last['loss']:.4f}  barrier penalty {last['barrier/penalty']:.5f}  "
        f"min margin {last['barrier/margin_min']:.4f}"
    )
    return trainer


def _load_json(path):
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)


if __name__ == "__main__":
    main()
