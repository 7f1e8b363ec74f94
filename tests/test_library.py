"""torch.library integration: opcheck, fake kernels, torch.compile, and clear errors."""

from __future__ import annotations

import pytest
import torch

import barrier_ops
from barrier_ops import reference as ref
from _cases import GRID, Case, assert_close, make_inputs

OPS = torch.ops.barrier_ops


CAUSAL = {True: "inclusive", False: "none", "strict": "strict"}


def _forward_args(case, dtype=torch.float32, requires_grad=True, noncontiguous=False, seed=0,
                  backend="fused"):
    q, k, v, coupling, mask = make_inputs(
        case, dtype, requires_grad=requires_grad, noncontiguous=noncontiguous, seed=seed
    )
    return (q, k, v, coupling, 1.0 / case.d**0.5, CAUSAL[case.causal], mask, case.combine_heads,
            backend)


def _kappa_args(case, requires_grad=True, noncontiguous=False, causal=None):
    """kappa's own arguments: k and w one slice per query head [B, H, T, d]."""
    q, k, _, _, mask = make_inputs(case, requires_grad=False, noncontiguous=noncontiguous)
    k = k.repeat_interleave(case.H // case.Hkv, 1)
    w = torch.randn(k.shape, generator=torch.Generator().manual_seed(7))
    if noncontiguous:
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    tensors = [t.detach().requires_grad_(requires_grad) for t in (q, k, w)]
    return (*tensors, 1.0 / case.d**0.5, causal or CAUSAL[case.causal], mask)


OPCHECK_CASES = [GRID[0], GRID[2], GRID[3], GRID[4], GRID[5], GRID[1]]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
@pytest.mark.parametrize("causal,requires_grad,noncontiguous", [
    (None, True, False), (None, False, False), (None, True, True), ("strict", True, False)])
def test_opcheck_kappa(case, causal, requires_grad, noncontiguous):
    args = _kappa_args(case, requires_grad, noncontiguous, causal)
    torch.library.opcheck(OPS.kappa.default, args)


@pytest.mark.parametrize("case", OPCHECK_CASES[:4], ids=str)
def test_opcheck_kappa_backward(case):
    args = _kappa_args(case, requires_grad=False)
    kappa, lse, stats = OPS.kappa.default(*args)
    beta = torch.randn_like(kappa)
    torch.library.opcheck(OPS.kappa_backward.default, (beta, *args, kappa, lse, stats))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
@pytest.mark.parametrize("backend,requires_grad,noncontiguous", [
    ("fused", True, False), ("fused", False, False), ("fused", True, True),
    ("sdpa", True, False), ("sdpa", True, True)])
def test_opcheck_token_margins(case, backend, requires_grad, noncontiguous):
    args = _forward_args(case, requires_grad=requires_grad, noncontiguous=noncontiguous,
                         backend=backend)
    torch.library.opcheck(OPS.token_margins.default, args)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
@pytest.mark.parametrize("backend", ["fused", "sdpa"])
@pytest.mark.parametrize("reduction,target_margin", [("mean", None), ("none", 1.1)])
def test_opcheck_margin_barrier_loss(case, backend, reduction, target_margin):
    args = _forward_args(case, backend=backend)
    args = args[:8] + (0.05, target_margin, reduction, backend)
    torch.library.opcheck(OPS.margin_barrier_loss.default, args)


@pytest.mark.parametrize("shape", [(3, 17), (2, 4, 9), (1, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck_support_token_argmin(shape, masked):
    margins = torch.randn(shape)
    mask = torch.rand(shape[0], shape[-1]) > 0.4 if masked else None
    torch.library.opcheck(OPS.support_token_argmin.default, (margins, mask))


def test_fake_kernels_match_real_shapes_dtypes_and_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for case in (GRID[0], GRID[5]):
        args = _kappa_args(case, requires_grad=False, noncontiguous=True)
        real = OPS.kappa.default(*args)
        beta = torch.randn_like(real[0])
        real_bwd = OPS.kappa_backward.default(beta, *args, *real)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            fake = OPS.kappa.default(*fake_args)
            fake_bwd = OPS.kappa_backward.default(mode.from_tensor(beta), *fake_args, *fake)
        for r, f in zip(real + real_bwd, fake + fake_bwd):
            assert r.shape == f.shape and r.dtype == f.dtype and r.stride() == f.stride()


@pytest.mark.parametrize("backend", ["fused", "sdpa"])
@pytest.mark.parametrize("causal", [True, "strict"])
@pytest.mark.parametrize("case", [GRID[2], GRID[5]], ids=str)
def test_compile_fullgraph_forward_and_backward_match_eager(case, causal, backend):
    torch._dynamo.reset()
    q, k, v, coupling, mask = make_inputs(case)

    def step(q, k, v, coupling, mask):
        loss = barrier_ops.margin_barrier_loss(
            q, k, v, coupling=coupling, key_padding_mask=mask, causal=causal,
            combine_heads=case.combine_heads, target_margin=1.05, backend=backend,
        )
        margins = barrier_ops.token_margins(
            q, k, v, coupling=coupling, key_padding_mask=mask, causal=causal,
            combine_heads=case.combine_heads, backend=backend,
        )
        idx, val = barrier_ops.support_token_argmin(margins, mask)
        return loss + 0.1 * margins.mean(), idx, val

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inputs = [q, k, v, coupling]
    out_e, idx_e, val_e = step(q, k, v, coupling, mask)
    grads_e = torch.autograd.grad(out_e, [t for t in inputs if t is not None])
    out_c, idx_c, val_c = compiled(q, k, v, coupling, mask)
    grads_c = torch.autograd.grad(out_c, [t for t in inputs if t is not None])
    assert_close(out_c, out_e, 1e-6, "loss")
    assert torch.equal(idx_c, idx_e)
    for gc, ge in zip(grads_c, grads_e):
        assert_close(gc, ge, 1e-6, "grad")


def test_compile_inductor_matches_eager():
    torch._dynamo.reset()
    case = GRID[0]
    q, k, v, _, _ = make_inputs(case)

    def f(q, k, v):
        return barrier_ops.margin_barrier_loss(q, k, v) * 2.0

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(q, k, v)
    (gq,) = torch.autograd.grad(out, [q])
    out_e = f(q, k, v)
    (gq_e,) = torch.autograd.grad(out_e, [q])
    assert_close(out, out_e, 1e-6, "loss")
    assert_close(gq, gq_e, 1e-6, "grad q")


# ---------------------------------------------------------------------------
# support_token_argmin semantics
# ---------------------------------------------------------------------------


def test_argmin_ties_nan_mask_and_empty_rows():
    nan, inf = float("nan"), float("inf")
    margins = torch.tensor(
        [[3.0, 1.0, 1.0, 2.0], [nan, 5.0, 4.0, 4.0], [0.5, 0.2, 0.1, 0.3], [inf, inf, 7.0, 7.0]]
    )
    mask = torch.tensor(
        [[True, True, True, True], [True, True, False, True], [False] * 4, [True, True, False, False]]
    )
    idx, val = barrier_ops.support_token_argmin(margins, mask)
    assert idx.tolist() == [1, 3, -1, 0]
    assert val.tolist() == [1.0, 4.0, inf, inf]
    assert idx.dtype == torch.int64 and val.dtype == margins.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_argmin_matches_reference_on_random_heads(dtype):
    gen = torch.Generator().manual_seed(3)
    margins = torch.randint(0, 5, (4, 3, 33), generator=gen).to(dtype)  # many ties
    mask = torch.rand(4, 33, generator=gen) > 0.5
    mask[1] = False
    idx, val = barrier_ops.support_token_argmin(margins, mask)
    ridx, rval = ref.support_token_argmin_reference(margins, mask)
    assert torch.equal(idx, ridx) and torch.equal(val, rval)
    assert (idx[1] == -1).all()


def test_argmin_on_real_margins_finds_the_support_token():
    case = Case(B=2, H=2, Hkv=2, T=40, d=4, masked=True)
    q, k, v, _, mask = make_inputs(case, requires_grad=False)
    margins = barrier_ops.token_margins(q, k, v, key_padding_mask=mask, combine_heads=True)
    idx, val = barrier_ops.support_token_argmin(margins, mask)
    for b in range(2):
        if mask[b].any():
            assert mask[b, idx[b]]
            assert val[b] == margins[b][mask[b]].min()
        else:
            assert idx[b] == -1


# ---------------------------------------------------------------------------
# Bad input: a clear error naming the argument, from Python and from torch.ops
# ---------------------------------------------------------------------------


def _good():
    q = torch.randn(2, 4, 8, 6)
    k = torch.randn(2, 2, 8, 6)
    v = torch.randn(2, 2, 8, 6)
    return q, k, v


BAD_INPUTS = [
    ("q rank", lambda q, k, v: (q[0], k, v, {}), ValueError, "q must have 4 dimensions"),
    ("k rank", lambda q, k, v: (q, k[..., None], v, {}), ValueError, "k must have 4 dimensions"),
    ("batch", lambda q, k, v: (q, k[:1], v[:1], {}), ValueError, "batch size B"),
    ("seq len", lambda q, k, v: (q, k[:, :, :5], v, {}), ValueError, "sequence length T"),
    ("head dim", lambda q, k, v: (q, k[..., :5], v, {}), ValueError, "head dim d"),
    ("kv heads", lambda q, k, v: (q, k, v[:, :1], {}), ValueError, "same number of kv heads"),
    ("gqa ratio", lambda q, k, v: (q[:, :3], k, v, {}), ValueError, "multiple of the kv heads"),
    ("dv needs coupling", lambda q, k, v: (q, k, v[..., :4], {}), ValueError, "dv == d"),
    ("coupling shape", lambda q, k, v: (q, k, v, {"coupling": torch.ones(3)}), ValueError,
     r"coupling must have shape \[H\]"),
    ("coupling matrix shape", lambda q, k, v: (q, k, v, {"coupling": torch.ones(4, 6, 5)}),
     ValueError, r"coupling must have shape"),
    ("scalar coupling needs dv == d", lambda q, k, v: (q, k, v[..., :4], {"coupling": torch.ones(4)}),
     ValueError, "per-head scalar coupling"),
    ("coupling dtype", lambda q, k, v: (q, k, v, {"coupling": torch.ones(4, dtype=torch.float64)}),
     TypeError, "coupling must have the dtype of q"),
    ("coupling int", lambda q, k, v: (q, k, v, {"coupling": torch.ones(4, dtype=torch.int64)}),
     TypeError, "coupling must be float"),
    ("mask dtype", lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 8)}), TypeError,
     "key_padding_mask must be a bool tensor"),
    ("mask shape", lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 7, dtype=torch.bool)}),
     ValueError, r"key_padding_mask must have shape \[B, T\]"),
    # A [1, T] mask would broadcast silently over the batch (SDPA-based code
    # paths accept it), a [3, T] one fail with a broadcasting error.
    ("mask batch 1", lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(1, 8, dtype=torch.bool)}),
     ValueError, r"key_padding_mask must have shape \[B, T\]=\[2, 8\], got \[1, 8\]"),
    ("mask batch 3", lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(3, 8, dtype=torch.int64)}),
     ValueError, r"key_padding_mask must have shape \[B, T\]=\[2, 8\], got \[3, 8\]"),
    ("mask rank", lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 1, 1, 8, dtype=torch.bool)}),
     ValueError, r"key_padding_mask must have shape \[B, T\]"),
    ("mask device", lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 8, dtype=torch.bool, device="meta")}),
     ValueError, "key_padding_mask must be on q's device"),
    ("int dtype", lambda q, k, v: (q.long(), k.long(), v.long(), {}), TypeError,
     "q must be float32, float64, bfloat16 or float16"),
    ("mixed dtype", lambda q, k, v: (q, k.double(), v, {}), TypeError, "share one dtype"),
    ("devices", lambda q, k, v: (q, k.to("meta"), v, {}), ValueError, "on one device"),
    ("scale zero", lambda q, k, v: (q, k, v, {"scale": 0.0}), ValueError, "scale must be a finite number > 0"),
    ("scale negative", lambda q, k, v: (q, k, v, {"scale": -1.0}), ValueError, "scale must be"),
    ("scale nan", lambda q, k, v: (q, k, v, {"scale": float("nan")}), ValueError, "scale must be"),
]


