"""README demo: train one CE and one barrier char-GPT briefly, evaluate clean and noisy BPC, plot.

    python -m barrier_ops.experiments.demo [--config configs/chargpt/cpu_demo.yaml] [--data PATH]
                                           [--root runs/demo] [--figures runs/demo/figures]

About 5 minutes on 2 free CPU cores with the default config (built-in KJV corpus:
``apt-get install -y bible-kjv``). Re-running reuses finished runs.
"""

from __future__ import annotations

import argparse
import os

from .config import load_config
from .plots import make_all
from .sweep import read_csv, run_sweep

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "chargpt", "cpu_demo.yaml")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.normpath(_DEFAULT_CONFIG))
    p.add_argument("--data", default=None)
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="barrier lambda_m (default: the config's largest sweep lambda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--root", default=os.path.join("runs", "demo"))
    p.add_argument("--figures", default=None, help="figure dir (default <root>/figures)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = load_config(args.config, {"data.path": args.data, "train.steps": args.steps})
    lam = args.lam if args.lam is not None else max(cfg.sweep.lambdas)
    if lam <= 0:
        raise ValueError(f"--lambda must be > 0 for the barrier model, got {lam}")
    run_sweep(cfg, args.root, [0.0, lam], [args.seed], progress=not args.no_progress)
    rows = read_csv(os.path.join(args.root, "results.csv"))
    sigmas = sorted({k[len("ratio_sigma"):] for k in rows[0] if k.startswith("ratio_sigma")}, key=float)
    print()
    print("| model | val BPC | " + " | ".join(f"BPC s={s}" for s in sigmas) + " | BPC(0.5)/BPC(0) | min margin |")
    print("|---|---|" + "---|" * len(sigmas) + "---|---|")
    for r in rows:
        name = "CE" if float(r["lambda"]) == 0 else f"CE + {float(r['lambda']):g} * barrier"
        mins = min(float(v) for k, v in r.items() if k.startswith("margin_min_l"))
        print(f"| {name} | {float(r['bpc']):.4f} | " + " | ".join(f"{float(r['bpc_sigma' + s]):.3f}" for s in sigmas)
              + f" | {float(r.get('ratio_sigma0.5', float('nan'))):.3f} | {mins:.3f} |")
    figures = args.figures or os.path.join(args.root, "figures")
    for path in make_all(args.root, figures, lam, seed=args.seed):
        print("wrote", path)


if __name__ == "__main__":
    main()
