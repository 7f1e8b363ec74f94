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

from dataclasses import dataclass

from .config import ExperimentConfig, load_config, variant_name
from .train import run_dir_name, train


@dataclass(frozen=True)
class Run:
    variant: str
    lam: float
    target_margin: Optional[float]
    seed: int

    @property
    def dir_name(self) -> str:
        return run_dir_name(self.lam, self.seed, self.target_margin)


def summary_path(root: str, lam: float, seed: int, target_margin: Optional[float] = None) -> str:
    return os.path.join(root, run_dir_name(lam, seed, target_margin), "summary.json")


def is_done(root: str, lam: float, seed: int, target_margin: Optional[float] = None) -> bool:
    return os.path.isfile(summary_path(root, lam, seed, target_margin))


def plan_runs(cfg: ExperimentConfig, lambdas: Optional[Sequence[float]] = None,
              seeds: Optional[Sequence[int]] = None, variants: Optional[Sequence[str]] = None) -> List[Run]:
    """The runs of a sweep, in the order they are trained.

    Without ``sweep.grid`` (v1): lambda x seed with the config's barrier (``barrier.target_margin``).
    With a grid (v2): CE once (any lambda 0 in the grid), then the grid's lambdas interleaved across
    variants by their position in each list (so list lambdas by priority: the first ones of every
    variant are trained first), every seed of one (variant, lambda) before the next. ``lambdas``
    and ``variants`` filter the grid.
    """
    seeds = list(cfg.sweep.seeds if seeds is None else seeds)
    if not cfg.sweep.grid:
        lambdas = list(cfg.sweep.lambdas if lambdas is None else lambdas)
        m0 = cfg.barrier.target_margin
        return [Run(variant_name(lam, m0), float(lam), None if lam == 0 else m0, int(seed))
                for lam in lambdas for seed in seeds]
    pairs, seen = [], set()
    depth = max(len(g.lambdas) for g in cfg.sweep.grid)
    for i in range(depth):
        for g in cfg.sweep.grid:
            if i >= len(g.lambdas):
                continue
            lam = float(g.lambdas[i])
            m0 = None if lam == 0 else g.target_margin
            name = variant_name(lam, m0)
            if lambdas is not None and not any(abs(lam - x) < 1e-12 for x in lambdas):
                continue
            if variants is not None and name not in variants:
                continue
            if (name, lam) not in seen:
                seen.add((name, lam))
                pairs.append((name, lam, m0))
    pairs.sort(key=lambda p: p[1] != 0)  # CE first
    return [Run(name, lam, m0, int(seed)) for name, lam, m0 in pairs for seed in seeds]


def _run_one(args) -> str:
    cfg, root, run, progress = args
    cfg = copy.deepcopy(cfg)
    cfg.train.lam, cfg.train.seed = run.lam, run.seed
    cfg.barrier.target_margin = run.target_margin
    out = os.path.join(root, run.dir_name)
    train(cfg, out, progress=progress)
    if cfg.eval.sub_rates:
        substitution_for_run(out)
    return out


SUBSTITUTION_FILE = "substitution.json"


def substitution_for_run(run_dir: str) -> Dict:
    """Character-substitution BPC of a finished run, from its checkpoint: writes ``<run>/substitution.json``.

    Rates, draws, windows and split come from the run's own config (``eval.sub_rates``); the draws are seeded
    by the run's seed (:func:`barrier_ops.experiments.evaluate.substitution_eval`), so the runs of one seed
    see the same corrupted characters. Evaluated on CPU with one thread, like the training runs.
    """
    import torch

    from .evaluate import substitution_eval
    from .trace_vs_exact import load_run
    from .train import get_data

    model, cfg = load_run(run_dir)
    e = cfg.eval
    if not e.sub_rates:
        raise ValueError(f"{run_dir}: its config has no eval.sub_rates; nothing to evaluate")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = substitution_eval(model, get_data(cfg).split(e.split), rates=e.sub_rates, draws=e.draws,
                                n_batches=e.batches, batch_size=e.batch_size, device=torch.device("cpu"),
                                bf16=False, seed=cfg.train.seed)
    finally:
        torch.set_num_threads(previous)
    tmp = os.path.join(run_dir, SUBSTITUTION_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, SUBSTITUTION_FILE))
    return res


