"""Resumable lambda x seed sweep writing one results CSV.

    python -m barrier_ops.experiments.sweep --config configs/chargpt/cpu_sweep.yaml \
        [--data PATH] [--lambdas 0 0.02] [--seeds 0 1] [--jobs 2] [--root runs/NAME] [--csv FILE]

Each run lives in ``<root>/lam<lambda>_seed<seed>/``; a run whose
``summary.json`` exists is skipped, so an interrupted sweep resumes where it
stopped. The CSV (default ``<root>/results.csv``) is rewritten from every
finished run's summary at the end.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import multiprocessing as mp
import os
import sys
from typing import Dict, List, Optional, Sequence

from .config import ExperimentConfig, load_config
from .train import run_dir_name, train


def summary_path(root: str, lam: float, seed: int) -> str:
    return os.path.join(root, run_dir_name(lam, seed), "summary.json")


def is_done(root: str, lam: float, seed: int) -> bool:
    return os.path.isfile(summary_path(root, lam, seed))


def _run_one(args) -> str:
    cfg, root, lam, seed, progress = args
    cfg = copy.deepcopy(cfg)
    cfg.train.lam, cfg.train.seed = float(lam), int(seed)
    out = os.path.join(root, run_dir_name(lam, seed))
    train(cfg, out, progress=progress)
    return out


def run_sweep(cfg: ExperimentConfig, root: str, lambdas: Optional[Sequence[float]] = None,
              seeds: Optional[Sequence[int]] = None, jobs: int = 1, progress: bool = True,
              csv_path: Optional[str] = None, log=print) -> List[Dict]:
    """Train every missing (lambda, seed) run under ``root`` and write the CSV; returns its rows."""
    lambdas = list(cfg.sweep.lambdas if lambdas is None else lambdas)
    seeds = list(cfg.sweep.seeds if seeds is None else seeds)
    todo, skipped = [], 0
    for lam in lambdas:
        for seed in seeds:
            if is_done(root, lam, seed):
                skipped += 1
            else:
                todo.append((cfg, root, lam, seed, progress and jobs == 1))
    log(f"sweep {cfg.name}: {len(lambdas) * len(seeds)} runs, {skipped} already finished, {len(todo)} to train")
    if jobs > 1 and len(todo) > 1:
        with mp.get_context("spawn").Pool(jobs) as pool:
            for out in pool.imap_unordered(_run_one, todo):
                log(f"  finished {out}")
    else:
        for item in todo:
            log(f"  finished {_run_one(item)}")
    rows = collect(root, lambdas, seeds)
    write_csv(rows, csv_path or os.path.join(root, "results.csv"))
    return rows


def summary_row(s: Dict) -> Dict:
    row = {
        "lambda": s["lambda"], "seed": s["seed"], "mode": s["mode"], "steps": s["steps"],
        "params": s["params"], "device": s["device"], "eval_split": s["eval_split"],
        "bpc": s["bpc"], "test_bpc": s["test_bpc"], "penalty": s["penalty"],
    }
    for sigma, r in s["noise"].items():
        row[f"bpc_sigma{sigma}"] = r["bpc"]
        row[f"ratio_sigma{sigma}"] = r["ratio"]
    for i, layer in enumerate(s["margins"]["layers"]):
        row[f"margin_mean_l{i}"] = layer["mean"]
        row[f"margin_min_l{i}"] = layer["min"]
        row[f"support_pos_mean_l{i}"] = layer["support_pos_mean"]
    row["train_seconds"] = s["train_seconds"]
    return row


def collect(root: str, lambdas: Sequence[float], seeds: Sequence[int]) -> List[Dict]:
    rows = []
    for lam in lambdas:
        for seed in seeds:
            p = summary_path(root, lam, seed)
            if os.path.isfile(p):
                with open(p, encoding="utf-8") as f:
                    rows.append(summary_row(json.load(f)))
    return rows


def collect_all(root: str) -> List[Dict]:
    """Rows of every finished run under ``root``, sorted by (lambda, seed)."""
    rows = []
    for name in sorted(os.listdir(root)):
        p = os.path.join(root, name, "summary.json")
        if name.startswith("lam") and os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                rows.append(summary_row(json.load(f)))
    return sorted(rows, key=lambda r: (float(r["lambda"]), int(r["seed"])))


def write_csv(rows: List[Dict], path: str) -> None:
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = list(rows[0].keys())
    for r in rows[1:]:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def read_csv(path: str) -> List[Dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            for conv in (int, float):
                try:
                    r[k] = conv(v)
                    break
                except (TypeError, ValueError):
                    pass
    return rows


def aggregate(rows: List[Dict], keys: Sequence[str]) -> List[Dict]:
    """Mean and sample std over seeds for each lambda: {"lambda", "n", key: mean, key+"_std": std}."""
    out = []
    for lam in sorted({float(r["lambda"]) for r in rows}):
        group = [r for r in rows if float(r["lambda"]) == lam]
        agg = {"lambda": lam, "n": len(group)}
        for k in keys:
            vals = [float(r[k]) for r in group if r.get(k) not in (None, "")]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            agg[k] = mean
            agg[k + "_std"] = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def format_table(rows: List[Dict], sigma: str = "0.5") -> str:
    """Markdown table, mean +- std over seeds per lambda (clean, noisy and test BPC, min margin)."""
    keys = ["bpc", f"bpc_sigma{sigma}", f"ratio_sigma{sigma}", "test_bpc"]
    agg = aggregate(rows, keys)
    ce = next((a for a in agg if a["lambda"] == 0), None)
    lines = [f"| lambda_m | seeds | val BPC | vs CE | BPC at sigma={sigma} | BPC(sigma={sigma})/BPC(0) | test BPC |",
             "|---|---|---|---|---|---|---|"]
    for a in agg:
        rel = f"{100 * (a['bpc'] / ce['bpc'] - 1):+.2f}%" if ce else "n/a"
        cells = [f"{a[k]:.4f} +- {a[k + '_std']:.4f}" if not k.startswith("ratio") else
                 f"{a[k]:.3f} +- {a[k + '_std']:.3f}" for k in keys]
        lines.append(f"| {a['lambda']:g} | {a['n']} | {cells[0]} | {rel} | {cells[1]} | {cells[2]} | {cells[3]} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--lambdas", type=float, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--jobs", type=int, default=1, help="parallel training processes (each uses train.threads)")
    p.add_argument("--root", default=None, help="run directory (default runs/<name>)")
    p.add_argument("--csv", default=None, help="results CSV (default <root>/results.csv)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = load_config(args.config, {"data.path": args.data, "train.steps": args.steps})
    root = args.root or os.path.join("runs", cfg.name)
    rows = run_sweep(cfg, root, args.lambdas, args.seeds, jobs=args.jobs, progress=not args.no_progress,
                     csv_path=args.csv)
    print(format_table(rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
