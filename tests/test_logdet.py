"""The float64 exact log-determinant reference (spec, "Exact log-determinant") against autograd Jacobians."""

import math

import pytest
import torch
from torch.autograd.functional import jacobian

import barrier_ops
from barrier_ops.experiments.logdet import (
    exact_logdet,
    logdet_and_margin_check,
    query_path_jacobian,
    spearman,
)

H, d, D, T = 2, 3, 6, 5


def _layer(seed=0, scale=0.8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, D, generator=g, dtype=torch.float64)
    wq, wk, wv, wo = (scale * torch.randn(H * d, D, generator=g, dtype=torch.float64) for _ in range(4))
    return x, wq, wk, wv, wo.T.contiguous()  # wo: [D, H*dv]


def _mask(causal):
    i = torch.arange(T)
    return (i[None, :] < i[:, None]) if causal == "strict" else (i[None, :] <= i[:, None])


def _out(xq, xkv, wq, wk, wv, wo, t, causal):
    """Layer output at token t, queries from xq, keys and values from xkv ([T, D] each)."""
    q = (xq[t] @ wq.T).view(H, d)
    k = (xkv @ wk.T).view(T, H, d).transpose(0, 1)
    v = (xkv @ wv.T).view(T, H, d).transpose(0, 1)
    z = torch.einsum("hd,hsd->hs", q, k) / math.sqrt(d)
    z = z.masked_fill(~_mask(causal)[t], float("-inf"))
    o = torch.einsum("hs,hsd->hd", torch.softmax(z, -1), v)
    return wo @ o.reshape(-1)


@pytest.mark.parametrize("causal", [True, "strict"])
def test_query_path_jacobian_matches_autograd(causal):
    x, wq, wk, wv, wo = _layer()
    J = query_path_jacobian(x, wq, wk, wv, wo, H, causal)
    for b in range(2):
        for t in range(1, T):
            def query_only(xt):  # x_t moves only its query; keys and values are held at the data
                xq = x[b].clone()
                xq[t] = xt
                return _out(xq, x[b], wq, wk, wv, wo, t, causal)

            ref = jacobian(query_only, x[b, t].clone())
            torch.testing.assert_close(J[b, t], ref, rtol=1e-10, atol=1e-12)

            def full(xt):  # the whole diagonal block: x_t moves its query, key and value
                xx = x[b].clone()
                xx[t] = xt
                return _out(xx, xx, wq, wk, wv, wo, t, causal)

            block = jacobian(full, x[b, t].clone())
            if causal == "strict":  # x_t enters y_t only through its query: the query path IS the block
                torch.testing.assert_close(J[b, t], block, rtol=1e-10, atol=1e-12)
            else:  # under s <= t its own key and value move y_t too
                assert (J[b, t] - block).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [True, "strict"])
def test_sylvester_logdet_and_trace_margin(causal):
    x, wq, wk, wv, wo = _layer(1)
    r = exact_logdet(x, wq, wk, wv, wo, H, causal)
    sign, logabs = logdet_and_margin_check(x, wq, wk, wv, wo, H, causal)  # slogdet(I_D - J_t) directly
    valid = r["valid"]
    assert valid.all() if causal is True else (not valid[:, 0].any() and valid[:, 1:].all())
    torch.testing.assert_close(r["logabsdet"][valid], logabs[valid], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(r["sign"][valid], sign[valid])
    # First-order term: 1 - tr J_t is the product's combined-heads margin with the exact coupling.
    J = query_path_jacobian(x, wq, wk, wv, wo, H, causal)
    trace = torch.diagonal(J, dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(r["trace_margin"][valid], (1 - trace)[valid], rtol=1e-10, atol=1e-12)
    q, k, v = ((x @ w.T).view(2, T, H, d).transpose(1, 2) for w in (wq, wk, wv))
    A = torch.stack([wq[h * d:(h + 1) * d] @ wo[:, h * d:(h + 1) * d] for h in range(H)])
    m = barrier_ops.token_margins(q, k, v, coupling=A, causal=causal, combine_heads=True)
    torch.testing.assert_close(r["trace_margin"], m.double(), rtol=1e-9, atol=1e-10)


def test_small_jacobian_logdet_is_minus_trace():
    x, wq, wk, wv, wo = _layer(2, scale=0.05)
    r = exact_logdet(x, wq, wk, wv, wo, H, True)
    # |J| ~ 1e-4: log det(I - J) = -tr J + O(|J|^2), and log m = log(1 - tr J) agrees to the same order
    torch.testing.assert_close(r["logabsdet"], torch.log(r["trace_margin"]), rtol=0, atol=1e-6)


def test_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 5.0])) == pytest.approx(1.0)


def test_trace_vs_exact_on_a_tiny_char_gpt():
    from barrier_ops.experiments.config import ModelConfig
    from barrier_ops.experiments.model import CharGPT
    from barrier_ops.experiments.trace_vs_exact import analyse_model, format_table

    torch.manual_seed(0)
    model = CharGPT(11, ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=8))
    with torch.no_grad():  # larger attention weights than the init, so margins spread out
        for b in model.blocks:
            for p in (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.attn.o_proj):
                p.weight.mul_(20.0)
    res = analyse_model(model, torch.randint(0, 11, (3, 8)))
    assert barrier_ops.get_handle(model) is None  # attached for the measurement only
    for L in res["layers"]:
        assert L["tokens"] == 24 and len(L["points"]["logabsdet"]) == 24
        assert L["op_vs_float64_trace_max_abs"] < 1e-4  # the product's float32 margin = the float64 trace
        assert -1 <= L["spearman_pooled"] <= 1 and 0 <= L["argmin_agree"] <= 1
    assert "| 0 |" in format_table({"tiny": {**res, "variant": "ce", "lambda": 0.0}})
