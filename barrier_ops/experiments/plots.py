"""Figures (matplotlib, Agg backend, PNG) from run directories and sweep CSVs.

    python -m barrier_ops.experiments.plots --root runs/cpu_sweep --out docs/figures [--compare 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .sweep import aggregate, read_csv  # noqa: E402
from .train import run_dir_name  # noqa: E402

DPI = 90


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def read_metrics(run_dir: str) -> List[Dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(runs: Dict[str, str], path: str) -> str:
    """Train (dashed) and validation (solid) BPC vs step for each labelled run dir."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, d) in enumerate(runs.items()):
        m = read_metrics(d)
        steps = [r["step"] for r in m]
        color = f"C{i}"
        ax.plot(steps, [r["train_bpc"] for r in m], "--", color=color, alpha=0.7, label=f"{label} train")
        ax.plot(steps, [r["val_bpc"] for r in m], "-", color=color, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.set_title("Training curves: CE vs CE + barrier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_margin_curves(runs: Dict[str, str], path: str) -> str:
    """Mean (solid, log scale) and min (dashed) validation margin per layer vs step."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (label, d) in enumerate(runs.items()):
        m = read_metrics(d)
        steps = [r["step"] for r in m]
        for layer in range(len(m[0]["margin_mean"])):
            style = dict(color=f"C{i}", alpha=1.0 - 0.4 * layer)
            axes[0].plot(steps, [r["margin_mean"][layer] for r in m], "-", label=f"{label} layer {layer}", **style)
            axes[1].plot(steps, [r["margin_min"][layer] for r in m], "--", label=f"{label} layer {layer}", **style)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean margin (val)")
    axes[1].set_ylabel("min margin (val)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Stability margins during training")
    return _save(fig, path)


def _sigmas(rows: List[Dict]) -> List[str]:
    return sorted({k[len("ratio_sigma"):] for k in rows[0] if k.startswith("ratio_sigma")}, key=float)


def plot_noise(rows: List[Dict], path: str, lambdas: Optional[Sequence[float]] = None) -> str:
    """Noisy BPC and BPC(sigma)/BPC(0) vs sigma, mean +- std over seeds, one line per lambda."""
    sig = _sigmas(rows)
    keys = [f"bpc_sigma{s}" for s in sig] + [f"ratio_sigma{s}" for s in sig]
    agg = aggregate(rows, keys)
    if lambdas is not None:
        agg = [a for a in agg if any(abs(a["lambda"] - lam) < 1e-12 for lam in lambdas)]
    xs = [float(s) for s in sig]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, a in enumerate(agg):
        label = "CE" if a["lambda"] == 0 else f"barrier lambda={a['lambda']:g}"
        for ax, prefix in zip(axes, ("bpc_sigma", "ratio_sigma")):
            ax.errorbar(xs, [a[f"{prefix}{s}"] for s in sig], yerr=[a[f"{prefix}{s}_std"] for s in sig],
                        marker="o", ms=3, capsize=3, color=f"C{i}", label=f"{label} (n={a['n']})")
    axes[0].set_ylabel("BPC under embedding noise")
    axes[1].set_ylabel("BPC(sigma) / BPC(0)")
    for ax in axes:
        ax.set_xlabel("noise std sigma")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("Robustness to Gaussian token-embedding noise (error bars: std over seeds)")
    return _save(fig, path)


def plot_lambda_path(rows: List[Dict], path: str, sigma: str = "0.5") -> str:
    """Clean BPC and degradation at ``sigma`` vs lambda_m (lambda = 0 drawn at the left edge)."""
    agg = aggregate(rows, ["bpc", f"ratio_sigma{sigma}"])
    lams = [a["lambda"] for a in agg]
    pos = [lam if lam > 0 else min([x for x in lams if x > 0] or [1e-3]) / 3 for lam in lams]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, ylabel in ((axes[0], "bpc", "clean val BPC"),
                            (axes[1], f"ratio_sigma{sigma}", f"BPC(sigma={sigma}) / BPC(0)")):
        ax.errorbar(pos, [a[key] for a in agg], yerr=[a[key + "_std"] for a in agg], marker="o", capsize=3)
        ax.set_xscale("log")
        ax.set_xticks(pos)
        ax.set_xticklabels(["CE (0)" if lam == 0 else f"{lam:g}" for lam in lams], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("lambda_m")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle("Regularization path over lambda_m (mean +- std over seeds)")
    return _save(fig, path)


def plot_margins(runs: Dict[str, str], path: str) -> str:
    """Per-layer margin histograms (left) and support-token positions (right) for each run."""
    summaries = {}
    for label, d in runs.items():
        with open(os.path.join(d, "summary.json"), encoding="utf-8") as f:
            summaries[label] = json.load(f)
    n_layer = len(next(iter(summaries.values()))["margins"]["layers"])
    fig, axes = plt.subplots(n_layer, 2, figsize=(10, 2.6 * n_layer), squeeze=False)
    for i, (label, s) in enumerate(summaries.items()):
        for layer, st in enumerate(s["margins"]["layers"]):
            edges, counts = st["hist_edges"], st["hist_counts"]
            total = max(sum(counts), 1)
            ax = axes[layer][0]
            ax.stairs([c / total for c in counts], edges, color=f"C{i}", label=f"{label} (min {st['min']:.3f})")
            ax.set_title(f"layer {layer}: margin m = 1 - kappa", fontsize=9)
            ax.set_ylabel("fraction of tokens")
            ax.axvline(0.0, color="k", lw=0.8, ls=":")
            ax.legend(fontsize=7)
            pc = st["support_pos_counts"]
            ptotal = max(sum(pc), 1)
            ax2 = axes[layer][1]
            ax2.stairs([c / ptotal for c in pc], range(len(pc) + 1), color=f"C{i}",
                       label=f"{label} (mean pos {st['support_pos_mean']:.1f})")
            ax2.set_title(f"layer {layer}: support-token position (argmin margin per sequence)", fontsize=9)
            ax2.set_ylabel("fraction of sequences")
            ax2.legend(fontsize=7)
    axes[-1][0].set_xlabel("margin")
    axes[-1][1].set_xlabel("position in the context window")
    return _save(fig, path)


def make_all(root: str, out_dir: str, compare: float, seed: int = 0, csv_path: Optional[str] = None,
             prefix: str = "") -> List[str]:
    """All figures for a sweep (or demo) root; ``compare`` picks the barrier run shown against CE."""
    csv_path = csv_path or os.path.join(root, "results.csv")
    rows = read_csv(csv_path)
    ce_dir = os.path.join(root, run_dir_name(0.0, seed))
    bar_dir = os.path.join(root, run_dir_name(compare, seed))
    pair = {"CE": ce_dir, f"barrier lambda={compare:g}": bar_dir}
    paths = [
        plot_curves(pair, os.path.join(out_dir, f"{prefix}curves.png")),
        plot_noise(rows, os.path.join(out_dir, f"{prefix}noise.png")),
        plot_margins(pair, os.path.join(out_dir, f"{prefix}margins.png")),
        plot_margin_curves(pair, os.path.join(out_dir, f"{prefix}margin_curves.png")),
    ]
    if len({float(r["lambda"]) for r in rows}) > 2:
        paths.append(plot_lambda_path(rows, os.path.join(out_dir, f"{prefix}lambda_path.png")))
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="sweep or demo run directory")
    p.add_argument("--out", required=True, help="figure directory")
    p.add_argument("--csv", default=None)
    p.add_argument("--compare", type=float, default=0.05, help="barrier lambda shown against CE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="")
    args = p.parse_args(argv)
    for path in make_all(args.root, args.out, args.compare, args.seed, args.csv, args.prefix):
        print(path)


if __name__ == "__main__":
    main()
