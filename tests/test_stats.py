"""barrier_ops.experiments.stats against hand-computed and tabulated values (no SciPy)."""

import itertools
import json
import math
import os
import random

import pytest

from barrier_ops.experiments import stats


def test_paired_pct_diff_and_errors():
    assert stats.paired_pct_diff([2.2, 1.8], [2.0, 2.0]) == pytest.approx([10.0, -10.0])
    with pytest.raises(ValueError, match="pair up"):
        stats.paired_pct_diff([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="b must be positive"):
        stats.paired_pct_diff([1.0], [0.0])
    with pytest.raises(ValueError, match="finite"):
        stats.paired_pct_diff([float("nan")], [1.0])
    with pytest.raises(TypeError, match="sequence of numbers"):
        stats.paired_pct_diff(["x"], [1.0])


def test_mean_sd():
    assert stats.mean([1, 2, 3]) == 2.0 and stats.sd([1, 2, 3]) == 1.0
    assert stats.sd([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx(math.sqrt(32 / 7))
    with pytest.raises(ValueError, match="at least 2"):
        stats.sd([1.0])


def test_betainc_closed_forms():
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert stats.betainc(1, 1, x) == pytest.approx(x, abs=1e-14)
        assert stats.betainc(3, 1, x) == pytest.approx(x ** 3, abs=1e-14)  # I_x(a, 1) = x^a
        assert stats.betainc(1, 2, x) == pytest.approx(1 - (1 - x) ** 2, abs=1e-14)


def test_t_cdf_closed_forms():
    assert stats.t_cdf(0.0, 7) == 0.5
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-13)  # Cauchy: 1/2 + atan(t)/pi
    assert stats.t_cdf(-3.0, 1) == pytest.approx(0.5 + math.atan(-3.0) / math.pi, abs=1e-13)
    for t in (0.3, 1.0, 2.5, 10.0):  # df = 2: 1/2 + t / (2 sqrt(2 + t^2))
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)


@pytest.mark.parametrize("df,q", [(1, 12.706204736174707), (2, 4.302652729749464), (9, 2.2621571627409915),
                                  (29, 2.045229642132703), (30, 2.0422724563012373)])
def test_t_quantile_table(df, q):
    assert stats.t_quantile(0.975, df) == pytest.approx(q, rel=1e-9)
    assert stats.t_quantile(0.025, df) == pytest.approx(-q, rel=1e-9)


def test_t_quantile_tends_to_normal():
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(1.959963984540054, rel=1e-6)
    with pytest.raises(ValueError, match="p must be"):
        stats.t_quantile(1.0, 3)


def test_t_interval_and_t_test():
    lo, hi = stats.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729749464 / math.sqrt(3)  # sd 1, n 3
    assert (lo, hi) == pytest.approx((2 - half, 2 + half), rel=1e-9)
    # t = 2 sqrt(3), df = 2: p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(6/7)
    assert stats.paired_t_test([1.0, 2.0, 3.0]) == pytest.approx(1 - math.sqrt(6 / 7), rel=1e-9)
    with pytest.raises(ValueError, match="conf"):
        stats.t_interval([1.0, 2.0], conf=95)


@pytest.mark.parametrize("d,p", [
    ([1.0, 2.0, 3.0], 2 / 8),          # sums +-1+-2+-3: only +-6 reach |6|
    ([3.0, 1.0, 1.0], 2 / 8),
    ([2.0, 1.0, 1.0, -1.0], 8 / 16),   # observed sum 3: four assignments per sign of the 2
    ([1.0, -1.0], 1.0),                # observed sum 0: every assignment ties
    ([0.5] * 10, 2 / 1024),            # all one sign: the smallest p with n = 10
    ([-0.1] * 16, 2 / 65536),
])
def test_sign_flip_known_values(d, p):
    assert stats.sign_flip_test(d) == p


def test_sign_flip_matches_brute_force_and_ties_float_noise():
    rng = random.Random(1)
    for n in (5, 8, 10):
        d = [rng.gauss(-0.5, 1.0) for _ in range(n)]
        obs = abs(sum(d))
        brute = sum(abs(sum(s * v for s, v in zip(signs, d))) >= obs - 1e-12
                    for signs in itertools.product((1, -1), repeat=n)) / 2 ** n
        assert stats.sign_flip_test(d) == brute
    # 0.1 + 0.2 - 0.3 is not 0 in floating point: the tolerance keeps the observed assignment a tie with itself
    assert stats.sign_flip_test([0.1, 0.2, -0.3, 0.7, -0.7]) == 1.0
    with pytest.raises(ValueError, match="n <= 16"):
        stats.sign_flip_test([1.0] * 17)
    with pytest.raises(ValueError, match="empty"):
        stats.sign_flip_test([])


def test_holm_and_bh_known_values():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.001, 0.2, 0.01, 0.04]) == pytest.approx([0.004, 0.2, 0.03, 0.08])
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0]
    assert stats.bh([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.04, 0.04])
    assert stats.bh([0.001, 0.2, 0.01, 0.04]) == pytest.approx([0.004, 0.2, 0.02, 0.04 * 4 / 3])
    assert stats.holm([]) == [] and stats.bh([]) == []
    with pytest.raises(ValueError, match="pvals"):
        stats.holm([1.5])