@pytest.mark.parametrize("name,build,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("fn", [barrier_ops.token_margins, barrier_ops.margin_barrier_loss],
                         ids=["token_margins", "margin_barrier_loss"])
@pytest.mark.parametrize("backend", ["auto", "fused", "sdpa"])
def test_bad_input_raises_clear_error(name, build, exc, match, fn, backend):
    # Every backend: the compiled kernels of "fused" check again in C++, which
    # would hide a gap in the Python checks that "sdpa" relies on alone.
    q, k, v, kwargs = build(*_good())
    with pytest.raises(exc, match=match):
        fn(q, k, v, backend=backend, **kwargs)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"reduction": "max"}, ValueError, "reduction must be one of"),
        ({"eps": 0.0}, ValueError, "eps must be a finite number > 0"),
        ({"eps": -1e-3}, ValueError, "eps must be"),
        ({"eps": "0.1"}, TypeError, "eps must be a real number"),
    ],
)
def test_bad_loss_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        barrier_ops.margin_barrier_loss(*_good(), **kwargs)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((torch.ones(2, 3, 4, dtype=torch.bool), None), TypeError, "margins must be a floating-point"),
        ((torch.ones(5), None), ValueError, r"margins must be \[B, T\] or \[B, H, T\]"),
        ((torch.ones(2, 5), torch.ones(2, 5)), TypeError, "key_padding_mask must be a bool"),
        ((torch.ones(2, 3, 5), torch.ones(3, 5, dtype=torch.bool)), ValueError,
         r"key_padding_mask must have shape \[B, T\]"),
    ],
)
def test_bad_argmin_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        barrier_ops.support_token_argmin(*args)
    # The compiled op checks too, for callers that bypass the Python wrapper.
    with pytest.raises(exc, match=match):
        OPS.support_token_argmin.default(*args)


