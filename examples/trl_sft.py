"""TRL's SFTTrainer with the margin barrier: the one line, nothing else.

    python examples/trl_sft.py [--steps 10]

SFTTrainer computes its loss from per-token log-probabilities and ignores the
model's ``loss``; ``barrier_ops.attach`` adds the barrier term to the loss the
trainer backpropagates (see docs/integrations.md, "TRL SFTTrainer"). Tiny Llama
from a config file, byte-level "tokenizer" built in memory, the repo's docs as
the dataset, CPU, no downloads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _text import ROOT, byte_ids, training_text  # noqa: E402

import barrier_ops  # noqa: E402


def byte_tokenizer():
    """Ids 1..255 are bytes, 0 is padding and end of text (the tiny config's pad/eos id)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"<0x{i:02X}>": i for i in range(1, 256)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>", eos_token="<pad>"
    )


def main(argv=None):
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "examples", "tiny_llama.json"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--weight", type=float, default=0.02)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    with open(args.config, encoding="utf-8") as f:
        config = AutoConfig.for_model(**json.load(f))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")

    barrier_ops.attach(model, weight=args.weight, coupling="weights")  # <- the one line

    ids = byte_ids(training_text()).clamp(min=1)  # 0 is padding
    rows = [{"input_ids": ids[i:i + args.seq_len].tolist()} for i in range(0, len(ids) - args.seq_len, args.seq_len)]
    training_args = SFTConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="barrier_trl_"), max_steps=args.steps,
        per_device_train_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant",
        logging_steps=max(1, min(5, args.steps)), save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, bf16=False, fp16=False,
    )
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=Dataset.from_list(rows),
                         processing_class=byte_tokenizer())
    barrier_ops.integrations.add_stats_callback(trainer)  # optional: margin statistics in the logs
    trainer.train()
    last = [e for e in trainer.state.log_history if "barrier/penalty" in e][-1]
    print(f"step {last['step']}: loss {last['loss']:.4f} (includes the barrier term "
          f"{last['barrier/loss_term']:+.3e})  min margin {last['barrier/margin_min']:.4f}")
    return trainer


if __name__ == "__main__":
    main()