def _add_substitution(row: Dict, run_dir: str) -> Dict:
    """Columns ``bpc_sub<p>`` / ``ratio_sub<p>`` from ``<run>/substitution.json`` when it exists."""
    p = os.path.join(run_dir, SUBSTITUTION_FILE)
    if os.path.isfile(p):
        with open(p, encoding="utf-8") as f:
            for key, r in json.load(f).items():
                row[f"bpc_sub{key[1:]}"] = r["bpc"]
                row[f"ratio_sub{key[1:]}"] = r["ratio"]
    return row


def run_sweep(cfg: ExperimentConfig, root: str, lambdas: Optional[Sequence[float]] = None,
              seeds: Optional[Sequence[int]] = None, jobs: int = 1, progress: bool = True,
              csv_path: Optional[str] = None, log=print, variants: Optional[Sequence[str]] = None) -> List[Dict]:
    """Train every missing run of :func:`plan_runs` under ``root`` and write the CSV; returns its rows."""
    runs = plan_runs(cfg, lambdas, seeds, variants)
    todo, skipped = [], 0
    for run in runs:
        if os.path.isfile(os.path.join(root, run.dir_name, "summary.json")):
            skipped += 1
        else:
            # Parallel workers share stderr: progress lines (log files) are fine, interleaved bars are not.
            lines = not (sys.stderr.isatty() and sys.stdout.isatty())
            todo.append((cfg, root, run, progress and (jobs == 1 or lines)))
    log(f"sweep {cfg.name}: {len(runs)} runs, {skipped} already finished, {len(todo)} to train")
    if jobs > 1 and len(todo) > 1:
        with mp.get_context("spawn").Pool(jobs) as pool:
            for out in pool.imap_unordered(_run_one, todo):
                log(f"  finished {out}")
    else:
        for item in todo:
            log(f"  finished {_run_one(item)}")
    rows = collect(root, runs)
    write_csv(rows, csv_path or os.path.join(root, "results.csv"))
    return rows


def summary_row(s: Dict) -> Dict:
    lam = float(s["lambda"])
    m0 = s.get("target_margin")
    row = {
        "variant": s.get("variant") or variant_name(lam, m0), "lambda": s["lambda"],
        "target_margin": "" if m0 is None else m0, "seed": s["seed"], "mode": s["mode"], "steps": s["steps"],
        "epochs": s.get("epochs", ""), "params": s["params"], "device": s["device"], "eval_split": s["eval_split"],
        "bpc": s["bpc"], "test_bpc": s["test_bpc"], "penalty": s["penalty"], "emb_rms": s.get("emb_rms", ""),
    }
    for key, r in s["noise"].items():
        tag = key if not key.startswith("r") else "_" + key
        row[f"bpc_sigma{tag}"] = r["bpc"]
        row[f"ratio_sigma{tag}"] = r["ratio"]
        if key.startswith("r"):
            row[f"sigma{tag}"] = r["sigma"]
    for i, layer in enumerate(s["margins"]["layers"]):
        row[f"margin_mean_l{i}"] = layer["mean"]
        row[f"margin_min_l{i}"] = layer["min"]
        for k in ("q0.01", "median", "q0.99", "active_frac", "support_pos0_frac"):
            if k in layer:
                row[f"margin_{k}_l{i}" if k.startswith("q") or k == "median" else f"{k}_l{i}"] = layer[k]
        row[f"support_pos_mean_l{i}"] = layer["support_pos_mean"]
        if "support_pos_excl0_mean" in layer:
            row[f"support_pos_excl0_mean_l{i}"] = layer["support_pos_excl0_mean"]
    row["train_seconds"] = s["train_seconds"]
    return row


VARIANT_ORDER = {"ce": 0, "paper": 1}


def variant_sort_key(variant: str):
    if variant in VARIANT_ORDER:
        return (VARIANT_ORDER[variant], 0.0)
    tail = variant[len("target"):] if variant.startswith("target") else ""
    try:
        return (2, float(tail))
    except ValueError:
        return (3, variant)


