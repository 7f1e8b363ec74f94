"""Random problem builders and tolerances shared by the op tests (CPU and CUDA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Per-dtype bounds on |kernel - reference|, relative to the reference's own
# scale: assert_close bounds the largest error of a tensor by tol * max|expected|
# (margins and losses are O(1), so there this is also an absolute bound; a
# mean-reduced loss's gradients are 1e-4..1e-2 and are held to the same
# relative accuracy). bf16/fp16 inputs accumulate in float32, but w = A v is
# rounded to the input dtype before the fused core, which dominates their
# error. At the bf16/fp16 tolerances a uniform 1% scale error is below the
# bound: only float32/float64 comparisons catch it (tests/test_comparisons.py).
VALUE_TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}


@dataclass
class Case:
    B: int = 2
    H: int = 4
    Hkv: int = 2
    T: int = 37
    d: int = 8
    dv: Optional[int] = None
    coupling: str = "none"  # none | scalar | matrix
    causal: bool = True
    masked: bool = False
    combine_heads: bool = False

    def __str__(self) -> str:
        return (
            f"B{self.B}H{self.H}kv{self.Hkv}T{self.T}d{self.d}dv{self.dv or self.d}"
            f"-{self.coupling}-{'causal' if self.causal else 'full'}"
            f"{'-mask' if self.masked else ''}{'-combine' if self.combine_heads else ''}"
        )


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0, requires_grad=True,
                coupling_scale=0.3, noncontiguous=False):
    gen = torch.Generator().manual_seed(seed)
    dv = case.dv or case.d

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    if noncontiguous:
        # SDPA-layout views of [B, T, H, d] projections, as a model produces them.
        q = rand(case.B, case.T, case.H, case.d).transpose(1, 2)
        k = rand(case.B, case.T, case.Hkv, case.d).transpose(1, 2)
        v = rand(case.B, case.T, case.Hkv, dv).transpose(1, 2)
    else:
        q = rand(case.B, case.H, case.T, case.d)
        k = rand(case.B, case.Hkv, case.T, case.d)
        v = rand(case.B, case.Hkv, case.T, dv)
    coupling = None
    if case.coupling == "scalar":
        coupling = rand(case.H, scale=coupling_scale)
    elif case.coupling == "matrix":
        coupling = rand(case.H, case.d, dv, scale=coupling_scale / case.d**0.5)
    elif case.coupling != "none":
        raise ValueError(case.coupling)
    mask = None
    if case.masked:
        mask = torch.rand(case.B, case.T, generator=gen) > 0.3
        mask[0, : min(3, case.T)] = False  # leading padding: causal rows with no key
        if case.B > 1:
            mask[-1] = False  # a fully padded sequence
    tensors = [q, k, v] + ([coupling] if coupling is not None else [])
    tensors = [t.to(device) for t in tensors]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    q, k, v = tensors[:3]
    coupling = tensors[3] if coupling is not None else None
    if mask is not None:
        mask = mask.to(device)
    return q, k, v, coupling, mask


def op_kwargs(case: Case, coupling, mask):
    return dict(coupling=coupling, causal=case.causal, key_padding_mask=mask,
                combine_heads=case.combine_heads)


def upcast(t, dtype):
    """A leaf copy in a wider dtype, for references computed on the same values."""
    if t is None:
        return None
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


# The bound for an all-zero expected tensor, in units of tol: such a tensor is
# matched exactly up to denormal-level noise, never by an absolute floor.
_ZERO_SCALE = 1e-30


def _prepare(actual, expected, what):
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the result"
    assert torch.isfinite(expected).all(), f"{what}: non-finite values in the reference"
    return actual, expected


def max_rel_error(actual, expected) -> float:
    """max|actual - expected| / max|expected| (the quantity assert_close bounds)."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if not expected.numel():
        return 0.0
    scale = max(expected.abs().max().item(), _ZERO_SCALE)
    return (actual - expected).abs().max().item() / scale


def assert_close(actual, expected, tol, what="", *, scale=None):
    """max|actual - expected| <= tol * max|expected|: relative to the tensor's own scale.

    A gradient of 1e-4 is held to the same relative accuracy as a margin of 1,
    so zeros, a sign flip or a scale error fail however small the reference is.
    An all-zero expected tensor must be matched exactly. scale: compare relative
    to this instead, for a tensor that is (near) zero by cancellation while the
    problem is not, e.g. dq where every query has one allowed key, against the
    largest gradient of the same problem; never a constant such as 1.
    """
    actual, expected = _prepare(actual, expected, what)
    if not expected.numel():
        return
    err = (actual - expected).abs().max().item()
    if scale is None:
        scale = expected.abs().max().item()
    scale = max(float(scale), _ZERO_SCALE)
    bound = tol * scale
    assert err <= bound, (
        f"{what}: max abs error {err:.3e} > {bound:.3e} (relative error {err / scale:.3e} "
        f"> tol {tol:.1e}; max|expected| {expected.abs().max().item():.3e}, scale {scale:.3e})"
    )


def assert_close_per_position(actual, expected, tol, what="", floor=1e-2):
    """Each entry within tol of itself: |a_i - e_i| <= tol * max(|e_i|, floor * max|expected|).

    Stricter than assert_close wherever |e_i| < max|expected|: an error confined to
    small entries (a head or a position whose values are 100x below the largest)
    fails here and can pass assert_close. Entries below floor * max|expected|
    share that absolute bound, so rounding noise of near-zero entries passes.
    """
    actual, expected = _prepare(actual, expected, what)
    if not expected.numel():
        return
    scale = max(expected.abs().max().item(), _ZERO_SCALE)
    err = (actual - expected).abs()
    bound = tol * expected.abs().clamp(min=floor * scale)
    ratio = err / bound
    worst = int(ratio.argmax())
    if ratio.view(-1)[worst] > 1:
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), expected.shape))
        raise AssertionError(
            f"{what}: at {pos} |{actual.reshape(-1)[worst].item():.6e} - {expected.reshape(-1)[worst].item():.6e}| "
            f"= {err.reshape(-1)[worst].item():.3e} > {bound.reshape(-1)[worst].item():.3e} "
            f"({int((ratio > 1).sum())} of {expected.numel()} positions out of bounds)"
        )


def assert_grads_close(got, want, tol, what="grad"):
    """assert_close on every entry of two {name: tensor} dicts, each relative to its own scale."""
    assert got.keys() == want.keys(), f"{what}: {sorted(got)} != {sorted(want)}"
    for name in want:
        assert_close(got[name], want[name], tol, f"{what} {name}")


# A grid that covers every code path of the fused kernels: GQA and MHA, every
# coupling form, causal and full attention, masks with empty rows, combined
# heads, odd lengths that leave partial query and key blocks, and T = 1.
GRID = [
    Case(),
    Case(H=4, Hkv=4, T=1, d=4),
    Case(H=2, Hkv=1, T=130, d=16, coupling="scalar", masked=True),
    Case(H=4, Hkv=2, T=67, d=5, dv=7, coupling="matrix"),
    Case(H=3, Hkv=3, T=200, d=8, causal=False, masked=True, coupling="matrix", dv=3),
    Case(H=4, Hkv=1, T=45, d=6, combine_heads=True, masked=True),
    Case(H=2, Hkv=2, T=129, d=3, causal=False, combine_heads=True, coupling="scalar"),
    Case(B=1, H=1, Hkv=1, T=2, d=1),
    # A square coupling (dv == d): A_h and its transpose have the same shape,
    # so only a case like this one catches a missing transpose.
    Case(H=2, Hkv=1, T=41, d=6, coupling="matrix", masked=True),
]
