"""The CUDA kernels against the reference and the CPU op (skipped without a GPU).

Fused CUDA backend (``backend="fused"``; on CUDA ``"auto"`` means sdpa, so every
test of our kernels names it): the CPU grid plus CUDA tile shapes and strict
causality (GQA, every coupling form, masks with empty rows, combined heads, odd
T and d, T = 1) in fp32/bf16/fp16/fp64, values and gradients of q, k, v and the
coupling, non-contiguous inputs, the kappa op's saved state against the CPU
core, support_token_argmin, opcheck of every op (the composite ops' opcheck,
covered on CPU, is named *cpu_covered*: benchmarks/gpu_check.sh deselects it),
torch.compile (fullgraph and
reduce-overhead) and a T = 16384 case that the materialised reference could not
hold. The sdpa backend is checked on CUDA against the same reference, and with
keys/values of a large mean at the barrier's real gradient scale, float16
without a loss scale included (where only its power-of-two rescale of dO keeps
the gradients).

Tolerances and the grid comparison (coupling gradients in bf16/fp16 too, held
entrywise to their sum of absolute terms) live in tests/_precision_checks.py,
with the errors they are derived from; tests/test_precision_checks_on_cpu.py
runs the same checks on CPU, where each fails on a planted defect.

Regression tests of the CUDA numerics fixes (each fails on the kernels before the fix):
realistic inputs (keys/values with a mean of 3-10x their std), the barrier's
real gradient scale, NaN in padded q/k/w, strict causality at the op level, and
a clear error below compute capability 8.0. The kappa-op tests call
torch.ops.barrier_ops.kappa directly: the public API centres k and w before the
kernel, the op itself must not need it.

Every comparison is relative to the expected tensor's own scale
(_cases.assert_close: max error <= tol * max|expected|).
"""

from __future__ import annotations

import pytest
import torch