def _row_key(r: Dict):
    return (variant_sort_key(str(r.get("variant") or "")), float(r["lambda"]), int(r["seed"]))


def collect(root: str, runs: Sequence[Run]) -> List[Dict]:
    rows = []
    for run in runs:
        p = os.path.join(root, run.dir_name, "summary.json")
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                rows.append(_add_substitution(summary_row(json.load(f)), os.path.join(root, run.dir_name)))
    return sorted(rows, key=_row_key)


def collect_all(root: str) -> List[Dict]:
    """Rows of every finished run under ``root``, sorted by (variant, lambda, seed)."""
    rows = []
    for name in sorted(os.listdir(root)):
        p = os.path.join(root, name, "summary.json")
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                row = _add_substitution(summary_row(json.load(f)), os.path.join(root, name))
            row["run"] = name
            rows.append(row)
    return sorted(rows, key=_row_key)


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


def row_variant(r: Dict) -> str:
    v = r.get("variant")
    if v not in (None, ""):
        return str(v)
    return "ce" if float(r["lambda"]) == 0 else "paper"  # v1 CSVs have no variant column


def aggregate(rows: List[Dict], keys: Sequence[str]) -> List[Dict]:
    """Mean and sample std over seeds per (variant, lambda): {"variant", "lambda", "n", key, key+"_std"}."""
    out = []
    groups = sorted({(row_variant(r), float(r["lambda"])) for r in rows},
                    key=lambda g: (variant_sort_key(g[0]), g[1]))
    for variant, lam in groups:
        group = [r for r in rows if row_variant(r) == variant and float(r["lambda"]) == lam]
        agg = {"variant": variant, "lambda": lam, "n": len(group)}
        for k in keys:
            vals = [float(r[k]) for r in group if r.get(k) not in (None, "")]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            agg[k] = mean
            agg[k + "_std"] = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def format_table(rows: List[Dict], sigma: str = "0.5", sigmas: Optional[Sequence[str]] = None) -> str:
    """Markdown table, mean +- std over seeds per (variant, lambda): clean, noisy and test BPC.

    ``sigmas``: the noise columns (keys as in the CSV: "0.05", "_r0.25", ...); default ``[sigma]``
    plus its ratio column (the v1 layout).
    """
    if sigmas is None:
        keys = ["bpc", f"bpc_sigma{sigma}", f"ratio_sigma{sigma}", "test_bpc"]
        heads = ["val BPC", f"BPC at sigma={sigma}", f"BPC(sigma={sigma})/BPC(0)", "test BPC"]
    else:
        keys = ["bpc"] + [f"bpc_sigma{s}" for s in sigmas] + ["test_bpc"]
        heads = ["val BPC"] + [_sigma_label(s) for s in sigmas] + ["test BPC"]
    agg = aggregate(rows, keys + ["margin_min_l0", "margin_mean_l0"])
    ce = next((a for a in agg if a["lambda"] == 0), None)
    lines = ["| variant | lambda_m | seeds | " + heads[0] + " | vs CE | " + " | ".join(heads[1:]) + " |",
             "|---|---|---|---|---|" + "---|" * (len(heads) - 1)]
    for a in agg:
        rel = f"{100 * (a['bpc'] / ce['bpc'] - 1):+.2f}%" if ce else "n/a"
        cells = [("n/a" if k not in a else f"{a[k]:.4f} +- {a[k + '_std']:.4f}") if not k.startswith("ratio") else
                 f"{a[k]:.3f} +- {a[k + '_std']:.3f}" for k in keys]
        lines.append(f"| {a['variant']} | {a['lambda']:g} | {a['n']} | {cells[0]} | {rel} | "
                     + " | ".join(cells[1:]) + " |")
    return "\n".join(lines)


