"""Recompute the validation margin statistics of finished runs from their checkpoints (no retraining).

    python -m barrier_ops.experiments.margins --root runs/cpu_sweep_v2 [--runs NAME ...]

For every run directory with ``model.pt``, evaluates the clean validation windows of the run's own
config (``eval.batches x eval.batch_size``) with the barrier measured, and writes
``<run>/margins.json``: :func:`barrier_ops.experiments.evaluate.margin_summary` with the support
token among positions t >= 1 as well (position 0 attends only to itself, so its margin is 1 exactly
and becomes the argmin as soon as a barrier lifts the other margins above 1). ``export`` puts these
into ``margins.jsonl`` in place of the summaries' statistics when present.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from .evaluate import evaluate_split, margin_summary
from .model import attach_barrier
from .trace_vs_exact import load_run


def recompute(run_dir: str) -> dict:
    from .train import get_data

    model, cfg = load_run(run_dir)
    attach_barrier(model, cfg.barrier, cfg.train.lam)
    data = get_data(cfg)
    e = cfg.eval
    r = evaluate_split(model, data.split(e.split), n_batches=e.batches, batch_size=e.batch_size,
                       device=torch.device("cpu"), with_penalty=True, with_margins=True)
    summary = margin_summary(r["margins"], r["support_pos"], cfg.model.block_size,
                             target_margin=cfg.barrier.target_margin if cfg.train.lam > 0 else None,
                             support_pos_excl0=r["support_pos_excl0"])
    summary["bpc"] = r["bpc"]
    path = os.path.join(run_dir, "margins.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f)
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--runs", nargs="*", default=None, help="run directory names under --root (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    names = args.runs or sorted(d for d in os.listdir(args.root)
                                if os.path.isfile(os.path.join(args.root, d, "summary.json")))
    for name in names:
        s = recompute(os.path.join(args.root, name))
        means = ", ".join(f"{L['support_pos_excl0_mean']:.1f}" for L in s["layers"])
        print(f"{name}: clean BPC {s['bpc']:.4f}; mean support position over t >= 1 per layer: {means}", flush=True)


if __name__ == "__main__":
    main()
