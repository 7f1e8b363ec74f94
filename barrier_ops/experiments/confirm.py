"""The pre-registered analysis of the confirmatory experiment (``configs/chargpt/cpu_confirm.yaml``).

    python -m barrier_ops.experiments.confirm --csv benchmarks/results/chargpt/cpu_confirm/results.csv \
        --out benchmarks/results/chargpt/cpu_confirm
    python -m barrier_ops.experiments.confirm --fill-substitution runs/cpu_confirm   # runs missing substitution.json

Reads the sweep's ``results.csv`` (one row per run) and writes ``summary.json`` and ``tables.md``: the primary
endpoint (target margin m0 = 2 at lambda_m = 1 vs CE, seed-paired % BPC difference at sigma = 0.25 x embedding
RMS, exact two-sided sign-flip test), the three secondary endpoints with Holm-adjusted p-values, the clean
non-inferiority check (+0.5% margin), the decision the pre-registration (docs/results.md) attaches to them,
and exploratory comparisons (every other noise level, character substitution) with unadjusted p-values.
Everything here is fixed by the pre-registration; change nothing after seeing data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from . import stats
from .sweep import read_csv, row_variant, variant_sort_key

ARMS = {"ce": 0.0, "target2": 1.0, "paper": 0.005}  # variant -> lambda_m
SEEDS = list(range(3, 13))
ALPHA = 0.05
NONINFERIORITY_MARGIN_PCT = 0.5
CONF = 0.95


@dataclass(frozen=True)
class Comparison:
    name: str
    arm: str
    ref: str
    column: str

    @property
    def label(self) -> str:
        return f"{self.arm} vs {self.ref}, {column_label(self.column)}"


PRIMARY = Comparison("primary", "target2", "ce", "bpc_sigma_r0.25")
SECONDARY = [
    Comparison("S1", "target2", "ce", "bpc_sigma0.05"),
    Comparison("S2", "target2", "ce", "bpc_sigma_r0.5"),
    Comparison("S3", "target2", "paper", "bpc_sigma_r0.25"),
]
CLEAN = Comparison("clean", "target2", "ce", "bpc")
EXPLORATORY_PAIRS = [("target2", "ce"), ("paper", "ce"), ("target2", "paper")]


def column_label(column: str) -> str:
    if column == "bpc":
        return "clean"
    if column.startswith("bpc_sigma_r"):
        return f"sigma = {column[len('bpc_sigma_r'):]} x RMS"
    if column.startswith("bpc_sigma"):
        return f"sigma = {column[len('bpc_sigma'):]}"
    if column.startswith("bpc_sub"):
        return f"{100 * float(column[len('bpc_sub'):]):g}% characters substituted"
    return column


def arm_rows(rows: Sequence[Dict], arm: str) -> Dict[int, Dict]:
    """The rows of one arm, by seed; a seed twice in one arm is an error (a CSV from mixed sweeps)."""
    lam = ARMS[arm]
    out: Dict[int, Dict] = {}
    for r in rows:
        if row_variant(r) == arm and abs(float(r["lambda"]) - lam) < 1e-12:
            seed = int(r["seed"])
            if seed in out:
                raise ValueError(f"results CSV has two rows for arm {arm!r}, seed {seed}")
            out[seed] = r
    return out


def _present(r: Dict, column: str) -> bool:
    return r.get(column) not in (None, "")


def compare(rows: Sequence[Dict], c: Comparison) -> Dict:
    """Seed-paired % differences of ``c.column``, arm vs ref, with mean, sd, t interval and sign-flip p."""
    a, b = arm_rows(rows, c.arm), arm_rows(rows, c.ref)
    seeds = sorted(s for s in a if s in b and _present(a[s], c.column) and _present(b[s], c.column))
    if len(seeds) < 2:
        raise ValueError(f"{c.label}: {len(seeds)} paired seeds in the CSV, need at least 2")
    diffs = stats.paired_pct_diff([float(a[s][c.column]) for s in seeds], [float(b[s][c.column]) for s in seeds])
    d = stats.describe_paired(diffs, conf=CONF, seeds=seeds)
    return {"name": c.name, "label": c.label, "arm": c.arm, "ref": c.ref, "column": c.column, "n": d["n"],
            "seeds": d["seeds"], "diffs_pct": d["diffs"], "mean_pct": d["mean"], "sd_pct": d["sd"],
            "ci95_pct": d["ci"], "p_value": d["p_sign_flip"], "p_t": d["p_t"],
            "test": "exact two-sided sign-flip over all 2^n sign assignments"}


def _noise_columns(rows: Sequence[Dict]) -> List[str]:
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and (k.startswith("bpc_sigma") or k.startswith("bpc_sub"))]
    absolute = sorted((k for k in cols if k.startswith("bpc_sigma") and not k.startswith("bpc_sigma_r")
                       and float(k[len("bpc_sigma"):]) > 0), key=lambda k: float(k[len("bpc_sigma"):]))
    relative = sorted((k for k in cols if k.startswith("bpc_sigma_r")), key=lambda k: float(k[len("bpc_sigma_r"):]))
    sub = sorted((k for k in cols if k.startswith("bpc_sub")), key=lambda k: float(k[len("bpc_sub"):]))
    return absolute + relative + sub


def decide(primary: Dict, clean: Dict) -> Dict:
    """The pre-registered decision rule (docs/results.md)."""
    significant = primary["p_value"] < ALPHA
    noninferior = clean["ci95_pct"][1] < NONINFERIORITY_MARGIN_PCT
    if not significant:
        outcome = "not confirmed"
    elif primary["mean_pct"] > 0:
        outcome = "reversed"
    elif noninferior:
        outcome = "confirmed"
    else:
        outcome = "confirmed with a clean cost"
    return {"outcome": outcome, "primary_significant": significant, "clean_noninferior": noninferior}


def analyse(rows: Sequence[Dict]) -> Dict:
    """The whole pre-registered analysis of ``rows`` (read_csv of the sweep's results.csv)."""
    runs = {arm: sorted(arm_rows(rows, arm)) for arm in ARMS}
    primary = compare(rows, PRIMARY)
    complete = all(runs[arm] == SEEDS for arm in ARMS)
    secondary = []
    for c in SECONDARY:
        try:
            secondary.append(compare(rows, c))
        except ValueError:  # an arm still running (incomplete summaries only)
            secondary.append({"name": c.name, "label": c.label, "arm": c.arm, "ref": c.ref, "column": c.column,
                              "n": 0, "seeds": [], "pending": True})
    if complete:
        for s, p in zip(secondary, stats.holm([s["p_value"] for s in secondary])):
            s["p_holm"] = p
            s["significant"] = p < ALPHA
    else:
        # Holm needs all three p-values on the final runs; until then only Bonferroni's bound, which Holm never
        # exceeds, is safe: a secondary with 3 p < alpha is significant whatever the others give.
        for s in secondary:
            if not s.get("pending"):
                s["p_holm"] = None
                s["p_holm_upper_bound"] = min(1.0, len(SECONDARY) * s["p_value"])
    clean = compare(rows, CLEAN)
    clean["margin_pct"] = NONINFERIORITY_MARGIN_PCT
    clean["noninferior"] = clean["ci95_pct"][1] < NONINFERIORITY_MARGIN_PCT
    tested = {(c.arm, c.ref, c.column) for c in [PRIMARY, CLEAN, *SECONDARY]}
    exploratory = []
    for arm, ref in EXPLORATORY_PAIRS:
        for col in ["bpc"] + _noise_columns(rows):
            if (arm, ref, col) in tested:
                continue
            try:
                e = compare(rows, Comparison("exploratory", arm, ref, col))
            except ValueError:
                continue  # a column some arm lacks (e.g. substitution not evaluated yet)
            exploratory.append(e)
    absolute = {}
    for arm in ARMS:
        by_seed = arm_rows(rows, arm)
        cols = {}
        for col in ["bpc"] + _noise_columns(rows):
            vals = [float(r[col]) for r in by_seed.values() if _present(r, col)]
            if len(vals) >= 2:
                cols[col] = {"n": len(vals), "mean": stats.mean(vals), "sd": stats.sd(vals)}
        absolute[arm] = cols
    return {
        "experiment": "confirmatory, pre-registered (configs/chargpt/cpu_confirm.yaml, docs/results.md)",
        "arms": {arm: {"lambda": lam, "seeds": runs[arm]} for arm, lam in ARMS.items()},
        "complete": complete, "alpha": ALPHA, "conf": CONF,
        "primary": primary, "secondary": secondary, "clean_noninferiority": clean,
        "decision": decide(primary, clean), "exploratory": exploratory, "absolute": absolute,
    }


def _ci(e: Dict) -> str:
    lo, hi = e["ci95_pct"]
    return f"[{lo:+.2f}, {hi:+.2f}]"


def _p(p: float) -> str:
    return f"{p:.4f}" if p >= 0.0001 else f"{p:.1e}"


def tables_md(summary: Dict) -> str:
    """The markdown tables docs/results.md quotes, from :func:`analyse`'s summary."""
    pr, clean = summary["primary"], summary["clean_noninferiority"]
    lines = [f"Decision (pre-registered rule): **{summary['decision']['outcome']}**"
             + ("" if summary["complete"] else " (INCOMPLETE: not every arm has seeds 3-12)"), "",
             "| endpoint | comparison | n | mean paired difference | 95% t interval | sign-flip p | Holm p |",
             "|---|---|---|---|---|---|---|",
             f"| primary | {pr['label']} | {pr['n']} | {pr['mean_pct']:+.2f}% | {_ci(pr)} | {_p(pr['p_value'])} | - |"]
    for s in summary["secondary"]:
        if s.get("pending"):
            lines.append(f"| secondary {s['name']} | {s['label']} | 0 | pending (arm still running) | - | - | - |")
            continue
        holm_cell = _p(s["p_holm"]) if s.get("p_holm") is not None else \
            f"<= {_p(s['p_holm_upper_bound'])} (3 p; Holm needs all three)"
        lines.append(f"| secondary {s['name']} | {s['label']} | {s['n']} | {s['mean_pct']:+.2f}% | {_ci(s)} | "
                     f"{_p(s['p_value'])} | {holm_cell} |")
    lines.append(f"| clean non-inferiority (margin +{clean['margin_pct']:g}%) | {clean['label']} | {clean['n']} | "
                 f"{clean['mean_pct']:+.2f}% | {_ci(clean)} | {_p(clean['p_value'])} | "
                 f"{'met' if clean['noninferior'] else 'not met'} |")
    lines += ["", "Per seed, primary endpoint (% difference, target2 vs ce at sigma = 0.25 x RMS):", "",
              "| seed | " + " | ".join(str(s) for s in pr["seeds"]) + " |",
              "|---|" + "---|" * len(pr["seeds"]),
              "| % | " + " | ".join(f"{d:+.2f}" for d in pr["diffs_pct"]) + " |"]
    cols = ["bpc"] + [c for c in _columns_of(summary) if c != "bpc"]
    lines += ["", "Absolute BPC per arm (mean +- sd over seeds):", "",
              "| arm | n | " + " | ".join(column_label(c) for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for arm, a in summary["absolute"].items():
        n = max((v["n"] for v in a.values()), default=0)
        cells = [f"{a[c]['mean']:.4f} +- {a[c]['sd']:.4f}" if c in a else "n/a" for c in cols]
        lines.append(f"| {arm} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "Exploratory (not pre-registered as tests; unadjusted p, several levels share models and draws):",
              "", "| comparison | level | n | mean | 95% t interval | sign-flip p |", "|---|---|---|---|---|---|"]
    for e in summary["exploratory"]:
        lines.append(f"| {e['arm']} vs {e['ref']} | {column_label(e['column'])} | {e['n']} | {e['mean_pct']:+.2f}% | "
                     f"{_ci(e)} | {_p(e['p_value'])} |")
    return "\n".join(lines) + "\n"


def _columns_of(summary: Dict) -> List[str]:
    cols: List[str] = []
    for a in summary["absolute"].values():
        cols += [c for c in a if c not in cols]
    return cols


def paired_ci_table(rows: Sequence[Dict], columns: Optional[Sequence[str]] = None, conf: float = CONF) -> str:
    """Markdown table of every (variant, lambda) vs CE of the same seed: mean % difference and ``conf`` t interval.

    One row per setting, one cell per column (default: clean and every noise column), with the
    per-setting paired t-test p-values Holm- and BH-adjusted over the whole table in the last two columns
    (smallest adjusted p of the row), so a reader sees what survives the multiplicity of the grid.
    """
    ce = {int(r["seed"]): r for r in rows if float(r["lambda"]) == 0}
    columns = list(columns) if columns is not None else ["bpc"] + _noise_columns(rows)
    settings = sorted({(row_variant(r), float(r["lambda"])) for r in rows if float(r["lambda"]) != 0},
                      key=lambda g: (variant_sort_key(g[0]), g[1]))
    cells, pvals, where = {}, [], []
    for v, lam in settings:
        g = {int(r["seed"]): r for r in rows if row_variant(r) == v and float(r["lambda"]) == lam}
        for c in columns:
            seeds = sorted(s for s in g if s in ce and _present(g[s], c) and _present(ce[s], c))
            if len(seeds) < 2:
                cells[(v, lam, c)] = "n/a"
                continue
            d = stats.paired_pct_diff([float(g[s][c]) for s in seeds], [float(ce[s][c]) for s in seeds])
            lo, hi = stats.t_interval(d, conf)
            cells[(v, lam, c)] = f"{stats.mean(d):+.1f} [{lo:+.1f}, {hi:+.1f}]"
            pvals.append(stats.paired_t_test(d))
            where.append((v, lam))
    holm_p, bh_p = stats.holm(pvals), stats.bh(pvals)
    best = {}
    for (v, lam), h, b in zip(where, holm_p, bh_p):
        hb = best.get((v, lam), (1.0, 1.0))
        best[(v, lam)] = (min(hb[0], h), min(hb[1], b))
    lines = ["| variant | lambda_m | " + " | ".join(column_label(c) for c in columns) + " | min Holm p | min BH p |",
             "|---|---|" + "---|" * (len(columns) + 2)]
    for v, lam in settings:
        h, b = best.get((v, lam), (float("nan"), float("nan")))
        lines.append(f"| {v} | {lam:g} | " + " | ".join(cells[(v, lam, c)] for c in columns)
                     + f" | {_p(h)} | {_p(b)} |")
    return "\n".join(lines)


def write(csv_path: str, out_dir: str, allow_incomplete: bool = False) -> Dict:
    rows = read_csv(csv_path)
    summary = analyse(rows)
    if not summary["complete"] and not allow_incomplete:
        raise SystemExit(f"{csv_path}: not every arm has seeds {SEEDS[0]}-{SEEDS[-1]} "
                         f"({ {a: v['seeds'] for a, v in summary['arms'].items()} }); the pre-registration analyses "
                         "the complete experiment once. Pass --allow-incomplete to write a marked partial summary.")
    summary["source_csv"] = os.path.basename(csv_path)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    with open(os.path.join(out_dir, "tables.md"), "w", encoding="utf-8") as f:
        f.write(tables_md(summary))
    return summary


def fill_substitution(root: str, log=print) -> List[str]:
    """Evaluate character substitution for every finished run under ``root`` that lacks substitution.json."""
    from .sweep import SUBSTITUTION_FILE, substitution_for_run

    done = []
    for name in sorted(os.listdir(root)):
        run = os.path.join(root, name)
        if os.path.isfile(os.path.join(run, "model.pt")) and os.path.isfile(os.path.join(run, "summary.json")) \
                and not os.path.isfile(os.path.join(run, SUBSTITUTION_FILE)):
            substitution_for_run(run)
            log(f"  substitution evaluated: {run}")
            done.append(run)
    return done


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=None, help="the sweep's results.csv (exported)")
    p.add_argument("--out", default=None, help="directory for summary.json and tables.md (default: the CSV's)")
    p.add_argument("--allow-incomplete", action="store_true", help="write a summary marked incomplete")
    p.add_argument("--fill-substitution", metavar="ROOT", default=None,
                   help="first evaluate character substitution for runs under ROOT that lack it")
    p.add_argument("--paired-table", metavar="CSV", default=None,
                   help="print the paired-difference table with t intervals and Holm/BH for any sweep's CSV")
    args = p.parse_args(argv)
    if args.csv is None and args.fill_substitution is None and args.paired_table is None:
        p.error("give --csv, --fill-substitution and/or --paired-table")
    if args.paired_table:
        print(paired_ci_table(read_csv(args.paired_table)))
    if args.fill_substitution:
        fill_substitution(args.fill_substitution)
    if args.csv:
        summary = write(args.csv, args.out or os.path.dirname(os.path.abspath(args.csv)), args.allow_incomplete)
        print(tables_md(summary))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