def paired_table(rows: List[Dict], sigma_keys: Sequence[str]) -> str:
    """Markdown table of paired differences to CE: (variant - CE of the same seed), mean +- std over seeds.

    A run and the CE run of the same seed share the initialisation, the batch order, the evaluation
    windows and the noise draws, so the paired difference removes most of the seed-to-seed spread.
    Relative differences in percent of the CE value. ``n`` counts the seeds with both runs.
    """
    ce = {int(r["seed"]): r for r in rows if float(r["lambda"]) == 0}
    keys = ["bpc"] + [f"bpc_sigma{k}" for k in sigma_keys]
    diffs: Dict[tuple, Dict[str, List[float]]] = {}
    for r in rows:
        seed = int(r["seed"])
        if float(r["lambda"]) == 0 or seed not in ce:
            continue
        d = diffs.setdefault((row_variant(r), float(r["lambda"])), {k: [] for k in keys})
        for k in keys:
            if r.get(k) not in (None, "") and ce[seed].get(k) not in (None, ""):
                d[k].append(100.0 * (float(r[k]) / float(ce[seed][k]) - 1.0))
    heads = ["clean"] + [_sigma_label(k).replace("BPC at ", "") for k in sigma_keys]
    lines = ["| variant | lambda_m | n | " + " | ".join(heads) + " |", "|---|---|---|" + "---|" * len(heads)]
    for (variant, lam), d in sorted(diffs.items(), key=lambda kv: (variant_sort_key(kv[0][0]), kv[0][1])):
        cells = []
        for k in keys:
            v = d[k]
            if not v:
                cells.append("n/a")
                continue
            mean = sum(v) / len(v)
            std = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
            cells.append(f"{mean:+.1f} +- {std:.1f}")
        lines.append(f"| {variant} | {lam:g} | {len(d['bpc'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def margin_table(rows: List[Dict]) -> str:
    """Markdown table of margin statistics per (variant, lambda) and layer, means over seeds.

    min / 1% quantile / median / mean / 99% quantile of every valid token's margin, the fraction of
    tokens the barrier is active on (margin < m0 for the target margin; every token for -log m and
    n/a for CE) and the fraction of windows whose support token is position 0.
    """
    layers = sorted({int(k.rsplit("_l", 1)[1]) for k in rows[0] if k.startswith("margin_min_l")})
    stats = ["margin_min", "margin_q0.01", "margin_median", "margin_mean", "margin_q0.99", "active_frac",
             "support_pos0_frac", "support_pos_mean"]
    keys = [f"{s}_l{i}" for i in layers for s in stats]
    agg = aggregate(rows, keys)
    lines = ["| variant | lambda_m | layer | min | 1% | median | mean | 99% | barrier active on | "
             "support token at t = 0 | mean support position |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in agg:
        for i in layers:
            def cell(stat, fmt="{:.3g}"):
                v = a.get(f"{stat}_l{i}")
                return "n/a" if v is None else fmt.format(v)
            active = "n/a" if a["lambda"] == 0 else cell("active_frac", "{:.1%}")
            lines.append(f"| {a['variant']} | {a['lambda']:g} | {i} | {cell('margin_min')} | "
                         f"{cell('margin_q0.01')} | {cell('margin_median')} | {cell('margin_mean')} | "
                         f"{cell('margin_q0.99')} | {active} | {cell('support_pos0_frac', '{:.0%}')} | "
                         f"{cell('support_pos_mean', '{:.1f}')} |")
    return "\n".join(lines)


def table_sigmas(cfg: ExperimentConfig) -> List[str]:
    """CSV keys of the noise columns worth a table: every absolute sigma > 0, then the relative ones."""
    return [f"{x:g}" for x in cfg.eval.sigmas if x > 0] + [f"_r{r:g}" for r in cfg.eval.rel_sigmas]


def _sigma_label(key: str) -> str:
    return f"BPC at sigma={key[2:]} RMS" if key.startswith("_r") else f"BPC at sigma={key}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--lambdas", type=float, nargs="+", default=None)
    p.add_argument("--variants", nargs="+", default=None, help="v2 grid: only these variants (ce, paper, target2, ...)")
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
                     csv_path=args.csv, variants=args.variants)
    print(format_table(rows, sigmas=table_sigmas(cfg)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
