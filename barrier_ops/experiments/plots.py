"""Figures (matplotlib, Agg backend, PNG) from run directories and sweep CSVs.

    python -m barrier_ops.experiments.plots --root runs/cpu_sweep --out docs/figures [--compare 0.05]
    python -m barrier_ops.experiments.plots --export benchmarks/results/chargpt/cpu_sweep_v2 --out docs/figures \
        --prefix sweep_v2_ --compare 1 --compare-target-margin 2 \
        --noise-settings ce:0,paper:0.02,paper:0.05,target2:1,target5:0.1 \
        --margin-settings paper:0.05,target2:1,target5:1

Every figure has a one-line title and a caption that says what to look at; each model keeps its
colour in every figure (CE black, the paper's barrier red, target margin m0 = 2 blue, m0 = 5 green).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import tempfile
import textwrap
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402

from .config import variant_name  # noqa: E402
from .sweep import aggregate, collect_all, read_csv, row_variant  # noqa: E402
from .train import run_dir_name  # noqa: E402

DPI = 90
TITLE_SIZE = 11
LABEL_SIZE = 10
LEGEND_SIZE = 8.5
CAPTION_SIZE = 9.5

# One colour per model in every figure: CE black, each barrier variant its own colour.
VARIANT_STYLE = {"ce": dict(color="k", marker="*", ms=12), "paper": dict(color="C3", marker="o"),
                 "target2": dict(color="C0", marker="s"), "target5": dict(color="C2", marker="^")}
_OTHER_COLORS = ("C4", "C1", "C5", "C6", "C8", "C9")
LAYER_STYLES = ("-", "--", ":", "-.")


def _style(variant: str, i: int = 0) -> Dict:
    """Colour and marker of a variant; a variant not listed gets a colour from its name (the same in every figure)."""
    if variant in VARIANT_STYLE:
        return dict(VARIANT_STYLE[variant])
    return dict(color=_OTHER_COLORS[zlib.crc32(variant.encode()) % len(_OTHER_COLORS)], marker="D")


def variant_color(variant: str) -> str:
    return _style(variant)["color"]


def run_variant(run_dir: str) -> str:
    """The variant of a run directory: from its summary.json, else from its name (lam0_*, lam<l>_*, tm<m0>_*)."""
    path = os.path.join(run_dir, "summary.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            s = json.load(f)
        return s.get("variant") or ("ce" if float(s["lambda"]) == 0 else "paper")
    name = os.path.basename(os.path.normpath(run_dir))
    if name.startswith("lam0_"):
        return "ce"
    if name.startswith("tm"):
        return "target" + name[2:].split("_", 1)[0]
    return "paper"


def _caption_height(text: str, width: int) -> Tuple[str, float]:
    wrapped = "\n".join(textwrap.fill(par, width) for par in text.split("\n"))
    return wrapped, (wrapped.count("\n") + 1) * CAPTION_SIZE * 1.45 / 72 + 0.15


def _save(fig, path: str, caption: Optional[str] = None, title: Optional[str] = None) -> str:
    """Save with a bold one-line title on top and a caption (what to look at) below the panels.

    The figure grows by the caption's height, so the panels keep their size.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    w, h = fig.get_size_inches()
    top_in = 0.35 if title else 0.0
    cap, cap_in = _caption_height(caption, int(w * 12.8)) if caption else ("", 0.0)
    fig.set_size_inches(w, h + top_in + cap_in)
    H = h + top_in + cap_in
    if title:
        fig.suptitle(title, fontsize=TITLE_SIZE + 1, fontweight="bold", y=1 - 0.12 / H, va="top")
    if caption:
        fig.text(0.012, 0.08 / H, cap, fontsize=CAPTION_SIZE, ha="left", va="bottom", color="0.15")
    fig.tight_layout(rect=(0, cap_in / H, 1, 1))  # tight_layout makes room for the suptitle itself
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _nice_log_ticks(lo: float, hi: float) -> List[float]:
    """Readable ticks for a log axis over [lo, hi]: 1-2-5 steps over a few decades, decades over many."""
    e0, e1 = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    for mants in ((1.0, 1.5, 2.0, 3.0, 5.0, 7.0), (1.0, 2.0, 5.0), (1.0,)):
        ticks = [float(f"{m * 10.0 ** e:.6g}") for e in range(e0, e1 + 1) for m in mants
                 if lo <= m * 10.0 ** e <= hi]
        if len(ticks) <= 9:
            break
    if len(ticks) > 9:
        ticks = ticks[:: math.ceil(len(ticks) / 8)]
    return ticks


