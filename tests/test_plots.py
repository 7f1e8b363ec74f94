"""Figures and the demo's printed output: one colour per model, axes fitted to the data, captions,
no error bars promised for one seed, and a demo table that fits a 100-column terminal.

The figures are drawn from the committed sweep v2 results (benchmarks/results/chargpt/cpu_sweep_v2),
whose seed-0 runs of CE and m0 = 2 at lambda_m = 1 are the README demo's two runs.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT = os.path.join(ROOT, "benchmarks", "results", "chargpt", "cpu_sweep_v2")


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    from barrier_ops.experiments import plots

    return plots.runs_from_export(EXPORT, str(tmp_path_factory.mktemp("sweep_v2")))


@pytest.fixture
def figures(monkeypatch):
    """Every figure the plot functions save, as (path, Figure), kept open for inspection."""
    from barrier_ops.experiments import plots

    saved = []
    real_save = plots._save

    def keep(fig, path, caption=None, title=None):
        saved.append((os.path.basename(path), fig, caption, title))
        fig.canvas.draw()
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield saved
    monkeypatch.setattr(plots, "_save", real_save)
    import matplotlib.pyplot as plt

    plt.close("all")


def _rgba(c):
    from matplotlib.colors import to_rgba

    return to_rgba(c)


def _labelled_lines(fig):
    """(label, colour) of every labelled line and errorbar in the figure."""
    out = []
    for ax in fig.axes:
        for line in ax.get_lines():
            label = line.get_label()
            if not label.startswith("_"):
                out.append((label, _rgba(line.get_color())))
        for cont in ax.containers:
            label = cont.get_label()
            if label and not label.startswith("_") and hasattr(cont, "lines"):
                out.append((label, _rgba(cont.lines[0].get_color())))
        for patch in ax.patches:  # histogram stairs
            label = patch.get_label()
            if label and not label.startswith("_"):
                out.append((label, _rgba(patch.get_edgecolor())))
    return out


def test_one_colour_per_model_in_every_figure(sweep_root, figures):
    from barrier_ops.experiments import plots

    plots.make_all(sweep_root, "unused", 1.0, compare_target_margin=2.0,
                   noise_settings=[("ce", 0.0), ("paper", 0.05), ("target2", 1.0)],
                   margin_settings=[("paper", 0.05), ("target2", 1.0), ("target5", 1.0)])
    names = {name for name, *_ in figures}
    assert {"curves.png", "noise.png", "margins.png", "margin_curves.png", "lambda_path.png",
            "frontier.png", "margins_variants.png"} <= names
    expected = {"CE only": "k", "-log m": "C3", "m0 = 2": "C0", "m0 = 5": "C2"}
    seen = {k: 0 for k in expected}
    for name, fig, caption, title in figures:
        assert caption and title, f"{name}: every figure has a title and a caption"
        for label, colour in _labelled_lines(fig):
            for key, want in expected.items():
                if key in label or (key == "-log m" and "paper's barrier" in label) or (
                        key.startswith("m0") and f"target-margin barrier, {key}" in label):
                    assert colour == _rgba(want), f"{name}: {label!r} drawn in {colour}, expected {want}"
                    seen[key] += 1
    assert all(seen.values()), seen


def test_margin_histograms_fit_the_data_with_readable_ticks(sweep_root, figures):
    from barrier_ops.experiments import plots

    pair = {"CE only": os.path.join(sweep_root, "lam0_seed0"),
            plots.model_label("target2", 1.0): os.path.join(sweep_root, "tm2_lam1_seed0")}
    plots.plot_margins(pair, "margins.png")
    (_, fig, caption, _), = figures
    hist_axes = [ax for ax in fig.axes if ax.get_xscale() == "log"]
    assert len(hist_axes) == 2  # one per layer
    for ax in hist_axes:
        lo, hi = ax.get_xlim()
        assert 0.4 < lo < 1.0 and 3.0 < hi < 6.0, (lo, hi)  # the data lie in ~0.6..4 (not 1e-3..1e4)
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert len(ticks) >= 3 and len(labels) >= 3, labels
        assert all("10^" not in s and "$" not in s for s in labels), labels
    assert "exactly 1" in caption and "position 0" in caption.lower()


def test_nice_log_ticks():
    from barrier_ops.experiments.plots import _nice_log_ticks

    assert _nice_log_ticks(0.6, 4.0) == [0.7, 1.0, 1.5, 2.0, 3.0]
    wide = _nice_log_ticks(1e-3, 1e4)
    assert 3 <= len(wide) <= 9 and wide[0] >= 1e-3 and wide[-1] <= 1e4


def test_noise_with_one_seed_promises_no_error_bars(sweep_root, figures):
    from barrier_ops.experiments import plots
    from barrier_ops.experiments.sweep import read_csv

    rows = [r for r in read_csv(os.path.join(sweep_root, "results.csv")) if int(r["seed"]) == 0]
    plots.plot_noise(rows, "noise.png", groups=[("ce", 0.0), ("target2", 1.0)])
    plots.plot_noise(read_csv(os.path.join(sweep_root, "results.csv")), "noise3.png",
                     groups=[("ce", 0.0), ("target2", 1.0)])
    (_, one, cap1, title1), (_, three, cap3, _) = figures
    assert not any(ax.containers for ax in one.axes)
    assert "no error bars" in cap1 and "error bar" not in title1.lower()
    assert all(len(ax.containers) == 2 for ax in three.axes) and "std over the n seeds" in cap3
    legend = one.axes[0].get_legend()
    assert legend is not None and min(t.get_fontsize() for t in legend.get_texts()) >= 8


def test_margin_curves_say_what_the_minimum_at_one_is(sweep_root, figures):
    from barrier_ops.experiments import plots

    pair = {"CE only": os.path.join(sweep_root, "lam0_seed0"),
            plots.model_label("target2", 1.0): os.path.join(sweep_root, "tm2_lam1_seed0")}
    plots.plot_margin_curves(pair, "margin_curves.png")
    (_, fig, caption, _), = figures
    assert "Position 0 attends only to itself" in caption
    assert any("position 0" in t.get_text() for t in fig.axes[1].texts)
    for ax in fig.axes:  # linear axes fitted to margins in ~0.5..3: several labelled ticks
        lo, hi = ax.get_ylim()
        assert ax.get_yscale() == "linear" and len([t for t in ax.get_yticks() if lo <= t <= hi]) >= 4


def test_demo_output_fits_100_columns(tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    from test_experiments import _tiny_cfg

    from barrier_ops.experiments import demo

    cfg = _tiny_cfg(tmp_path).to_dict()
    cfg["train"]["lambda"] = cfg["train"].pop("lam")
    cfg["eval"]["sigmas"] = [0.0, 0.02, 0.05, 0.1, 0.2, 0.5]
    cfg["eval"]["rel_sigmas"] = [0.1, 0.25, 0.5, 1.0]
    cfg["sweep"]["grid"] = [{"variant": "ce", "lambdas": [0.0]},
                            {"variant": "target2", "target_margin": 2.0, "lambdas": [1.0]}]
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    root = tmp_path / "demo"
    demo.main(["--config", str(path), "--root", str(root), "--no-progress"])
    out = capsys.readouterr().out
    # As if run with the default --root runs/demo:
    lines = out.replace(str(root), os.path.join("runs", "demo")).splitlines()
    too_wide = [line for line in lines if len(line) > 100]
    assert not too_wide, "\n".join(too_wide)
    assert "| CE + barrier " in out and "change vs CE" in out and "support token at t = 0" in out
    bpc_rows = [line for line in lines if line.startswith("| CE only ")]
    assert len(bpc_rows) == 2  # the BPC table and the margin table
    assert all(not math.isnan(float(c)) for c in bpc_rows[0].strip("|").split("|")[1:])