_OP_LEVEL = BAD_INPUTS


@pytest.mark.parametrize("name,build,exc,match", _OP_LEVEL, ids=[b[0] for b in _OP_LEVEL])
@pytest.mark.parametrize("backend", ["auto", "fused", "sdpa"])
def test_direct_op_call_checks(name, build, exc, match, backend):
    q, k, v, kwargs = build(*_good())
    with pytest.raises(exc, match=match):
        OPS.token_margins.default(
            q, k, v, kwargs.get("coupling"), kwargs.get("scale", 0.5), "inclusive",
            kwargs.get("key_padding_mask"), False, backend,
        )


KAPPA_BAD = [
    ("rank", lambda q: (q[0], q, q, {}), ValueError, "q must have 4 dimensions"),
    ("k per query head", lambda q: (q, q[:, :2], q, {}), ValueError, "one slice per query head"),
    ("w shape", lambda q: (q, q, q[..., :5], {}), ValueError, "one shape"),
    ("dtype", lambda q: (q, q.double(), q, {}), TypeError, "share one dtype"),
    ("int", lambda q: (q.long(), q.long(), q.long(), {}), TypeError, "float32, float64"),
    ("mask", lambda q: (q, q, q, {"mask": torch.ones(2, 8)}), TypeError, "bool tensor"),
    ("scale", lambda q: (q, q, q, {"scale": -1.0}), ValueError, "scale must be"),
]