def _log_axis(ax, lo: float, hi: float, which: str = "x", pad: float = 1.25) -> None:
    """Log scale fitted to [lo, hi] (with a margin), labelled with plain numbers."""
    lo, hi = lo / pad, hi * pad
    getattr(ax, f"set_{which}scale")("log")
    getattr(ax, f"set_{which}lim")(lo, hi)
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(mticker.FixedLocator(_nice_log_ticks(lo, hi)))
    axis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(mticker.NullFormatter())


def _fit_axis(ax, values: Sequence[float], which: str = "y") -> None:
    """Linear axis unless the positive values span more than a factor 20 (then a labelled log axis)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if vals and min(vals) > 0 and max(vals) / min(vals) > 20:
        _log_axis(ax, min(vals), max(vals), which, pad=1.15)


def read_metrics(run_dir: str) -> List[Dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(runs: Dict[str, str], path: str) -> str:
    """Train (dashed) and validation (solid) BPC vs step for each labelled run dir."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, d in runs.items():
        m = read_metrics(d)
        steps = [r["step"] for r in m]
        color = variant_color(run_variant(d))
        ax.plot(steps, [r["train_bpc"] for r in m], "--", color=color, alpha=0.75, label=f"{label}: train")
        ax.plot(steps, [r["val_bpc"] for r in m], "-", color=color, lw=1.8, label=f"{label}: validation")
    ax.set_xlabel("training step", fontsize=LABEL_SIZE)
    ax.set_ylabel("bits per character (lower is better)", fontsize=LABEL_SIZE)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=LEGEND_SIZE)
    return _save(fig, path, title="Training curves",
                 caption="Look at the end of the solid lines: the gap between them is what the barrier costs (or "
                         "saves) in clean accuracy (the final evaluation, on more batches, is in the table). "
                         "Dashed: the training batches.")


