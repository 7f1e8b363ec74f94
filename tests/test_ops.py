"""The fused CPU ops against the pure-PyTorch reference: values, gradients, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

import barrier_ops
from barrier_ops import reference as ref
from _cases import GRID, GRAD_TOL, VALUE_TOL, Case, assert_close, make_inputs, op_kwargs, upcast


def _grads(out, inputs):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs)


def _ref_inputs(q, k, v, coupling, dtype):
    return [upcast(t, dtype) for t in (q, k, v, coupling)]


@pytest.mark.parametrize("case", GRID, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_margins_and_gradients_match_reference(case, dtype):
    q, k, v, coupling, mask = make_inputs(case, dtype)
    kw = op_kwargs(case, coupling, mask)
    margins = barrier_ops.token_margins(q, k, v, **kw)
    rq, rk, rv, rc = _ref_inputs(q, k, v, coupling, torch.float64)
    expected = ref.token_margins_reference(rq, rk, rv, **op_kwargs(case, rc, mask))
    assert margins.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert margins.shape == ((case.B, case.T) if case.combine_heads else (case.B, case.H, case.T))
    assert_close(margins, expected, VALUE_TOL[dtype], "margins")

    # A random cotangent exercises every position's gradient, not just a sum.
    cot = torch.randn(margins.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = _grads((margins * cot.to(margins.dtype)).sum(), [q, k, v, coupling])
    want = _grads((expected * cot).sum(), [rq, rk, rv, rc])
    for name, g, w in zip("q k v coupling".split(), got, want):
        assert g.dtype == dtype, f"grad {name} dtype"
        assert_close(g, w, GRAD_TOL[dtype], f"grad {name}")


@pytest.mark.parametrize("case", GRID, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_barrier_loss_matches_reference(case, reduction):
    dtype = torch.float32
    q, k, v, coupling, mask = make_inputs(case, dtype, coupling_scale=3.0)
    kw = dict(op_kwargs(case, coupling, mask), eps=0.05, reduction=reduction)
    loss = barrier_ops.margin_barrier_loss(q, k, v, **kw)
    rq, rk, rv, rc = _ref_inputs(q, k, v, coupling, torch.float64)
    expected = ref.margin_barrier_loss_reference(
        rq, rk, rv, **dict(op_kwargs(case, rc, mask), eps=0.05, reduction=reduction)
    )
    assert_close(loss, expected, VALUE_TOL[dtype], "loss")
    cot = torch.randn(loss.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = _grads((loss * cot.to(loss.dtype)).sum(), [q, k, v, coupling])
    want = _grads((expected * cot).sum(), [rq, rk, rv, rc])
    for name, g, w in zip("q k v coupling".split(), got, want):
        assert_close(g, w, GRAD_TOL[dtype], f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [GRID[0], GRID[2], GRID[3], GRID[5]], ids=str)
def test_half_precision_inputs_accumulate_in_float32(case, dtype):
    q, k, v, coupling, mask = make_inputs(case, dtype)
    kw = op_kwargs(case, coupling, mask)
    loss = barrier_ops.margin_barrier_loss(q, k, v, **kw)
    assert loss.dtype == torch.float32
    rq, rk, rv, rc = _ref_inputs(q, k, v, coupling, torch.float64)
    expected = ref.margin_barrier_loss_reference(rq, rk, rv, **op_kwargs(case, rc, mask))
    assert_close(loss, expected, VALUE_TOL[dtype], "loss")
    got = _grads(loss, [q, k, v, coupling])
    want = _grads(expected, [rq, rk, rv, rc])
    for name, g, w in zip("q k v coupling".split(), got, want):
        assert g.dtype == dtype
        assert_close(g, w, GRAD_TOL[dtype], f"grad {name}")


def test_noncontiguous_inputs_match_contiguous():
    case = Case(H=4, Hkv=2, T=70, d=8, coupling="matrix", masked=True)
    q, k, v, coupling, mask = make_inputs(case, noncontiguous=True)
    assert not q.is_contiguous()
    kw = op_kwargs(case, coupling, mask)
    loss = barrier_ops.margin_barrier_loss(q, k, v, **kw)
    got = _grads(loss, [q, k, v, coupling])
    qc, kc, vc, cc = [t.detach().contiguous().requires_grad_() for t in (q, k, v, coupling)]
    loss_c = barrier_ops.margin_barrier_loss(qc, kc, vc, **op_kwargs(case, cc, mask))
    want = _grads(loss_c, [qc, kc, vc, cc])
    assert_close(loss, loss_c, 1e-6, "loss")
    for g, w in zip(got, want):
        assert_close(g, w, 1e-5, "grad")


@pytest.mark.parametrize("case", [GRID[1], GRID[2], GRID[3], GRID[5]], ids=str)
def test_gradcheck_float64(case):
    small = Case(**{**case.__dict__, "T": min(case.T, 9), "B": 2})
    q, k, v, coupling, mask = make_inputs(small, torch.float64)
    inputs = tuple(t for t in (q, k, v, coupling) if t is not None)

    def loss_fn(*xs):
        c = xs[3] if coupling is not None else None
        return barrier_ops.margin_barrier_loss(
            xs[0], xs[1], xs[2], **dict(op_kwargs(small, c, mask), eps=0.3)
        )

    def margins_fn(*xs):
        c = xs[3] if coupling is not None else None
        return barrier_ops.token_margins(xs[0], xs[1], xs[2], **op_kwargs(small, c, mask))

    assert torch.autograd.gradcheck(loss_fn, inputs, eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(margins_fn, inputs, eps=1e-6, atol=1e-7)


def test_proposition_1_scalar_case_is_a_times_attention_variance():
    # d = 1, k = w_k x, v = x, A = w_q: kappa_t = a * Var_alpha(x) with a = c w_q w_k.
    torch.manual_seed(0)
    T, w_q, w_k, c = 50, 0.7, 1.3, 0.9
    x = torch.randn(1, 1, T, 1, dtype=torch.float64)
    q, k, v = w_q * x, w_k * x, x
    coupling = torch.tensor([w_q], dtype=torch.float64)
    margins = barrier_ops.token_margins(q, k, v, coupling=coupling, scale=c)
    z = c * (q[0, 0] @ k[0, 0].T)
    z = z.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), -math.inf)
    alpha = torch.softmax(z, -1)
    xs = x[0, 0, :, 0]
    var = alpha @ xs**2 - (alpha @ xs) ** 2
    a = c * w_q * w_k
    torch.testing.assert_close(margins[0, 0], 1 - a * var, atol=1e-12, rtol=0)


def test_invalid_positions_read_one_and_get_no_gradient():
    case = Case(B=2, H=2, Hkv=1, T=12, d=4, masked=True)
    q, k, v, coupling, mask = make_inputs(case)
    margins = barrier_ops.token_margins(q, k, v, key_padding_mask=mask)
    valid = ref.valid_positions(case.B, case.T, True, mask, q.device)
    assert (margins[~valid.unsqueeze(1).expand_as(margins)] == 1.0).all()
    grad_q, = torch.autograd.grad(margins.sum(), [q])
    assert (grad_q[~valid.unsqueeze(1).expand_as(margins)] == 0).all()


def test_fully_padded_batch_gives_zero_loss_not_nan():
    case = Case(B=2, H=2, Hkv=2, T=6, d=4)
    q, k, v, _, _ = make_inputs(case)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    for reduction in ("mean", "sum"):
        loss = barrier_ops.margin_barrier_loss(q, k, v, key_padding_mask=mask, reduction=reduction)
        assert loss.item() == 0.0
        grads = torch.autograd.grad(loss, [q, k, v])
        assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


def test_single_token_has_zero_kappa():
    # With one key the attention distribution is a point mass: no covariance.
    q, k, v, _, _ = make_inputs(Case(B=3, H=2, Hkv=2, T=1, d=4))
    margins = barrier_ops.token_margins(q, k, v)
    assert margins.shape == (3, 2, 1)
    assert (margins == 1.0).all()
    loss = barrier_ops.margin_barrier_loss(q, k, v)
    assert loss.item() == 0.0


def test_margins_past_the_boundary_give_finite_loss_and_restoring_gradient():
    case = Case(B=1, H=2, Hkv=2, T=40, d=4, coupling="scalar")
    q, k, v, _, _ = make_inputs(case, torch.float64)
    coupling = torch.full((2,), 200.0, dtype=torch.float64, requires_grad=True)
    margins = barrier_ops.token_margins(q, k, v, coupling=coupling)
    assert (margins < 0).any(), "the test needs infeasible margins"
    loss = barrier_ops.margin_barrier_loss(q, k, v, coupling=coupling, eps=1e-2)
    expected = ref.margin_barrier_loss_reference(q, k, v, coupling=coupling, eps=1e-2)
    assert torch.isfinite(loss)
    assert_close(loss, expected, 1e-9, "loss")
    grad_c, grad_q = torch.autograd.grad(loss, [coupling, q])
    assert torch.isfinite(grad_c).all() and torch.isfinite(grad_q).all()
    want_c, want_q = torch.autograd.grad(expected, [coupling, q])
    assert_close(grad_c, want_c, 1e-9, "grad coupling")
    assert_close(grad_q, want_q, 1e-9, "grad q")
    # A larger coupling shrinks the margins, so the barrier must push it down.
    assert (grad_c > 0).all()


def test_default_scale_is_inverse_sqrt_d():
    q, k, v, _, _ = make_inputs(Case(T=20, d=9), requires_grad=False)
    a = barrier_ops.token_margins(q, k, v)
    b = barrier_ops.token_margins(q, k, v, scale=1 / 3)
    assert torch.equal(a, b)


def test_autocast_casts_mixed_inputs_and_keeps_float32_margins():
    case = Case(H=4, Hkv=2, T=33, d=8, coupling="matrix")
    q, k, v, coupling, _ = make_inputs(case, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = barrier_ops.margin_barrier_loss(q, k, v, coupling=coupling)
        margins = barrier_ops.token_margins(q.bfloat16(), k, v, coupling=coupling)
    assert loss.dtype == torch.float32 and margins.dtype == torch.float32
    grads = _grads(loss, [q, k, v, coupling])
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    rq, rk, rv, rc = [upcast(t.bfloat16(), torch.float64) for t in (q, k, v, coupling)]
    expected = ref.margin_barrier_loss_reference(rq, rk, rv, coupling=rc)
    assert_close(loss, expected, VALUE_TOL[torch.bfloat16], "autocast loss")


def test_gqa_gradient_of_a_kv_head_sums_its_query_heads():
    # Repeating k, v per query head (MHA) must give the same loss, and the kv
    # gradient must be the sum of the repeated heads' gradients.
    case = Case(H=4, Hkv=2, T=30, d=6)
    q, k, v, _, _ = make_inputs(case, torch.float64)
    loss = barrier_ops.margin_barrier_loss(q, k, v)
    gk, gv = torch.autograd.grad(loss, [k, v])
    k_rep = k.detach().repeat_interleave(2, 1).requires_grad_()
    v_rep = v.detach().repeat_interleave(2, 1).requires_grad_()
    loss_rep = barrier_ops.margin_barrier_loss(q, k_rep, v_rep)
    gk_rep, gv_rep = torch.autograd.grad(loss_rep, [k_rep, v_rep])
    assert_close(loss, loss_rep, 1e-12, "loss")
    assert_close(gk, gk_rep.view(2, 2, 2, 30, 6).sum(2), 1e-10, "grad k")
    assert_close(gv, gv_rep.view(2, 2, 2, 30, 6).sum(2), 1e-10, "grad v")


def test_combine_heads_margin_is_one_minus_summed_kappa():
    case = Case(H=3, Hkv=3, T=25, d=4, masked=True)
    q, k, v, _, mask = make_inputs(case, torch.float64, requires_grad=False)
    per_head = barrier_ops.token_margins(q, k, v, key_padding_mask=mask)
    combined = barrier_ops.token_margins(q, k, v, key_padding_mask=mask, combine_heads=True)
    assert_close(combined, 1 - (1 - per_head).sum(1), 1e-12, "combined margins")


def test_no_grad_path_and_requires_grad_flags():
    q, k, v, _, _ = make_inputs(Case(T=10), requires_grad=False)
    out = barrier_ops.margin_barrier_loss(q, k, v)
    assert not out.requires_grad
    q.requires_grad_()
    out = barrier_ops.margin_barrier_loss(q, k, v)
    assert out.requires_grad
    (gq,) = torch.autograd.grad(out, [q])
    assert gq.shape == q.shape


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _random_case(draw):
    Hkv = draw(st.integers(1, 3))
    coupling = draw(st.sampled_from(["none", "scalar", "matrix"]))
    d = draw(st.integers(1, 12))
    return Case(
        B=draw(st.integers(1, 3)),
        Hkv=Hkv,
        H=Hkv * draw(st.integers(1, 3)),
        T=draw(st.integers(1, 150)),
        d=d,
        dv=draw(st.integers(1, 12)) if coupling == "matrix" else d,
        coupling=coupling,
        causal=draw(st.sampled_from([True, False, "strict"])),
        masked=draw(st.booleans()),
        combine_heads=draw(st.booleans()),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_random_case(), seed=st.integers(0, 2**16), backend=st.sampled_from(["fused", "sdpa"]))
def test_random_cases_match_reference(case, seed, backend):
    q, k, v, coupling, mask = make_inputs(case, torch.float32, seed=seed)
    kw = dict(op_kwargs(case, coupling, mask), eps=0.05, backend=backend)
    loss = barrier_ops.margin_barrier_loss(q, k, v, **kw)
    rq, rk, rv, rc = _ref_inputs(q, k, v, coupling, torch.float64)
    expected = ref.margin_barrier_loss_reference(rq, rk, rv, **dict(op_kwargs(case, rc, mask), eps=0.05))
    assert_close(loss, expected, VALUE_TOL[torch.float32], "loss")
    if not expected.requires_grad:  # strict T = 1: no position has a margin
        return
    got = torch.autograd.grad(loss, [t for t in (q, k, v, coupling) if t is not None], allow_unused=True)
    want = torch.autograd.grad(expected, [t for t in (rq, rk, rv, rc) if t is not None], allow_unused=True)
    # A gradient can be zero by cancellation (strict, T = 2: one allowed key and
    # kappa = 0 whatever q is) while float32 leaves rounding noise: each is held
    # to the problem's largest gradient, which catches zeros and scale errors alike.
    scale = max(w.abs().max().item() for w in want if w is not None)
    for name, g, w in zip("q k v coupling".split(), got, want):
        if w is None:
            continue
        assert_close(g, w, GRAD_TOL[torch.float32], f"grad {name}", scale=max(w.abs().max().item(), scale))


@pytest.mark.parametrize("use_loss", [True, False])
def test_non_reentrant_checkpoint_reads_saved_tensors_once(use_loss):
    from torch.utils.checkpoint import checkpoint

    q, k, v, _, _ = make_inputs(Case(T=20))

    def f(q, k, v):
        if use_loss:
            return barrier_ops.margin_barrier_loss(q, k, v)
        return barrier_ops.token_margins(q, k, v).sum()

    got = torch.autograd.grad(checkpoint(f, q, k, v, use_reentrant=False), [q, k, v])
    want = torch.autograd.grad(f(q, k, v), [q, k, v])
    for g, w in zip(got, want):
        assert_close(g, w, 1e-6, "grad")
