"""The sdpa backend with a row set (query_positions): kappa of gathered query rows.

barrier_ops._sdpa.kappa_sdpa(q_rows, k, w, scale, causal, key_padding_mask,
query_positions) against the float64 reference's full kappa gathered at the
positions, values and gradients (dq through the gather, dk, dv), for every
dtype, causality and padding; the edge cases of a row set (empty slots,
unsorted and repeated rows, R = 1, R = T, T = 1, rows with no allowed key);
16-bit accuracy with large-mean keys and an attention sink; and the memory
(an R x T mask, never T x T). Each check is also run once on a planted defect
that it must catch.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from barrier_ops import _checks, _sdpa
from barrier_ops import reference as ref
from _cases import assert_close

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
CAUSAL = ["inclusive", "strict", "none"]
REF_CAUSAL = {"inclusive": True, "strict": "strict", "none": False}

# max|error| / max|expected| (values; each gradient against its own scale).
# Measured on CPU (torch 2.15) over test_row_set_matches_the_reference, worst
# value / gradient (dq, dk, dv): float64 1.0e-15 / 2.7e-15, float32 3.6e-7 /
# 8.4e-7, bf16 1.5e-2 / 3.0e-2 (dk), fp16 1.4e-3 / 5.9e-3 (dk). Bounds 2-10x
# that; a uniform 10% error in a bf16 gradient fails
# (test_the_reference_comparison_catches_a_10_percent_bf16_gradient_error).
TOL = {
    torch.float64: (1e-12, 1e-11),
    torch.float32: (5e-6, 1e-5),
    torch.bfloat16: (3e-2, 5e-2),
    torch.float16: (5e-3, 1.2e-2),
}


def row_positions(B, T, R, *, empty=1, repeat=True, seed=0):
    """int64 [B, R]: distinct positions in random (unsorted) order, one repeat, `empty` -1 slots."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        filled = max(R - empty - int(repeat), 0)
        pos = torch.randperm(T, generator=g)[:filled]
        extra = [pos[:1]] if repeat and len(pos) else []
        pos = torch.cat([pos, *extra, torch.full((R - len(pos) - len(extra),), -1, dtype=torch.long)])
        rows.append(pos[torch.randperm(R, generator=g)])
    return torch.stack(rows)


def problem(dtype, *, B=2, H=2, T=37, d=8, masked=False, seed=0, key_mean=0.0, sink=0.0):
    """Leaves q, k, v [B, H, T, d] in dtype (padded positions zero, as the caller hands them) and the mask."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    k = k + key_mean
    v = v + key_mean
    if T:
        k[:, :, 0] += sink
        v[:, :, 0] += sink
    mask = None
    if masked:
        mask = torch.rand(B, T, generator=g) > 0.3
        mask[0, : min(3, T)] = False  # leading padding: real rows whose every earlier key is padded
        real = mask[:, None, :, None]
        q, k, v = (torch.where(real, t, torch.zeros_like(t)) for t in (q, k, v))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], mask


def gather_rows(q, positions):
    """q [B, H, T, d] -> [B, H, R, d] at positions; an empty slot's row holds zeros."""
    B, H, _, d = q.shape
    index = positions.clamp(min=0)[:, None, :, None].expand(B, H, -1, d)
    rows = q.gather(2, index)
    return torch.where((positions >= 0)[:, None, :, None], rows, torch.zeros_like(rows))


def valid_rows(valid, positions):
    """[B, R] bool: the slot is filled and its position is valid (the caller's mask)."""
    return (positions >= 0) & valid.gather(1, positions.clamp(min=0))


def sdpa_rows(q, k, v, causal, mask, positions, scale):
    """What the composite does around the backend: gather, w = v in the accumulation dtype, mask rows."""
    acc = _checks.margin_dtype(q.dtype)
    rows = None if positions is None else gather_rows(q, positions)
    kappa = _sdpa.kappa_sdpa(q if rows is None else rows, k, v.to(acc), scale, causal, mask, positions)
    return kappa


