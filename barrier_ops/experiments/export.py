"""Copy a sweep's small summaries into the repository (never checkpoints).

    python -m barrier_ops.experiments.export --root runs/cpu_sweep --out benchmarks/results/chargpt/cpu_sweep

Writes ``results.csv`` (one row per finished run, so it works mid-sweep), ``metrics.jsonl`` (every eval line of
every run, tagged with variant, lambda and seed), ``margins.jsonl`` (per run and layer: margin quantiles, fractions
below thresholds, active fraction, log-binned histogram, support-token positions) and ``table.md`` (mean +- std
over seeds).
"""

from __future__ import annotations

import argparse
import json
import os

from .sweep import collect_all, format_table, margin_table, paired_table, row_variant, write_csv


def export(root: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    rows = collect_all(root)
    runs = [r.pop("run") for r in rows]
    write_csv(rows, os.path.join(out, "results.csv"))
    with open(os.path.join(out, "metrics.jsonl"), "w", encoding="utf-8") as dst:
        for run, r in zip(runs, rows):
            lam, seed = float(r["lambda"]), int(r["seed"])
            tag = {"variant": row_variant(r), "lambda": lam, "seed": seed}
            with open(os.path.join(root, run, "metrics.jsonl"), encoding="utf-8") as src:
                for line in src:
                    if line.strip():
                        dst.write(json.dumps({**tag, **json.loads(line)}) + "\n")
    # Per-run margin statistics without the histograms' bulk (quantiles, active fraction, support positions).
    with open(os.path.join(out, "margins.jsonl"), "w", encoding="utf-8") as dst:
        for run, r in zip(runs, rows):
            with open(os.path.join(root, run, "summary.json"), encoding="utf-8") as src:
                s = json.load(src)
            layers = s["margins"]["layers"]
            recomputed = os.path.join(root, run, "margins.json")  # experiments.margins (from the checkpoint)
            if os.path.isfile(recomputed):
                with open(recomputed, encoding="utf-8") as src:
                    layers = json.load(src)["layers"]
            dst.write(json.dumps({"run": run, "variant": row_variant(r), "lambda": float(r["lambda"]),
                                  "seed": int(r["seed"]), "emb_rms": s.get("emb_rms"),
                                  "recomputed": os.path.isfile(recomputed), "layers": layers}) + "\n")
    sigmas = [k[len("bpc_sigma"):] for k in rows[0] if k.startswith("bpc_sigma") and k != "bpc_sigma0"]
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(format_table(rows, sigmas=sigmas if any("_r" in k for k in sigmas) else None) + "\n")
        f.write("\nPaired differences to CE of the same seed, % of CE's BPC (mean +- std over seeds):\n\n"
                + paired_table(rows, [k for k in sigmas if k != "0"]) + "\n")
        if any(k.startswith("margin_median_l") for k in rows[0]):
            f.write("\nMargins (every valid validation token; means over seeds):\n\n" + margin_table(rows) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    export(args.root, args.out)
    print(open(os.path.join(args.out, "table.md"), encoding="utf-8").read())


if __name__ == "__main__":
    main()