from _cases import GRID, Case, assert_close, make_inputs, op_kwargs, upcast
from _precision_checks import (
    check_against_reference,
    sdpa_fp16_without_loss_scale_check,
    sdpa_real_scale_check,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

import barrier_ops  # noqa: E402
from barrier_ops import reference as ref  # noqa: E402

OPS = torch.ops.barrier_ops
OP_CAUSAL = {True: "inclusive", False: "none", "strict": "strict"}
REF_CAUSAL = {"inclusive": True, "none": False, "strict": "strict"}

# On top of the CPU op's error (w = A v rounded to the input dtype), the
# tensor-core paths round the softmax weights and the gradient operands to
# bf16/fp16 before the products (as flash attention rounds P and dS); fp32 runs
# scalar FMAs. Relative to each tensor's largest entry.
CUDA_VALUE_TOL = {torch.float64: 1e-9, torch.float32: 5e-4, torch.bfloat16: 5e-2,
                  torch.float16: 1e-2}
CUDA_GRAD_TOL = {torch.float64: 1e-8, torch.float32: 2e-3, torch.bfloat16: 1e-1,
                 torch.float16: 3e-2}

STRICT = [
    Case(H=4, Hkv=2, T=37, d=8, causal="strict"),
    Case(H=2, Hkv=1, T=130, d=16, coupling="scalar", masked=True, causal="strict"),
    Case(H=2, Hkv=2, T=97, d=64, coupling="matrix", masked=True, causal="strict",
         combine_heads=True),
    Case(B=2, H=1, Hkv=1, T=1, d=4, causal="strict"),
]

# The CPU grid plus the head dims of the CUDA tiles: padded (16, 40), exact
# (64, 128), across partial key and query blocks, and strict causality.
CUDA_GRID = GRID + [
    Case(H=2, Hkv=1, T=37, d=40, coupling="matrix", masked=True),
    Case(H=2, Hkv=2, T=130, d=64),
    Case(H=4, Hkv=2, T=130, d=128, coupling="scalar", causal=False, masked=True),
    Case(B=1, H=2, Hkv=1, T=1, d=128),
    Case(H=2, Hkv=1, T=97, d=16, dv=24, coupling="matrix", combine_heads=True),
] + STRICT


def case_id(case):
    return str(case) + ("-strict" if case.causal == "strict" else "")


def _grads(out, inputs):
    return torch.autograd.grad(out, [t for t in inputs if t is not None])


def _to(t, device):
    return None if t is None else t.detach().to(device).requires_grad_(t.requires_grad)


def _check_against_reference(case, dtype, backend="fused", noncontiguous=False, seed=0,
                             value_tol=None, grad_tol=None):
    """tests/_precision_checks.check_against_reference on CUDA: margins and the gradients
    of q, k, v and the coupling (16-bit couplings entrywise against their sum of
    absolute terms) at GRID_TOL, the per-backend, per-dtype tolerances derived there."""
    check_against_reference(case, dtype, "cuda", backend=backend, noncontiguous=noncontiguous,
                            seed=seed, value_tol=value_tol, grad_tol=grad_tol)


# ---------------------------------------------------------------------------
# Grid parity, both backends
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CUDA_GRID, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_margins_and_gradients_match_reference(case, dtype):
    _check_against_reference(case, dtype)


@pytest.mark.parametrize("case", [GRID[0], GRID[2], GRID[4], STRICT[1]], ids=case_id)
def test_float64_path_matches_reference(case):
    _check_against_reference(case, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [GRID[3], CUDA_GRID[len(GRID) + 2]], ids=case_id)
def test_noncontiguous_inputs(case, dtype):
    _check_against_reference(case, dtype, noncontiguous=True)


@pytest.mark.parametrize("case", [GRID[0], GRID[2], GRID[4], GRID[5], CUDA_GRID[len(GRID) + 1],
                                  STRICT[1], STRICT[2]], ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sdpa_backend_matches_reference_on_cuda(case, dtype):
    _check_against_reference(case, dtype, backend="sdpa")


@pytest.mark.parametrize("causal", [True, "strict"])
@pytest.mark.parametrize("mean", [3.0, 10.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sdpa_backend_with_large_mean_keys_at_the_real_gradient_scale(dtype, mean, causal):
    """Keys/values with a mean of 3 and 10 std, GQA, a padded tail, loss = 0.02 *
    mean barrier as one slice of a 262144-token batch (fp16 under a 2^16 loss scale):
    loss and every gradient against float64 (tests/_precision_checks.py; on CPU the
    same check fails without the centring)."""
    sdpa_real_scale_check(dtype, mean, causal, "cuda")


def test_sdpa_backend_float16_gradients_without_a_loss_scale():
    """float16, no loss scale, the real per-token gradient of a 16384-token batch:
    dO lies below float16's normal range, so only the backend's power-of-two rescale
    of dO keeps SDPA's float16 backward exact (on CPU the check fails without it; the
    2^16-loss-scale tests pass either way)."""
    sdpa_fp16_without_loss_scale_check("cuda")


def test_auto_backend_is_sdpa_on_cuda():
    from barrier_ops.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cuda")) == "sdpa"


@pytest.mark.parametrize("case", CUDA_GRID, ids=case_id)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_barrier_loss_matches_cpu_op(case, reduction):
    """The same fused op on CPU and CUDA: loss and gradients."""
    q, k, v, coupling, mask = make_inputs(case, torch.float32, device="cuda", coupling_scale=3.0)
    kw = dict(op_kwargs(case, coupling, mask), eps=0.05, reduction=reduction, backend="fused")
    loss = barrier_ops.margin_barrier_loss(q, k, v, **kw)
    cq, ck, cv, cc = [_to(t, "cpu") for t in (q, k, v, coupling)]
    cmask = None if mask is None else mask.cpu()
    cpu_loss = barrier_ops.margin_barrier_loss(
        cq, ck, cv, **dict(op_kwargs(case, cc, cmask), eps=0.05, reduction=reduction,
                           backend="fused"))
    assert_close(loss, cpu_loss, CUDA_VALUE_TOL[torch.float32], "loss")
    cot = torch.randn(loss.shape, generator=torch.Generator().manual_seed(2))
    got = _grads((loss * cot.cuda()).sum(), [q, k, v, coupling])
    want = _grads((cpu_loss * cot).sum(), [cq, ck, cv, cc])
    for name, g, w in zip("q k v coupling".split(), got, want):
        assert_close(g, w, CUDA_GRAD_TOL[torch.float32], f"grad {name}")


# ---------------------------------------------------------------------------
# The kappa op itself (torch.ops.barrier_ops.kappa / kappa_backward)
# ---------------------------------------------------------------------------


def _kappa_inputs(B=2, H=4, T=256, d=64, dtype=torch.float32, k_mean=0.0, w_mean=0.0,
                  masked=True, seed=0):
    """q, k, w [B, H, T, d] on CUDA and a bool mask [B, T] (one sequence with a padded tail)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    k = k_mean + torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    w = w_mean + torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[-1, (3 * T) // 4:] = False
        mask[0, :2] = False  # leading padding: real tokens with no earlier real key
        mask = mask.cuda()
    return [t.to(dtype).cuda().requires_grad_() for t in (q, k, w)], mask


def _kappa_reference(q, k, w, scale, causal, mask):
    """float64 kappa on the same values (0 at invalid positions), differentiable."""
    kappa, _ = ref.token_kappa_reference(q, k, w, scale=scale, causal=REF_CAUSAL[causal],
                                         key_padding_mask=mask)
    return kappa


def _kappa_op_vs_reference(q, k, w, scale, causal, mask, beta):
    """(kappa, dq, dk, dw) of the fused op and of the float64 reference, loss = sum beta kappa."""
    kappa = OPS.kappa(q, k, w, scale, causal, mask)[0]
    got = (kappa, *_grads((kappa * beta.to(kappa.dtype)).sum(), [q, k, w]))
    rq, rk, rw = [upcast(t, torch.float64) for t in (q, k, w)]
    expected = _kappa_reference(rq, rk, rw, scale, causal, mask)
    want = (expected, *_grads((expected * beta.double()).sum(), [rq, rk, rw]))
    return got, want


@pytest.mark.parametrize("causal", ["none", "inclusive", "strict"])
def test_kappa_state_matches_cpu_core(causal):
    """kappa, lse (-inf where invalid) and stats follow the CPU core's layout."""
    (q, k, w), mask = _kappa_inputs(B=2, H=2, T=70, d=40)
    args = (q.detach(), k.detach(), w.detach(), 0.2, causal, mask)
    got = OPS.kappa.default(*args)
    want = OPS.kappa.default(*[t.cpu() if isinstance(t, torch.Tensor) else t for t in args])
    for name, g, w_ in zip(["kappa", "lse", "stats"], got, want):
        assert g.shape == w_.shape and g.dtype == w_.dtype, name
        assert g.is_contiguous(), name
        g, w_ = g.cpu(), w_.cpu()
        assert torch.equal(torch.isinf(g), torch.isinf(w_)), f"{name}: invalid positions differ"
        finite = torch.isfinite(w_)
        assert_close(g[finite], w_[finite], 1e-4, name)


def test_strict_causality_in_the_kappa_op():
    """s < t: position 0 has no key (kappa 0, lse -inf, stats 0, zero gradient) and
    the last key is seen by no query (zero dk, dw); the rest matches the reference."""
    (q, k, w), _ = _kappa_inputs(B=2, H=2, T=150, d=64, masked=False)
    kappa, lse, stats = OPS.kappa(q, k, w, 0.125, "strict", None)
    assert (kappa[:, :, 0] == 0).all() and torch.isneginf(lse[:, :, 0]).all()
    assert (stats[:, :, 0] == 0).all()
    assert torch.isfinite(lse[:, :, 1:]).all()
    beta = torch.randn(kappa.shape, generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64).cuda()
    got, want = _kappa_op_vs_reference(q, k, w, 0.125, "strict", None, beta)
    for name, g, e in zip(["kappa", "dq", "dk", "dw"], got, want):
        assert_close(g, e, CUDA_GRAD_TOL[torch.float32], name)
    _, dq, dk, dw = got
    assert (dq[:, :, 0] == 0).all()
    assert (dk[:, :, -1] == 0).all() and (dw[:, :, -1] == 0).all()
    # Inclusive differs from strict (the diagonal matters): the modes are not mixed up.
    inclusive = OPS.kappa(q, k, w, 0.125, "inclusive", None)[0]
    assert not torch.allclose(inclusive[:, :, 1:], kappa[:, :, 1:])


@pytest.mark.parametrize("causal", ["none", "inclusive", "strict"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_in_padded_rows_does_not_leak_through_the_kappa_op(dtype, causal):
    """CUDA numerics fix (4): the key kernel loaded Q without the row mask; dz is 0 for a padded
    query but 0 * NaN = NaN poisoned dk of the whole key block. Padded rows of q, k and
    w hold NaN here; everything must equal the run with zeros there."""
    (q, k, w), mask = _kappa_inputs(B=2, H=2, T=150, d=64, dtype=dtype)
    pad = (~mask)[:, None, :, None]
    clean = [torch.where(pad, torch.zeros_like(t), t).detach().requires_grad_() for t in (q, k, w)]
    dirty = [torch.where(pad, torch.full_like(t, float("nan")), t).detach().requires_grad_()
             for t in (q, k, w)]
    beta = torch.rand(q.shape[:3], generator=torch.Generator().manual_seed(4)).cuda()
    results = []
    for inputs in (clean, dirty):
        out = OPS.kappa(*inputs, 0.125, causal, mask)
        grads = _grads((out[0] * beta).sum(), inputs)
        results.append((*out, *grads))
    names = ["kappa", "lse", "stats", "dq", "dk", "dw"]
    for name, c, d_ in zip(names, *results):
        assert not torch.isnan(d_).any(), f"{name}: NaN leaked from padded rows"
        assert torch.equal(torch.isinf(c), torch.isinf(d_)), name
        finite = torch.isfinite(c)
        assert_close(d_[finite], c[finite], 1e-6, name)
    for g in results[1][3:]:
        assert (g.masked_select(pad.expand_as(g)) == 0).all()


# Relative tolerances for the large-mean, real-scale kappa-op test, from a CPU
# emulation of the kernels' rounding points (errors ~3e-4 fp32 (logits of
# large-mean keys), 5e-3 bf16, 6e-4 fp16 for dq, plus the output rounding to the
# input dtype) times ~3. The kernels before the numerics fixes gave (emulated, mean
# 3 / 10 std): bf16 dq 0.17 / 6.3, fp16 dq 1.9e-2 / 0.96, fp32 dq 1e-4 / 5.7e-3.
LARGE_MEAN_TOL = {torch.float32: 1.5e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("mean", [3.0, 10.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kappa_op_with_large_mean_keys_at_the_real_gradient_scale(dtype, mean):
    """CUDA numerics fix (1-3), at the op level (no centring by the caller):
    keys and values with a mean of `mean` x their std, and beta = dL/dkappa of
    0.02 * a mean-reduced barrier over B*H*T = 262144 tokens (~1e-7 per token;
    times GradScaler's 2^16 in float16, whose gradients are not representable
    otherwise). Before the fix: fp16 operands -beta c alpha and c dz underflowed
    (dq all zero without a loss scale, subnormal with it), the cross term used
    rounded kbar/wbar while hbar used the float32 ones, and dk/dw cancelled."""
    (q, k, w), mask = _kappa_inputs(dtype=dtype, k_mean=mean, w_mean=mean)
    loss_scale = 2.0**16 if dtype == torch.float16 else 1.0
    g = torch.Generator().manual_seed(5)
    # dL/dkappa = -weight/N psi'(m) > 0; psi' spans ~[-2, -0.5] for m in [0.5, 2].
    beta = loss_scale * 0.02 / 262_144 * (0.5 + 1.5 * torch.rand(q.shape[:3], generator=g))
    got, want = _kappa_op_vs_reference(q, k, w, 0.125, "inclusive", mask, beta.cuda())
    for name, gt, e in zip(["kappa", "dq", "dk", "dw"], got, want):
        if name != "kappa":
            assert gt.dtype == dtype
            assert (gt != 0).any(), f"{name} underflowed to zero"
        assert_close(gt, e, LARGE_MEAN_TOL[dtype], f"{name} (mean {mean} std)")


# Measured on CPU for the fused CPU kernels (float32 inside) ~2e-3; the CUDA
# kernels round their tensor-core operands too (emulated dq ~5e-3 bf16, ~5e-4 fp16).
REAL_SCALE_GRAD_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("causal", [True, "strict"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_at_the_barriers_real_scale(dtype, causal):
    """CUDA numerics fix (1), through the public API: loss = 0.02 * margin_barrier_loss(mean) as
    one slice of B*H*T = 262144 tokens, keys/values with a mean of 3 std (float16
    under a 2^16 GradScaler, bfloat16 unscaled). dq must not underflow to zero."""
    B, H, T, d = 2, 4, 256, 64
    g = torch.Generator().manual_seed(6)
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    k = 3.0 + torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    v = 3.0 + torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[-1, (3 * T) // 4:] = False
    q, k, v = [t.to(dtype).cuda().requires_grad_() for t in (q, k, v)]
    mask = mask.cuda()
    loss_scale = 2.0**16 if dtype == torch.float16 else 1.0
    weight = loss_scale * 0.02 / 262_144 * int(mask.sum()) * H
    kw = dict(causal=causal, key_padding_mask=mask)
    loss = weight * barrier_ops.margin_barrier_loss(q, k, v, **kw, backend="fused")
    rq, rk, rv = [upcast(t, torch.float64) for t in (q, k, v)]
    expected = weight * ref.margin_barrier_loss_reference(rq, rk, rv, **kw)
    assert_close(loss, expected, CUDA_VALUE_TOL[dtype], "loss")
    got = _grads(loss, [q, k, v])
    want = _grads(expected, [rq, rk, rv])
    for name, gt, e in zip("qkv", got, want):
        assert (gt != 0).any(), f"grad {name} underflowed to zero"
        assert_close(gt, e, REAL_SCALE_GRAD_TOL[dtype], f"grad {name}")


# ---------------------------------------------------------------------------
# Edge cases, padding, determinism
# ---------------------------------------------------------------------------


def test_fully_padded_and_single_token_rows():
    case = Case(B=2, H=2, Hkv=2, T=1, d=16)
    q, k, v, _, _ = make_inputs(case, torch.bfloat16, device="cuda")
    margins = barrier_ops.token_margins(q, k, v, backend="fused")
    # One key: alpha = 1 and kappa = c (g - k.w) = 0 up to summation order.
    assert (margins - 1).abs().max().item() <= 1e-5
    strict = barrier_ops.token_margins(q, k, v, causal="strict", backend="fused")
    assert (strict == 1).all()  # no allowed key at all: invalid, reported as 1
    mask = torch.zeros(2, 1, dtype=torch.bool, device="cuda")
    loss = barrier_ops.margin_barrier_loss(q, k, v, key_padding_mask=mask, backend="fused")
    assert loss.item() == 0.0
    grads = _grads(loss, [q, k, v])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("backend", ["fused", "sdpa"])
@pytest.mark.parametrize("causal", [True, "strict"])
def test_nan_in_padded_tokens_does_not_leak_through_the_api(backend, causal):
    case = Case(B=2, H=2, Hkv=2, T=150, d=64, causal=causal)
    q, k, v, _, _ = make_inputs(case, torch.bfloat16, device="cuda")
    mask = torch.ones(2, 150, dtype=torch.bool, device="cuda")
    mask[0, 10:20] = False
    mask[1, 120:] = False
    pad = (~mask)[:, None, :, None]
    dirty = [torch.where(pad, torch.full_like(t, float("nan")), t).detach().requires_grad_()
             for t in (q, k, v)]
    kw = dict(causal=causal, key_padding_mask=mask, backend=backend)
    margins = barrier_ops.token_margins(*dirty, **kw)
    loss = barrier_ops.margin_barrier_loss(*dirty, **kw)
    assert torch.isfinite(margins).all() and torch.isfinite(loss)
    for g in _grads(loss + margins.sum(), dirty):
        assert torch.isfinite(g).all()
        assert (g.masked_select(pad.expand_as(g)) == 0).all()


def test_backward_is_deterministic():
    case = Case(B=2, H=4, Hkv=2, T=300, d=64, coupling="matrix", masked=True)
    q, k, v, coupling, mask = make_inputs(case, torch.bfloat16, device="cuda")
    runs = []
    for _ in range(2):
        loss = barrier_ops.margin_barrier_loss(q, k, v, coupling=coupling, key_padding_mask=mask,
                                               backend="fused")
        runs.append(_grads(loss, [q, k, v, coupling]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# support_token_argmin
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_support_token_argmin_matches_reference_and_cpu(dtype):
    gen = torch.Generator().manual_seed(3)
    margins = torch.randn(3, 4, 700, generator=gen).to(dtype)
    margins[0, 0, 5] = margins[0, 0, 600] = -10.0  # tie: the smaller index wins
    margins[0, 1, :] = float("nan")                 # nothing valid -> -1, +inf
    margins[1, 2, 7] = float("nan")
    margins[2, 3, 650] = -float("inf")
    mask = torch.rand(3, 700, generator=gen) > 0.2
    mask[0, 5] = mask[0, 600] = True
    mask[2, 650] = True
    mask[1, :] = mask[1, :] & (torch.arange(700) != 7)
    for m in (None, mask):
        for rows in (margins, margins[:, 0]):
            got_i, got_v = barrier_ops.support_token_argmin(rows.cuda(), None if m is None
                                                            else m.cuda())
            want_i, want_v = ref.support_token_argmin_reference(rows, m)
            cpu_i, cpu_v = barrier_ops.support_token_argmin(rows, m)
            assert torch.equal(got_i.cpu(), want_i) and torch.equal(got_i.cpu(), cpu_i)
            assert torch.equal(got_v.cpu(), cpu_v)
            assert got_v.dtype == dtype
    idx, val = barrier_ops.support_token_argmin(margins.cuda())
    assert idx[0, 0].item() == 5 and idx[0, 1].item() == -1 and val[0, 1].item() == float("inf")


def test_support_token_argmin_empty_token_dim():
    idx, val = barrier_ops.support_token_argmin(torch.empty(2, 0, device="cuda"))
    assert idx.tolist() == [-1, -1] and val.isinf().all()


# ---------------------------------------------------------------------------
# Errors, registration, torch.library, torch.compile
# ---------------------------------------------------------------------------


def test_head_dim_above_128_is_a_clear_error():
    q = torch.randn(1, 1, 4, 160, device="cuda")
    with pytest.raises(ValueError, match="d <= 128"):
        barrier_ops.token_margins(q, q, q, backend="fused")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_dtype_runs_or_names_the_needed_compute_capability(dtype):
    """CUDA numerics fix (5): below compute capability 8.0 every dtype (not only bf16/fp16)
    fails with one clear error naming the device's capability; from 8.0 on
    (sm_80, sm_90 and, through the PTX, newer GPUs) every dtype runs."""
    q = torch.randn(1, 2, 40, 64, device="cuda", dtype=dtype)
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        with pytest.raises(RuntimeError, match=rf"compute capability 8\.0.*{major}\.{minor}"):
            OPS.kappa(q, q, q, 0.125, "inclusive", None)
    else:
        kappa = OPS.kappa(q, q, q, 0.125, "inclusive", None)[0]
        assert torch.isfinite(kappa).all()


def test_cuda_kernels_are_registered():
    for op in ["kappa", "kappa_backward", "support_token_argmin"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"barrier_ops::{op}", "CUDA"), op


# opcheck on CUDA, split by what only a GPU can check. The CUDA kernels' real outputs
# against their fake kernels (schema, autograd registration, fake tensors) run for
# every dtype and causal mode; the slow AOT-dispatch tracing (~30 s a case on CPU,
# mostly Python) once; the composite ops (CompositeImplicitAutograd Python, the same
# code on every device, opcheck'd on CPU by tests/test_library.py) are named
# *cpu_covered*, which benchmarks/gpu_check.sh deselects to fit its time budget.
KERNEL_OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _kernel_opcheck_args(dtype, causal):
    (kq, kk, kw_), kmask = _kappa_inputs(B=2, H=2, T=33, d=40, dtype=dtype)
    c = 40 ** -0.5
    with torch.no_grad():
        kappa, lse, stats = OPS.kappa.default(kq, kk, kw_, c, causal, kmask)
    margins = barrier_ops.token_margins(kq, kk, kw_, causal=REF_CAUSAL[causal], key_padding_mask=kmask,
                                        backend="fused").detach()
    return {
        OPS.kappa.default: (kq, kk, kw_, c, causal, kmask),
        OPS.kappa_backward.default: (torch.randn_like(kappa), kq.detach(), kk.detach(), kw_.detach(), c,
                                     causal, kmask, kappa, lse, stats),
        OPS.support_token_argmin.default: (margins, kmask),
    }


@pytest.mark.parametrize("causal", ["inclusive", "strict"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cuda_kernels(dtype, causal):
    for op, args in _kernel_opcheck_args(dtype, causal).items():
        torch.library.opcheck(op, args, test_utils=KERNEL_OPCHECK_UTILS)


def test_opcheck_cuda_kernels_aot_dispatch():
    for op, args in _kernel_opcheck_args(torch.float32, "inclusive").items():
        torch.library.opcheck(op, args, test_utils=("test_aot_dispatch_dynamic",))


@pytest.mark.parametrize("causal", ["inclusive", "strict"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_composites_cpu_covered(dtype, causal):
    case = Case(H=4, Hkv=2, T=33, d=40, coupling="matrix", masked=True)
    q, k, v, coupling, mask = make_inputs(case, dtype, device="cuda")
    c = case.d ** -0.5
    torch.library.opcheck(OPS.token_margins.default,
                          (q, k, v, coupling, c, causal, mask, False, "fused"))
    torch.library.opcheck(OPS.margin_barrier_loss.default,
                          (q, k, v, coupling, c, causal, mask, True, 1e-2, None, "mean", "fused"))
    torch.library.opcheck(OPS.margin_barrier_loss.default,
                          (q, k, v, coupling, c, causal, mask, False, 0.05, 1.1, "none", "sdpa"))


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile(mode):
    # float32: in bf16, inductor's own rounding of the ATen part (centring, casts)
    # differs from eager by ~5e-3, which would hide a real mismatch.
    case = Case(H=4, Hkv=2, T=64, d=64, coupling="scalar")
    q, k, v, coupling, _ = make_inputs(case, torch.float32, device="cuda")

    def step(q, k, v, coupling):
        loss = barrier_ops.margin_barrier_loss(q, k, v, coupling=coupling, backend="fused")
        return loss, barrier_ops.token_margins(q, k, v, coupling=coupling, causal="strict",
                                               backend="fused")

    compiled = torch.compile(step, fullgraph=True, mode=mode)
    want_loss, want_m = step(q, k, v, coupling)
    want = _grads(want_loss, [q, k, v, coupling])
    for _ in range(3):  # reduce-overhead records a CUDA graph after warm-up runs
        got_loss, got_m = compiled(q, k, v, coupling)
        assert_close(got_loss, want_loss, 1e-4, "loss")
        assert_close(got_m, want_m, 1e-4, "margins")
        got = _grads(got_loss, [q, k, v, coupling])
        for name, g, w in zip("q k v coupling".split(), got, want):
            assert_close(g, w, 1e-4, f"grad {name}")


def test_long_sequence_bf16_runs_where_reference_would_not_fit():
    """T = 16384, d = 128: the reference materialises T x T fp32 logits (1 GiB per head,
    several copies under autograd); the fused op stays O(B H T d)."""
    B, H, T, d = 1, 2, 16384, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, device="cuda", generator=gen, dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))
    torch.cuda.reset_peak_memory_stats()
    loss = barrier_ops.margin_barrier_loss(q, k, v, backend="fused")
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert all((t.grad != 0).any() for t in (q, k, v))
    # O(B H T d) memory: half of one T x T fp32 matrix (1 GiB) bounds it.
    assert torch.cuda.max_memory_allocated() < 512 * 2**20
    # The last query's margin against the reference over its full causal row.
    t = T - 1
    with torch.no_grad():
        qs, ks, vs = (x.detach()[:, :, : t + 1].double() for x in (q, k, v))
        z = (qs[:, :, t:] @ ks.transpose(-1, -2)) * d ** -0.5
        alpha = torch.softmax(z, -1)
        kbar, vbar = alpha @ ks, alpha @ vs
        g = (ks * vs).sum(-1)
        kappa = d ** -0.5 * ((alpha * g.unsqueeze(2)).sum(-1) - (kbar * vbar).sum(-1))
        margins = barrier_ops.token_margins(q.detach(), k.detach(), v.detach(), backend="fused")
    assert_close(margins[:, :, t:], 1 - kappa, CUDA_VALUE_TOL[torch.bfloat16], "last margin")