def reference_rows(q, k, v, causal, mask, positions, scale):
    """(kappa [B, H, R] of the float64 reference gathered at the positions, valid rows [B, R])."""
    kappa, valid = ref.token_kappa_reference(q, k, v, scale=scale, causal=REF_CAUSAL[causal],
                                             key_padding_mask=mask)
    B, H, _ = kappa.shape
    index = positions.clamp(min=0)[:, None, :].expand(B, H, -1)
    return kappa.gather(2, index), valid_rows(valid, positions)


def compare(dtype, causal, masked, positions, *, T=37, B=2, H=2, d=8, seed=0, tol=None, **kw):
    """Values and gradients (dq, dk, dv) of the row set against the float64 reference."""
    (q, k, v), mask = problem(dtype, B=B, H=H, T=T, d=d, masked=masked, seed=seed, **kw)
    scale = 1 / math.sqrt(d)
    rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
    want, valid = reference_rows(rq, rk, rv, causal, mask, positions, scale)
    got = sdpa_rows(q, k, v, causal, mask, positions, scale)
    assert got.shape == want.shape
    assert torch.isfinite(got).all(), "non-finite kappa at some row (invalid rows must stay finite)"
    v_tol, g_tol = tol or TOL[dtype]
    live = valid[:, None, :]
    zero = torch.zeros((), dtype=got.dtype)
    assert_close(torch.where(live, got, zero), torch.where(live, want, zero.double()), v_tol, "kappa")
    beta = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    beta = beta * live
    got_grads = torch.autograd.grad((got.double() * beta).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * beta).sum(), (rq, rk, rv))
    # Each gradient against its own scale, floored at 1% of the problem's
    # largest (dq is exactly zero where a row has one allowed key).
    largest = max(b.abs().max().item() for b in want_grads)
    for name, a, b in zip(("dq", "dk", "dv"), got_grads, want_grads):
        assert torch.isfinite(a).all(), f"{name}: non-finite"
        assert_close(a, b, g_tol, name, scale=max(b.abs().max().item(), 1e-2 * largest))
    return got, valid


# ---------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_set_matches_the_reference(dtype, causal, masked):
    # Unsorted rows, a repeated row, an empty slot; odd T; padding with real
    # rows whose every earlier key is padded (no allowed key).
    compare(dtype, causal, masked, row_positions(2, 37, 13, empty=2))


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_row(dtype, causal):
    for seed, position in enumerate((0, 1, 36, 17)):
        positions = torch.tensor([[position], [36 - position]])
        compare(dtype, causal, True, positions, seed=seed)


@pytest.mark.parametrize("causal", CAUSAL)
def test_sorted_rows_with_leading_empty_slots(causal):
    # The sampler's layout: -1 slots first, then distinct positions ascending.
    positions = torch.stack([torch.cat([torch.full((3,), -1), torch.arange(0, 60, 7)]),
                             torch.cat([torch.full((2,), -1), torch.arange(5, 60, 6)])])
    compare(torch.float32, causal, True, positions, T=61)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("T", [1, 2])
def test_tiny_sequences(causal, T):
    positions = torch.tensor([[T - 1, -1], [0, T - 1]])
    compare(torch.float64, causal, False, positions, T=T)
    compare(torch.float32, causal, True, positions, T=T, seed=1)


@pytest.mark.parametrize("causal", CAUSAL)
def test_all_slots_empty(causal):
    # No query at all: finite values, zero gradients.
    got, valid = compare(torch.float32, causal, True, torch.full((2, 4), -1))
    assert not valid.any()


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_all_rows_in_order_equal_the_path_without_a_row_set(dtype, causal, masked):
    # R = T, row r at position r: the same kappa and gradients as query_positions=None.
    (q, k, v), mask = problem(dtype, T=29, masked=masked)
    positions = torch.arange(29).expand(2, 29)
    whole = sdpa_rows(q, k, v, causal, mask, None, 0.3)
    rows = sdpa_rows(q, k, v, causal, mask, positions, 0.3)
    valid = ref.valid_positions(2, 29, REF_CAUSAL[causal], mask, q.device)[:, None, :]
    zero = torch.zeros((), dtype=whole.dtype)
    whole, rows = torch.where(valid, whole, zero), torch.where(valid, rows, zero)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_close(rows, whole, tol, "kappa")
    beta = torch.randn(whole.shape, generator=torch.Generator().manual_seed(3), dtype=whole.dtype)
    for name, a, b in zip("qkv", torch.autograd.grad((rows * beta).sum(), (q, k, v)),
                          torch.autograd.grad((whole * beta).sum(), (q, k, v))):
        assert_close(a, b, 10 * tol, f"d{name}")


