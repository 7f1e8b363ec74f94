"""Python face of the compiled ops in ``torch.ops.barrier_ops``.

The schemas and kernels live in C++ (csrc/); this module registers their fake
(meta) kernels and autograd formulas with torch.library and wraps them in the
public functions. Everything here is traceable, so ``torch.compile(fullgraph=True)``
sees one custom op per call and no graph break.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _checks
from . import _C  # noqa: F401  (loads the shared library, which registers the ops)

__all__ = ["token_margins", "margin_barrier_loss", "support_token_argmin"]

_ops = torch.ops.barrier_ops


# ---------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and (contiguous) strides of the real outputs.
# ---------------------------------------------------------------------------


def _fake_forward_state(q, combine_heads):
    B, H, T, d = q.shape
    acc = _checks.margin_dtype(q.dtype)
    margins = q.new_empty((B, T) if combine_heads else (B, H, T), dtype=acc)
    kappa = q.new_empty((B, H, T), dtype=acc)
    lse = q.new_empty((B, H, T), dtype=acc)
    stats = q.new_empty((B, H, T, 2 * d), dtype=acc)
    return margins, kappa, lse, stats


@torch.library.register_fake("barrier_ops::token_margins")
def _token_margins_fake(q, k, v, coupling, scale, causal, key_padding_mask, combine_heads):
    _checks.check_attention_inputs(q, k, v, coupling, key_padding_mask)
    return _fake_forward_state(q, combine_heads)


@torch.library.register_fake("barrier_ops::margin_barrier_loss")
def _margin_barrier_loss_fake(
    q, k, v, coupling, scale, causal, key_padding_mask, combine_heads, eps, reduction
):
    _checks.check_attention_inputs(q, k, v, coupling, key_padding_mask)
    _checks.check_reduction(reduction)
    margins, kappa, lse, stats = _fake_forward_state(q, combine_heads)
    loss = torch.empty_like(margins) if reduction == "none" else margins.new_empty(())
    return loss, margins, kappa, lse, stats


@torch.library.register_fake("barrier_ops::token_margins_backward")
def _token_margins_backward_fake(
    grad_kappa, q, k, v, coupling, scale, causal, key_padding_mask, kappa, lse, stats
):
    dcoupling = q.new_empty((0,)) if coupling is None else torch.empty_like(
        coupling, memory_format=torch.contiguous_format
    )
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        dcoupling,
    )


@torch.library.register_fake("barrier_ops::support_token_argmin")
def _support_token_argmin_fake(margins, key_padding_mask):
    _checks.check_margins_and_mask(margins, key_padding_mask)
    rows = margins.shape[:-1]
    return margins.new_empty(rows, dtype=torch.int64), margins.new_empty(rows)


# ---------------------------------------------------------------------------
# Autograd. lse and stats are saved state of the fused kernels, not results:
# they are marked non-differentiable. Gradients reach q, k, v, coupling.
# ---------------------------------------------------------------------------


def _save_forward(ctx, inputs, kappa, lse, stats):
    q, k, v, coupling, scale, causal, key_padding_mask, combine_heads = inputs[:8]
    ctx.save_for_backward(q, k, v, coupling, key_padding_mask, kappa, lse, stats)
    ctx.scale = scale
    ctx.causal = causal
    ctx.combine_heads = combine_heads
    ctx.has_coupling = coupling is not None
    ctx.mark_non_differentiable(lse, stats)


def _kappa_grad(ctx, kappa, grad_margins, grad_kappa):
    """beta = dL/dkappa, from the margins' gradient (m = 1 - kappa) and kappa's own."""
    beta = torch.zeros_like(kappa) if grad_kappa is None else grad_kappa.to(kappa.dtype)
    if grad_margins is not None:
        g = grad_margins.to(kappa.dtype)
        beta = beta - (g.unsqueeze(1) if ctx.combine_heads else g)
    return beta.expand_as(kappa)


def _backward_through_kernel(ctx, saved, beta):
    # `saved` is ctx.saved_tensors read once by the caller: non-reentrant
    # activation checkpointing allows a single read per backward.
    q, k, v, coupling, key_padding_mask, kappa, lse, stats = saved
    dq, dk, dv, dcoupling = _ops.token_margins_backward.default(
        beta.contiguous(), q, k, v, coupling, ctx.scale, ctx.causal, key_padding_mask,
        kappa, lse, stats,
    )
    return dq, dk, dv, (dcoupling if ctx.has_coupling else None)


def _token_margins_setup(ctx, inputs, output):
    margins, kappa, lse, stats = output
    _save_forward(ctx, inputs, kappa, lse, stats)


def _token_margins_backward(ctx, grad_margins, grad_kappa, grad_lse, grad_stats):
    saved = ctx.saved_tensors
    beta = _kappa_grad(ctx, saved[5], grad_margins, grad_kappa)
    return _backward_through_kernel(ctx, saved, beta) + (None, None, None, None)


torch.library.register_autograd(
    "barrier_ops::token_margins", _token_margins_backward, setup_context=_token_margins_setup
)


def _psi_prime(m: torch.Tensor, eps: float) -> torch.Tensor:
    """d psi / dm: -1/m above eps, the quadratic's slope below (finite everywhere)."""
    return torch.where(m >= eps, -1.0 / torch.clamp(m, min=eps), (m - 2.0 * eps) / (eps * eps))


def _margin_barrier_loss_setup(ctx, inputs, output):
    loss, margins, kappa, lse, stats = output
    _save_forward(ctx, inputs, kappa, lse, stats)
    ctx.eps = inputs[8]
    ctx.reduction = inputs[9]


