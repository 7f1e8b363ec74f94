"""barrier_ops.experiments.stats against hand-computed and tabulated values (no SciPy)."""

import itertools
import math
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
