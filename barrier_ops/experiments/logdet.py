"""Float64 reference: the exact log-determinant of a layer's query-path Jacobian (docs/math.md, "Exact log-determinant").

For one attention layer with input x ``[B, T, D]`` (the tensor the q, k, v
projections read; in the char GPT the pre-attention LayerNorm's output), H
heads, ``nn.Linear`` weights (``out x in``) ``wq, wk [H*d, D]``, ``wv [H*dv, D]``,
``wo [D, H*dv]`` and no biases, the query-path Jacobian of the layer output
``y_t = sum_h W_O^h o_t^h`` at token t is

    J_t = sum_h W_O^h C_t^h W_Q^h,   C_t^h = c * sum_s alpha_ts (v_s - vbar_t)(k_s - kbar_t)^T

and by Sylvester's identity ``log|det(I_D - J_t)| = log|det(I_{Hd} - W_Q W_O C_t)|``
with ``W_Q`` stacked over heads (``Hd x D``), ``W_O`` side by side
(``D x H dv``) and ``C_t = blockdiag(C_t^h)``. Its first-order term is
``-tr J_t = -sum_h kappa_h``, i.e. ``log m`` of the combined-heads trace margin
``m = 1 - sum_h kappa_h`` to first order.

Which causality makes it exact: under strictly-past attention (``causal="strict"``,
keys ``s < t``, the paper's setting) x_t enters y_t only through its query, so J_t
*is* the diagonal block ``dy_t/dx_t``. Under ``s <= t`` (``causal=True``, GPT-style,
what the char GPT uses) x_t also moves y_t through its own key and value; J_t is
then the query-path part of the block, the part the trace margin describes.
Position 0 has no key under ``"strict"`` (invalid: J = 0, log-det 0 reported).

Cost O(B T (T H d dv + (Hd)^3)): a validation tool at small scale, not a training op.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch


def _split_heads(x: torch.Tensor, w: torch.Tensor, heads: int) -> torch.Tensor:
    """``x @ w.T`` as ``[B, H, T, width / H]``."""
    B, T, _ = x.shape
    return (x @ w.T).view(B, T, heads, -1).transpose(1, 2)


def _allowed(T: int, causal, device) -> torch.Tensor:
    i = torch.arange(T, device=device)
    if causal == "strict":
        return i[None, :] < i[:, None]
    if causal is True:
        return i[None, :] <= i[:, None]
    if causal is False:
        return torch.ones(T, T, dtype=torch.bool, device=device)
    raise ValueError(f"causal must be True, False or 'strict', got {causal!r}")


def attention_covariances(x, wq, wk, wv, heads: int, causal=True, scale: Optional[float] = None):
    """``C [B, T, H, dv, d]`` (float64), ``kappa [B, H, T]`` and validity ``[T]`` of every query token."""
    x, wq, wk, wv = (t.double() for t in (x, wq, wk, wv))
    q, k, v = (_split_heads(x, w, heads) for w in (wq, wk, wv))  # [B, H, T, d|dv]
    d = q.shape[-1]
    c = 1.0 / math.sqrt(d) if scale is None else float(scale)
    T = x.shape[1]
    allowed = _allowed(T, causal, x.device)
    valid = allowed.any(dim=1)
    z = c * q @ k.transpose(-1, -2)
    z = z.masked_fill(~allowed, float("-inf"))
    alpha = torch.softmax(z, dim=-1).nan_to_num(0.0)  # rows without keys (strict, t = 0): all zero
    kbar = alpha @ k  # [B, H, T, d]
    vbar = alpha @ v
    # C_t = c * (sum_s alpha_ts v_s k_s^T - vbar_t kbar_t^T)
    second = torch.einsum("bhts,bhse,bhsf->bthef", alpha, v, k)
    C = c * (second - torch.einsum("bhte,bhtf->bthef", vbar, kbar))
    return C, valid


def query_path_jacobian(x, wq, wk, wv, wo, heads: int, causal=True, scale: Optional[float] = None):
    """``J [B, T, D, D]`` (float64): ``J_t = sum_h W_O^h C_t^h W_Q^h``."""
    C, _ = attention_covariances(x, wq, wk, wv, heads, causal, scale)
    D = x.shape[-1]
    w_q = wq.double().reshape(heads, -1, D)  # [H, d, D]
    w_o = wo.double().reshape(D, heads, -1).permute(1, 0, 2)  # [H, D, dv]
    return torch.einsum("hDe,bthef,hfG->btDG", w_o, C, w_q)


def exact_logdet(x, wq, wk, wv, wo, heads: int, causal=True, scale: Optional[float] = None
                 ) -> Dict[str, torch.Tensor]:
    """Exact ``log|det(I - J_t)|`` per token via Sylvester's identity, and the trace margin.

    Returns (all float64, ``[B, T]``): ``logabsdet``, ``sign`` (of the determinant),
    ``trace_margin`` (``1 - tr J_t = 1 - sum_h kappa_h``) and ``valid`` (bool ``[B, T]``;
    invalid positions report logabsdet 0, sign 1, margin 1).
    """
    C, valid = attention_covariances(x, wq, wk, wv, heads, causal, scale)
    B, T, H, dv, d = C.shape
    D = x.shape[-1]
    W_Q = wq.double()  # [H d, D]
    W_O = wo.double()  # [D, H dv]
    P = W_Q @ W_O  # [H d, H dv]: block (g, h) = W_Q^g W_O^h
    blocks = P.view(H, d, H, dv)
    # (W_Q W_O C_t)[g, :, h, :] = W_Q^g W_O^h C_t^h  ([d, d] blocks)
    M = torch.einsum("gehf,bthfi->btgehi", blocks, C).reshape(B, T, H * d, H * d)
    eye = torch.eye(H * d, dtype=torch.float64, device=x.device)
    sign, logabsdet = torch.linalg.slogdet(eye - M)
    trace = torch.diagonal(M, dim1=-2, dim2=-1).sum(-1)  # tr(W_Q W_O C_t) = tr J_t = sum_h kappa_h
    valid = valid.expand(B, T)
    return {
        "logabsdet": torch.where(valid, logabsdet, torch.zeros_like(logabsdet)),
        "sign": torch.where(valid, sign, torch.ones_like(sign)),
        "trace_margin": torch.where(valid, 1.0 - trace, torch.ones_like(trace)),
        "valid": valid,
    }


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (average ranks for ties)."""
    def ranks(x):
        x = x.double().flatten()
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        # average ranks over ties
        uniq, inv = torch.unique(x, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
        counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
        return (sums / counts)[inv]

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def logdet_and_margin_check(x, wq, wk, wv, wo, heads: int, causal=True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Direct ``slogdet(I_D - J_t)`` (no Sylvester), for tests: (sign, logabsdet) ``[B, T]``."""
    J = query_path_jacobian(x, wq, wk, wv, wo, heads, causal)
    eye = torch.eye(J.shape[-1], dtype=torch.float64, device=J.device)
    return torch.linalg.slogdet(eye - J)
