"""Figures (matplotlib, Agg backend, PNG) from run directories and sweep CSVs.

    python -m barrier_ops.experiments.plots --root runs/cpu_sweep --out docs/figures [--compare 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import variant_name  # noqa: E402
from .sweep import aggregate, collect_all, read_csv, row_variant  # noqa: E402
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
    """Absolute noise levels present in the CSV (keys of ``bpc_sigma<key>``), sorted."""
    return sorted({k[len("ratio_sigma"):] for k in rows[0] if k.startswith("ratio_sigma") and "_r" not in k},
                  key=float)


def _rel_sigmas(rows: List[Dict]) -> List[str]:
    """Relative noise keys (``_r<r>``: sigma = r * embedding RMS), sorted by r."""
    return sorted({k[len("ratio_sigma"):] for k in rows[0] if k.startswith("ratio_sigma_r")},
                  key=lambda k: float(k[2:]))


def sigma_label(key: str, rows: Optional[List[Dict]] = None) -> str:
    """Human label of a noise key; absolute sigmas also shown as a multiple of the mean embedding RMS."""
    rms = _mean(rows, "emb_rms") if rows else None
    if key.startswith("_r"):
        return f"sigma = {key[2:]} x embedding RMS" + (f" (~{float(key[2:]) * rms:.3g})" if rms else "")
    return f"sigma = {key}" + (f" (~{float(key) / rms:.2g} x embedding RMS)" if rms else "")


def _mean(rows, key):
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return sum(vals) / len(vals) if vals else None


VARIANT_STYLE = {"ce": dict(color="k", marker="*", ms=12), "paper": dict(color="C3", marker="o"),
                 "target2": dict(color="C0", marker="s"), "target5": dict(color="C2", marker="^")}


def _style(variant: str, i: int = 0) -> Dict:
    return dict(VARIANT_STYLE.get(variant, dict(color=f"C{4 + i}", marker="D")))


def variant_label(variant: str) -> str:
    if variant == "ce":
        return "CE only"
    if variant == "paper":
        return "paper's barrier -log m"
    if variant.startswith("target"):
        return f"target-margin barrier, m0 = {variant[len('target'):]}"
    return variant


def _by_variant(agg: List[Dict]) -> Dict[str, List[Dict]]:
    out: Dict[str, List[Dict]] = {}
    for a in agg:
        out.setdefault(a["variant"], []).append(a)
    for v in out.values():
        v.sort(key=lambda a: a["lambda"])
    return out


def plot_frontier(rows: List[Dict], path: str, sigma_keys: Optional[Sequence[str]] = None,
                  max_clean_cost: Optional[float] = None) -> str:
    """Clean BPC (x) against noisy BPC (y), one panel per noise level, one curve per variant across lambda.

    Points are means over seeds with std error bars on both axes; CE is the black star with dotted
    guide lines. A variant is better only where its curve lies below (and left of) the other's.
    ``max_clean_cost``: leave out settings whose clean BPC is more than this fraction above CE's
    (a zoom on the settings of about equal clean accuracy; the title lists what was left out).
    """
    if sigma_keys is None:
        sigma_keys = [k for k in _sigmas(rows) if float(k) > 0] + _rel_sigmas(rows)
    keys = ["bpc"] + [f"bpc_sigma{k}" for k in sigma_keys]
    agg = aggregate(rows, keys)
    left_out = []
    ce = next((a for a in agg if a["variant"] == "ce"), None)
    if max_clean_cost is not None and ce is not None:
        limit = ce["bpc"] * (1 + max_clean_cost)
        left_out = [f"{a['variant']} {a['lambda']:g}" for a in agg if a["bpc"] > limit]
        agg = [a for a in agg if a["bpc"] <= limit]
    by_var = _by_variant(agg)
    n = len(sigma_keys)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    for i, key in enumerate(sigma_keys):
        ax = axes[i // cols][i % cols]
        yk = f"bpc_sigma{key}"
        for vi, (variant, pts) in enumerate(by_var.items()):
            st = _style(variant, vi)
            xs, ys = [a["bpc"] for a in pts], [a[yk] for a in pts]
            ax.errorbar(xs, ys, xerr=[a["bpc_std"] for a in pts], yerr=[a[yk + "_std"] for a in pts],
                        capsize=2, lw=1.2, label=f"{variant_label(variant)} (n={pts[0]['n']})", **st)
            if variant == "ce":
                ax.axhline(ys[0], color="k", lw=0.6, ls=":")
                ax.axvline(xs[0], color="k", lw=0.6, ls=":")
            else:
                for a in pts:
                    ax.annotate(f"{a['lambda']:g}", (a["bpc"], a[yk]), fontsize=7, color=st["color"],
                                xytext=(3, 3), textcoords="offset points")
        ax.set_title(sigma_label(key, rows), fontsize=9)
        ax.set_xlabel("clean validation BPC (lower = more accurate)", fontsize=8)
        ax.set_ylabel("BPC under embedding noise (lower = more robust)", fontsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    for j in range(n, nrows * cols):
        axes[j // cols][j % cols].axis("off")
    note = ""
    if max_clean_cost is not None:
        note = (f"\nZoom: settings within +{100 * max_clean_cost:g}% of CE's clean BPC"
                + (f" (left out: {', '.join(left_out)})" if left_out else ""))
    fig.suptitle("Accuracy-robustness frontier: each curve is one barrier across lambda_m (numbers = lambda_m), "
                 "mean +- std over seeds.\nA variant helps only if its curve passes below the CE star at about "
                 "the same clean BPC." + note, fontsize=9)
    return _save(fig, path)


def plot_noise(rows: List[Dict], path: str, lambdas: Optional[Sequence[float]] = None,
               groups: Optional[Sequence[Tuple[str, float]]] = None) -> str:
    """Noisy BPC and BPC(sigma)/BPC(0) vs sigma, mean +- std over seeds, one line per (variant, lambda)."""
    sig = _sigmas(rows)
    keys = [f"bpc_sigma{s}" for s in sig] + [f"ratio_sigma{s}" for s in sig]
    agg = aggregate(rows, keys)
    if lambdas is not None:
        agg = [a for a in agg if any(abs(a["lambda"] - lam) < 1e-12 for lam in lambdas)]
    if groups is not None:
        agg = [a for a in agg if any(a["variant"] == v and abs(a["lambda"] - lam) < 1e-12 for v, lam in groups)]
    xs = [float(s) for s in sig]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    seen: Dict[str, int] = {}
    for i, a in enumerate(agg):
        label = variant_label(a["variant"]) + ("" if a["lambda"] == 0 else f", lambda={a['lambda']:g}")
        st = _style(a["variant"], i)
        st["ms"] = 4
        repeat = seen.get(a["variant"], 0)  # the same variant at another lambda: dashed, then dotted
        seen[a["variant"]] = repeat + 1
        st["ls"] = ("-", "--", ":", "-.")[repeat % 4]
        for ax, prefix in zip(axes, ("bpc_sigma", "ratio_sigma")):
            ax.errorbar(xs, [a[f"{prefix}{s}"] for s in sig], yerr=[a[f"{prefix}{s}_std"] for s in sig],
                        capsize=3, label=f"{label} (n={a['n']})", **st)
    rms = _mean(rows, "emb_rms")
    axes[0].set_ylabel("BPC under embedding noise (lower is better)")
    axes[1].set_ylabel("BPC(sigma) / BPC(0)")
    for ax in axes:
        ax.set_xlabel("noise std sigma on the token embeddings" + (f" (their RMS ~{rms:.2g})" if rms else ""))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("Robustness to Gaussian token-embedding noise (error bars: std over seeds)")
    return _save(fig, path)


def plot_lambda_path(rows: List[Dict], path: str, sigma: str = "0.5", sigma_keys: Optional[Sequence[str]] = None
                     ) -> str:
    """Clean BPC and noisy BPC vs lambda_m, one line per variant (CE drawn at the left edge, dotted)."""
    if sigma_keys is None:
        preferred = [k for k in ("_r0.25", "_r1", "0.2") if f"bpc_sigma{k}" in rows[0]]
        if _rel_sigmas(rows) and preferred:
            sigma_keys = preferred
        else:
            sigma_keys = [sigma] if f"bpc_sigma{sigma}" in rows[0] else _sigmas(rows)[-1:]
    keys = ["bpc"] + [f"bpc_sigma{k}" for k in sigma_keys] + [f"ratio_sigma{k}" for k in sigma_keys]
    by_var = _by_variant(aggregate(rows, keys))
    panels = [("bpc", "clean validation BPC")] + [(f"bpc_sigma{k}", "BPC at " + sigma_label(k, rows))
                                                 for k in sigma_keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4), squeeze=False)
    for ax, (key, ylabel) in zip(axes[0], panels):
        for vi, (variant, pts) in enumerate(by_var.items()):
            st = _style(variant, vi)
            if variant == "ce":
                a = pts[0]
                ax.axhline(a[key], color="k", ls=":", lw=1, label="CE only")
                ax.axhspan(a[key] - a[key + "_std"], a[key] + a[key + "_std"], color="k", alpha=0.08)
                continue
            ax.errorbar([a["lambda"] for a in pts], [a[key] for a in pts], yerr=[a[key + "_std"] for a in pts],
                        capsize=3, label=variant_label(variant), **st)
        ax.set_xscale("log")
        ax.set_xlabel("lambda_m (barrier weight)")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Regularization path over lambda_m (mean +- std over seeds; CE: dotted line, std band)")
    return _save(fig, path)


def plot_margins(runs: Dict[str, str], path: str) -> str:
    """Per-layer margin histograms on a log axis (left) and support-token positions (right) for each run."""
    summaries = {}
    for label, d in runs.items():
        with open(os.path.join(d, "summary.json"), encoding="utf-8") as f:
            summaries[label] = json.load(f)
        recomputed = os.path.join(d, "margins.json")  # experiments.margins: adds the support token over t >= 1
        if os.path.isfile(recomputed):
            with open(recomputed, encoding="utf-8") as f:
                summaries[label]["margins"] = json.load(f)
    n_layer = len(next(iter(summaries.values()))["margins"]["layers"])
    fig, axes = plt.subplots(n_layer, 2, figsize=(12, 3.4 * n_layer), squeeze=False)
    top_by_layer: Dict[int, float] = {}
    ptop_by_layer: Dict[int, float] = {}
    for i, (label, s) in enumerate(summaries.items()):
        variant = s.get("variant") or ("ce" if float(s["lambda"]) == 0 else "paper")
        color = _style(variant, i)["color"]
        for layer, st in enumerate(s["margins"]["layers"]):
            edges, counts = st["hist_edges"], st["hist_counts"]
            total = max(sum(counts) + st.get("hist_below", 0) + st.get("hist_above", 0), 1)
            ax = axes[layer][0]
            extra = f", {100 * st['hist_below'] / total:.1f}% below 1e-3" if st.get("hist_below") else ""
            if st.get("hist_above"):
                extra += f", {100 * st['hist_above'] / total:.1f}% above 1e4"
            ax.stairs([c / total for c in counts], edges, color=color,
                      label=f"{label}: median {st['median']:.3g}, min {st['min']:.3g}{extra}")
            if "hist_below" in st:  # v2 summaries: fixed log-spaced bins
                ax.set_xscale("log")
            ax.axvline(1.0, color="k", lw=0.8, ls=":")
            m0 = s.get("target_margin")
            if m0:
                ax.axvline(float(m0), color=color, lw=0.8, ls="--")
            ax.set_title(f"layer {layer}: stability margin m = 1 - sum_h kappa_h of every token\n"
                         "(dotted: m = 1, CE models sit there; m -> 0: layer near-singular; dashed: target m0)",
                         fontsize=8)
            ax.set_ylabel("fraction of tokens")
            top_by_layer[layer] = max(top_by_layer.get(layer, 0.0), max(c / total for c in counts))
            ax.legend(fontsize=6.5, loc="upper left", framealpha=0.7)
            excl0 = "support_pos_excl0_counts" in st
            pc = st["support_pos_excl0_counts"] if excl0 else st["support_pos_counts"]
            ptotal = max(sum(pc), 1)
            ax2 = axes[layer][1]
            if excl0:
                text = (f"{label}: mean {st['support_pos_excl0_mean']:.1f} "
                        f"(over all t: at t = 0 in {100 * st['support_pos0_frac']:.0f}%)")
                title = (f"layer {layer}: where the support token (smallest margin of a window) sits among t >= 1\n"
                         "(t = 0 attends only to itself: its margin is 1 exactly)")
            else:
                text = f"{label} (mean position {st['support_pos_mean']:.1f})"
                title = f"layer {layer}: where the support token (smallest margin of a window) sits"
            ax2.stairs([c / ptotal for c in pc], range(len(pc) + 1), color=color, label=text)
            ax2.set_title(title, fontsize=8)
            ax2.set_ylabel("fraction of windows")
            ptop_by_layer[layer] = max(ptop_by_layer.get(layer, 0.0), max(c / ptotal for c in pc))
            ax2.legend(fontsize=6.5, loc="upper right", framealpha=0.7)
    grow = 1.25 + 0.13 * len(summaries)  # room for the legends above the bars
    for layer in range(n_layer):
        axes[layer][0].set_ylim(0, grow * top_by_layer.get(layer, 1.0))
        axes[layer][1].set_ylim(0, grow * ptop_by_layer.get(layer, 1.0))
    axes[-1][0].set_xlabel("margin m (log scale)")
    axes[-1][1].set_xlabel("position in the context window")
    return _save(fig, path)


def make_all(root: str, out_dir: str, compare: float, seed: int = 0, csv_path: Optional[str] = None,
             prefix: str = "", compare_target_margin: Optional[float] = None) -> List[str]:
    """All figures for a sweep (or demo) root; ``compare`` (and its target margin) picks the barrier run vs CE."""
    csv_path = csv_path or os.path.join(root, "results.csv")
    if os.path.isfile(csv_path):
        rows = read_csv(csv_path)
    else:  # mid-sweep: the sweep writes its CSV at the end; read the finished runs' summaries
        rows = collect_all(root)
    ce_dir = os.path.join(root, run_dir_name(0.0, seed))
    bar_dir = os.path.join(root, run_dir_name(compare, seed, compare_target_margin))
    bar_label = variant_label(variant_name(compare, compare_target_margin)) + f", lambda={compare:g}"
    pair = {"CE only": ce_dir, bar_label: bar_dir}
    paths = [
        plot_curves(pair, os.path.join(out_dir, f"{prefix}curves.png")),
        plot_noise(rows, os.path.join(out_dir, f"{prefix}noise.png")),
        plot_margins(pair, os.path.join(out_dir, f"{prefix}margins.png")),
        plot_margin_curves(pair, os.path.join(out_dir, f"{prefix}margin_curves.png")),
    ]
    if len({(row_variant(r), float(r["lambda"])) for r in rows}) > 2:
        paths.append(plot_lambda_path(rows, os.path.join(out_dir, f"{prefix}lambda_path.png")))
        paths.append(plot_frontier(rows, os.path.join(out_dir, f"{prefix}frontier.png")))
        paths.append(plot_frontier(rows, os.path.join(out_dir, f"{prefix}frontier_zoom.png"), max_clean_cost=0.03))
        # every variant at the compared lambda (when that run exists), margins side by side
        variants = {"CE only": ce_dir}
        for r in rows:
            v = row_variant(r)
            if v != "ce" and abs(float(r["lambda"]) - compare) < 1e-12 and int(r["seed"]) == seed:
                m0 = r.get("target_margin")
                m0 = None if m0 in (None, "") else float(m0)
                variants[variant_label(v) + f", lambda={compare:g}"] = os.path.join(
                    root, run_dir_name(compare, seed, m0))
        if len(variants) > 2:
            paths.append(plot_margins(variants, os.path.join(out_dir, f"{prefix}margins_variants.png")))
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="sweep or demo run directory")
    p.add_argument("--out", required=True, help="figure directory")
    p.add_argument("--csv", default=None)
    p.add_argument("--compare", type=float, default=0.05, help="barrier lambda shown against CE")
    p.add_argument("--compare-target-margin", type=float, default=None,
                   help="target margin m0 of the barrier run shown against CE (default: the paper's barrier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="")
    args = p.parse_args(argv)
    for path in make_all(args.root, args.out, args.compare, args.seed, args.csv, args.prefix,
                         args.compare_target_margin):
        print(path)


if __name__ == "__main__":
    main()
