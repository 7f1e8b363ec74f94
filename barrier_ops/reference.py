"""Pure-PyTorch reference of the margin barrier (the test oracle).

This materialises the T x T attention matrix and relies on autograd for the
gradients, so it is slow and memory-hungry (O(B*H*T^2)), but it reads like the
math in ``docs/math.md``:

    z_ts    = c <q_t, k_s>                 (allowed s only)
    alpha_t = softmax_s(z_t)
    w_s     = A_h v_s,  g_s = <k_s, w_s>
    kappa_t = c (sum_s alpha_ts g_s - <kbar_t, wbar_t>)
    m_t     = 1 - kappa_t                  (or 1 - sum_h kappa_t with combine_heads)

It computes in float32 (float64 for float64 inputs), like the fused kernels.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _checks
from .barriers import barrier

__all__ = [
    "apply_coupling",
    "valid_positions",
    "token_kappa_reference",
    "token_margins_reference",
    "margin_barrier_loss_reference",
    "support_token_argmin_reference",
]


def apply_coupling(v: torch.Tensor, coupling: Optional[torch.Tensor]) -> torch.Tensor:
    """w = A_h v for v of shape [B, H, T, dv] (already one slice per query head)."""
    if coupling is None:
        return v
    if coupling.dim() == 1:
        return v * coupling.view(1, -1, 1, 1)
    return torch.einsum("bhtv,hdv->bhtd", v, coupling)


def allowed_keys(T: int, causal: Union[bool, str], device: torch.device) -> torch.Tensor:
    """[T, T] bool: key s (column) is allowed for query t (row), before padding."""
    allowed = torch.ones(T, T, dtype=torch.bool, device=device)
    if causal == "strict":
        return torch.tril(allowed, diagonal=-1)
    return torch.tril(allowed) if causal else allowed


def valid_positions(
    B: int,
    T: int,
    causal: Union[bool, str],
    key_padding_mask: Optional[torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """[B, T] bool: the query is a real token and has at least one allowed key."""
    real = (
        torch.ones(B, T, dtype=torch.bool, device=device)
        if key_padding_mask is None
        else key_padding_mask
    )
    allowed = allowed_keys(T, causal, device).view(1, T, T) & real.view(B, 1, T)
    return real & allowed.any(dim=-1)


def token_kappa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    coupling: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: Union[bool, str] = True,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-head kappa [B, H, T] (0 at invalid positions) and validity [B, T]."""
    key_padding_mask = _checks.as_bool_mask(key_padding_mask)
    _checks.check_attention_inputs(q, k, v, coupling, key_padding_mask)
    _checks.check_causal(causal)
    B, H, T, d = q.shape
    c = _checks.resolve_scale(scale, d)
    acc = _checks.margin_dtype(q.dtype)
    group = H // k.shape[1]
    q = q.to(acc)
    k_h = k.to(acc).repeat_interleave(group, dim=1)
    v_h = v.to(acc).repeat_interleave(group, dim=1)
    w = apply_coupling(v_h, None if coupling is None else coupling.to(acc))

    allowed = allowed_keys(T, causal, q.device).view(1, 1, T, T)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.view(B, 1, 1, T)

    z = c * torch.matmul(q, k_h.transpose(-1, -2))
    # A finite fill keeps rows with no allowed key free of NaN in value and gradient.
    z = z.masked_fill(~allowed, torch.finfo(acc).min)
    alpha = torch.softmax(z, dim=-1) * allowed

    g = (k_h * w).sum(-1)  # [B, H, T]
    kbar = torch.matmul(alpha, k_h)
    wbar = torch.matmul(alpha, w)
    kappa = c * (torch.matmul(alpha, g.unsqueeze(-1)).squeeze(-1) - (kbar * wbar).sum(-1))

    # NaN/inf in a real query makes its kappa NaN (an all -inf logit row would
    # otherwise give zero weights and kappa 0); in a real key or value, every
    # row of the heads that read it (explicitly, not by relying on 0 * inf in
    # the products above). An added NaN: the gradient still flows (and is NaN).
    real = 1.0 if key_padding_mask is None else key_padding_mask.view(B, 1, T)
    kv_bad = (~(torch.isfinite(k_h).all(-1) & torch.isfinite(w).all(-1)) & (real > 0)).any(-1)
    bad = ~torch.isfinite(q).all(-1) | kv_bad[..., None]
    kappa = kappa + torch.zeros_like(kappa).masked_fill(bad, float("nan"))
    valid = valid_positions(B, T, causal, key_padding_mask, q.device)
    kappa = torch.where(valid.view(B, 1, T), kappa, torch.zeros((), dtype=acc, device=q.device))
    return kappa, valid