def test_empty_slots_and_their_rows_contribute_nothing():
    # The same row set with and without extra empty slots (whose q rows hold
    # garbage, not zeros): equal kappa at the filled slots, equal dk and dv,
    # and the caller's masking leaves dq of an empty slot's row zero.
    (q, k, v), mask = problem(torch.float32, masked=True)
    filled = row_positions(2, 37, 8, empty=0, repeat=False, seed=4)
    padded = torch.cat([torch.full((2, 3), -1), filled], dim=1)
    acc = torch.float32
    rows = gather_rows(q, filled)
    garbage = torch.randn(2, 2, 3, 8) * 1e3
    rows_padded = torch.cat([garbage.requires_grad_(), gather_rows(q, filled)], dim=2)
    a = _sdpa.kappa_sdpa(rows, k, v.to(acc), 0.35, "inclusive", mask, filled)
    b = _sdpa.kappa_sdpa(rows_padded, k, v.to(acc), 0.35, "inclusive", mask, padded)
    assert torch.isfinite(b).all()
    assert_close(b[..., 3:], a, 1e-6, "kappa at filled slots")
    live = valid_rows(ref.valid_positions(2, 37, True, mask, q.device), padded)[:, None, :]
    beta = torch.randn(b.shape, generator=torch.Generator().manual_seed(5))
    grads_b = torch.autograd.grad((torch.where(live, b, 0.0) * beta).sum(), (garbage, k, v))
    grads_a = torch.autograd.grad((torch.where(live[..., 3:], a, 0.0) * beta[..., 3:]).sum(), (k, v))
    assert (grads_b[0] == 0).all(), "an empty slot's row got a gradient"
    assert_close(grads_b[1], grads_a[0], 1e-5, "dk")
    assert_close(grads_b[2], grads_a[1], 1e-5, "dv")


# ---------------------------------------------------------------------------
# 16-bit accuracy with realistic keys: large means, attention sinks
# ---------------------------------------------------------------------------


def _16_bit_rows_error(dtype, causal, inputs):
    """(max |kappa - ref| over rows with |kappa_ref| < 2, max of it / max(1, |kappa_ref|) over all rows)."""
    positions = row_positions(2, 160, 40, seed=2)
    (q, k, v), mask = problem(dtype, T=160, d=64, masked=True, **inputs)
    scale = 1 / 8
    with torch.no_grad():
        got = sdpa_rows(q, k, v, causal, mask, positions, scale)
        want, valid = reference_rows(q.double(), k.double(), v.double(), causal, mask, positions, scale)
    live = valid[:, None, :].expand_as(want)
    diff = (got.double() - want).abs()
    diff = torch.where(torch.isfinite(got), diff, torch.full_like(diff, float("inf")))
    near = (want.abs() < 2) & live
    return diff[near].max().item(), (diff / want.abs().clamp(min=1))[live].max().item()