@pytest.mark.parametrize("name,build,exc,match", KAPPA_BAD, ids=[b[0] for b in KAPPA_BAD])
def test_kappa_op_checks_in_cpp(name, build, exc, match):
    q, k, w, kw = build(torch.randn(2, 4, 8, 6))
    with pytest.raises(exc, match=match):
        OPS.kappa.default(q, k, w, kw.get("scale", 0.5), "inclusive", kw.get("mask"))


def test_direct_op_call_rejects_bad_reduction_eps_target_and_backend():
    q, k, v = _good()
    with pytest.raises(ValueError, match="reduction must be one of"):
        OPS.margin_barrier_loss.default(q, k, v, None, 0.5, "inclusive", None, False, 0.01, None, "avg", "auto")
    with pytest.raises(ValueError, match="eps must be"):
        OPS.margin_barrier_loss.default(q, k, v, None, 0.5, "inclusive", None, False, 0.0, None, "mean", "auto")
    with pytest.raises(ValueError, match="target_margin must be"):
        OPS.margin_barrier_loss.default(q, k, v, None, 0.5, "inclusive", None, False, 0.01, 0.001, "mean", "auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        OPS.margin_barrier_loss.default(q, k, v, None, 0.5, "inclusive", None, False, 0.01, None, "mean", "cudnn")
