"""The fused kappa kernels with a row set (``query_positions``).

With a row set, q holds R gathered query rows [B, H, R, d], k and w keep all T
keys, and row r of sequence b is the query at position query_positions[b, r]
(-1: an empty slot). Every check compares against the pure-PyTorch reference:
kappa at all positions of a sequence in which every query is row r's query,
then read at row r's position (kappa at a position depends only on the query
there), so values and the gradients dq (per row, repeats included), dk and dw
come from autograd through the reference.
"""

from __future__ import annotations

import pytest
import torch

import barrier_ops  # noqa: F401  (registers the ops, fake kernels and autograd)
from barrier_ops import _kappa
from barrier_ops.reference import token_kappa_reference

from _cases import GRAD_TOL, VALUE_TOL

OPS = torch.ops.barrier_ops
CAUSAL = ["none", "inclusive", "strict"]
_REF_CAUSAL = {"none": False, "inclusive": True, "strict": "strict"}
NEG_INF = float("-inf")

_NO_CUDA_KERNELS = pytest.mark.skipif(
    not (torch.cuda.is_available()
         and torch._C._dispatch_has_kernel_for_dispatch_key("barrier_ops::kappa", "CUDA")),
    reason="needs a CUDA GPU and a build with the CUDA kernels",
)


def CUDA(test):
    """A CUDA test: marked `cuda` (benchmarks/gpu_check.sh selects -m cuda), skipped without one."""
    return pytest.mark.cuda(_NO_CUDA_KERNELS(test))


