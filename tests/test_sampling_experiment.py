"""The sampled-barrier experiment's plan and its pre-registered analysis, on synthetic run summaries."""

import json
import os

import pytest

from barrier_ops.experiments import sampling


def _summary(frac_below_2, bpc=2.1, seconds=100.0, extra=0.0):
    layer = {"frac_below_2": frac_below_2, "q0.01": 1.0, "q0.05": 1.0 + extra, "median": 2.3 + extra,
             "min": 0.95}
    return {"margins": {"layers": [dict(layer), dict(layer)]}, "bpc": bpc, "train_seconds": seconds}


def _write_runs(root, values):
    for (arm, seed), summary in values.items():
        d = os.path.join(root, f"{arm}_seed{seed}")
        os.makedirs(d)
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump(summary, f)


def test_plan_interleaves_arms_within_each_seed():
    runs = sampling.plan([3, 4])
    assert [r.dir_name for r in runs[:4]] == ["ce_seed3", "full_seed3", "q1_4_seed3", "q1_16_seed3"]
    assert [r.seed for r in runs] == [3] * 4 + [4] * 4
    with pytest.raises(ValueError, match="arms"):
        sampling.plan([0], arms=["nope"])


def test_arms_are_the_preregistered_ones():
    assert sampling.ARMS == {"ce": (0.0, None, 1.0), "full": (1.0, 2.0, 1.0), "q1_4": (1.0, 2.0, 0.25),
                             "q1_16": (1.0, 2.0, 0.0625)}
    assert sampling.EQUIVALENCE_MARGIN == 0.05 and sampling.CONF == 0.95


@pytest.mark.parametrize("ci,expected", [
    ((-0.01, 0.02), "equivalent"),
    ((-0.06, 0.02), "inconclusive"),
    ((0.01, 0.07), "inconclusive"),
    ((0.05, 0.09), "differs by more than the margin"),
    ((-0.2, -0.06), "differs by more than the margin"),
])
def test_decision_rule(ci, expected):
    assert sampling.decide({"ci": list(ci)}) == expected


def test_analysis_reads_equivalence_and_a_shift(tmp_path):
    seeds = [3, 4, 5, 6, 7]
    noise = [0.004, -0.003, 0.002, -0.001, 0.0]
    runs = {}
    for s, e in zip(seeds, noise):
        runs[("ce", s)] = _summary(1.0, seconds=90.0)
        runs[("full", s)] = _summary(0.10 + 3 * e, seconds=150.0)
        runs[("q1_4", s)] = _summary(0.10 + 3 * e + e, seconds=110.0, extra=0.01)  # within a few thousandths
        runs[("q1_16", s)] = _summary(0.30 + 3 * e - e, seconds=100.0)  # 0.2 above: beyond the margin
    _write_runs(tmp_path, runs)
    summary = sampling.write(str(tmp_path), str(tmp_path / "out"))
    assert summary["primary"]["q1_4"]["decision"] == "equivalent"
    assert summary["primary"]["q1_16"]["decision"] == "differs by more than the margin"
    assert summary["primary"]["q1_16"]["mean"] == pytest.approx(0.2, abs=1e-3)
    assert summary["sanity_full_vs_ce"]["mean"] == pytest.approx(-0.9, abs=3e-3)
    assert summary["timing"]["q1_4/full"]["mean"] == pytest.approx(110 / 150)
    assert summary["timing"]["full/ce"]["mean"] == pytest.approx(150 / 90)
    holm = [e["p_holm"] for e in summary["secondary"]]
    assert all(h >= e["p_sign_flip"] for h, e in zip(holm, summary["secondary"]))
    runs_csv = (tmp_path / "out" / "runs.csv").read_text().splitlines()
    assert runs_csv[0].startswith("arm,lambda,target_margin,query_fraction,seed,frac_below_m0")
    assert len(runs_csv) == 1 + 20 and sum(line.startswith("q1_16,1.0,2.0,0.0625,") for line in runs_csv) == 5
    tables = (tmp_path / "out" / "tables.md").read_text()
    assert "| q1_16 | 5 |" in tables and "differs by more than the margin" in tables


def test_analysis_refuses_missing_arms(tmp_path):
    _write_runs(tmp_path, {("full", 3): _summary(0.1), ("full", 4): _summary(0.1)})
    with pytest.raises(ValueError, match="no finished runs"):
        sampling.analyse(sampling.load_records(str(tmp_path)))
