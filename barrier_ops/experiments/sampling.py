"""The sampled-barrier experiment: does ``query_fraction < 1`` keep the margins where the full barrier puts them?

    nice -n 10 python -m barrier_ops.experiments.sampling run --config configs/chargpt/cpu_sampled.yaml \
        --jobs 2 --no-progress
    python -m barrier_ops.experiments.sampling analyse --root runs/cpu_sampled \
        --out benchmarks/results/chargpt/cpu_sampled

Four arms on the v2 model, data, schedule and evaluation (``configs/chargpt/cpu_sampled.yaml``), one run per
(arm, seed): CE, the target-margin barrier m0 = 2 at lambda_m = 1 with every query row (``full``), and the same
barrier estimated from a random quarter and a random sixteenth of the rows. The endpoint, the test and the
decision rule are fixed in docs/results.md ("Sampled barrier: pre-registration") and here, before any run;
change nothing after seeing data. The analysis writes ``summary.json`` and ``tables.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from . import stats

# arm -> (lambda_m, target margin m0, query_fraction)
ARMS: Dict[str, tuple] = {
    "ce": (0.0, None, 1.0),
    "full": (1.0, 2.0, 1.0),
    "q1_4": (1.0, 2.0, 0.25),
    "q1_16": (1.0, 2.0, 0.0625),
}
SAMPLED = ("q1_4", "q1_16")
PRIMARY_COLUMN = "frac_below_m0"  # fraction of validation tokens with a layer margin below m0, mean of the layers
EQUIVALENCE_MARGIN = 0.05  # absolute, on PRIMARY_COLUMN (CE ~1.0, the full barrier ~0.10 in the confirmatory runs)
CONF = 0.95  # two-sided; = two one-sided 2.5% tests, Bonferroni over the two sampled arms
SECONDARY_STATS = ("frac_below_2", "q0.01", "q0.05", "median", "min")


@dataclass(frozen=True)
class Run:
    arm: str
    seed: int

    @property
    def dir_name(self) -> str:
        return f"{self.arm}_seed{self.seed}"


def plan(seeds: Sequence[int], arms: Sequence[str] = tuple(ARMS)) -> List[Run]:
    """Seed by seed, every arm of a seed before the next seed: arms that run side by side share the load."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"arms must be among {tuple(ARMS)}, got {unknown}")
    return [Run(arm, int(seed)) for seed in seeds for arm in arms]


def arm_config(cfg, arm: str, seed: int):
    """A copy of ``cfg`` set up for one run of ``arm``."""
    lam, m0, fraction = ARMS[arm]
    cfg = copy.deepcopy(cfg)
    cfg.train.lam, cfg.train.seed = lam, int(seed)
    cfg.barrier.target_margin = m0
    if not hasattr(cfg.barrier, "query_fraction"):
        raise RuntimeError("this build's experiment config has no barrier.query_fraction")
    cfg.barrier.query_fraction = fraction
    return cfg


def _train_one(args) -> str:
    from .train import train

    cfg, root, run, progress = args
    out = os.path.join(root, run.dir_name)
    train(arm_config(cfg, run.arm, run.seed), out, progress=progress)
    return out


def run_all(cfg, root: str, seeds: Sequence[int], jobs: int = 1, progress: bool = True, log=print) -> None:
    runs = plan(seeds)
    todo = [(cfg, root, r, progress and jobs == 1) for r in runs
            if not os.path.isfile(os.path.join(root, r.dir_name, "summary.json"))]
    log(f"sampled-barrier experiment: {len(runs)} runs, {len(runs) - len(todo)} already finished, "
        f"{len(todo)} to train")
    if jobs > 1 and len(todo) > 1:
        with mp.get_context("spawn").Pool(jobs) as pool:
            for out in pool.imap(_train_one, todo):  # in plan order, so a log shows the seeds finishing in turn
                log(f"  finished {out}")
    else:
        for item in todo:
            log(f"  finished {_train_one(item)}")


# ---------------------------------------------------------------------------------------------------------
# Analysis (fixed by the pre-registration)
# ---------------------------------------------------------------------------------------------------------


def run_record(summary: Dict, m0: float = 2.0) -> Dict:
    """The analysed quantities of one run, from its ``summary.json``."""
    layers = summary["margins"]["layers"]
    key = f"frac_below_{m0:g}"
    rec = {
        PRIMARY_COLUMN: sum(layer[key] for layer in layers) / len(layers),
        "bpc": float(summary["bpc"]),
        "train_seconds": float(summary["train_seconds"]),
    }
    for i, layer in enumerate(layers):
        for s in SECONDARY_STATS:
            rec[f"{s}_l{i}"] = float(layer[s])
    return rec


def load_records(root: str) -> Dict[str, Dict[int, Dict]]:
    """arm -> seed -> record, for every finished run under ``root``."""
    out: Dict[str, Dict[int, Dict]] = {}
    for name in sorted(os.listdir(root)):
        p = os.path.join(root, name, "summary.json")
        arm, _, seed = name.rpartition("_seed")
        if arm in ARMS and seed.isdigit() and os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                out.setdefault(arm, {})[int(seed)] = run_record(json.load(f))
    return out


