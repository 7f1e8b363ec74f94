"""The reliability checks of tests/test_reliability.py on a CUDA GPU (skipped without one).

NaN/inf at real positions reach margins, loss and gradients in the fused CUDA
kernels (validity is structural there too) and in sdpa; attention sinks keep
16-bit margins within 0.05 of the float64 reference on both backends; float16
does not overflow; double backward through fused raises.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

import barrier_ops  # noqa: E402
from barrier_ops import reference as ref  # noqa: E402
from _cases import Case, make_inputs, op_kwargs  # noqa: E402
from test_reliability import (  # noqa: E402
    NONFINITE_CASES,
    _expected_nonfinite,
    _margin_errors,
    _sink_inputs,
)

BACKENDS = ["fused", "sdpa"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("where,value", [("q", float("nan")), ("q", float("inf")),
                                         ("k", float("inf")), ("v", float("nan"))])
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=str)
def test_nonfinite_real_inputs_reach_margins_loss_and_gradients_on_cuda(case, where, value,
                                                                         dtype, backend):
    q, k, v, coupling, mask = make_inputs(case, dtype, device="cuda", requires_grad=False)
    valid = ref.valid_positions(case.B, case.T, case.causal, mask.cpu() if mask is not None
                                else None, torch.device("cpu"))
    t = max(int(i) for i in torch.nonzero(valid[0]).flatten())
    pos = (0, 1 if where == "q" else 0, t)
    tensors = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    tensors[where][pos[0], pos[1], pos[2], 0] = value
    q, k, v = (tensors[n].requires_grad_() for n in "qkv")
    kw = dict(op_kwargs(case, coupling, mask), backend=backend)
    margins = barrier_ops.token_margins(q, k, v, **kw)
    want = _expected_nonfinite(case, where, pos, valid)
    assert torch.equal(~torch.isfinite(margins.cpu()), want)
    loss = barrier_ops.margin_barrier_loss(q, k, v, **kw, eps=0.05)
    assert torch.isnan(loss)
    (gq,) = torch.autograd.grad(loss, [q])
    assert not torch.isfinite(gq).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("value_offset", [True, False], ids=["key+value", "key"])
@pytest.mark.parametrize("offset", [5.0, 10.0, 30.0])
def test_attention_sink_keeps_16_bit_margins_within_0_05_of_the_reference_on_cuda(
        offset, value_offset, dtype, backend):
    (q, k, v), mask = _sink_inputs(dtype, offset, value_offset=value_offset)
    with torch.no_grad():
        margins = barrier_ops.token_margins(q.cuda(), k.cuda(), v.cuda(),
                                            key_padding_mask=mask.cuda(), backend=backend)
    expected = ref.token_margins_reference(q.double(), k.double(), v.double(),
                                           key_padding_mask=mask)
    near, rel = _margin_errors(margins.cpu(), expected)
    assert near <= 0.05 and rel <= 0.05, (near, rel)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [40.0, 100.0])
def test_float16_does_not_overflow_with_large_keys_on_cuda(offset, backend):
    (q, k, v), mask = _sink_inputs(torch.float16, offset, T=96)
    with torch.no_grad():
        margins = barrier_ops.token_margins(q.cuda(), k.cuda(), v.cuda(),
                                            key_padding_mask=mask.cuda(), backend=backend)
    assert torch.isfinite(margins).all()


def test_double_backward_through_fused_raises_on_cuda():
    q, k, v, _, _ = make_inputs(Case(B=1, H=2, Hkv=2, T=20, d=8), torch.float32, device="cuda")
    loss = barrier_ops.margin_barrier_loss(q, k, v, backend="fused")
    (gq,) = torch.autograd.grad(loss, [q], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(gq.sum(), [q])
