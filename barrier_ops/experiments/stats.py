"""Small, dependency-free statistics for seed-paired experiments.

Paired relative differences, the exact two-sided sign-flip (paired permutation) test, Student-t
intervals and p-values, and the Holm and Benjamini-Hochberg adjustments. Pure Python (no SciPy), so the
numbers in docs/results.md can be recomputed anywhere the package imports.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

MAX_EXACT_N = 16  # 2^16 = 65,536 sign assignments: enumerated in well under a second


def _as_floats(x: Sequence[float], name: str) -> List[float]:
    try:
        vals = [float(v) for v in x]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers, got {x!r}") from None
    if any(not math.isfinite(v) for v in vals):
        raise ValueError(f"{name} must be finite, got {vals}")
    return vals


def paired_pct_diff(a: Sequence[float], b: Sequence[float]) -> List[float]:
    """100 * (a_i / b_i - 1): the % change of ``a`` relative to its pair ``b`` (negative = ``a`` lower)."""
    a, b = _as_floats(a, "a"), _as_floats(b, "b")
    if len(a) != len(b):
        raise ValueError(f"a and b must pair up one to one, got lengths {len(a)} and {len(b)}")
    if any(v <= 0 for v in b):
        raise ValueError(f"b must be positive (it is the denominator), got {b}")
    return [100.0 * (x / y - 1.0) for x, y in zip(a, b)]


def mean(x: Sequence[float]) -> float:
    x = _as_floats(x, "x")
    if not x:
        raise ValueError("x must not be empty")
    return sum(x) / len(x)


def sd(x: Sequence[float]) -> float:
    """Sample standard deviation (n - 1 in the denominator)."""
    x = _as_floats(x, "x")
    if len(x) < 2:
        raise ValueError(f"x needs at least 2 values for a sample sd, got {len(x)}")
    m = sum(x) / len(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on :func:`t_cdf`, to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(x: Sequence[float], conf: float = 0.95) -> Tuple[float, float]:
    """Two-sided ``conf`` Student-t interval for the mean of ``x`` (n - 1 df)."""
    if not 0.0 < conf < 1.0:
        raise ValueError(f"conf must be in (0, 1), got {conf}")
    x = _as_floats(x, "x")
    m, s, n = mean(x), sd(x), len(x)
    half = t_quantile(0.5 + conf / 2.0, n - 1) * s / math.sqrt(n)
    return m - half, m + half


def paired_t_test(d: Sequence[float]) -> float:
    """Two-sided one-sample t test of mean(d) = 0 (for comparison with the sign-flip test)."""
    d = _as_floats(d, "d")
    s = sd(d)
    if s == 0:
        return 1.0 if mean(d) == 0 else 0.0
    t = mean(d) / (s / math.sqrt(len(d)))
    return 2.0 * (1.0 - t_cdf(abs(t), len(d) - 1))


def sign_flip_test(d: Sequence[float]) -> float:
    """Exact two-sided sign-flip test of the mean of paired differences ``d``.

    Under the null hypothesis each difference is symmetric about 0, so each of the 2^n sign assignments
    is equally likely. p = (number of assignments whose |sum| is at least the observed |sum|) / 2^n,
    the observed assignment included (so p >= 2 / 2^n). Enumerated exactly; n <= ``MAX_EXACT_N``.
    """
    d = _as_floats(d, "d")
    n = len(d)
    if n == 0:
        raise ValueError("d must not be empty")
    if n > MAX_EXACT_N:
        raise ValueError(f"d has {n} values; the exact test enumerates 2^n assignments and allows n <= {MAX_EXACT_N}")
    observed = abs(sum(d))
    tol = 1e-12 * max(1.0, sum(abs(v) for v in d))  # the observed assignment must count as a tie with itself
    hits = 0
    total = 1 << n
    for mask in range(total):
        s = 0.0
        for i, v in enumerate(d):
            s += -v if (mask >> i) & 1 else v
        if abs(s) >= observed - tol:
            hits += 1
    return hits / total


def holm(pvals: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order."""
    p = _as_floats(pvals, "pvals")
    if any(not 0.0 <= v <= 1.0 for v in p):
        raise ValueError(f"pvals must be in [0, 1], got {p}")
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def bh(pvals: Sequence[float]) -> List[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input order."""
    p = _as_floats(pvals, "pvals")
    if any(not 0.0 <= v <= 1.0 for v in p):
        raise ValueError(f"pvals must be in [0, 1], got {p}")
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i], reverse=True)
    adjusted, running = [0.0] * m, 1.0
    for k, i in enumerate(order):
        rank = m - k  # 1-based rank in ascending order
        running = min(running, m * p[i] / rank)
        adjusted[i] = running
    return adjusted


def describe_paired(d: Sequence[float], conf: float = 0.95, seeds: Optional[Sequence[int]] = None) -> Dict:
    """n, mean, sd, ``conf`` t interval and exact sign-flip p of paired differences ``d``."""
    d = _as_floats(d, "d")
    out = {"n": len(d), "mean": mean(d), "sd": sd(d), "ci": list(t_interval(d, conf)), "conf": conf,
           "p_sign_flip": sign_flip_test(d), "p_t": paired_t_test(d), "diffs": d}
    if seeds is not None:
        if len(seeds) != len(d):
            raise ValueError(f"seeds must have one entry per difference ({len(d)}), got {len(seeds)}")
        out["seeds"] = [int(s) for s in seeds]
    return out