def _paired(records, arm: str, ref: str, column: str, relative: bool = False) -> Optional[Dict]:
    seeds = sorted(set(records.get(arm, {})) & set(records.get(ref, {})))
    if len(seeds) < 2:
        return None
    a = [records[arm][s][column] for s in seeds]
    b = [records[ref][s][column] for s in seeds]
    d = stats.paired_pct_diff(a, b) if relative else [x - y for x, y in zip(a, b)]
    out = stats.describe_paired(d, CONF, seeds)
    out.update({"arm": arm, "ref": ref, "column": column, "relative": relative,
                "arm_mean": stats.mean(a), "ref_mean": stats.mean(b)})
    return out


def decide(primary: Dict, margin: float = EQUIVALENCE_MARGIN) -> str:
    """The pre-registered reading of one primary comparison's interval.

    "equivalent": the whole interval lies within (-margin, +margin); "differs by more than the margin": the
    whole interval lies beyond one end; "inconclusive" otherwise.
    """
    lo, hi = primary["ci"]
    if -margin < lo and hi < margin:
        return "equivalent"
    if lo >= margin or hi <= -margin:
        return "differs by more than the margin"
    return "inconclusive"


def analyse(records: Dict[str, Dict[int, Dict]]) -> Dict:
    missing = [a for a in ARMS if a not in records]
    if missing:
        raise ValueError(f"no finished runs for arms {missing}")
    primary = {}
    for arm in SAMPLED:
        e = _paired(records, arm, "full", PRIMARY_COLUMN)
        if e is None:
            raise ValueError(f"arm {arm} shares fewer than 2 seeds with 'full'")
        e["decision"] = decide(e)
        primary[arm] = e
    sanity = _paired(records, "full", "ce", PRIMARY_COLUMN)
    secondary_columns = sorted(k for k in next(iter(records["full"].values())) if k not in
                               (PRIMARY_COLUMN, "bpc", "train_seconds"))
    secondary = [_paired(records, arm, "full", c) for arm in SAMPLED for c in secondary_columns]
    secondary += [_paired(records, arm, "full", "bpc", relative=True) for arm in SAMPLED]
    secondary = [e for e in secondary if e is not None]
    # Holm over the whole secondary family; a margin quantile that equals 1.0 in every run (invalid
    # positions read exactly 1) has d = 0 and p = 1.
    for e, p in zip(secondary, stats.holm([e["p_sign_flip"] for e in secondary])):
        e["p_holm"] = p
    timing = {}
    for arm in ARMS:
        for ref in ("full", "ce"):
            seeds = sorted(set(records[arm]) & set(records[ref]))
            if arm == ref or len(seeds) < 2:
                continue
            ratios = [records[arm][s]["train_seconds"] / records[ref][s]["train_seconds"] for s in seeds]
            timing[f"{arm}/{ref}"] = {"mean": stats.mean(ratios), "ci": list(stats.t_interval(ratios, CONF)),
                                      "ratios": ratios, "seeds": seeds}
    arms = {arm: {"seeds": sorted(records[arm]),
                  **{c: stats.mean([r[c] for r in records[arm].values()])
                     for c in next(iter(records[arm].values()))}}
            for arm in ARMS}
    return {"primary": primary, "sanity_full_vs_ce": sanity, "secondary": secondary, "timing": timing,
            "arms": arms, "equivalence_margin": EQUIVALENCE_MARGIN, "conf": CONF}


def _ci(e: Dict, fmt: str = "{:+.4f}") -> str:
    return f"{fmt.format(e['mean'])} [{fmt.format(e['ci'][0])}, {fmt.format(e['ci'][1])}]"


def tables_md(summary: Dict) -> str:
    lines = ["### Primary: fraction of validation tokens with a layer margin below m0 = 2 (mean of 2 layers)", "",
             f"Paired over seeds, sampled arm minus full barrier; {summary['conf']:.0%} t interval; "
             f"equivalence margin +-{summary['equivalence_margin']}.", "",
             "| arm | n | arm mean | full mean | difference [95% CI] | sign-flip p | decision |",
             "|---|---|---|---|---|---|---|"]
    for arm, e in summary["primary"].items():
        lines.append(f"| {arm} | {e['n']} | {e['arm_mean']:.4f} | {e['ref_mean']:.4f} | {_ci(e)} | "
                     f"{e['p_sign_flip']:.3g} | {e['decision']} |")
    s = summary["sanity_full_vs_ce"]
    if s is not None:
        lines += ["", f"Check that the full barrier acts: full minus CE {_ci(s)} (n = {s['n']})."]
    lines += ["", "### Secondary (paired differences to the full barrier; Holm over all rows)", "",
              "| arm | quantity | arm mean | full mean | difference [95% CI] | p (sign-flip) | p (Holm) |",
              "|---|---|---|---|---|---|---|"]
    for e in summary["secondary"]:
        name = "clean BPC, % difference" if e["column"] == "bpc" else e["column"]
        fmt = "{:+.2f}%" if e["relative"] else "{:+.4f}"
        lines.append(f"| {e['arm']} | {name} | {e['arm_mean']:.4f} | {e['ref_mean']:.4f} | {_ci(e, fmt)} | "
                     f"{e['p_sign_flip']:.3g} | {e['p_holm']:.3g} |")
    lines += ["", "### Training time (ratio of train_seconds, same seed)", "",
              "| ratio | mean [95% CI] | per seed |", "|---|---|---|"]
    for name, t in summary["timing"].items():
        lines.append(f"| {name} | {t['mean']:.3f} [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] | "
                     + ", ".join(f"{r:.2f}" for r in t["ratios"]) + " |")
    return "\n".join(lines) + "\n"