def _inputs(B, H, T, d, R, dtype, *, seed=0, masked=False, key_mean=0.0, device="cpu"):
    """q rows [B, H, R, d], k, w [B, H, T, d] and a key padding mask (or None)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = rand(B, H, R, d)
    k = rand(B, H, T, d) + key_mean
    w = 0.5 * rand(B, H, T, d) + key_mean
    mask = None
    if masked:
        mask = torch.rand(B, T, generator=gen) > 0.35
        mask[:, -1] = False  # a padded position at the end
        if T > 1:
            mask[:, T // 2] = True
    to = dict(dtype=dtype, device=device)
    return q.to(**to), k.to(**to), w.to(**to), (None if mask is None else mask.to(device))


def _positions(B, T, R, *, seed=0, empty=1, sort=False, device="cpu"):
    """[B, R] positions: repeats and any order, `empty` slots of -1 per sequence."""
    gen = torch.Generator().manual_seed(100 + seed)
    pos = torch.randint(0, T, (B, R), generator=gen)
    for b in range(B):
        pos[b, torch.randperm(R, generator=gen)[: min(empty, R)]] = -1
    if sort:
        pos = pos.sort(dim=1).values
    return pos.to(device)


def _reference_rows(q, k, w, scale, causal, mask, positions):
    """kappa [B, H, R] at the rows, from the reference (differentiable in q, k, w)."""
    B, H, R, d = q.shape
    T = k.shape[2]
    # Sequence (b, r): every position's query is row r's query, keys those of b.
    q_all = q.permute(0, 2, 1, 3).reshape(B * R, H, 1, d).expand(B * R, H, T, d)
    k_all = k.repeat_interleave(R, dim=0)
    w_all = w.repeat_interleave(R, dim=0)
    mask_all = None if mask is None else mask.repeat_interleave(R, dim=0)
    kappa_all, _ = token_kappa_reference(
        q_all, k_all, w_all, scale=scale, causal=_REF_CAUSAL[causal], key_padding_mask=mask_all
    )  # [B * R, H, T]
    flat_pos = positions.reshape(B * R)
    rows = kappa_all[torch.arange(B * R), :, flat_pos.clamp_min(0)]  # [B * R, H]
    rows = torch.where((flat_pos >= 0).view(-1, 1), rows, torch.zeros_like(rows))
    return rows.view(B, R, H).permute(0, 2, 1)


def _row_is_query(mask, positions):
    query = positions >= 0
    if mask is not None:
        query = query & mask.gather(1, positions.clamp_min(0))
    return query


def _assert_close(actual, expected, tol, what, floor=1e-5):
    """|actual - expected| <= tol * max|expected| (floor: the scale where that max is ~0)."""
    if actual.numel() == 0:
        return
    err = (actual.double() - expected.double()).abs().max().item()
    bound = tol * max(expected.double().abs().max().item(), floor)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _check_against_reference(q, k, w, scale, causal, mask, positions, *, grad_scale=1.0):
    dtype = q.dtype
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, w)]
    kappa, lse, stats = OPS.kappa.default(*leaves, scale, causal, mask, positions)
    B, H, R, d = q.shape
    assert kappa.shape == (B, H, R) and lse.shape == (B, H, R) and stats.shape == (B, H, R, 2 * d)
    weights = grad_scale * torch.linspace(-1.0, 2.0, kappa.numel(), dtype=torch.float64)
    weights = weights.view(kappa.shape)
    grads = torch.autograd.grad((kappa * weights.to(kappa.dtype)).sum(), leaves)
    assert grads[0].shape == q.shape and grads[1].shape == k.shape and grads[2].shape == w.shape

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, w)]
    ref_mask = mask
    expected = _reference_rows(*ref_leaves, scale, causal, ref_mask, positions)
    ref_grads = torch.autograd.grad((expected * weights).sum(), ref_leaves)

    _assert_close(kappa, expected, VALUE_TOL[dtype], "kappa")
    for name, g, ref in zip(("dq", "dk", "dw"), grads, ref_grads):
        _assert_close(g, ref, GRAD_TOL[dtype], name, floor=1e-5 * grad_scale)
    # Rows that are no query (empty slot, padded position): the invalid fill,
    # and no gradient (dq exactly 0 there).
    not_query = ~_row_is_query(mask, positions)
    nq = not_query.view(B, 1, R).expand(B, H, R)
    assert torch.all(kappa[nq] == 0)
    assert torch.all(lse[nq] == NEG_INF)
    assert torch.all(stats[nq] == 0)
    assert torch.all(grads[0][nq] == 0)
    return kappa, grads


SHAPES = [
    # B, H, T, d, R
    (2, 2, 37, 8, 13),
    (1, 3, 150, 16, 70),  # R > one query block of 64, T > one key block of 128
    (2, 1, 1, 4, 1),  # T = 1
    (1, 2, 9, 5, 1),  # R = 1, odd T and d
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}T{}d{}R{}".format(*s))
def test_rows_match_reference(dtype, causal, masked, shape):
    B, H, T, d, R = shape
    q, k, w, mask = _inputs(B, H, T, d, R, dtype, seed=R + T, masked=masked)
    # Unsorted, with repeats and an empty slot (none at R = 1: one real row).
    positions = _positions(B, T, R, seed=T, empty=0 if R == 1 else 2)
    if R == 1:
        positions[:] = T - 1 if T > 1 and not masked else 0
    _check_against_reference(q, k, w, 0.4, causal, mask, positions)


@pytest.mark.parametrize("causal", CAUSAL)
def test_sorted_rows_with_empty_slots_first_match_reference(causal):
    # The sampler's layout: -1 slots first, then distinct positions ascending.
    B, H, T, d = 2, 2, 300, 16
    R = 90
    q, k, w, mask = _inputs(B, H, T, d, R, torch.float32, seed=5, masked=True)
    gen = torch.Generator().manual_seed(7)
    rows = []
    for b, empty in enumerate((0, 11)):
        chosen = torch.randperm(T, generator=gen)[: R - empty].sort().values
        rows.append(torch.cat([torch.full((empty,), -1), chosen]))
    positions = torch.stack(rows)
    _check_against_reference(q, k, w, 0.25, causal, mask, positions)


def test_repeated_rows_get_the_same_kappa_and_their_own_dq():
    B, H, T, d = 1, 2, 40, 8
    q, k, w, _ = _inputs(B, H, T, d, 3, torch.float64, seed=1)
    q[:, :, 1] = q[:, :, 0]  # rows 0 and 1: the same query at the same position
    positions = torch.tensor([[17, 17, 3]])
    leaves = [t.clone().requires_grad_() for t in (q, k, w)]
    kappa = OPS.kappa.default(*leaves, 0.3, "inclusive", None, positions)[0]
    assert torch.equal(kappa[:, :, 0], kappa[:, :, 1])
    (dq,) = torch.autograd.grad((kappa * torch.tensor([1.0, 3.0, 0.5], dtype=kappa.dtype)).sum(),
                                leaves[0])
    # dq of a row scales with that row's own weight only.
    torch.testing.assert_close(dq[:, :, 1], 3.0 * dq[:, :, 0], rtol=1e-12, atol=1e-15)


def test_low_precision_with_large_mean_keys_and_a_real_gradient_scale():
    # bf16 keys / values with a large common mean (kappa is a covariance: the
    # mean must cancel exactly) and the barrier's real gradient scale (~1e-7).
    B, H, T, d, R = 2, 2, 96, 16, 24
    q, k, w, mask = _inputs(B, H, T, d, R, torch.bfloat16, seed=11, masked=True, key_mean=6.0)
    positions = _positions(B, T, R, seed=3, empty=3, sort=True)
    _check_against_reference(q, k, w, d ** -0.5, "inclusive", mask, positions, grad_scale=1e-7)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_all_rows_in_order_equal_no_row_set_exactly(causal, masked, T, dtype):
    # The row set 0..T-1 is the problem without a row set: bit for bit.
    B, H, d = 2, 2, 8
    q, k, w, mask = _inputs(B, H, T, d, T, dtype, seed=T, masked=masked)
    positions = torch.arange(T).expand(B, T).contiguous()
    plain = OPS.kappa.default(q, k, w, 0.35, causal, mask)
    rows = OPS.kappa.default(q, k, w, 0.35, causal, mask, positions)
    for name, a, b in zip(("kappa", "lse", "stats"), rows, plain):
        assert torch.equal(a, b), name
    beta = torch.randn(plain[0].shape, generator=torch.Generator().manual_seed(T), dtype=dtype)
    grads_plain = OPS.kappa_backward.default(beta, q, k, w, 0.35, causal, mask, *plain)
    grads_rows = OPS.kappa_backward.default(beta, q, k, w, 0.35, causal, mask, *rows, positions)
    for name, a, b in zip(("dq", "dk", "dw"), grads_rows, grads_plain):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("causal", CAUSAL)
def test_rows_equal_the_full_problem_at_their_positions(causal):
    # Row r with the query of position p gives position p's kappa, lse and stats.
    B, H, T, d = 2, 3, 130, 8
    q_full, k, w, mask = _inputs(B, H, T, d, T, torch.float64, seed=2, masked=True)
    positions = _positions(B, T, 45, seed=9, empty=4)
    idx = positions.clamp_min(0).view(B, 1, -1, 1).expand(B, H, -1, d)
    q_rows = torch.gather(q_full, 2, idx)
    full = OPS.kappa.default(q_full, k, w, 0.3, causal, mask)
    rows = OPS.kappa.default(q_rows, k, w, 0.3, causal, mask, positions)
    query = _row_is_query(mask, positions)  # [B, R]
    for name, r, f in zip(("kappa", "lse", "stats"), rows, full):
        for b in range(B):
            sel = positions[b][query[b]]
            torch.testing.assert_close(r[b][:, query[b]], f[b][:, sel], rtol=1e-12, atol=1e-12,
                                       msg=name)


def test_noncontiguous_inputs_and_positions():
    B, H, T, d, R = 2, 3, 50, 8, 20
    gen = torch.Generator().manual_seed(4)
    # [B, T, H, d] projections viewed in the SDPA layout, positions a strided view.
    q = torch.randn(B, R, H, d, generator=gen, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(B, T, H, d, generator=gen, dtype=torch.float64).transpose(1, 2)
    w = torch.randn(B, T, H, d, generator=gen, dtype=torch.float64).transpose(1, 2)
    positions = torch.randint(0, T, (R, B), generator=gen).t()  # a [B, R] view
    assert not (q.is_contiguous() or k.is_contiguous() or positions.is_contiguous())
    mask = torch.rand(B, 2 * T, generator=gen)[:, ::2] > 0.3
    _check_against_reference(q, k, w, 0.3, "inclusive", mask, positions)


def test_empty_row_set_gives_empty_outputs_and_zero_key_gradients():
    B, H, T, d = 2, 2, 10, 4
    q, k, w, _ = _inputs(B, H, T, d, 0, torch.float32)
    positions = torch.empty(B, 0, dtype=torch.long)
    leaves = [t.clone().requires_grad_() for t in (q, k, w)]
    kappa, lse, stats = OPS.kappa.default(*leaves, 0.3, "inclusive", None, positions)
    assert kappa.shape == (B, H, 0) and stats.shape == (B, H, 0, 2 * d)
    dq, dk, dw = torch.autograd.grad(kappa.sum(), leaves, allow_unused=True, materialize_grads=True)
    assert dq.shape == (B, H, 0, d) and torch.all(dk == 0) and torch.all(dw == 0)


def test_only_empty_slots_give_the_invalid_fill_and_no_gradient():
    B, H, T, d = 1, 2, 20, 4
    q, k, w, _ = _inputs(B, H, T, d, 5, torch.float32)
    q[0, 0, 2] = float("nan")  # an empty slot's row may hold anything
    positions = torch.full((B, 5), -1)
    leaves = [t.clone().requires_grad_() for t in (q, k, w)]
    kappa, lse, stats = OPS.kappa.default(*leaves, 0.3, "none", None, positions)
    assert torch.all(kappa == 0) and torch.all(lse == NEG_INF) and torch.all(stats == 0)
    grads = torch.autograd.grad(kappa.sum(), leaves)
    assert all(torch.all(g == 0) for g in grads)


def test_gradcheck_kappa_with_a_row_set():
    B, H, T, d, R = 2, 2, 11, 3, 6
    q, k, w, mask = _inputs(B, H, T, d, R, torch.float64, seed=8, masked=True)
    mask[:, 0] = True
    positions = torch.tensor([[-1, 0, 10, 4, 4, 7], [9, 1, 2, -1, 5, 10]])
    for causal in CAUSAL:
        fn = lambda q, k, w: OPS.kappa.default(q, k, w, 0.5, causal, mask, positions)[0]  # noqa: E731
        leaves = [t.clone().requires_grad_() for t in (q, k, w)]
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("causal", ["inclusive", "strict"])
def test_opcheck_kappa_with_a_row_set(causal):
    B, H, T, d, R = 2, 2, 12, 4, 5
    q, k, w, mask = _inputs(B, H, T, d, R, torch.float32, seed=6, masked=True)
    positions = torch.tensor([[-1, 3, 0, 11, 3], [2, 2, 7, -1, 1]])
    args = (q.requires_grad_(), k.requires_grad_(), w.requires_grad_(), 0.4, causal, mask,
            positions)
    torch.library.opcheck(OPS.kappa.default, args)
    kappa, lse, stats = OPS.kappa.default(*[a.detach() if torch.is_tensor(a) else a for a in args])
    beta = torch.randn_like(kappa)
    torch.library.opcheck(
        OPS.kappa_backward.default,
        (beta, q.detach(), k.detach(), w.detach(), 0.4, causal, mask, kappa, lse, stats, positions),
    )


def test_kappa_fused_and_compile_take_the_row_set():
    B, H, T, d, R = 1, 2, 24, 4, 6
    q, k, w, _ = _inputs(B, H, T, d, R, torch.float32, seed=2)
    positions = torch.tensor([[0, 5, 9, 9, 20, 23]])
    eager = _kappa.kappa_fused(q, k, w, 0.4, "inclusive", None, positions)
    compiled = torch.compile(_kappa.kappa_fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, w, 0.4, "inclusive", None, positions), eager)
    torch.testing.assert_close(eager, OPS.kappa.default(q, k, w, 0.4, "inclusive", None,
                                                        positions)[0], rtol=0, atol=0)


def _good_args():
    q, k, w, _ = _inputs(2, 2, 8, 4, 3, torch.float32)
    return q, k, w


BAD_POSITIONS = [
    ("dtype int32", lambda: torch.zeros(2, 3, dtype=torch.int32), TypeError, "int64"),
    ("dtype float", lambda: torch.zeros(2, 3), TypeError, "int64"),
    ("one dim", lambda: torch.zeros(3, dtype=torch.long), ValueError, r"shape \[B, R\]"),
    ("three dims", lambda: torch.zeros(2, 3, 1, dtype=torch.long), ValueError, r"shape \[B, R\]"),
    ("wrong R", lambda: torch.zeros(2, 4, dtype=torch.long), ValueError, r"shape \[B, R\]"),
    ("wrong B", lambda: torch.zeros(1, 3, dtype=torch.long), ValueError, r"shape \[B, R\]"),
    ("value -2", lambda: torch.tensor([[0, -2, 1], [0, 1, 2]]), ValueError, r"\[0, T\)"),
    ("value T", lambda: torch.tensor([[0, 8, 1], [0, 1, 2]]), ValueError, r"\[0, T\)"),
]


@pytest.mark.parametrize("name,build,exc,match", BAD_POSITIONS, ids=[b[0] for b in BAD_POSITIONS])
def test_bad_query_positions_name_the_argument(name, build, exc, match):
    q, k, w = _good_args()
    positions = build()
    with pytest.raises(exc, match="query_positions") as info:
        OPS.kappa.default(q, k, w, 0.5, "inclusive", None, positions)
    assert info.match(match)
    kappa, lse, stats = OPS.kappa.default(q, k, w, 0.5, "inclusive", None,
                                          torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(exc, match="query_positions"):
        OPS.kappa_backward.default(kappa, q, k, w, 0.5, "inclusive", None, kappa, lse, stats,
                                   positions)


def test_row_set_shapes_are_checked():
    q, k, w = _good_args()
    positions = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="with query_positions, q must be"):
        OPS.kappa.default(q[..., :3], k, w, 0.5, "inclusive", None, positions)
    with pytest.raises(ValueError, match="with query_positions, q must be"):
        OPS.kappa.default(q, k, w[:, :, :5], 0.5, "inclusive", None, positions)
    # Without a row set q keeps the keys' shape, as before.
    with pytest.raises(ValueError, match="one slice per query head"):
        OPS.kappa.default(q, k, w, 0.5, "inclusive", None)


# ---------------------------------------------------------------------------
# CUDA kernels: the same comparisons (skipped without a GPU).
# ---------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES + [(2, 2, 300, 64, 100), (1, 2, 200, 96, 33)],
                         ids=lambda s: "B{}H{}T{}d{}R{}".format(*s))
def test_cuda_rows_match_reference(dtype, causal, masked, shape):
    B, H, T, d, R = shape
    q, k, w, mask = _inputs(B, H, T, d, R, dtype, seed=R + T, masked=masked, device="cuda")
    positions = _positions(B, T, R, seed=T, empty=0 if R == 1 else 2, device="cuda")
    _check_against_reference_cuda(q, k, w, 0.4, causal, mask, positions)


def _check_against_reference_cuda(q, k, w, scale, causal, mask, positions, grad_scale=1.0):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, w)]
    kappa, lse, stats = OPS.kappa.default(*leaves, scale, causal, mask, positions)
    weights = grad_scale * torch.linspace(-1.0, 2.0, kappa.numel(), dtype=torch.float64)
    weights = weights.view(kappa.shape)
    grads = torch.autograd.grad((kappa * weights.to(kappa)).sum(), leaves)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, w)]
    expected = _reference_rows(*ref_leaves, scale, causal, cpu(mask), cpu(positions))
    ref_grads = torch.autograd.grad((expected * weights).sum(), ref_leaves)
    dtype = q.dtype
    _assert_close(kappa.cpu(), expected, VALUE_TOL[dtype], "kappa")
    for name, g, ref in zip(("dq", "dk", "dw"), grads, ref_grads):
        _assert_close(g.cpu(), ref, GRAD_TOL[dtype], name, floor=1e-5 * grad_scale)
    not_query = (~_row_is_query(cpu(mask), cpu(positions))).view(q.shape[0], 1, -1)
    nq = not_query.expand(kappa.shape)
    assert torch.all(kappa.cpu()[nq] == 0) and torch.all(lse.cpu()[nq] == NEG_INF)
    assert torch.all(grads[0].cpu()[nq] == 0)
    return kappa, grads


@CUDA
@pytest.mark.parametrize("causal", CAUSAL)
def test_cuda_all_rows_in_order_equal_no_row_set(causal):
    B, H, T, d = 2, 2, 130, 32
    q, k, w, mask = _inputs(B, H, T, d, T, torch.float32, seed=1, masked=True, device="cuda")
    positions = torch.arange(T, device="cuda").expand(B, T).contiguous()
    plain = OPS.kappa.default(q, k, w, 0.35, causal, mask)
    rows = OPS.kappa.default(q, k, w, 0.35, causal, mask, positions)
    for a, b in zip(rows, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    beta = torch.randn_like(plain[0])
    for a, b in zip(OPS.kappa_backward.default(beta, q, k, w, 0.35, causal, mask, *rows, positions),
                    OPS.kappa_backward.default(beta, q, k, w, 0.35, causal, mask, *plain)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@CUDA
def test_cuda_out_of_range_positions_are_empty_slots():
    # No device sync to check values: anything outside [0, T) is an empty slot.
    B, H, T, d, R = 2, 2, 40, 16, 6
    q, k, w, _ = _inputs(B, H, T, d, R, torch.float32, seed=3, device="cuda")
    bad = torch.tensor([[-2, 5, T, 2**40, 7, -(2**40)], [3, T + 1, -1, 0, 39, -7]], device="cuda")
    good = torch.where((bad >= 0) & (bad < T), bad, torch.full_like(bad, -1))
    leaves = [t.clone().requires_grad_() for t in (q, k, w)]
    out_bad = OPS.kappa.default(*leaves, 0.3, "inclusive", None, bad)
    out_good = OPS.kappa.default(q, k, w, 0.3, "inclusive", None, good)
    for a, b in zip(out_bad, out_good):
        assert torch.equal(a, b)
    grads = torch.autograd.grad(out_bad[0].sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    _check_against_reference_cuda(q, k, w, 0.3, "inclusive", None, good)


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_low_precision_sorted_rows_with_large_mean_keys_and_real_gradient_scale(dtype):
    # The sampler's layout (-1 slots first, then ascending positions), keys and
    # values with a large common mean, and the barrier's real gradient scale.
    B, H, T, d, R = 2, 4, 700, 64, 90
    q, k, w, mask = _inputs(B, H, T, d, R, dtype, seed=12, masked=True, key_mean=6.0,
                            device="cuda")
    positions = _positions(B, T, R, seed=4, empty=5, sort=True, device="cuda")
    _check_against_reference_cuda(q, k, w, d ** -0.5, "inclusive", mask, positions,
                                  grad_scale=1e-7)


def test_row_set_results_do_not_depend_on_the_thread_count():
    # Each forward task owns a block of rows, each backward task a (b, h): the
    # thread count must not change a bit, with rows unsorted and repeated.
    B, H, T, d, R = 2, 3, 260, 16, 150
    q, k, w, mask = _inputs(B, H, T, d, R, torch.float32, seed=21, masked=True)
    positions = _positions(B, T, R, seed=21, empty=9)
    beta = torch.randn(B, H, R, generator=torch.Generator().manual_seed(2))

    def run(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = OPS.kappa.default(q, k, w, 0.3, "inclusive", mask, positions)
            grads = OPS.kappa_backward.default(beta, q, k, w, 0.3, "inclusive", mask, *out,
                                               positions)
            return [*out, *grads]
        finally:
            torch.set_num_threads(previous)

    serial = run(1)
    for threads in (2, 4):
        for a, b in zip(serial, run(threads)):
            assert torch.equal(a, b), f"{threads} threads differ from 1 thread"