def plot_margin_curves(runs: Dict[str, str], path: str) -> str:
    """Mean (left) and minimum (right) validation margin per layer vs step; colour = model, line style = layer."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    means, mins = [], []
    for label, d in runs.items():
        m = read_metrics(d)
        steps = [r["step"] for r in m]
        color = variant_color(run_variant(d))
        for layer in range(len(m[0]["margin_mean"])):
            ls = LAYER_STYLES[layer % len(LAYER_STYLES)]
            mean = [r["margin_mean"][layer] for r in m]
            low = [r["margin_min"][layer] for r in m]
            means += mean
            mins += low
            axes[0].plot(steps, mean, ls, color=color, label=f"{label}, layer {layer}")
            axes[1].plot(steps, low, ls, color=color, label=f"{label}, layer {layer}")
    axes[1].axhline(1.0, color="0.4", lw=0.8, ls=":")
    axes[1].annotate("m = 1: position 0", (0.99, 1.0), xycoords=("axes fraction", "data"), ha="right",
                     va="bottom", fontsize=LEGEND_SIZE, color="0.3")
    _fit_axis(axes[0], means)
    _fit_axis(axes[1], mins)
    axes[0].set_ylabel("mean margin of the validation tokens", fontsize=LABEL_SIZE)
    axes[1].set_ylabel("smallest margin of the validation tokens", fontsize=LABEL_SIZE)
    for ax in axes:
        ax.set_xlabel("training step", fontsize=LABEL_SIZE)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=LEGEND_SIZE)
    return _save(fig, path, title="Stability margins during training (colour: model; line style: layer)",
                 caption="Left: a barrier lifts the mean margin away from the CE model's ~1. Right: the smallest "
                         "margin at each periodic evaluation, position 0 included. Position 0 attends only to "
                         "itself, so its margin is exactly 1: a line flat at 1.0 means every other token's margin "
                         "is above 1 (the table's minimum, from the larger final evaluation, can be lower).")


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


def model_label(variant: str, lam: float) -> str:
    """Short legend name of a model: "CE only", "CE + 1 x barrier m0 = 2", "CE + 0.05 x -log m barrier"."""
    if variant == "ce" or lam == 0:
        return "CE only"
    if variant == "paper":
        return f"CE + {lam:g} x -log m barrier"
    if variant.startswith("target"):
        return f"CE + {lam:g} x barrier m0 = {variant[len('target'):]}"
    return f"CE + {lam:g} x {variant}"


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
                    ax.annotate(f"{a['lambda']:g}", (a["bpc"], a[yk]), fontsize=8, color=st["color"],
                                xytext=(3, 3), textcoords="offset points")
        ax.set_title(sigma_label(key, rows), fontsize=LABEL_SIZE)
        ax.set_xlabel("clean validation BPC (lower = more accurate)", fontsize=LABEL_SIZE - 1)
        ax.set_ylabel("BPC under noise (lower = more robust)", fontsize=LABEL_SIZE - 1)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=LEGEND_SIZE, loc="best", framealpha=0.8)
    for j in range(n, nrows * cols):
        axes[j // cols][j % cols].axis("off")
    note = ""
    if max_clean_cost is not None:
        note = (f" Zoom: settings within +{100 * max_clean_cost:g}% of CE's clean BPC"
                + (f" (left out: {', '.join(left_out)})." if left_out else "."))
    return _save(fig, path, title="Accuracy-robustness frontier, one panel per noise level",
                 caption="Each curve is one barrier across lambda_m (the numbers), mean +- std over seeds on both "
                         "axes; the dotted lines cross at CE. Lower-left is better: a barrier helps only where its "
                         "curve passes below the CE star at about the same clean BPC (x)." + note)


def plot_noise(rows: List[Dict], path: str, lambdas: Optional[Sequence[float]] = None,
               groups: Optional[Sequence[Tuple[str, float]]] = None) -> str:
    """Noisy BPC and BPC(sigma)/BPC(0) vs sigma, one line per (variant, lambda); error bars (std over seeds)
    only where there is more than one seed."""
    sig = _sigmas(rows)
    keys = [f"bpc_sigma{s}" for s in sig] + [f"ratio_sigma{s}" for s in sig]
    agg = aggregate(rows, keys)
    if lambdas is not None:
        agg = [a for a in agg if any(abs(a["lambda"] - lam) < 1e-12 for lam in lambdas)]
    if groups is not None:
        agg = [a for a in agg if any(a["variant"] == v and abs(a["lambda"] - lam) < 1e-12 for v, lam in groups)]
    xs = [float(s) for s in sig]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    seen: Dict[str, int] = {}
    seeds = sorted({a["n"] for a in agg})
    for i, a in enumerate(agg):
        label = model_label(a["variant"], a["lambda"])
        if seeds != [1]:
            label += f" (n={a['n']})"
        st = _style(a["variant"], i)
        st["ms"] = 9 if a["variant"] == "ce" else 5
        repeat = seen.get(a["variant"], 0)  # the same variant at another lambda: dashed, then dotted
        seen[a["variant"]] = repeat + 1
        st["ls"] = LAYER_STYLES[repeat % len(LAYER_STYLES)]
        for ax, prefix in zip(axes, ("bpc_sigma", "ratio_sigma")):
            ys = [a[f"{prefix}{s}"] for s in sig]
            if a["n"] > 1:
                ax.errorbar(xs, ys, yerr=[a[f"{prefix}{s}_std"] for s in sig], capsize=3, label=label, **st)
            else:
                ax.plot(xs, ys, label=label, **st)
    rms = _mean(rows, "emb_rms")
    axes[0].set_ylabel("BPC under embedding noise (lower is better)", fontsize=LABEL_SIZE)
    axes[1].set_ylabel("BPC(sigma) / BPC(0)", fontsize=LABEL_SIZE)
    for ax in axes:
        ax.set_xlabel("noise std sigma on the token embeddings" + (f" (their RMS ~{rms:.2g})" if rms else ""),
                      fontsize=LABEL_SIZE)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=LEGEND_SIZE, loc="lower right")
    spread = ("One seed per setting, so no error bars: the seed-to-seed spread is not shown"
              if seeds == [1] else "Error bars: std over the n seeds of each setting")
    return _save(fig, path, title="Robustness to Gaussian noise on the token embeddings",
                 caption="Gaussian noise of std sigma is added to every token embedding at evaluation (averaged "
                         "over draws). Look at the gap between the lines at a given sigma: the lower line is the "
                         "more robust model. Right: the same relative to each model's clean BPC (sigma = 0). "
                         + spread + ".")


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
        lams = [a["lambda"] for v, pts in by_var.items() if v != "ce" for a in pts]
        if lams:
            _log_axis(ax, min(lams), max(lams), "x", pad=1.4)
        ax.set_xlabel("lambda_m (barrier weight)", fontsize=LABEL_SIZE)
        ax.set_ylabel(ylabel, fontsize=LABEL_SIZE - 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=LEGEND_SIZE)
    return _save(fig, path, title="Regularization path over lambda_m",
                 caption="Mean +- std over seeds per barrier; CE is the dotted line with its std band. Left: what "
                         "each weight costs in clean BPC. Right: BPC under noise; below the band is more robust "
                         "than CE.")


def plot_margins(runs: Dict[str, str], path: str) -> str:
    """Per-layer margin histograms (left, log axis fitted to the data) and support-token positions (right)."""
    summaries = {}
    for label, d in runs.items():
        with open(os.path.join(d, "summary.json"), encoding="utf-8") as f:
            summaries[label] = json.load(f)
        recomputed = os.path.join(d, "margins.json")  # experiments.margins: adds the support token over t >= 1
        if os.path.isfile(recomputed):
            with open(recomputed, encoding="utf-8") as f:
                summaries[label]["margins"] = json.load(f)
    n_layer = len(next(iter(summaries.values()))["margins"]["layers"])
    fig, axes = plt.subplots(n_layer, 2, figsize=(13, 3.6 * n_layer), squeeze=False)
    top_by_layer: Dict[int, float] = {}
    ptop_by_layer: Dict[int, float] = {}
    range_by_layer: Dict[int, List[float]] = {}
    log_bins = False
    any_excl0 = False
    for i, (label, s) in enumerate(summaries.items()):
        variant = s.get("variant") or ("ce" if float(s["lambda"]) == 0 else "paper")
        color = _style(variant, i)["color"]
        m0 = s.get("target_margin")
        for layer, st in enumerate(s["margins"]["layers"]):
            edges, counts = st["hist_edges"], st["hist_counts"]
            below, above = st.get("hist_below", 0), st.get("hist_above", 0)
            total = max(sum(counts) + below + above, 1)
            ax = axes[layer][0]
            extra = ""
            if below:
                extra += f", {100 * below / total:.1f}% below {edges[0]:g}"
            if above:
                extra += f", {100 * above / total:.1f}% above {edges[-1]:g}"
            ax.stairs([c / total for c in counts], edges, color=color, lw=1.6,
                      label=f"{label}: median {st['median']:.3g}, min {st['min']:.3g}{extra}")
            log_bins = log_bins or "hist_below" in st  # v2 summaries: fixed log-spaced bins
            nonzero = [j for j, c in enumerate(counts) if c]
            if nonzero:
                rng = range_by_layer.setdefault(layer, [math.inf, -math.inf])
                rng[0] = min(rng[0], edges[nonzero[0]], st["min"] if st["min"] > 0 else math.inf)
                rng[1] = max(rng[1], edges[nonzero[-1] + 1], float(m0) if m0 else 0.0)
            if m0:
                ax.axvline(float(m0), color=color, lw=1.0, ls="--")
            ax.axvline(1.0, color="0.4", lw=0.8, ls=":")
            ax.set_title(f"layer {layer}: margin m of every validation token", fontsize=LABEL_SIZE)
            ax.set_ylabel("fraction of tokens", fontsize=LABEL_SIZE)
            top_by_layer[layer] = max(top_by_layer.get(layer, 0.0), max(c / total for c in counts))
            ax.legend(fontsize=LEGEND_SIZE, loc="upper left", framealpha=0.8)
            excl0 = "support_pos_excl0_counts" in st
            any_excl0 = any_excl0 or excl0
            pc = st["support_pos_excl0_counts"] if excl0 else st["support_pos_counts"]
            ptotal = max(sum(pc), 1)
            ax2 = axes[layer][1]
            if excl0:
                text = (f"{label}: mean t {st['support_pos_excl0_mean']:.1f}; "
                        f"t = 0 lowest in {100 * st['support_pos0_frac']:.0f}%")
                title = f"layer {layer}: position of the support token among t >= 1"
            else:
                text = f"{label}: mean t {st['support_pos_mean']:.1f}"
                title = f"layer {layer}: position of the support token"
            ax2.stairs([c / ptotal for c in pc], range(len(pc) + 1), color=color, lw=1.6, label=text)
            ax2.set_title(title, fontsize=LABEL_SIZE)
            ax2.set_ylabel("fraction of windows", fontsize=LABEL_SIZE)
            ax2.set_xlim(0, len(pc))
            ptop_by_layer[layer] = max(ptop_by_layer.get(layer, 0.0), max(c / ptotal for c in pc))
            ax2.legend(fontsize=LEGEND_SIZE, loc="upper right", framealpha=0.8)
    grow = 1.2 + 0.14 * len(summaries)  # room for the legends above the bars
    for layer in range(n_layer):
        axes[layer][0].set_ylim(0, grow * top_by_layer.get(layer, 1.0))
        axes[layer][1].set_ylim(0, grow * ptop_by_layer.get(layer, 1.0))
        lo, hi = range_by_layer.get(layer, [0.5, 2.0])
        if log_bins:
            _log_axis(axes[layer][0], min(lo, 1.0), max(hi, 1.0), "x", pad=1.1)
    axes[-1][0].set_xlabel("margin m = 1 - sum_h kappa_h" + (" (log scale)" if log_bins else ""),
                           fontsize=LABEL_SIZE)
    axes[-1][1].set_xlabel("position t in the context window", fontsize=LABEL_SIZE)
    m0_note = " Dashed: a model's target margin m0, above which its barrier costs nothing." if any(
        s.get("target_margin") for s in summaries.values()) else ""
    pos0_note = (" Position 0 attends only to itself, so its margin is exactly 1; the right panels leave it out, "
                 "and their legends say in what share of windows it would be the smallest (all of them once "
                 "every other margin is above 1).") if any_excl0 else ""
    return _save(fig, path, title="Where the margins sit, and which token is closest to the boundary",
                 caption="Left: m -> 0 means the attention layer is near-singular for that token; dotted: m = 1, "
                         "where a CE model's margins sit." + m0_note + " Right: the support token is each window's "
                         "smallest margin; look at whether it sits at the start of the window or anywhere."
                         + pos0_note)


def runs_from_export(export_dir: str, dest: str) -> str:
    """Rebuild run directories (metrics.jsonl, summary.json with the margin statistics) and results.csv under
    ``dest`` from a sweep exported into the repository (``experiments.export``: results.csv, metrics.jsonl,
    margins.jsonl), so the committed figures can be redrawn without the original run directories."""
    with open(os.path.join(export_dir, "results.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(export_dir, "metrics.jsonl"), encoding="utf-8") as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(export_dir, "margins.jsonl"), encoding="utf-8") as f:
        margins = [json.loads(line) for line in f if line.strip()]

    def key(variant, lam, seed):
        return str(variant), float(lam), int(seed)

    by_key = {key(row_variant(r), r["lambda"], r["seed"]): r for r in rows}
    for m in margins:
        k = key(m["variant"], m["lambda"], m["seed"])
        row = by_key[k]
        run = os.path.join(dest, m["run"])
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "metrics.jsonl"), "w", encoding="utf-8") as f:
            for x in metrics:
                if key(x["variant"], x["lambda"], x["seed"]) == k:
                    f.write(json.dumps({n: v for n, v in x.items() if n != "variant"}) + "\n")
        m0 = row.get("target_margin")
        summary = {"lambda": k[1], "seed": k[2], "variant": k[0], "emb_rms": m.get("emb_rms"),
                   "target_margin": None if m0 in (None, "") else float(m0), "margins": {"layers": m["layers"]}}
        with open(os.path.join(run, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f)
    with open(os.path.join(dest, "results.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dest


def _setting_dir(root: str, variant: str, lam: float, seed: int) -> str:
    m0 = float(variant[len("target"):]) if variant.startswith("target") else None
    return os.path.join(root, run_dir_name(0.0 if variant == "ce" else lam, seed, m0))


def make_all(root: str, out_dir: str, compare: float, seed: int = 0, csv_path: Optional[str] = None,
             prefix: str = "", compare_target_margin: Optional[float] = None,
             noise_settings: Optional[Sequence[Tuple[str, float]]] = None,
             margin_settings: Optional[Sequence[Tuple[str, float]]] = None) -> List[str]:
    """All figures for a sweep (or demo) root; ``compare`` (and its target margin) picks the barrier run vs CE.

    ``noise_settings``: the (variant, lambda) lines of noise.png (default: every setting). ``margin_settings``:
    the barrier runs drawn next to CE in margins_variants.png (default: every variant at ``compare``).
    """
    csv_path = csv_path or os.path.join(root, "results.csv")
    if os.path.isfile(csv_path):
        rows = read_csv(csv_path)
    else:  # mid-sweep: the sweep writes its CSV at the end; read the finished runs' summaries
        rows = collect_all(root)
    ce_dir = os.path.join(root, run_dir_name(0.0, seed))
    bar_dir = os.path.join(root, run_dir_name(compare, seed, compare_target_margin))
    pair = {"CE only": ce_dir, model_label(variant_name(compare, compare_target_margin), compare): bar_dir}
    paths = [
        plot_curves(pair, os.path.join(out_dir, f"{prefix}curves.png")),
        plot_noise(rows, os.path.join(out_dir, f"{prefix}noise.png"), groups=noise_settings),
        plot_margins(pair, os.path.join(out_dir, f"{prefix}margins.png")),
        plot_margin_curves(pair, os.path.join(out_dir, f"{prefix}margin_curves.png")),
    ]
    if len({(row_variant(r), float(r["lambda"])) for r in rows}) > 2:
        paths.append(plot_lambda_path(rows, os.path.join(out_dir, f"{prefix}lambda_path.png")))
        paths.append(plot_frontier(rows, os.path.join(out_dir, f"{prefix}frontier.png")))
        paths.append(plot_frontier(rows, os.path.join(out_dir, f"{prefix}frontier_zoom.png"), max_clean_cost=0.03))
        if margin_settings is None:  # every variant at the compared lambda (when that run exists)
            margin_settings = [(row_variant(r), compare) for r in rows if row_variant(r) != "ce"
                               and abs(float(r["lambda"]) - compare) < 1e-12 and int(r["seed"]) == seed]
        variants = {"CE only": ce_dir}
        for v, lam in margin_settings:
            variants[model_label(v, lam)] = _setting_dir(root, v, lam, seed)
        if len(variants) > 2:
            paths.append(plot_margins(variants, os.path.join(out_dir, f"{prefix}margins_variants.png")))
    return paths


def _parse_settings(text: Optional[str]) -> Optional[List[Tuple[str, float]]]:
    """"ce:0,paper:0.02,target2:1" -> [("ce", 0.0), ("paper", 0.02), ("target2", 1.0)]."""
    if not text:
        return None
    out = []
    for item in text.split(","):
        variant, sep, lam = item.strip().partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected variant:lambda items (e.g. paper:0.02), got {item!r}")
        out.append((variant, float(lam)))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", help="sweep or demo run directory")
    src.add_argument("--export", help="a sweep exported into the repository (benchmarks/results/chargpt/...): "
                                      "its run directories are rebuilt in a temporary directory first")
    p.add_argument("--out", required=True, help="figure directory")
    p.add_argument("--csv", default=None)
    p.add_argument("--compare", type=float, default=0.05, help="barrier lambda shown against CE")
    p.add_argument("--compare-target-margin", type=float, default=None,
                   help="target margin m0 of the barrier run shown against CE (default: the paper's barrier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="")
    p.add_argument("--noise-settings", type=_parse_settings, default=None,
                   help="variant:lambda,... drawn in noise.png (default: all), e.g. ce:0,paper:0.02,target2:1")
    p.add_argument("--margin-settings", type=_parse_settings, default=None,
                   help="variant:lambda,... drawn next to CE in margins_variants.png (default: all at --compare)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = runs_from_export(args.export, tmp) if args.export else args.root
        for path in make_all(root, args.out, args.compare, args.seed, args.csv, args.prefix,
                             args.compare_target_margin, args.noise_settings, args.margin_settings):
            print(path)


if __name__ == "__main__":
    main()