def write_runs_csv(records: Dict[str, Dict[int, Dict]], path: str) -> None:
    """One row per run: arm, its lambda_m / m0 / query_fraction, seed and the analysed quantities."""
    import csv

    rows = []
    for arm in ARMS:
        lam, m0, fraction = ARMS[arm]
        for seed in sorted(records.get(arm, {})):
            rows.append({"arm": arm, "lambda": lam, "target_margin": "" if m0 is None else m0,
                         "query_fraction": fraction, "seed": seed, **records[arm][seed]})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write(root: str, out_dir: str) -> Dict:
    records = load_records(root)
    summary = analyse(records)
    os.makedirs(out_dir, exist_ok=True)
    write_runs_csv(records, os.path.join(out_dir, "runs.csv"))
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "tables.md"), "w", encoding="utf-8") as f:
        f.write(tables_md(summary))
    return summary


def step_times(cfg, steps: int = 20, rounds: int = 5, log=print) -> Dict[str, Dict]:
    """Seconds per training step of each arm, interleaved in one process (not part of the pre-registration).

    The runs' ``train_seconds`` come from processes that shared a loaded machine; this times the arms
    in turn within each round, on one thread, with the experiment's model, batch and autocast, and keeps
    each arm's fastest round (load only ever adds time).
    """
    import time

    import torch

    from .data import random_batch
    from .evaluate import autocast_context
    from .model import CharGPT
    from .train import attach_barrier, get_data, make_optimizer, training_loss

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = get_data(cfg)
        setups = {}
        for arm in ARMS:
            c = arm_config(cfg, arm, 0)
            torch.manual_seed(0)
            model = CharGPT(data.vocab.size, c.model)
            attach_barrier(model, c.barrier, c.train.lam)
            setups[arm] = (model.train(), make_optimizer(model, c.train), c.train.lam)
        gen = torch.Generator().manual_seed(0)
        batches = [random_batch(data.train, cfg.train.batch_size, cfg.model.block_size, gen) for _ in range(steps)]

        def run(arm):
            model, opt, lam = setups[arm]
            t = time.perf_counter()
            for x, y in batches:
                with autocast_context(torch.device("cpu"), cfg.train.bf16):
                    loss = training_loss(model(x, y), lam)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return (time.perf_counter() - t) / steps

        for arm in ARMS:
            run(arm)  # warm-up
        times = {arm: [] for arm in ARMS}
        for _ in range(rounds):
            for arm in ARMS:
                times[arm].append(run(arm))
    finally:
        torch.set_num_threads(previous)
    best = {arm: min(v) for arm, v in times.items()}
    out = {arm: {"seconds_per_step": best[arm], "vs_full": best[arm] / best["full"], "vs_ce": best[arm] / best["ce"],
                 "rounds": times[arm]} for arm in ARMS}
    for arm, r in out.items():
        log(f"{arm}: {1e3 * r['seconds_per_step']:.2f} ms/step, {r['vs_full']:.3f} x full, {r['vs_ce']:.3f} x CE")
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train every missing run")
    r.add_argument("--config", required=True)
    r.add_argument("--root", default=None, help="run directory (default runs/<name>)")
    r.add_argument("--jobs", type=int, default=1)
    r.add_argument("--no-progress", action="store_true")
    a = sub.add_parser("analyse", help="the pre-registered analysis of the finished runs")
    a.add_argument("--root", required=True)
    a.add_argument("--out", required=True)
    st = sub.add_parser("steptime", help="seconds per training step of each arm, interleaved (descriptive)")
    st.add_argument("--config", required=True)
    st.add_argument("--steps", type=int, default=20)
    st.add_argument("--rounds", type=int, default=5)
    st.add_argument("--out", default=None, help="also write the timings as JSON")
    args = p.parse_args(argv)
    if args.command == "steptime":
        from .config import load_config

        timings = step_times(load_config(args.config, {}), args.steps, args.rounds)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(timings, f, indent=1)
        return
    if args.command == "run":
        from .config import load_config

        cfg = load_config(args.config, {})
        root = args.root or os.path.join("runs", cfg.name)
        run_all(cfg, root, cfg.sweep.seeds, jobs=args.jobs, progress=not args.no_progress)
        args.root = root
    else:
        summary = write(args.root, args.out)
        print(tables_md(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
