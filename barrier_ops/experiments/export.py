"""Copy a sweep's small summaries into the repository (never checkpoints).

    python -m barrier_ops.experiments.export --root runs/cpu_sweep --out benchmarks/results/chargpt/cpu_sweep

Writes ``results.csv`` (one row per finished run, so it works mid-sweep), ``metrics.jsonl`` (every eval line of
every run, tagged with lambda and seed) and ``table.md`` (mean +- std over seeds).
"""

from __future__ import annotations

import argparse
import json
import os

from .sweep import collect_all, format_table, write_csv


def export(root: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    rows = collect_all(root)
    write_csv(rows, os.path.join(out, "results.csv"))
    with open(os.path.join(out, "metrics.jsonl"), "w", encoding="utf-8") as dst:
        for r in rows:
            lam, seed = float(r["lambda"]), int(r["seed"])
            path = os.path.join(root, f"lam{lam:g}_seed{seed}", "metrics.jsonl")
            with open(path, encoding="utf-8") as src:
                for line in src:
                    if line.strip():
                        dst.write(json.dumps({"lambda": lam, "seed": seed, **json.loads(line)}) + "\n")
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(format_table(rows) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    export(args.root, args.out)
    print(open(os.path.join(args.out, "table.md"), encoding="utf-8").read())


if __name__ == "__main__":
    main()
