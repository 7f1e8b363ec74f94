"""The comparison helpers of tests/_cases.py must fail on wrong results.

Every op test reduces to one of these helpers, so each is checked here
against deliberately wrong results (all zeros, a sign flip, a 1% scale
error, an error confined to a few entries) at the scales the op tests see:
margins and losses O(1), gradients of a mean-reduced loss 1e-6..1e-2.
An absolute floor (the old bound: tol * max(1, max|expected|)) let an
all-zero gradient pass; the bounds are now relative to each tensor's scale.
Also checks the suite's guard against global torch state leaking between
tests (tests/conftest.py). Needs only torch (not the compiled ops).
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from _cases import (
    GRAD_TOL,
    VALUE_TOL,
    assert_close,
    assert_close_per_position,
    assert_grads_close,
    max_rel_error,
)

SCALES = [1.0, 1e-2, 1e-4, 1e-6]
TIGHT = {torch.float64: 1e-9, torch.float32: 1e-3}  # GRAD_TOL's full-precision entries, asserted below


def _expected(scale, shape=(2, 4, 37, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def _noisy(expected, rel, per_position=False, seed=1):
    """What a correct kernel returns: expected plus errors up to rel * max|expected|
    (per_position: up to rel * max(|e_i|, 1% of max|expected|), assert_close_per_position's bound)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(expected.shape, generator=gen, dtype=torch.float64) * 2 - 1
    size = expected.abs().max()
    if per_position:
        size = expected.abs().clamp(min=1e-2 * size)
    return expected + rel * size * noise


WRONG = {
    "zeros": lambda e: torch.zeros_like(e),
    "sign flip": lambda e: -e,
    "1% scale": lambda e: 1.01 * e,
    "one entry off by 2% of max": lambda e: e.flatten().index_add(0, torch.tensor([7]), 0.02 * e.abs().max().view(1))
    .view(e.shape),
}


def _per_position(a, e, tol, what=""):
    assert_close_per_position(a, e, tol, what)


def _grads(a, e, tol, what=""):
    # The wrong tensor sits next to a correct one 1e4 times larger: its error must not hide in that scale.
    big = _expected(1.0, (5, 3), seed=9)
    assert_grads_close({"big": big.clone(), "small": a}, {"big": big, "small": e}, tol, what)


HELPERS = {"assert_close": assert_close, "assert_close_per_position": _per_position, "assert_grads_close": _grads}


@pytest.mark.parametrize("helper", HELPERS)
@pytest.mark.parametrize("dtype", list(TIGHT), ids=str)
@pytest.mark.parametrize("scale", SCALES)
def test_full_precision_tolerances_reject_wrong_results(helper, dtype, scale):
    check = HELPERS[helper]
    tol = TIGHT[dtype]
    e = _expected(scale)
    check(_noisy(e, 0.5 * tol, helper == "assert_close_per_position"), e, tol, "correct")  # a correct result passes ...
    for name, wrong in WRONG.items():  # ... and every wrong one fails, however small the scale
        with pytest.raises(AssertionError):
            check(wrong(e), e, tol, name)


@pytest.mark.parametrize("helper", HELPERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale", SCALES)
def test_low_precision_tolerances_reject_zeros_and_sign_flips(helper, dtype, scale):
    # At bf16/fp16 tolerances a 1% scale error is within rounding; zeros and a sign flip are not.
    check = HELPERS[helper]
    e = _expected(scale)
    for tol in (VALUE_TOL[dtype], GRAD_TOL[dtype]):
        check(_noisy(e, 0.5 * tol, helper == "assert_close_per_position"), e, tol, "correct")
        for name in ("zeros", "sign flip"):
            with pytest.raises(AssertionError):
                check(WRONG[name](e), e, tol, name)


def test_full_precision_tables_can_see_a_one_percent_scale_error():
    # The tables are the op tests' tolerances: loosening a full-precision entry to >= 1%
    # would let a 1% scale error of every value or gradient through.
    for dtype in TIGHT:
        assert VALUE_TOL[dtype] <= TIGHT[dtype] and GRAD_TOL[dtype] <= TIGHT[dtype], dtype
    for table in (VALUE_TOL, GRAD_TOL):
        assert all(0 < tol < 1 for tol in table.values())  # zeros and a sign flip fail at every dtype


def test_tiny_gradients_are_not_under_an_absolute_floor():
    # The bug this file guards against: a mean-reduced loss's gradients are ~1e-4, and the old
    # bound tol * max(1, max|expected|) = 1e-3 accepted all zeros.
    e = _expected(1e-4)
    zeros = torch.zeros_like(e)
    assert (zeros - e).abs().max() <= GRAD_TOL[torch.float32] * max(1.0, e.abs().max().item())  # old: passes
    with pytest.raises(AssertionError, match="relative error 1.000e\\+00"):
        assert_close(zeros, e, GRAD_TOL[torch.float32], "grad q")
    assert max_rel_error(zeros, e) == pytest.approx(1.0)
    assert max_rel_error(-e, e) == pytest.approx(2.0)


def test_per_position_sees_errors_in_small_entries():
    # One head's gradients 1000x smaller than another's, and that head wrong (zeros):
    # within tol of the tensor's max, but not of the entries themselves.
    e = torch.cat([_expected(1.0, (1, 37, 8)), _expected(1e-3, (1, 37, 8), seed=3)])
    wrong = e.clone()
    wrong[1] = 0
    assert_close(wrong, e, 1e-2, "whole-tensor bound")  # the max-relative bound cannot see it
    with pytest.raises(AssertionError, match="at \\(1, "):
        assert_close_per_position(wrong, e, 1e-2, "per position")
    # Errors of half the bound everywhere, and at entries far below the floor, pass.
    assert_close_per_position(_noisy(e, 0.5e-2, per_position=True), e, 1e-2, "per position noise")
    tiny = e.clone()
    tiny[1, 0, 0] = 1e-9
    assert_close_per_position(tiny + 0.5e-2 * 1e-2, tiny, 1e-2, "noise below the floor")


def test_structural_failures():
    e = _expected(1e-3, (3, 4))
    with pytest.raises(AssertionError, match="shape"):
        assert_close(e[:2], e, 1e-3, "shape")
    for bad in (float("nan"), float("inf")):
        a = e.clone()
        a[1, 2] = bad
        for check in (assert_close, assert_close_per_position):
            with pytest.raises(AssertionError, match="non-finite"):
                check(a, e, 1e-3, "non-finite")
    with pytest.raises(AssertionError, match="non-finite values in the reference"):
        assert_close(e, e.masked_fill(e > 0, float("nan")), 1e-3)
    with pytest.raises(AssertionError):
        assert_grads_close({"a": e}, {"a": e, "b": e}, 1e-3)  # a missing gradient
    # An all-zero reference is matched exactly (no absolute floor), an empty one trivially.
    z = torch.zeros(3, 4, dtype=torch.float64)
    assert_close(z.clone(), z, 1e-3)
    with pytest.raises(AssertionError):
        assert_close(z + 1e-12, z, 1e-3)
    assert_close(torch.empty(0), torch.empty(0), 1e-3)
    # Scalars (losses), compared in any dtype.
    loss = torch.tensor(2.5e-3, dtype=torch.float32)
    assert_close(loss * (1 + 1e-5), loss.double(), 1e-4, "loss")
    assert_close_per_position(loss * (1 + 1e-5), loss.double(), 1e-4, "loss")
    with pytest.raises(AssertionError):
        assert_close(loss * 1.01, loss.double(), 1e-3, "loss")
    with pytest.raises(AssertionError, match="at \\(\\)"):
        assert_close_per_position(loss * 1.01, loss.double(), 1e-3, "loss")


def test_explicit_scale_for_a_reference_that_is_zero_by_cancellation():
    # dq is exactly 0 in float64 where each query has one allowed key (alpha = 1); a float32
    # kernel returns rounding noise. Without a scale an all-zero reference is matched exactly.
    e = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    noise = torch.full_like(e, 3e-8)
    with pytest.raises(AssertionError):
        assert_close(noise, e, 1e-3, "dq")
    assert_close(noise, e, 1e-3, "dq", scale=1e-2)  # relative to the problem's largest gradient
    with pytest.raises(AssertionError):
        assert_close(noise + 1e-5, e, 1e-3, "dq", scale=1e-2)  # an error at 1e-3 of that scale fails
    # scale replaces the tensor's own: a smaller one is stricter.
    x = _expected(1e-4, (3, 4))
    with pytest.raises(AssertionError):
        assert_close(_noisy(x, 0.5e-3), x, 1e-3, scale=1e-6)


def test_conftest_guard_reports_and_restores_leaked_torch_state(pytester):
    pytester.makeconftest((pathlib.Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(
        """
        import pytest, torch

        @pytest.fixture
        def restored_threads():
            before = torch.get_num_threads()
            torch.set_num_threads(1 if before != 1 else 2)
            yield
            torch.set_num_threads(before)

        def test_threads():
            torch.set_num_threads(1 if torch.get_num_threads() != 1 else 2)

        def test_dtype():
            torch.set_default_dtype(torch.float64)

        def test_grad_mode():
            torch.set_grad_enabled(False)

        def test_after_the_leaks_state_is_back():
            assert torch.get_default_dtype() == torch.float32 and torch.is_grad_enabled()

        def test_fixture_that_restores(restored_threads):
            pass
        """
    )
    before = (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled())
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, errors=3)
    result.stdout.fnmatch_lines([
        "*test_threads changed global torch state*torch.get_num_threads()*",
        "*test_dtype changed global torch state*torch.get_default_dtype(): torch.float32 -> torch.float64*",
        "*test_grad_mode changed global torch state*torch.is_grad_enabled(): True -> False*",
    ])
    assert (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()) == before
