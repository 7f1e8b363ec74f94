"""How good is the trace margin? Compare it with the exact log-determinant on trained models.

    python -m barrier_ops.experiments.trace_vs_exact --runs runs/cpu_sweep_v2/lam0_seed0 \\
        runs/cpu_sweep_v2/lam0.05_seed0 [--windows 8] [--out-json FILE] [--figure FILE]

For every run (a directory with ``model.pt``) and every layer, on ``--windows``
fixed validation windows: the combined-heads trace margin ``m = 1 - sum_h kappa_h``
(``barrier_ops.attach`` with the exact coupling, i.e. what training regularises)
against the exact ``log|det(I - J_t)|`` of the query-path Jacobian
(:func:`barrier_ops.experiments.logdet.exact_logdet`, float64). The char GPT attends
with ``s <= t``, so J_t is the query-path part of the diagonal block (see logdet.py).
Reported per layer: Spearman correlation of log m and the exact log|det| over all
tokens (pooled) and its mean over windows, how often the support token (argmin of m
in a window) is the argmin of the exact log|det|, how often it is among the exact
3 smallest, the fractions of tokens with m <= 0 or det <= 0, and the median
|log m - log|det|| (where m > 0). The figure is a scatter of log m against the
exact log|det| per layer, with the first-order line y = x.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Sequence

import torch

import barrier_ops

from .config import from_dict
from .data import eval_batches
from .logdet import exact_logdet, spearman
from .model import CharGPT, measuring


def load_run(run_dir: str):
    # Tensors, dicts, lists and strings only: a pickle from a run directory must not be able to run code.
    ckpt = torch.load(os.path.join(run_dir, "model.pt"), map_location="cpu", weights_only=True)
    raw = dict(ckpt["config"])
    raw["train"] = dict(raw["train"])
    raw["train"]["lambda"] = raw["train"].pop("lam")
    cfg = from_dict(raw)
    model = CharGPT(len(ckpt["vocab"]), cfg.model)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg


def analyse_model(model: CharGPT, windows: torch.Tensor) -> Dict:
    """Per-layer trace margins, exact log-dets and the agreement statistics on ``windows`` ``[B, T]``."""
    inputs: List[torch.Tensor] = []
    hooks = [b.attn.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach()))
             for b in model.blocks]
    handle = barrier_ops.attach(model, weight=0.0, coupling="weights", combine_heads=True, causal=True)
    try:
        with torch.no_grad(), measuring(model):
            out = model(windows)
    finally:
        barrier_ops.detach(model)
        for h in hooks:
            h.remove()
    assert handle.coupling == "weights"
    layers = []
    for i, (block, x, m) in enumerate(zip(model.blocks, inputs, out.margins)):
        a = block.attn
        with torch.no_grad():
            r = exact_logdet(x, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, a.n_head, True)
        m = m.double()
        logdet = r["logabsdet"]
        layers.append(_agreement(m, logdet, r))
        layers[-1]["layer"] = i
        layers[-1]["op_vs_float64_trace_max_abs"] = float((m - r["trace_margin"]).abs().max())
        layers[-1]["points"] = {
            "log_m": torch.log(m.clamp(min=1e-12)).flatten().tolist(),
            "m_positive": (m > 0).flatten().tolist(),
            "logabsdet": logdet.flatten().tolist(),
        }
    return {"layers": layers}


def _agreement(m: torch.Tensor, logdet: torch.Tensor, r: Dict) -> Dict:
    B, T = m.shape
    pos = m > 0
    per_window = [spearman(m[b], logdet[b]) for b in range(B)]
    trace_arg = m.argmin(dim=1)
    exact_arg = logdet.argmin(dim=1)
    exact_top3 = logdet.topk(min(3, T), dim=1, largest=False).indices
    diff = (torch.log(m[pos]) - logdet[pos]).abs()
    # Position 0 attends only to itself (m = 1, log-det 0 exactly): a support token there agrees trivially.
    trace_arg1 = m[:, 1:].argmin(dim=1)
    exact_arg1 = logdet[:, 1:].argmin(dim=1)
    return {
        "tokens": B * T,
        "windows": B,
        "spearman_pooled": spearman(m.flatten(), logdet.flatten()),  # = Spearman of log m (monotone)
        "spearman_window_mean": sum(per_window) / B,
        "argmin_agree": float((trace_arg == exact_arg).double().mean()),
        "argmin_agree_excl_pos0": float((trace_arg1 == exact_arg1).double().mean()),
        "argmin_in_exact_top3": float((exact_top3 == trace_arg[:, None]).any(dim=1).double().mean()),
        "frac_m_nonpositive": float((~pos).double().mean()),
        "frac_det_nonpositive": float((r["sign"] <= 0).double().mean()),
        "median_abs_logm_minus_logdet": float(diff.median()) if diff.numel() else float("nan"),
        "m_min": float(m.min()),
        "m_median": float(m.median()),
        "logdet_min": float(logdet.min()),
        "support_pos_trace": trace_arg.tolist(),
        "support_pos_exact": exact_arg.tolist(),
    }


def run_analysis(run_dirs: Sequence[str], windows: int = 8, seed_offset: int = 0) -> Dict:
    from .train import get_data

    results = {}
    for run in run_dirs:
        model, cfg = load_run(run)
        data = get_data(cfg)
        x, _ = next(iter(eval_batches(data.val, 1, windows, cfg.model.block_size)))
        res = analyse_model(model, x)
        res.update({"run": run, "variant": cfg.variant, "lambda": cfg.train.lam, "seed": cfg.train.seed,
                    "target_margin": cfg.barrier.target_margin})
        results[os.path.basename(os.path.normpath(run))] = res
    return results


def format_table(results: Dict) -> str:
    lines = ["| run | variant | lambda | layer | Spearman (pooled) | Spearman (per window) | argmin agrees "
             "| argmin agrees, t >= 1 | argmin in exact 3 smallest | m <= 0 | det <= 0 "
             "| median abs(log m - log abs det) | min m | support at t = 0 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for L in res["layers"]:
            lines.append(
                f"| {name} | {res['variant']} | {res['lambda']:g} | {L['layer']} | {L['spearman_pooled']:.3f} | "
                f"{L['spearman_window_mean']:.3f} | {L['argmin_agree']:.2f} | {L['argmin_agree_excl_pos0']:.2f} | "
                f"{L['argmin_in_exact_top3']:.2f} | {L['frac_m_nonpositive']:.3f} | "
                f"{L['frac_det_nonpositive']:.3f} | {L['median_abs_logm_minus_logdet']:.3g} | {L['m_min']:.3g} | "
                f"{sum(1 for t in L['support_pos_trace'] if t == 0)}/{L['windows']} |")
    return "\n".join(lines)


def plot(results: Dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = max(len(r["layers"]) for r in results.values())
    names = list(results)
    fig, axes = plt.subplots(len(names), n_layers, figsize=(5.0 * n_layers, 3.9 * len(names)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ri, name in enumerate(names):
        res = results[name]
        for li, L in enumerate(res["layers"]):
            ax = axes[ri][li]
            pts = L["points"]
            xs = [a for a, ok in zip(pts["log_m"], pts["m_positive"]) if ok]
            ys = [b for b, ok in zip(pts["logabsdet"], pts["m_positive"]) if ok]
            ax.scatter(xs, ys, s=5, alpha=0.4, color=colors[ri % len(colors)],
                       label=f"tokens (m > 0: {len(xs)}/{len(pts['log_m'])})")
            if xs:
                lo, hi = min(min(xs), min(ys)), max(max(xs), max(ys))
                ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x (first-order agreement)")
            ax.set_title(f"{res['variant']} lambda={res['lambda']:g} ({name}), layer {li}\n"
                         f"Spearman {L['spearman_pooled']:.3f}; support token agrees "
                         f"{100 * L['argmin_agree']:.0f}% ({100 * L['argmin_agree_excl_pos0']:.0f}% for t >= 1)",
                         fontsize=8.5)
            ax.set_xlabel("log m (trace margin, what the barrier sees)", fontsize=8)
            ax.set_ylabel("exact log|det(I - J_t)| (query path)", fontsize=8)
            ax.legend(fontsize=7, markerscale=2, loc="upper left")
            ax.grid(alpha=0.3)
    fig.suptitle("How well the trace margin tracks the exact log-determinant (validation windows)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_size_inches()[1]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run directories with model.pt")
    p.add_argument("--windows", type=int, default=8, help="validation windows (of block_size characters)")
    p.add_argument("--out-json", default=None, help="statistics (without the per-token points)")
    p.add_argument("--figure", default=None, help="scatter plot PNG")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = run_analysis(args.runs, args.windows)
    table = format_table(results)
    print(table)
    if args.figure:
        print("wrote", plot(results, args.figure))
    if args.out_json:
        slim = {k: {**v, "layers": [{kk: vv for kk, vv in L.items() if kk != "points"} for L in v["layers"]]}
                for k, v in results.items()}
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
        with open(args.out_json, "w", encoding="utf-8") as f:
            json.dump({"table": table, "results": slim}, f, indent=1)
        print("wrote", args.out_json)


if __name__ == "__main__":
    main()
