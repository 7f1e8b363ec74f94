"""Train one char-level GPT from a YAML config: CE ("ce", lambda = 0) or CE + lambda_m * barrier.

    python -m barrier_ops.experiments.train --config configs/chargpt/cpu_demo.yaml \
        [--data PATH] [--lambda 0.02] [--seed 0] [--steps N] [--out runs/NAME]

Writes to the output directory:
    config.yaml     the resolved config
    metrics.jsonl   one line per eval step: train/val BPC, penalty, per-layer mean and min margin
    summary.json    final clean and noisy BPC, margins, support tokens (written last: marks the run done)
    model.pt        the final weights (keep under runs/, which git ignores)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from typing import Dict, Optional

import torch

from .config import ExperimentConfig, load_config
from .data import CharData, build_data, load_splits, random_batch
from .evaluate import autocast_context, embedding_rms, evaluate_split, margin_summary, noise_eval
from .model import CharGPT, attach_barrier, training_loss


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


@functools.lru_cache(maxsize=4)
def _cached_data(path: Optional[str], split: tuple) -> CharData:
    return build_data(load_splits(path, split))


def get_data(cfg: ExperimentConfig) -> CharData:
    return _cached_data(cfg.data.path, tuple(cfg.data.split))


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * ratio


def total_steps(cfg: ExperimentConfig, n_train_tokens: int) -> int:
    t = cfg.train
    if t.epochs is None:
        return t.steps
    return max(1, int(t.epochs * n_train_tokens / (t.batch_size * cfg.model.block_size)))


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))


def _eval_record(model, data: CharData, cfg: ExperimentConfig, device, step: int, lr: float,
                 train_loss: float, elapsed: float) -> Dict:
    t = cfg.train
    kw = dict(n_batches=t.eval_batches, batch_size=t.batch_size, device=device, bf16=t.bf16)
    tr = evaluate_split(model, data.train, **kw)
    va = evaluate_split(model, data.val, with_penalty=True, with_margins=True, **kw)
    return {
        "step": step,
        "lr": lr,
        "train_loss": train_loss,
        "train_bpc": tr["bpc"],
        "val_bpc": va["bpc"],
        "val_penalty": va["penalty"],
        "margin_mean": [float(m.mean()) for m in va["margins"]],
        "margin_min": [float(m.min()) for m in va["margins"]],
        "elapsed_s": elapsed,
    }


def train(cfg: ExperimentConfig, out_dir: str, progress: Optional[bool] = None) -> Dict:
    """Train, evaluate and write ``out_dir``; returns the summary dict.

    On CPU, runs with ``train.threads`` threads and restores the caller's
    thread count on return (or error).
    """
    t = cfg.train
    progress = t.progress if progress is None else progress
    device = resolve_device(t.device)
    previous_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(t.threads)
    try:
        return _train(cfg, out_dir, progress, device)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: ExperimentConfig, out_dir: str, progress: bool, device: torch.device) -> Dict:
    t = cfg.train
    torch.manual_seed(t.seed)
    os.makedirs(out_dir, exist_ok=True)
    _dump_config(cfg, os.path.join(out_dir, "config.yaml"))

    data = get_data(cfg)
    model = CharGPT(data.vocab.size, cfg.model).to(device)
    attach_barrier(model, cfg.barrier, t.lam)  # barrier_ops.attach; disabled while training a CE model
    opt = make_optimizer(model, t)
    steps = total_steps(cfg, data.train.numel())
    gen = torch.Generator().manual_seed(t.seed)
    lam = t.lam
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    metrics = open(metrics_path, "w", encoding="utf-8")
    start = time.time()
    bar = range(steps)
    label = f"train {cfg.variant} lambda={lam:g} seed={t.seed}"
    # A progress bar on a terminal; one plain line per evaluation when stderr is a log file.
    use_bar = progress and _is_tty()
    if use_bar:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=label, dynamic_ncols=True)
    running = None
    model.train()
    for step in bar:
        lr = lr_at(step, steps, t)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = random_batch(data.train, t.batch_size, cfg.model.block_size, gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_context(device, t.bf16):
            out = model(x, y)  # the attached handle adds lambda_m * penalty (ce mode: disabled, no cost)
            loss = training_loss(out, lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        lv = loss.detach().item()
        if not math.isfinite(lv):
            raise FloatingPointError(f"non-finite training loss {lv} at step {step}")
        running = lv if running is None else 0.95 * running + 0.05 * lv
        if use_bar:
            bar.set_postfix(loss=f"{running:.3f}", bpc=f"{out.ce.detach().item() / math.log(2):.3f}")
        if (step + 1) % t.eval_interval == 0 or step + 1 == steps:
            rec = _eval_record(model, data, cfg, device, step + 1, lr, running, time.time() - start)
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            if progress and not use_bar:
                print(f"{label}: step {step + 1}/{steps} loss {running:.3f} val BPC {rec['val_bpc']:.3f} "
                      f"min margin {min(rec['margin_min']):.3g} ({rec['elapsed_s']:.0f}s)", file=sys.stderr, flush=True)
    metrics.close()
    train_seconds = time.time() - start

    torch.save({"model": model.state_dict(), "vocab": data.vocab.chars, "config": cfg.to_dict()},
               os.path.join(out_dir, "model.pt"))
    summary = final_evaluation(model, data, cfg, device, progress=use_bar)
    summary.update({
        "name": cfg.name, "mode": cfg.mode, "variant": cfg.variant, "target_margin": cfg.barrier.target_margin,
        "lambda": lam, "emb_rms": embedding_rms(model), "epochs": steps * t.batch_size * cfg.model.block_size
        / data.train.numel(), "seed": t.seed, "steps": steps,
        "params": model.num_params(), "device": str(device), "train_seconds": train_seconds,
        "eval_seconds": time.time() - start - train_seconds,
        "train_chars": data.train.numel(), "vocab_size": data.vocab.size,
        "coupling": cfg.barrier.coupling, "combine_heads": cfg.barrier.combine_heads,
        "query_fraction": cfg.barrier.query_fraction,
    })
    tmp = os.path.join(out_dir, "summary.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "summary.json"))
    return summary


def final_evaluation(model, data: CharData, cfg: ExperimentConfig, device, progress: bool = False) -> Dict:
    e, t = cfg.eval, cfg.train
    split = data.split(e.split)
    kw = dict(n_batches=e.batches, batch_size=e.batch_size, device=device, bf16=t.bf16)
    clean = evaluate_split(model, split, with_penalty=True, with_margins=True, progress=progress,
                           desc=f"eval {e.split}", **kw)
    noise = noise_eval(model, split, sigmas=e.sigmas, rel_sigmas=e.rel_sigmas, draws=e.draws, seed=t.seed,
                       progress=progress, **kw)
    test = evaluate_split(model, data.test, **kw)["bpc"]
    return {
        "eval_split": e.split,
        "bpc": clean["bpc"],
        "test_bpc": test,
        "penalty": clean["penalty"],
        "noise": noise,
        "margins": margin_summary(clean["margins"], clean["support_pos"], cfg.model.block_size,
                                  target_margin=cfg.barrier.target_margin if t.lam > 0 else None,
                                  support_pos_excl0=clean["support_pos_excl0"]),
    }


def _dump_config(cfg: ExperimentConfig, path: str) -> None:
    import yaml

    d = cfg.to_dict()
    d["train"]["lambda"] = d["train"].pop("lam")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(d, f, sort_keys=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/chargpt/cpu_demo.yaml")
    p.add_argument("--data", default=None, help="WikiText-2 raw dir, train/valid/test .txt dir, or one text file")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="lambda_m (0 = CE only)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    p.add_argument("--query-fraction", dest="query_fraction", type=float, default=None,
                   help="share f in (0, 1] of query rows the barrier draws per layer and step "
                        "(barrier.query_fraction; docs/sampling.md)")
    p.add_argument("--out", default=None, help="output dir (default runs/<name>/lam<lambda>_seed<seed>)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set barrier.coupling=identity (YAML value)")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_sets(sets) -> dict:
    import yaml

    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def overrides_from_args(args) -> dict:
    return {**parse_sets(args.sets), "data.path": args.data, "train.lambda": args.lam, "train.seed": args.seed,
            "train.steps": args.steps, "train.device": args.device,
            "barrier.query_fraction": getattr(args, "query_fraction", None)}


def run_dir_name(lam: float, seed: int, target_margin: Optional[float] = None) -> str:
    """``lam<lambda>_seed<seed>`` (CE and the paper's barrier), ``tm<m0>_lam<lambda>_seed<seed>`` (target margin m0)."""
    name = f"lam{lam:g}_seed{seed}"
    return name if target_margin is None or lam == 0 else f"tm{target_margin:g}_{name}"


def _is_tty() -> bool:
    """Progress bars only when both streams are terminals (``> log 2>&1`` gets plain lines)."""
    return sys.stderr.isatty() and sys.stdout.isatty()


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, overrides_from_args(args))
    out = args.out or os.path.join("runs", cfg.name, run_dir_name(cfg.train.lam, cfg.train.seed,
                                                                  cfg.barrier.target_margin))
    s = train(cfg, out, progress=not args.no_progress and cfg.train.progress)
    ratio = s["noise"].get("0.5", {}).get("ratio", float("nan"))
    print(f"{cfg.variant} lambda={s['lambda']:g} seed={s['seed']}: {s['eval_split']} BPC {s['bpc']:.4f}, "
          f"test BPC {s['test_bpc']:.4f}, BPC(sigma=0.5)/BPC(0) {ratio:.3f}, "
          f"train {s['train_seconds']:.0f}s -> {out}")


if __name__ == "__main__":
    main()