def test_describe_paired():
    r = stats.describe_paired([-1.0, -2.0, -3.0], seeds=[3, 4, 5])
    assert r["n"] == 3 and r["mean"] == -2.0 and r["sd"] == 1.0 and r["seeds"] == [3, 4, 5]
    assert r["p_sign_flip"] == 0.25 and r["ci"][1] == pytest.approx(-2 + 4.302652729749464 / math.sqrt(3))
    with pytest.raises(ValueError, match="seeds"):
        stats.describe_paired([1.0, 2.0], seeds=[1])


# ---- the confirmatory analysis (barrier_ops.experiments.confirm) -------------------------------------------

CONFIRM_DIR = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "chargpt", "cpu_confirm")


def _synthetic_rows(primary_pct, clean_pct, seeds=range(3, 13)):
    """CE, target2 and paper rows whose paired % differences are known exactly."""
    rows = []
    for i, s in enumerate(seeds):
        ce = {"bpc": 2.1 + 0.01 * i, "bpc_sigma0.05": 4.2 - 0.02 * i, "bpc_sigma_r0.25": 3.6 + 0.03 * i,
              "bpc_sigma_r0.5": 4.4 + 0.01 * i, "bpc_sub0.02": 2.3 + 0.01 * i}
        tgt = {"bpc": ce["bpc"] * (1 + clean_pct[i] / 100), "bpc_sigma0.05": ce["bpc_sigma0.05"] * 0.98,
               "bpc_sigma_r0.25": ce["bpc_sigma_r0.25"] * (1 + primary_pct[i] / 100),
               "bpc_sigma_r0.5": ce["bpc_sigma_r0.5"] * (1.01 if i % 2 else 0.995), "bpc_sub0.02": ce["bpc_sub0.02"]}
        paper = {k: v * 1.001 for k, v in ce.items()}
        for variant, lam, vals in (("ce", 0.0, ce), ("target2", 1.0, tgt), ("paper", 0.005, paper)):
            rows.append({"variant": variant, "lambda": lam, "target_margin": 2.0 if variant == "target2" else "",
                         "seed": s, **vals})
    return rows


def _write_csv(rows, path):
    from barrier_ops.experiments.sweep import write_csv

    write_csv(rows, str(path))
    return str(path)


def test_confirm_analysis_on_known_differences(tmp_path):
    from barrier_ops.experiments import confirm

    primary = [-3.0, -1.0, -2.5, 0.5, -4.0, -2.0, -1.5, -3.5, -0.5, -2.0]
    clean = [0.1, -0.2, 0.0, 0.3, -0.1, 0.2, -0.3, 0.1, 0.0, 0.1]
    s = confirm.analyse(_synthetic_rows(primary, clean))
    assert s["complete"] and s["primary"]["n"] == 10 and s["primary"]["seeds"] == list(range(3, 13))
    assert s["primary"]["mean_pct"] == pytest.approx(stats.mean(primary), abs=1e-9)
    assert s["primary"]["diffs_pct"] == pytest.approx(primary, abs=1e-9)
    # only seed 6 (+0.5) is positive: assignments with |sum| >= 19 are few; recomputed independently
    obs = abs(sum(primary))
    brute = sum(abs(sum(g * v for g, v in zip(signs, primary))) >= obs - 1e-9
                for signs in itertools.product((1, -1), repeat=10)) / 1024
    assert s["primary"]["p_value"] == brute < 0.01
    sec = s["secondary"]
    assert [x["name"] for x in sec] == ["S1", "S2", "S3"]
    assert sec[0]["mean_pct"] == pytest.approx(-2.0) and sec[0]["p_value"] == 2 / 1024  # every seed -2%
    assert [x["p_holm"] for x in sec] == stats.holm([x["p_value"] for x in sec])
    assert sec[2]["arm"] == "target2" and sec[2]["ref"] == "paper"
    assert s["clean_noninferiority"]["noninferior"] and s["decision"]["outcome"] == "confirmed"
    labels = {(e["arm"], e["ref"], e["column"]) for e in s["exploratory"]}
    assert ("target2", "ce", "bpc_sub0.02") in labels and ("target2", "ce", "bpc_sigma_r0.25") not in labels

    # the decision rule's other branches
    assert confirm.analyse(_synthetic_rows([x + 2.2 for x in primary], clean))["decision"]["outcome"] == "not confirmed"
    assert confirm.analyse(_synthetic_rows([-x for x in primary], clean))["decision"]["outcome"] == "reversed"
    costly = confirm.analyse(_synthetic_rows(primary, [x + 0.6 for x in clean]))
    assert costly["decision"]["outcome"] == "confirmed with a clean cost"


