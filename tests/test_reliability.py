"""No silent wrong result on inputs that real models produce.

NaN/inf in real positions reach the margins and the loss on every backend and
dtype (padding stays contained: tests/test_backends.py), attention-sink
outliers keep sdpa accurate, and the edge cases of compile, torch.func,
autocast, eps, masks and double backward either work or raise clearly.
"""

from __future__ import annotations

import pytest
import torch

import barrier_ops
from barrier_ops import reference as ref
from _cases import Case, make_inputs, op_kwargs

BACKENDS = ["fused", "sdpa"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _expected_nonfinite(case, where, pos, valid):
    """[B, H, T] (or [B, T]) bool: the margins a non-finite input must reach.

    A non-finite query reaches its own margin; a non-finite real key or value
    reaches every margin of the query heads that read its kv head (the key and
    value means of the centring and the reference's 0 * inf both spread it).
    Invalid positions read exactly 1.0 whatever the inputs hold.
    """
    b, h, t = pos
    out = torch.zeros(case.B, case.H, case.T, dtype=torch.bool)
    if where == "q":
        out[b, h, t] = True
    else:
        group = case.H // case.Hkv
        out[b, h * group:(h + 1) * group, :] = True
    out &= valid[:, None, :]
    return out.any(1) if case.combine_heads else out


NONFINITE_CASES = [
    Case(B=2, H=4, Hkv=2, T=40, d=8, masked=True),
    Case(B=2, H=2, Hkv=2, T=70, d=4, dv=6, coupling="matrix", causal=False),
    Case(B=2, H=2, Hkv=1, T=33, d=4, coupling="scalar", masked=True, combine_heads=True,
         causal="strict"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where,value", [("q", float("nan")), ("q", float("inf")),
                                         ("k", float("inf")), ("k", float("nan")),
                                         ("v", float("-inf")), ("v", float("nan"))])
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=str)
def test_nonfinite_real_inputs_reach_margins_loss_and_gradients(case, where, value, dtype,
                                                                 backend):
    q, k, v, coupling, mask = make_inputs(case, dtype, requires_grad=False)
    coupling = None if coupling is None else coupling.to(dtype)
    valid = ref.valid_positions(case.B, case.T, case.causal, mask, q.device)
    # A real position late in sequence 0, whose query is valid.
    t = max(int(i) for i in torch.nonzero(valid[0]).flatten())
    pos = (0, 1 if where == "q" else 0, t)
    tensors = {"q": q, "k": k, "v": v}
    tensors[where] = tensors[where].clone()
    tensors[where][pos[0], pos[1], pos[2], 0] = value
    q, k, v = (tensors[n].requires_grad_() for n in "qkv")
    kw = dict(op_kwargs(case, coupling, mask), backend=backend)
    margins = barrier_ops.token_margins(q, k, v, **kw)
    want = _expected_nonfinite(case, where, pos, valid)
    assert torch.equal(~torch.isfinite(margins), want), (
        f"{int((~torch.isfinite(margins)).sum())} non-finite margins, {int(want.sum())} expected")
    valid_b = valid if case.combine_heads else valid[:, None, :].expand_as(margins)
    assert (margins[~valid_b] == 1.0).all(), "invalid positions must read 1.0"
    for target_margin in (None, 1.05):
        loss = barrier_ops.margin_barrier_loss(q, k, v, **kw, eps=0.05,
                                               target_margin=target_margin)
        assert torch.isnan(loss), f"loss {loss.item()} with target_margin={target_margin}"
    (gq,) = torch.autograd.grad(loss, [q])
    assert not torch.isfinite(gq).all(), "the gradient must not hide the non-finite input"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False, "strict"])
def test_nonfinite_input_at_an_invalid_query_stays_contained(backend, causal):
    # A query with no margin (strict t = 0) is never read: NaN there changes nothing.
    case = Case(B=1, H=2, Hkv=2, T=12, d=4)
    q, k, v, _, _ = make_inputs(case, torch.float64, requires_grad=False)
    dirty = q.clone()
    dirty[0, 0, 0] = float("nan")
    got = barrier_ops.token_margins(dirty, k, v, causal=causal, backend=backend)
    if causal == "strict":
        torch.testing.assert_close(got, barrier_ops.token_margins(q, k, v, causal=causal,
                                                                  backend=backend))
    else:
        assert torch.isnan(got[0, 0, 0]) and torch.isfinite(got[0, 1]).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kappa_op_rows_with_nonfinite_logits_are_nan_not_invalid(dtype):
    # The op itself: a NaN query row, a row whose only allowed key is NaN
    # (the block's max skips it), and an inf key read by later rows.
    B, H, T, d = 1, 1, 300, 4
    g = torch.Generator().manual_seed(0)
    q, k, w = (torch.randn(B, H, T, d, generator=g, dtype=dtype) for _ in range(3))
    q[0, 0, 5] = float("nan")
    k[0, 0, 0] = float("nan")
    kappa, lse, stats = torch.ops.barrier_ops.kappa(q, k, w, 0.5, "inclusive", None)
    assert torch.isnan(kappa[0, 0, 5]) and torch.isnan(lse[0, 0, 5])
    assert torch.isnan(kappa[0, 0, 0]) and torch.isnan(stats[0, 0, 0]).all()
    assert torch.isnan(kappa).all(), "key 0 is allowed for every query"
    beta = torch.ones_like(kappa)
    dq, dk, dw = torch.ops.barrier_ops.kappa_backward(beta, q, k, w, 0.5, "inclusive", None,
                                                      kappa, lse, stats)
    assert torch.isnan(dq).any() and torch.isnan(dk).any()
