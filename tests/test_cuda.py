"""The CUDA kernels against the reference and the CPU op (skipped without a GPU).

Covers the CPU grid (GQA, every coupling form, masks with empty rows, combined
heads, odd T and d, T = 1), fp32/bf16/fp16/fp64, values and gradients of q, k,
v and the coupling, non-contiguous inputs, support_token_argmin, opcheck,
torch.compile (fullgraph and reduce-overhead) and a T = 16384 case that the
materialised reference could not hold.
"""

from __future__ import annotations

import pytest
import torch

from _cases import GRID, Case, assert_close, make_inputs, op_kwargs, upcast

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

import barrier_ops  # noqa: E402
from barrier_ops import reference as ref  # noqa: E402

# On top of the CPU op's error (w = A v rounded to the input dtype), the
# tensor-core paths round the softmax weights and dz to bf16/fp16 before the
# products (as flash attention rounds P and dS); fp32 runs scalar FMAs.
CUDA_VALUE_TOL = {torch.float64: 1e-9, torch.float32: 5e-4, torch.bfloat16: 5e-2,
                  torch.float16: 1e-2}
CUDA_GRAD_TOL = {torch.float64: 1e-8, torch.float32: 2e-3, torch.bfloat16: 1e-1,
                 torch.float16: 3e-2}

# The CPU grid plus the head dims of the CUDA tiles: padded (16, 40), exact
# (64, 128), across partial key and query blocks.
CUDA_GRID = GRID + [
    Case(H=2, Hkv=1, T=37, d=40, coupling="matrix", masked=True),
    Case(H=2, Hkv=2, T=130, d=64),
    Case(H=4, Hkv=2, T=130, d=128, coupling="scalar", causal=False, masked=True),
    Case(B=1, H=2, Hkv=1, T=1, d=128),
    Case(H=2, Hkv=1, T=97, d=16, dv=24, coupling="matrix", combine_heads=True),
]


def _grads(out, inputs):
    return torch.autograd.grad(out, [t for t in inputs if t is not None])


def _to(t, device):
    return None if t is None else t.detach().to(device).requires_grad_(t.requires_grad)


def _check_against_reference(case, dtype, noncontiguous=False, seed=0):
    q, k, v, coupling, mask = make_inputs(case, dtype, device="cuda", seed=seed,
                                          noncontiguous=noncontiguous)
    margins = barrier_ops.token_margins(q, k, v, **op_kwargs(case, coupling, mask))
    assert margins.device.type == "cuda"
    assert margins.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rq, rk, rv, rc = [upcast(t, torch.float64) for t in (q, k, v, coupling)]
    expected = ref.token_margins_reference(rq, rk, rv, **op_kwargs(case, rc, mask))
    assert_close(margins, expected, CUDA_VALUE_TOL[dtype], "margins")
    cot = torch.randn(margins.shape, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64).to("cuda")
    got = _grads((margins * cot.to(margins.dtype)).sum(), [q, k, v, coupling])
    want = _grads((expected * cot).sum(), [rq, rk, rv, rc])
    for name, g, w in zip("q k v coupling".split(), got, want):
        assert g.dtype == dtype and g.device.type == "cuda", f"grad {name} dtype/device"
        assert_close(g, w, CUDA_GRAD_TOL[dtype], f"grad {name}")


