"""Low-precision checks that tests/test_cuda.py runs on the GPU, written for any device.

tests/test_precision_checks_on_cpu.py runs the same bodies on CPU, where the
sdpa backend is the same Python code (centring, the float16 dO rescale, the
attention form) and the fused backend the same ATen glue, each with a planted
defect it must catch: a check that passes on a broken implementation tests
nothing. Tolerances and where they come from are next to each check.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

import barrier_ops
from barrier_ops import reference as ref
from _cases import assert_close, make_inputs, op_kwargs, upcast

# Relative tolerances (max error / max|expected|) of the grid comparison on CUDA.
# sdpa, and fused fp32/fp64: the values tests/test_cuda.py always used. Fused
# bf16/fp16 were 5e-2 / 1e-1 and 1e-2 / 3e-2; now from the errors they add up to:
# the CPU op's own error on CUDA_GRID (measured: bf16 margins <= 6.0e-4, grads
# <= 5.9e-3; fp16 <= 7.5e-5 and <= 6.3e-4; w = A v rounded to 16 bits dominates)
# plus the CUDA kernels' extra rounding of softmax weights and gradient operands
# (CPU emulation, docs/cuda.md: bf16 dq <= 4.7e-3, dk/dw <= 7.3e-4, forward ~2e-3;
# fp16 dq <= 6.0e-4), x ~3: a uniform 4% error in one bf16 gradient now fails
# (tests/test_precision_checks_on_cpu.py), where 1e-1 let it pass.
GRID_TOL = {
    ("fused", torch.float64): (1e-9, 1e-8),
    ("fused", torch.float32): (5e-4, 2e-3),
    ("fused", torch.bfloat16): (1e-2, 3e-2),
    ("fused", torch.float16): (2e-3, 5e-3),
    ("sdpa", torch.float64): (1e-9, 1e-8),
    ("sdpa", torch.float32): (5e-4, 2e-3),
    ("sdpa", torch.bfloat16): (5e-2, 1e-1),
    ("sdpa", torch.float16): (1e-2, 3e-2),
}

# Coupling gradients in 16 bits: dA = sum_s dw_s v_s^T is formed by ATen from dw
# rounded to the input dtype, and cancels (to 1e-3 of its terms for a scalar
# coupling over all keys), so each entry is held to its own sum of absolute terms
# S = sum_s |dw_s| |v_s|^T rather than to max|dA|: |dA - ref| <= tol * S entrywise,
# tol = 8 units of bf16 rounding (2^-8) / 16 of fp16 (2^-11). Measured on CPU
# (CUDA_GRID, both backends): max error / S <= 1.3e-2 bf16 (sdpa), 2.4e-3 fp16.
# A zero, transposed or 10%-off matrix-coupling gradient fails (|dA| / S ~ 0.3-0.6
# there); for scalar couplings (|dA| / S ~ 1e-3..4e-2) only gross errors can.
COUPLING_TERM_TOL = {torch.bfloat16: 8 * 2.0**-8, torch.float16: 16 * 2.0**-11}

Perturb = Optional[Callable[[str, torch.Tensor], torch.Tensor]]


def _grads(out, inputs):
    return torch.autograd.grad(out, [t for t in inputs if t is not None])


def _coupled(v, coupling):
    if coupling.dim() == 1:
        return v * coupling.view(1, -1, 1, 1)
    return torch.matmul(v, coupling.transpose(-1, -2))


def coupling_term_scale(case, q, k, v, coupling, mask, cot):
    """(S, dA_ref): S = sum over (b, s) of |dw| |v| per coupling entry, from the float64
    reference's gradient with respect to the coupled values w = A v, and the signed
    sum of the same terms (which must be the reference's dA)."""
    group = case.H // case.Hkv
    rq = q.detach().double()
    rk = k.detach().double().repeat_interleave(group, 1)
    rv = v.detach().double().repeat_interleave(group, 1)
    ra = coupling.detach().double()
    w = _coupled(rv, ra).detach().requires_grad_()
    margins = ref.token_margins_reference(rq, rk, w, **op_kwargs(case, None, mask))
    (dw,) = torch.autograd.grad((margins * cot).sum(), [w])
    if ra.dim() == 1:
        return (dw.abs() * rv.abs()).sum(dim=(0, 2, 3)), (dw * rv).sum(dim=(0, 2, 3))
    return (torch.einsum("bhsi,bhsj->hij", dw.abs(), rv.abs()),
            torch.einsum("bhsi,bhsj->hij", dw, rv))


def assert_coupling_grad_close(got, want, scale, signed, dtype, what="grad coupling"):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale, signed = scale.cpu(), signed.cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    # The helper itself: its terms must add up to the reference's dA.
    torch.testing.assert_close(signed, want, rtol=1e-9, atol=1e-12 * float(scale.max()))
    tol = COUPLING_TERM_TOL[dtype]
    ratio = (got - want).abs() / scale.clamp(min=1e-300)
    worst = float(ratio.max())
    assert worst <= tol, (f"{what}: max |error| / (sum of |terms|) {worst:.3e} > tol {tol:.1e} "
                          f"(max|dA| / max S {float(want.abs().max() / scale.max()):.2e})")


def check_against_reference(case, dtype, device, backend="fused", noncontiguous=False, seed=0,
                            value_tol=None, grad_tol=None, perturb: Perturb = None):
    """Margins and the gradients of sum(margins * cot) against the float64 reference.

    perturb(name, grad) -> grad: a test hook that plants a defect in a gradient
    (tests/test_precision_checks_on_cpu.py); None in real use.
    """
    q, k, v, coupling, mask = make_inputs(case, dtype, device=device, seed=seed,
                                          noncontiguous=noncontiguous)
    margins = barrier_ops.token_margins(q, k, v, **op_kwargs(case, coupling, mask), backend=backend)
    assert margins.device.type == torch.device(device).type
    assert margins.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rq, rk, rv, rc = [upcast(t, torch.float64) for t in (q, k, v, coupling)]
    expected = ref.token_margins_reference(rq, rk, rv, **op_kwargs(case, rc, mask))
    tol_value, tol_grad = GRID_TOL[(backend, dtype)]
    assert_close(margins, expected, value_tol or tol_value, "margins")
    cot = torch.randn(margins.shape, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64).to(device)
    got = _grads((margins * cot.to(margins.dtype)).sum(), [q, k, v, coupling])
    want = _grads((expected * cot).sum(), [rq, rk, rv, rc])
    for name, g, w in zip("q k v coupling".split(), got, want):
        if perturb is not None:
            g = perturb(name, g)
        assert g.dtype == dtype and g.device.type == torch.device(device).type, f"grad {name} dtype/device"
        if name == "coupling" and dtype in (torch.bfloat16, torch.float16):
            scale, signed = coupling_term_scale(case, q, k, v, coupling, mask, cot)
            assert_coupling_grad_close(g, w, scale, signed, dtype)
            continue
        assert_close(g, w, grad_tol or tol_grad, f"grad {name}")


# ---------------------------------------------------------------------------
# The sdpa backend with realistic inputs
# ---------------------------------------------------------------------------

REAL_BATCH_TOKENS = 262_144  # B * H * T of the batch whose per-token gradient the checks emulate
BARRIER_WEIGHT = 0.02


def shifted_inputs(dtype, mean, device, B=2, H=4, Hkv=2, T=256, d=64, seed=6):
    """q; keys and values with a mean of `mean` x their std (GQA); a padded tail."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    k = mean + torch.randn(B, Hkv, T, d, generator=g, dtype=torch.float64)
    v = mean + torch.randn(B, Hkv, T, d, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[-1, (3 * T) // 4:] = False
    return [t.to(dtype).to(device).requires_grad_() for t in (q, k, v)], mask.to(device)


def _real_scale_loss_and_grads(q, k, v, mask, causal, weight, backend):
    kw = dict(causal=causal, key_padding_mask=mask)
    loss = weight * barrier_ops.margin_barrier_loss(q, k, v, **kw, backend=backend)
    rq, rk, rv = [upcast(t, torch.float64) for t in (q, k, v)]
    expected = weight * ref.margin_barrier_loss_reference(rq, rk, rv, **kw)
    return loss, expected, _grads(loss, [q, k, v]), _grads(expected, [rq, rk, rv])


# Relative tolerances (loss, gradients) for the sdpa backend at the real scale with
# keys/values of mean 3 and 10 std. Measured on CPU (the same Python, PyTorch's CPU
# flash kernel computing in fp32 from 16-bit inputs): fp32 loss <= 1.9e-7, grads
# <= 2.6e-6; bf16 4.4e-3 / 2.0e-2; fp16 (2^16 loss scale) 2.7e-4 / 2.8e-3. On CUDA
# the memory-efficient kernel also rounds its softmax weights and dS to 16 bits,
# and may run fp32 products in TF32 (~5e-4): x ~2.5 the CPU error, or TF32's.
SDPA_REAL_SCALE_TOL = {
    torch.float32: (2e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
    torch.float16: (5e-3, 1e-2),
}


def sdpa_real_scale_check(dtype, mean, causal, device):
    """loss = 0.02 * margin_barrier_loss(mean) as one slice of a 262144-token batch
    (fp16 under GradScaler's initial 2^16), keys/values with a large mean, GQA and a
    padded tail, through backend="sdpa": loss and gradients against float64, and no
    gradient all zero. Catches a missing centring (bf16 at mean 10: kappa is lost to
    cancellation) and any underflow of the real-scale gradient."""
    (q, k, v), mask = shifted_inputs(dtype, mean, device)
    loss_scale = 2.0**16 if dtype == torch.float16 else 1.0
    weight = loss_scale * BARRIER_WEIGHT / REAL_BATCH_TOKENS * int(mask.sum()) * q.shape[1]
    loss, expected, got, want = _real_scale_loss_and_grads(q, k, v, mask, causal, weight, "sdpa")
    tol_loss, tol_grad = SDPA_REAL_SCALE_TOL[dtype]
    assert_close(loss, expected, tol_loss, f"loss (mean {mean} std)")
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == dtype
        assert (g != 0).any(), f"grad {name} underflowed to zero"
        assert_close(g, w, tol_grad, f"grad {name} (mean {mean} std)")


# float16 without a loss scale, at the real per-token gradient of a batch of
# B * H * T = 16384 (0.02 / 16384 per token): dO (~1e-6 and below) sits under
# float16's normal range (6.1e-5), so SDPA's float16 backward would quantise it
# (and, on CUDA, its dS products) to a few bits without the power-of-two rescale;
# the inputs' gradients (dk, dv ~1e-5) are representable. Measured on CPU: dk, dv
# 7.9e-3 / 7.4e-3 with the rescale, 7.7e-2 / 5.8e-2 without it. dq (~1e-6 at most)
# is near float16's subnormal spacing 2^-24: its bound adds that spacing.
FP16_NO_SCALE_TOKENS = 16_384
FP16_NO_SCALE_TOL = 2e-2


def sdpa_fp16_without_loss_scale_check(device):
    (q, k, v), mask = shifted_inputs(torch.float16, 3.0, device)
    weight = BARRIER_WEIGHT / FP16_NO_SCALE_TOKENS * int(mask.sum()) * q.shape[1]
    loss, expected, got, want = _real_scale_loss_and_grads(q, k, v, mask, True, weight, "sdpa")
    assert_close(loss, expected, SDPA_REAL_SCALE_TOL[torch.float16][0], "loss")
    for name, g, w in zip("qkv", got, want):
        assert (g != 0).any(), f"grad {name} underflowed to zero"
        if name == "q":
            err = (g.double().cpu() - w.cpu()).abs().max().item()
            bound = FP16_NO_SCALE_TOL * w.abs().max().item() + 2.0**-24
            assert err <= bound, f"grad q: max abs error {err:.3e} > {bound:.3e} (max|dq| {w.abs().max():.2e})"
        else:
            assert_close(g, w, FP16_NO_SCALE_TOL, f"grad {name}")