def token_margins_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    coupling: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: Union[bool, str] = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    combine_heads: bool = False,
) -> torch.Tensor:
    """Reference of :func:`barrier_ops.token_margins`."""
    kappa, _ = token_kappa_reference(
        q, k, v, coupling=coupling, scale=scale, causal=causal, key_padding_mask=key_padding_mask
    )
    if combine_heads:
        return 1.0 - kappa.sum(dim=1)
    return 1.0 - kappa


def margin_barrier_loss_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    coupling: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: Union[bool, str] = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    combine_heads: bool = False,
    eps: float = 1e-2,
    target_margin: Optional[float] = None,
    reduction: str = "mean",
    query_positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference of :func:`barrier_ops.margin_barrier_loss` (barrier from :mod:`barrier_ops.barriers`).

    ``query_positions`` ([B, R] int64, -1 = empty slot): the sampled estimate for
    that row set (docs/sampling.md), computed from every row's penalty and slot
    counts in plain loops: a position held by c valid slots of sequence b counts
    c times, weighted by n_b / (number of valid slots of b).
    """
    key_padding_mask = _checks.as_bool_mask(key_padding_mask)
    eps = _checks.check_eps_for_dtype(eps, q.dtype)
    target_margin = _checks.check_target_margin(target_margin, eps)
    _checks.check_reduction(reduction)
    kappa, valid = token_kappa_reference(
        q, k, v, coupling=coupling, scale=scale, causal=causal, key_padding_mask=key_padding_mask
    )
    if combine_heads:
        margins = 1.0 - kappa.sum(dim=1)
        valid_b = valid
    else:
        margins = 1.0 - kappa
        valid_b = valid.unsqueeze(1).expand_as(margins)
    penalty = torch.where(valid_b, barrier(margins, eps, target_margin), torch.zeros_like(margins))
    count = valid_b.sum()
    if query_positions is not None:
        B, T = valid.shape
        weights = torch.zeros(B, T, dtype=penalty.dtype)
        for b in range(B):
            slots = [int(t) for t in query_positions[b].tolist() if 0 <= t < T and bool(valid[b, t])]
            for t in slots:
                weights[b, t] += float(valid[b].sum()) / len(slots)
        weights = weights.to(penalty.device)
        penalty = penalty * (weights if combine_heads else weights.unsqueeze(1))
    if reduction == "none":
        return penalty
    total = penalty.sum()
    if reduction == "sum":
        return total
    return total / count.clamp(min=1).to(total.dtype)


def support_token_argmin_reference(
    margins: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`barrier_ops.support_token_argmin` (by sorting, not a fused kernel)."""
    key_padding_mask = _checks.as_bool_mask(key_padding_mask)
    _checks.check_margins_and_mask(margins, key_padding_mask)
    T = margins.shape[-1]
    m = margins.detach()
    # NaN margins are skipped like padding, so one bad value cannot hide the real minimum.
    usable = ~torch.isnan(m)
    if key_padding_mask is not None:
        usable = usable & (key_padding_mask if m.dim() == 2 else key_padding_mask.unsqueeze(1))
    m = torch.where(usable, m, torch.full_like(m, float("inf")))
    if T == 0:
        values = torch.full(m.shape[:-1], float("inf"), dtype=m.dtype, device=m.device)
    else:
        values = m.min(dim=-1).values
    positions = torch.arange(T, device=m.device).expand_as(m)
    hits = usable & (m == values.unsqueeze(-1))
    first = torch.where(hits, positions, torch.full_like(positions, T))
    indices = first.min(dim=-1).values if T > 0 else torch.zeros(m.shape[:-1], dtype=torch.int64)
    indices = torch.where(indices == T, torch.full_like(indices, -1), indices)
    return indices, values