@pytest.mark.parametrize("case", CUDA_GRID, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_margins_and_gradients_match_reference(case, dtype):
    _check_against_reference(case, dtype)


@pytest.mark.parametrize("case", [GRID[0], GRID[2], GRID[4]], ids=str)
def test_float64_path_matches_reference(case):
    _check_against_reference(case, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [GRID[3], CUDA_GRID[-3]], ids=str)
def test_noncontiguous_inputs(case, dtype):
    _check_against_reference(case, dtype, noncontiguous=True)


@pytest.mark.parametrize("case", CUDA_GRID, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_barrier_loss_matches_cpu_op(case, reduction):
    """The same op on CPU and CUDA: loss, saved state and gradients."""
    q, k, v, coupling, mask = make_inputs(case, torch.float32, device="cuda", coupling_scale=3.0)
    kw = dict(op_kwargs(case, coupling, mask), eps=0.05, reduction=reduction)
    loss = barrier_ops.margin_barrier_loss(q, k, v, **kw)
    cq, ck, cv, cc = [_to(t, "cpu") for t in (q, k, v, coupling)]
    cmask = None if mask is None else mask.cpu()
    cpu_loss = barrier_ops.margin_barrier_loss(cq, ck, cv, **dict(op_kwargs(case, cc, cmask),
                                                                  eps=0.05, reduction=reduction))
    assert_close(loss, cpu_loss, CUDA_VALUE_TOL[torch.float32], "loss")
    cot = torch.randn(loss.shape, generator=torch.Generator().manual_seed(2))
    got = _grads((loss * cot.cuda()).sum(), [q, k, v, coupling])
    want = _grads((cpu_loss * cot).sum(), [cq, ck, cv, cc])
    for name, g, w in zip("q k v coupling".split(), got, want):
        assert_close(g, w, CUDA_GRAD_TOL[torch.float32], f"grad {name}")


def test_saved_state_matches_cpu_core():
    """kappa, lse (-inf where invalid) and stats follow the CPU core's layout."""
    case = Case(H=2, Hkv=1, T=70, d=40, coupling="matrix", masked=True)
    q, k, v, coupling, mask = make_inputs(case, torch.float32, device="cuda",
                                          requires_grad=False)
    args = (q, k, v, coupling, 0.2, True, mask, False)
    got = torch.ops.barrier_ops.token_margins.default(*args)
    want = torch.ops.barrier_ops.token_margins.default(
        *[t.cpu() if isinstance(t, torch.Tensor) else t for t in args])
    for name, g, w in zip(["margins", "kappa", "lse", "stats"], got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        g, w = g.cpu(), w.cpu()
        assert torch.equal(torch.isinf(g), torch.isinf(w)), f"{name}: invalid positions differ"
        finite = torch.isfinite(w)
        assert_close(g[finite], w[finite], 1e-4, name)


def test_fully_padded_and_single_token_rows():
    case = Case(B=2, H=2, Hkv=2, T=1, d=16)
    q, k, v, _, _ = make_inputs(case, torch.bfloat16, device="cuda")
    margins = barrier_ops.token_margins(q, k, v)
    # One key: alpha = 1 and kappa = c (g - k.w) = 0 up to summation order.
    assert_close(margins, torch.ones_like(margins), 1e-5, "T=1 margins")
    mask = torch.zeros(2, 1, dtype=torch.bool, device="cuda")
    loss = barrier_ops.margin_barrier_loss(q, k, v, key_padding_mask=mask)
    assert loss.item() == 0.0
    grads = _grads(loss, [q, k, v])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_padded_keys_with_nan_contents_do_not_leak():
    case = Case(B=1, H=2, Hkv=2, T=50, d=64)
    q, k, v, _, _ = make_inputs(case, torch.bfloat16, device="cuda", requires_grad=False)
    mask = torch.ones(1, 50, dtype=torch.bool, device="cuda")
    mask[0, 10:20] = False
    k[:, :, 10:20] = float("nan")
    v[:, :, 10:20] = float("nan")
    margins = barrier_ops.token_margins(q, k, v, key_padding_mask=mask)
    assert torch.isfinite(margins).all()


def test_backward_is_deterministic():
    case = Case(B=2, H=4, Hkv=2, T=300, d=64, coupling="matrix", masked=True)
    q, k, v, coupling, mask = make_inputs(case, torch.bfloat16, device="cuda")
    runs = []
    for _ in range(2):
        loss = barrier_ops.margin_barrier_loss(q, k, v, coupling=coupling, key_padding_mask=mask)
        runs.append(_grads(loss, [q, k, v, coupling]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


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


def test_head_dim_above_128_is_a_clear_error():
    q = torch.randn(1, 1, 4, 160, device="cuda")
    with pytest.raises(ValueError, match="d <= 128"):
        barrier_ops.token_margins(q, q, q)


def test_cuda_kernels_are_registered():
    for op in ["token_margins", "margin_barrier_loss", "token_margins_backward",
               "support_token_argmin"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"barrier_ops::{op}", "CUDA"), op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    case = Case(H=4, Hkv=2, T=33, d=40, coupling="matrix", masked=True)
    q, k, v, coupling, mask = make_inputs(case, dtype, device="cuda")
    c = case.d ** -0.5
    torch.library.opcheck(torch.ops.barrier_ops.token_margins.default,
                          (q, k, v, coupling, c, True, mask, False))
    torch.library.opcheck(torch.ops.barrier_ops.margin_barrier_loss.default,
                          (q, k, v, coupling, c, True, mask, True, 1e-2, "mean"))
    margins = barrier_ops.token_margins(q, k, v, coupling=coupling, key_padding_mask=mask)
    torch.library.opcheck(torch.ops.barrier_ops.support_token_argmin.default,
                          (margins.detach(), mask))
    with torch.no_grad():
        _, kappa, lse, stats = torch.ops.barrier_ops.token_margins.default(
            q, k, v, coupling, c, True, mask, False)
    torch.library.opcheck(torch.ops.barrier_ops.token_margins_backward.default,
                          (torch.randn_like(kappa), q.detach(), k.detach(), v.detach(),
                           coupling.detach(), c, True, mask, kappa, lse, stats))


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile(mode):
    case = Case(H=4, Hkv=2, T=64, d=64, coupling="scalar")
    q, k, v, coupling, _ = make_inputs(case, torch.bfloat16, device="cuda")

    def step(q, k, v, coupling):
        loss = barrier_ops.margin_barrier_loss(q, k, v, coupling=coupling)
        return loss, barrier_ops.token_margins(q, k, v, coupling=coupling)

    compiled = torch.compile(step, fullgraph=True, mode=mode)
    want_loss, want_m = step(q, k, v, coupling)
    for _ in range(3):  # reduce-overhead records a CUDA graph after warm-up runs
        got_loss, got_m = compiled(q, k, v, coupling)
        assert_close(got_loss, want_loss, 1e-5, "loss")
        assert_close(got_m, want_m, 1e-5, "margins")
        got = _grads(got_loss, [q, k, v, coupling])
        want = _grads(want_loss, [q, k, v, coupling])
        for name, g, w in zip("q k v coupling".split(), got, want):
            assert_close(g, w, 1e-5, f"grad {name}")


def test_long_sequence_bf16_runs_where_reference_would_not_fit():
    """T = 16384, d = 128: the reference materialises T x T fp32 logits (1 GiB per head,
    several copies under autograd); the fused op stays O(B H T d)."""
    B, H, T, d = 1, 2, 16384, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, device="cuda", generator=gen, dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))
    torch.cuda.reset_peak_memory_stats()
    loss = barrier_ops.margin_barrier_loss(q, k, v)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # O(B H T d) memory: half of one T x T fp32 matrix (1 GiB) bounds it.
    assert torch.cuda.max_memory_allocated() < 512 * 2**20
    # Spot-check a few late rows against the reference on a window-free slice:
    # the last query's margin from the reference over its full causal row.
    t = T - 1
    with torch.no_grad():
        qs, ks, vs = (x.detach()[:, :, : t + 1].double() for x in (q, k, v))
        z = (qs[:, :, t:] @ ks.transpose(-1, -2)) * d ** -0.5
        alpha = torch.softmax(z, -1)
        kbar, vbar = alpha @ ks, alpha @ vs
        g = (ks * vs).sum(-1)
        kappa = d ** -0.5 * ((alpha * g.unsqueeze(2)).sum(-1) - (kbar * vbar).sum(-1))
        margins = barrier_ops.token_margins(q.detach(), k.detach(), v.detach())
    assert_close(margins[:, :, t:], 1 - kappa, CUDA_VALUE_TOL[torch.bfloat16], "last margin")