def _margin_barrier_loss_backward(ctx, grad_loss, grad_margins, grad_kappa, grad_lse, grad_stats):
    saved = ctx.saved_tensors
    kappa, lse = saved[5], saved[6]
    margins = 1.0 - (kappa.sum(1) if ctx.combine_heads else kappa)
    valid = torch.isfinite(lse[:, 0] if ctx.combine_heads else lse)
    total = grad_margins.to(margins.dtype) if grad_margins is not None else torch.zeros_like(margins)
    if grad_loss is not None:
        slope = torch.where(valid, _psi_prime(margins, ctx.eps), torch.zeros_like(margins))
        if ctx.reduction == "mean":
            slope = slope / valid.sum().clamp(min=1).to(slope.dtype)
        total = total + grad_loss.to(margins.dtype) * slope
    beta = _kappa_grad(ctx, kappa, total, grad_kappa)
    return _backward_through_kernel(ctx, saved, beta) + (None, None, None, None, None, None)


torch.library.register_autograd(
    "barrier_ops::margin_barrier_loss",
    _margin_barrier_loss_backward,
    setup_context=_margin_barrier_loss_setup,
)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def token_margins(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    coupling: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    combine_heads: bool = False,
) -> torch.Tensor:
    """Stability margins ``m = 1 - kappa`` of every query token of one attention layer.

    Args:
        q: queries ``[B, H, T, d]`` (SDPA layout).
        k: keys ``[B, Hkv, T, d]``, ``H % Hkv == 0`` (grouped-query attention:
            query head ``h`` reads kv head ``h // (H // Hkv)``).
        v: values ``[B, Hkv, T, dv]``.
        coupling: ``A_h`` mapping value space to key space: ``None`` (identity,
            needs ``dv == d``), a per-head scalar ``[H]``, or a per-head matrix
            ``[H, d, dv]`` (the exact coupling is ``W_Q^h W_O^h``). Same dtype as q.
        scale: logit scale ``c``; ``None`` means ``1/sqrt(d)``.
        causal: key ``s`` is allowed for query ``t`` iff ``s <= t``.
        key_padding_mask: bool ``[B, T]``, True for real tokens. Padded keys are
            never attended; padded queries have no margin.
        combine_heads: return the layer margin ``1 - sum_h kappa`` ``[B, T]``
            instead of per-head margins ``[B, H, T]``.

    Returns:
        Margins ``[B, H, T]`` (or ``[B, T]``), float32 (float64 for float64
        inputs). Invalid positions (padded queries, queries without an allowed
        key) read exactly 1.0. Differentiable w.r.t. q, k, v and coupling.
    """
    _checks.check_attention_inputs(q, k, v, coupling, key_padding_mask)
    c = _checks.resolve_scale(scale, q.shape[-1])
    return _ops.token_margins.default(
        q, k, v, coupling, c, bool(causal), key_padding_mask, bool(combine_heads)
    )[0]


def margin_barrier_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    coupling: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    combine_heads: bool = False,
    eps: float = 1e-2,
    reduction: str = "mean",
) -> torch.Tensor:
    """Smooth log-barrier on the stability margins: ``reduce(psi(m))`` over valid positions.

    ``psi(m) = -log m`` for ``m >= eps`` and its C2 quadratic continuation below
    ``eps``, so configurations past the degeneracy boundary (``m <= 0``) give a
    large, finite loss whose gradient pushes the margin back up. Train with
    ``loss = ce + weight * margin_barrier_loss(...)`` (the paper's best weight
    was about 0.02).

    Arguments are those of :func:`token_margins`, plus:
        eps: where the barrier switches from ``-log m`` to the quadratic (> 0).
        reduction: ``"mean"`` (over valid positions; 0 when there are none),
            ``"sum"`` or ``"none"`` (per position, 0 at invalid positions).

    Returns:
        A scalar (or ``[B, H, T]`` / ``[B, T]`` for ``"none"``), float32
        (float64 for float64 inputs), differentiable w.r.t. q, k, v, coupling.
    """
    return barrier_and_margins(
        q, k, v, coupling=coupling, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
        combine_heads=combine_heads, eps=eps, reduction=reduction,
    )[0]


def barrier_and_margins(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    coupling: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    combine_heads: bool = False,
    eps: float = 1e-2,
    reduction: str = "mean",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(margin_barrier_loss, token_margins)`` from one fused pass.

    For callers that need both (the training integrations log the margins):
    the op computes the margins anyway, so this saves a second O(T^2) pass.
    Arguments and checks are those of :func:`margin_barrier_loss`.
    """
    _checks.check_attention_inputs(q, k, v, coupling, key_padding_mask)
    c = _checks.resolve_scale(scale, q.shape[-1])
    eps = _checks.check_eps(eps)
    _checks.check_reduction(reduction)
    out = _ops.margin_barrier_loss.default(
        q, k, v, coupling, c, bool(causal), key_padding_mask, bool(combine_heads), eps, reduction
    )
    return out[0], out[1]


def support_token_argmin(
    margins: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The support token of each sequence: the position of the smallest margin.

    Args:
        margins: ``[B, T]`` or ``[B, H, T]`` (e.g. from :func:`token_margins`).
        key_padding_mask: optional bool ``[B, T]`` (broadcast over heads);
            False positions are never chosen.

    Returns:
        ``(indices, values)`` over the last dimension: int64 indices and the
        margins there. Ties go to the smallest index; NaN margins are skipped;
        a row with no valid position gives index -1 and value +inf. Not
        differentiable (values are detached; index ``margins`` with
        ``indices`` for a differentiable value).
    """
    _checks.check_margins_and_mask(margins, key_padding_mask)
    return _ops.support_token_argmin.default(margins.detach(), key_padding_mask)
