"""kappa through PyTorch's own fused attention kernels (backend="sdpa").

docs/math.md, "The attention form": kbar, wbar and
sum alpha g share one set of logits, so kappa is ONE attention with the
widened, centred value

    V'_s = [k_s - mu_k | w_s - mu_w | <k_s - mu_k, w_s - mu_w>]   (width 2d + 1)
    o_t  = sum_s alpha_ts V'_s
    kappa_t = c (o_t[2d] - <o_t[:d], o_t[d:2d]>)

computed by ``scaled_dot_product_attention`` (FlashAttention, cuDNN,
memory-efficient or the CPU flash kernel: O(T) memory, no T x T matrix) with
a float32 epilogue. Autograd through SDPA gives the exact gradients.

Three details make it exact and robust:
* Centring. kappa is a covariance, so it does not depend on mu_k, mu_w (held
  constant). With 16-bit outputs, keys with a large mean make o_g and
  <o_k, o_w> two big numbers whose difference is kappa; the caller centres k
  and w (barrier_ops.ops._centred, shared with the fused backend).
* Key padding without a T x T mask. A padded key gets the logit -L through
  one extra column: q' = [q | M], k' = [k | -M] for padded keys and 0 for real
  ones, with c M^2 = L (2^14 for float16, whose math path must not overflow,
  2^20 otherwise: with 2^60 the CPU flash kernel's float32 backward gave NaN
  for rows whose every allowed key is padded). exp(-L - max) is exactly 0, so
  the kernels stay maskless (is_causal alone), which keeps the fused kernels
  eligible. Real logits must stay above -L + 100 (any sane model's do).
* float16 gradients. The barrier's real gradient (weight / number of tokens,
  ~1e-8) is below float16's smallest subnormal, so dO would round to zero on
  its way into SDPA's backward. For float16, a pair of autograd functions
  rescales dO by a power of two (from its own maximum) before the cast, and
  undoes it on the float32 side of the inputs.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _checks

# Logit given to padded keys (see the module docstring).
_PADDED_LOGIT = {torch.float16: 2.0**14}
_PADDED_LOGIT_DEFAULT = 2.0**20


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def value_layout(device: torch.device, d: int, masked: bool) -> Tuple[int, int]:
    """(width of q' and k', width of V') for the SDPA call.

    PyTorch's CPU flash kernel (and FlashAttention on CUDA) want q, k and v of
    one width; with V' wider than q, SDPA silently takes its math path, which
    materialises T x T. So on every device but CUDA, q and k are padded with
    zero columns (no logit changes) to V''s width. On CUDA the
    memory-efficient and cuDNN kernels take a wider V' as it is; widths there
    are multiples of 8, which their alignment rules want.
    """
    qk, v = d + int(masked), 2 * d + 1
    if device.type == "cuda":
        return _round_up(qk, 8), _round_up(v, 8)
    width = max(qk, v)
    return width, width


class _UnscaleInputGrads(torch.autograd.Function):
    """Identity on (q, k, v) plus a token; backward divides their grads by the token's grad.

    The token's gradient is the power of two by which :class:`_ScaleOutputGrad`
    multiplied dO, so the gradients leave in their true scale, in float32.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        return q.view_as(q), k.view_as(k), v.view_as(v), q.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, dq, dk, dv, dscale):
        scale = torch.ones((), dtype=torch.float32, device=dq.device if dq is not None else None)
        if dscale is not None:
            scale = torch.where(dscale > 0, dscale, torch.ones_like(dscale))
        return tuple(None if g is None else g / scale.to(g.dtype) for g in (dq, dk, dv))


class _ScaleOutputGrad(torch.autograd.Function):
    """Identity on o; backward multiplies dO by 2^-floor(log2 max|dO|) and reports that factor."""

    @staticmethod
    def forward(ctx, o, token):
        return o.view_as(o)

    @staticmethod
    def backward(ctx, do):
        peak = do.detach().abs().amax().to(torch.float32)
        usable = torch.isfinite(peak) & (peak > 0)
        exponent = torch.where(usable, -torch.floor(torch.log2(peak)), torch.zeros_like(peak))
        factor = torch.exp2(exponent.clamp(-100.0, 100.0))
        return do * factor.to(do.dtype), factor


def _attention_form(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    is_causal: bool,
    key_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """kappa [B, H, T] for s <= t (is_causal) or all keys.

    k and w come centred (barrier_ops.ops._centred), so V' = [k | w | <k, w>]
    is the centred value of docs/math.md; padded keys hold finite values.
    """
    B, H, T, d = q.shape
    io = q.dtype  # SDPA runs in q's dtype; k and w may come in the accumulation dtype
    acc = _checks.margin_dtype(io)
    k_acc, w_acc = k.to(acc), w.to(acc)
    value = torch.cat([k_acc, w_acc, (k_acc * w_acc).sum(-1, keepdim=True)], dim=-1)

    rescale = io == torch.float16
    query, key = q, k
    if rescale:
        query, key, value, token = _UnscaleInputGrads.apply(q.to(acc), k_acc, value)
    masked = key_mask is not None
    qk_width, v_width = value_layout(q.device, d, masked)
    query, key, value = query.to(io), key.to(io), value.to(io)
    if masked:
        big = math.sqrt(_PADDED_LOGIT.get(io, _PADDED_LOGIT_DEFAULT) / scale)
        padded = (~key_mask)[:, None, :, None].expand(B, H, T, 1)
        query = torch.cat([query, query.new_full((B, H, T, 1), big)], dim=-1)
        key = torch.cat([key, padded.to(io) * -big], dim=-1)
    query = F.pad(query, (0, qk_width - query.shape[-1]))
    key = F.pad(key, (0, qk_width - key.shape[-1]))
    value = F.pad(value, (0, v_width - value.shape[-1]))

    out = F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale)
    out = out[..., : 2 * d + 1].to(acc)
    if rescale:
        out = _ScaleOutputGrad.apply(out, token)
    kbar, wbar, gbar = out[..., :d], out[..., d : 2 * d], out[..., 2 * d]
    return scale * (gbar - (kbar * wbar).sum(-1))


def kappa_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    causal: str,
    key_padding_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """kappa [B, H, T] through SDPA; q, k, w one slice per query head, padding zeroed.

    Values at invalid positions are arbitrary (finite); the caller masks them.
    """
    if causal != "strict":
        return _attention_form(q, k, w, scale, causal == "inclusive", key_padding_mask)
    # s < t: query t against keys 0..t-1 is the inclusive problem of q[1:] against k[:-1].
    shifted_mask = None if key_padding_mask is None else key_padding_mask[:, :-1]
    rest = _attention_form(q[:, :, 1:], k[:, :, :-1], w[:, :, :-1], scale, True, shifted_mask)
    return F.pad(rest, (1, 0))