def test_confirm_cli_summary_matches_recomputation(tmp_path):
    from barrier_ops.experiments import confirm
    from barrier_ops.experiments.sweep import read_csv

    rows = _synthetic_rows([-1.0, 2.0, -0.5, 0.3, -2.0, 1.0, -1.5, 0.2, -0.1, -0.7], [0.0] * 10)
    csv_path = _write_csv(rows, tmp_path / "results.csv")
    confirm.main(["--csv", csv_path, "--out", str(tmp_path / "out")])
    with open(tmp_path / "out" / "summary.json") as f:
        written = json.load(f)
    assert written.pop("source_csv") == "results.csv"
    assert written == json.loads(json.dumps(confirm.analyse(read_csv(csv_path))))
    assert {"mean_pct", "p_value", "n", "seeds"} <= set(written["primary"])
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "| primary |" in md and f"{written['primary']['mean_pct']:+.2f}%" in md and "Holm p" in md

    with pytest.raises(SystemExit, match="allow-incomplete"):
        confirm.main(["--csv", _write_csv(rows[:-3], tmp_path / "partial.csv"), "--out", str(tmp_path / "p")])
    confirm.main(["--csv", str(tmp_path / "partial.csv"), "--out", str(tmp_path / "p"), "--allow-incomplete"])
    assert "INCOMPLETE" in (tmp_path / "p" / "tables.md").read_text()
    # paper arm not started: S3 pending, S1/S2 carry only Bonferroni's bound (Holm needs all three p-values)
    partial = confirm.analyse([r for r in rows if r["variant"] != "paper"])
    assert not partial["complete"] and partial["secondary"][2]["pending"]
    s1 = partial["secondary"][0]
    assert s1["p_holm"] is None and s1["p_holm_upper_bound"] == min(1.0, 3 * s1["p_value"])
    assert partial["primary"] == confirm.analyse(rows)["primary"]  # the primary does not depend on the paper arm
    assert "pending" in confirm.tables_md(partial)
    with pytest.raises(ValueError, match="two rows"):
        confirm.analyse(rows + rows[:1])


@pytest.mark.skipif(not os.path.isfile(os.path.join(CONFIRM_DIR, "summary.json")),
                    reason="the confirmatory results are not committed yet")
def test_committed_confirm_summary_matches_its_csv():
    from barrier_ops.experiments import confirm
    from barrier_ops.experiments.sweep import read_csv

    with open(os.path.join(CONFIRM_DIR, "summary.json")) as f:
        written = json.load(f)
    written.pop("source_csv", None)
    assert written["complete"]
    assert written == json.loads(json.dumps(confirm.analyse(read_csv(os.path.join(CONFIRM_DIR, "results.csv")))))
    with open(os.path.join(CONFIRM_DIR, "tables.md")) as f:
        assert f.read() == confirm.tables_md(written)


def test_paired_ci_table_intervals_and_multiplicity():
    from barrier_ops.experiments import confirm

    rows = []
    for s, (c, t) in enumerate([(2.0, 1.98), (2.1, 2.058), (2.2, 2.134)]):  # -1, -2, -3 %
        rows += [{"variant": "ce", "lambda": 0.0, "seed": s, "bpc": c},
                 {"variant": "target2", "lambda": 1.0, "seed": s, "bpc": t}]
    table = confirm.paired_ci_table(rows)
    half = 4.302652729749464 / math.sqrt(3)
    assert f"| target2 | 1 | -2.0 [{-2 - half:+.1f}, {-2 + half:+.1f}] |" in table
    p = f"{1 - math.sqrt(6 / 7):.4f}"  # t = -2 sqrt(3), 2 df; one test, so Holm = BH = p
    assert table.rstrip().endswith(f"| {p} | {p} |")


RESULTS_MD = os.path.join(os.path.dirname(__file__), "..", "docs", "results.md")
V2_CSV = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "chargpt", "cpu_sweep_v2", "results.csv")


@pytest.mark.skipif(not os.path.isfile(V2_CSV), reason="sweep v2 results not present")
def test_results_md_quotes_the_computed_tables():
    from barrier_ops.experiments import confirm
    from barrier_ops.experiments.sweep import read_csv

    with open(RESULTS_MD) as f:
        doc = f.read()
    assert confirm.paired_ci_table(read_csv(V2_CSV)) in doc  # sweep v2's interval table, as generated
    if os.path.isfile(os.path.join(CONFIRM_DIR, "tables.md")):
        with open(os.path.join(CONFIRM_DIR, "tables.md")) as f:
            tables = f.read()
        primary_row = next(line for line in tables.splitlines() if line.startswith("| primary |"))
        assert primary_row in doc