@pytest.mark.parametrize("causal", ["inclusive", "strict"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("inputs", [dict(key_mean=10.0), dict(sink=30.0)], ids=["mean10", "sink30"])
def test_16_bit_rows_with_large_keys_and_a_sink(dtype, causal, inputs):
    # Centring on the rest's mean, the outlier split, the power-of-two scaling
    # and the hi/lo keys act on the keys, so they serve a row set as they serve
    # the full problem: measured, the same error as without a row set, <= 0.0046
    # (bf16 and fp16, both inputs; kappa of rows that attend the sink ~1100).
    # Without the outlier split: 14.6 (bf16) / 1.08 (fp16) with the sink.
    near, rel = _16_bit_rows_error(dtype, causal, inputs)
    assert near <= 0.02 and rel <= 0.02, (near, rel)


def test_the_row_set_keeps_the_outlier_split(monkeypatch):
    monkeypatch.setattr(_sdpa, "OUTLIERS", 0)
    with pytest.raises(AssertionError):
        test_16_bit_rows_with_large_keys_and_a_sink(torch.float16, "inclusive", dict(sink=30.0))


def test_the_row_set_keeps_the_centring(monkeypatch):
    monkeypatch.setattr(_sdpa, "_rest_means", lambda k, w, rest: (0.0, 0.0))
    with pytest.raises(AssertionError):
        test_16_bit_rows_with_large_keys_and_a_sink(torch.bfloat16, "inclusive", dict(key_mean=10.0))


def _fp16_rows_at_the_real_scale():
    # The barrier's real per-row gradient without a loss scale (weight 0.02 over
    # a batch of 16384 tokens, 4 heads: 5e-6 per row): dO (~1e-7) sits under
    # float16's normal range, so the float16 dO rescale must carry it through
    # SDPA's backward. Keys and values with a mean of 3 std. The gradients
    # (~1e-6) are float16 subnormals, rounded to the spacing 2^-24, which each
    # bound adds. Measured: dk, dv 7.4e-3 / 6.3e-3 of their max, dq 6e-8
    # absolute; without the rescale dk 3.5e-2, dq 1.5e-7.
    (q, k, v), mask = problem(torch.float16, T=256, d=64, masked=True, key_mean=3.0)
    positions = row_positions(2, 256, 128, seed=6)
    rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
    want, valid = reference_rows(rq, rk, rv, "inclusive", mask, positions, 1 / 8)
    got = sdpa_rows(q, k, v, "inclusive", mask, positions, 1 / 8)
    beta = 0.02 / 16384 * 4 * valid[:, None, :]
    got_grads = torch.autograd.grad((got * beta).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * beta).sum(), (rq, rk, rv))
    for name, a, b in zip("qkv", got_grads, want_grads):
        assert (a != 0).any(), f"d{name} underflowed to zero"
        err = (a.double() - b).abs().max().item()
        bound = 1.5e-2 * b.abs().max().item() + 2.0**-24
        assert err <= bound, f"d{name}: max abs error {err:.3e} > {bound:.3e}"


def test_fp16_row_gradients_at_the_real_scale():
    _fp16_rows_at_the_real_scale()


def test_the_real_scale_check_catches_a_missing_fp16_rescale(monkeypatch):
    def no_rescale(ctx, do):
        return do, torch.ones((), dtype=torch.float32, device=do.device)

    monkeypatch.setattr(_sdpa._ScaleOutputGrad, "backward", staticmethod(no_rescale))
    with pytest.raises(AssertionError):
        _fp16_rows_at_the_real_scale()


# ---------------------------------------------------------------------------
# Memory: an R x T mask, never T x T
# ---------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal", CAUSAL)
def test_row_set_memory_is_rows_times_keys(causal, monkeypatch):
    # Forward and backward at T = 1024 with R = 16 rows: no tensor as large as
    # T x T / 8 (a full mask or score matrix would be T x T), and SDPA gets a
    # [B, 1, R, T] mask and picks a fused kernel (the math path would
    # materialise [B, H, R, T] scores: allowed by O(R T), but not what runs).
    B, H, T, d, R = 1, 2, 1024, 4, 16
    (q, k, v), mask = problem(torch.float32, B=B, H=H, T=T, d=d, masked=True)
    positions = row_positions(B, T, R, seed=7)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kw):
        calls.append((attn_mask.shape, torch._fused_sdp_choice(query, key, value, attn_mask=attn_mask, **kw)))
        return sdpa(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with _LargestTensor() as spy_mode:
        kappa = sdpa_rows(q, k, v, causal, mask, positions, 0.5)
        kappa.sum().backward()
    assert calls and all(shape == (B, 1, R, T) for shape, _ in calls), calls
    assert all(choice != 0 for _, choice in calls), "SDPA took its math path"
    assert spy_mode.largest < T * T // 8, spy_mode.largest


def test_the_memory_check_catches_a_full_mask(monkeypatch):
    # A T x T mask with the rows gathered from it is correct but O(T^2).
    def full_then_rows(positions, T, causal, key_mask):
        allowed = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(positions.shape[0], T, T)
        rows = allowed.gather(1, positions.clamp(min=0)[..., None].expand(-1, -1, T))
        return rows[:, None] | ~rows.any(-1, keepdim=True)[:, None]

    monkeypatch.setattr(_sdpa, "_row_mask", full_then_rows)
    with pytest.raises(AssertionError):
        test_row_set_memory_is_rows_times_keys("inclusive", monkeypatch)


# ---------------------------------------------------------------------------
# The checks above catch planted defects
# ---------------------------------------------------------------------------


def _inclusive_for_strict(positions, T, causal, key_mask):
    return _ROW_MASK(positions, T, "inclusive" if causal == "strict" else causal, key_mask)


def _no_key_padding(positions, T, causal, key_mask):
    return _ROW_MASK(positions, T, causal, None)


def _rows_read_as_in_order(positions, T, causal, key_mask):
    in_order = torch.arange(positions.shape[1]).expand_as(positions)
    return _ROW_MASK(torch.where(positions >= 0, in_order, positions), T, causal, key_mask)


_ROW_MASK = _sdpa._row_mask


@pytest.mark.parametrize("defect, causal", [
    (_inclusive_for_strict, "strict"),  # s <= pos where s < pos is asked
    (_no_key_padding, "inclusive"),  # padded keys attended
    (_rows_read_as_in_order, "inclusive"),  # positions ignored: row r taken as position r
])
def test_the_reference_comparison_catches_a_wrong_row_mask(defect, causal, monkeypatch):
    monkeypatch.setattr(_sdpa, "_row_mask", defect)
    with pytest.raises(AssertionError):
        compare(torch.float32, causal, True, row_positions(2, 37, 13, empty=2))


def test_the_reference_comparison_catches_a_10_percent_bf16_gradient_error(monkeypatch):
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def off(query, key, value, **kw):
        return scale_grad(sdpa(query, key, value, **kw), 1.1)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", off)
    with pytest.raises(AssertionError, match="d[qkv]"):
        compare(torch.bfloat16, "inclusive", True, row_positions(2, 37, 13, empty=2))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x, whose gradient comes back multiplied by ``factor``: a planted gradient error."""
    return _ScaleGrad.apply(x, factor)


def test_positions_outside_the_sequence_are_empty_slots():
    # As the CUDA kernels read them (no device sync to check values): no error,
    # finite values, and the other rows unchanged.
    (q, k, v), mask = problem(torch.float32, masked=True)
    inside = row_positions(2, 37, 6, empty=0, repeat=False, seed=8)
    outside = torch.cat([inside, torch.tensor([[37, 1000], [-5, 37]])], dim=1)
    rows = torch.cat([gather_rows(q, inside), torch.randn(2, 2, 2, 8).requires_grad_()], dim=2)
    a = _sdpa.kappa_sdpa(gather_rows(q, inside), k, v, 0.35, "inclusive", mask, inside)
    b = _sdpa.kappa_sdpa(rows, k, v, 0.35, "inclusive", mask, outside)
    assert torch.isfinite(b).all()
    assert_close(b[..., :6], a, 1e-6, "kappa at the rows inside")


def _fp16_rows_with_huge_keys_and_values():
    # Keys and values of std 80: g = <k, w> of the centred rest reaches ~4e5,
    # past float16's 65504. The power-of-two column scaling keeps V' in range,
    # so every kappa is finite (its accuracy is the documented 16-bit limit when
    # every key is large, not asserted here).
    g = torch.Generator().manual_seed(0)
    q = 0.05 * torch.randn(2, 2, 96, 64, generator=g, dtype=torch.float64)
    k, v = (80 * torch.randn(2, 2, 96, 64, generator=g, dtype=torch.float64) for _ in range(2))
    q, k, v = (t.half() for t in (q, k, v))
    with torch.no_grad():
        got = sdpa_rows(q, k, v, "inclusive", None, row_positions(2, 96, 24, seed=3), 1 / 8)
    assert torch.isfinite(got).all()


def test_fp16_rows_with_huge_keys_and_values_stay_finite():
    _fp16_rows_with_huge_keys_and_values()


def test_the_finiteness_check_catches_a_missing_power_of_two_scaling(monkeypatch):
    monkeypatch.setattr(_sdpa, "_pow2_scale", lambda x: torch.ones(x.shape[0], x.shape[1], 1, 1, dtype=x.dtype))
    with pytest.raises(AssertionError):
        _fp16_rows_with_huge_keys_and_values()
