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

Five details make it exact and robust:
* Centring. kappa is a covariance, so it does not depend on mu_k, mu_w (held
  constant). With 16-bit outputs, keys with a large mean make o_g and
  <o_k, o_w> two big numbers whose difference is kappa, so k and w are
  centred on the mean of the "rest" keys (below), here, not by the caller.
  The logits use the centred keys too (SDPA's dq = c sum_s dS_ts k_s would
  cancel a large mean); in 16 bits as hi + lo halves, q' = [q | q] and
  k' = [hi | lo]: rounded once, an outlier's centred key would move its
  logits by ~offset * 2^-9 * |q|. (On CPU q and k are padded to V''s width
  anyway, so the split is free there; on CUDA it widens q and k by d.)
* Outliers (attention sinks). One key/value far from the others (the first
  token's massive activations, offsets of 10-40 std) defeats any centring:
  o_g and <o_k, o_w> both carry alpha_0 g_0 with g_0 ~ d offset^2. So the
  OUTLIERS keys with the largest k and w norms per (b, h) leave V': their rows
  hold only an indicator column each, and one more column marks the rest, so
  SDPA returns their weights p_j and the rest's p_R = 1 - sum_j p_j. With S_k,
  S_w, A the rest's sums of alpha k, alpha w, alpha g (centred on the rest),
  and K_j, W_j, G_j = <K_j, W_j> the outliers' centred values (float32):
      kappa / c = (A - <S_k, S_w>) + p_R sum_j p_j G_j
                  - sum_j p_j (<S_k, W_j> + <K_j, S_w>)
                  + 1/2 sum_{j,l} p_j p_l <K_j - K_l, W_j - W_l>
  an exact identity (law of total covariance) whose terms carry their own
  weights, so none is a difference of large numbers: each is rounded
  relatively and is small when kappa is. Measured (benchmarks/sdpa_outliers.py,
  docs/ops.md "Accuracy"): bf16 margins within 0.014 of the float64 reference
  with a sink at 0-40 std (3.4 / 16.9 at 10 / 30 std before).
* Range. Powers of two per (b, h) scale the k, w and g columns to |x| <= 1
  (exact), so float16 holds g of keys and values of magnitude ~40 and more.
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

Row sets (query_positions, the sampled barrier): q holds R gathered query
rows and causality compares a key's index with each row's position, which no
is_causal flag expresses; an explicit bool mask [B, 1, R, T] does (key padding
folded in, so no extra logit column), at O(R T) memory: the fused kernels take
masks (the CPU flash kernel, and the memory-efficient and cuDNN kernels on
CUDA; FlashAttention takes none). Centring, the outlier split, the scaling and
the hi/lo keys act on the keys, so they serve a row set unchanged.

Value split (SDPA_VALUE_SPLIT): V' is 2d + 6 wide, wider than q' (d, or 2d
for 16-bit hi/lo keys), so on CUDA it reaches neither FlashAttention (equal
widths) nor cuDNN (widths <= 128 in training) and runs the memory-efficient
kernel's generic path. "equal" and "narrow" cut V' into column parts that fit
those kernels, one SDPA call per part (each recomputes the logits; the weights
and outputs are those of one call, so kappa is the same). The default "auto"
is "whole" on every device until a GPU run measures the split faster.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _checks

# Logit given to padded keys (see the module docstring).
_PADDED_LOGIT = {torch.float16: 2.0**14}
_PADDED_LOGIT_DEFAULT = 2.0**20


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


# Keys handled outside SDPA, per (b, h) (see "Outliers" in the module docstring).
OUTLIERS = 4


def value_width(d: int, outliers: int = OUTLIERS) -> int:
    """Columns of V': [k | w | g | one weight column per outlier | the rest's weight]."""
    return 2 * d + 1 + outliers + 1


# How V' reaches SDPA ("Value split" in the module docstring). "auto" picks
# from AUTO_VALUE_SPLIT by device type ("whole" for devices not listed). Read at
# every call, so a benchmark can switch it; the environment variable sets the
# starting value.
VALUE_SPLITS = ("whole", "equal", "narrow")
SDPA_VALUE_SPLIT: str = os.environ.get("BARRIER_OPS_SDPA_VALUE_SPLIT", "auto")
# Nothing of the split has been timed on a GPU yet: "whole" (one SDPA call, as
# before the split existed) until benchmarks/gpu_check.py measures otherwise.
# On CPU "whole" is also the cheapest: the CPU flash kernel wants q, k and V'
# of one width, so every part of a split pays a full QK^T (measured, one thread,
# T = 1024, d = 64, fwd+bwd: float32 whole 112 ms, equal 156, narrow 193; bf16
# 86, 135, 145; benchmarks/sdpa_outliers.py --bench-variants).
AUTO_VALUE_SPLIT: Dict[str, str] = {"cpu": "whole", "cuda": "whole"}
# cuDNN's head-dim limit in training (d_qk, d_v <= 128; 256 only with new cuDNN
# on sm90/sm100 and then d_qk == d_v == 256), and the widest value the
# memory-efficient kernel runs without its generic (kMaxK = 65536) path.
NARROW_WIDTH = 128


def value_split(device: torch.device) -> str:
    """The split mode in force for a tensor on ``device`` ("whole", "equal" or "narrow")."""
    mode = SDPA_VALUE_SPLIT
    if mode == "auto":
        mode = AUTO_VALUE_SPLIT.get(device.type, "whole")
    if mode not in VALUE_SPLITS:
        raise ValueError(
            "barrier_ops._sdpa.SDPA_VALUE_SPLIT (environment variable BARRIER_OPS_SDPA_VALUE_SPLIT) "
            f"must be one of {('auto',) + VALUE_SPLITS}, got {mode!r}")
    return mode


def value_parts(device_type: str, qk: int, v: int,
                split: str = "whole") -> Tuple[int, Tuple[Tuple[int, int, int], ...]]:
    """(width of q' and k', ((first column, end column, padded width) of each V' part)).

    qk: the columns q' and k' carry before padding; v: V''s columns. One SDPA
    call per part, each on the same q' and k' (so each recomputes the logits
    and the softmax; the weights, hence the outputs, are those of one call).

    * "whole": one part. PyTorch's CPU flash kernel (and FlashAttention on
      CUDA) want q, k and v of one width; with V' wider than q, SDPA silently
      takes its math path, which materialises T x T. So on every device but
      CUDA, q' and k' are padded with zero columns (no logit changes) to V''s
      width. On CUDA the memory-efficient and cuDNN kernels take a wider V'
      as it is; widths there are multiples of 8, which their alignment rules
      want.
    * "equal": parts as wide as q' (FlashAttention's rule on CUDA: q, k and v
      of one width <= 256, 16-bit, no explicit mask; the CPU flash kernel's).
    * "narrow": parts at most NARROW_WIDTH wide (cuDNN's d_v <= 128 in
      training; the memory-efficient kernel's fast path for widths <= 128).
      On devices but CUDA each part and q' take the same width (the CPU flash
      kernel's rule): max(qk, min(v, NARROW_WIDTH)).
    """
    if split not in VALUE_SPLITS:
        raise ValueError(f"split must be one of {VALUE_SPLITS}, got {split!r}")
    cuda = device_type == "cuda"
    if split == "whole":
        if cuda:
            return _round_up(qk, 8), ((0, v, _round_up(v, 8)),)
        width = max(qk, v)
        return width, ((0, v, width),)
    qk_width = _round_up(qk, 8) if cuda else qk
    step = qk_width
    if split == "narrow":
        step = NARROW_WIDTH if cuda else max(qk, min(v, NARROW_WIDTH))
        qk_width = qk_width if cuda else step
    parts = []
    for first in range(0, v, step):
        end = min(first + step, v)
        width = _round_up(end - first, 8) if cuda and split == "narrow" else qk_width
        parts.append((first, end, width))
    return qk_width, tuple(parts)


def value_layout(device: torch.device, d: int, masked: bool,
                 outliers: int = OUTLIERS, split_keys: bool = False,
                 split: str = "whole") -> Tuple[int, Tuple[int, ...]]:
    """(width of q' and k', width of V') for the one SDPA call of the "whole" split.

    With ``split`` other than "whole", the second item is the tuple of the
    parts' widths instead (see :func:`value_parts`). masked: key padding by the
    extra logit column (no row set); split_keys: the 16-bit hi/lo keys.
    """
    qk, v = (2 * d if split_keys else d) + int(masked), value_width(d, outliers)
    qk_width, parts = value_parts(device.type, qk, v, split)
    if split == "whole":
        return qk_width, parts[0][2]
    return qk_width, tuple(width for _, _, width in parts)


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


def _split_outliers(k: torch.Tensor, w: torch.Tensor, key_mask: Optional[torch.Tensor],
                    outliers: int):
    """(index [B, H, n] of the outlier keys, rest [B, H, T, 1] bool, k and w centred on the rest).

    Outliers are the keys with the largest k and w norms relative to the
    head's mean squared norms (an attention sink has either or both); the
    choice is a constant (detached): the split is exact for any choice.
    """
    B, H, T, d = k.shape
    real = None if key_mask is None else key_mask[:, None, :].to(k.dtype)  # [B, 1, T]
    with torch.no_grad():
        kk, ww = k.detach().square().sum(-1), w.detach().square().sum(-1)  # [B, H, T]
        if real is not None:
            kk, ww = kk * real, ww * real
        tiny = torch.finfo(k.dtype).tiny
        score = kk / kk.mean(-1, keepdim=True).clamp(min=tiny) + ww / ww.mean(
            -1, keepdim=True).clamp(min=tiny)
        index = score.topk(outliers, dim=-1).indices  # [B, H, n]
    # Out of place (torch.func.vmap refuses an in-place scatter into an unbatched tensor).
    is_outlier = torch.zeros(B, H, T, dtype=torch.bool, device=k.device).scatter(-1, index, True)
    rest = ~is_outlier if real is None else ~is_outlier & (real > 0)
    rest_f = rest.to(k.dtype)[..., None]
    mu_k, mu_w = _rest_means(k, w, rest_f)
    return index, rest_f, k - mu_k, w - mu_w


def _rest_means(k: torch.Tensor, w: torch.Tensor, rest: torch.Tensor):
    """The centring: means of k and w over the rest (real, not outlier) keys, held constant.

    kappa does not depend on them; they are there for precision. With 16-bit
    outputs, keys or values with a large mean make sum alpha g and
    <kbar, wbar> two big numbers whose difference is kappa; after the outlier
    split no single key dominates the mean, however far the outliers lie.
    """
    count = rest.sum(2, keepdim=True).clamp(min=1.0)
    mu_k = (k.detach() * rest).sum(2, keepdim=True) / count
    mu_w = (w.detach() * rest).sum(2, keepdim=True) / count
    return mu_k, mu_w


def _pow2_scale(x: torch.Tensor) -> torch.Tensor:
    """[B, H, 1, 1]: a power of two >= max |x| per (b, h) (1 where x is all zero), constant."""
    with torch.no_grad():
        peak = x.detach().abs().amax(dim=(2, 3), keepdim=True)
        usable = torch.isfinite(peak) & (peak > 0)
        return torch.where(usable, torch.exp2(torch.ceil(torch.log2(peak))), torch.ones_like(peak))


def _row_mask(positions: torch.Tensor, T: int, causal: str,
              key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, 1, R, T] bool: key s is allowed for the row at positions[b, r] (-1: empty slot).

    O(R T) memory, the only quadratic tensor of a row set. A row with no
    allowed key (an empty slot, strict causality at position 0, only padded
    keys) would give NaN in SDPA; it reads every key instead: a finite value
    that the caller discards, and a zero gradient (its dO is zero).
    """
    keys = torch.arange(T, device=positions.device)
    pos = positions[:, :, None]  # [B, R, 1]
    filled = (pos >= 0) & (pos < T)  # outside [0, T): an empty slot, as the CUDA kernels read it
    if causal == "inclusive":
        allowed = (keys <= pos) & filled
    elif causal == "strict":
        allowed = (keys < pos) & filled
    else:
        allowed = filled.expand(-1, -1, T)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
    return (allowed | ~allowed.any(-1, keepdim=True))[:, None]


def _attention_form(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    is_causal: bool,
    key_mask: Optional[torch.Tensor],
    row_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """kappa [B, H, R] for s <= t (is_causal), all keys, or the keys row_mask allows.

    k and w come as the layer has them (this backend centres them itself),
    padded keys zeroed. Without row_mask, R = T and row t is position t. With
    row_mask ([B, 1, R, T] bool from :func:`_row_mask`, key padding folded in),
    q holds R gathered rows. See the module docstring for V', the outlier
    split, the hi/lo keys and the value split.
    """
    B, H, R, d = q.shape
    T = k.shape[2]
    io = q.dtype  # SDPA runs in q's dtype; k and w may come in the accumulation dtype
    acc = _checks.margin_dtype(io)
    if row_mask is None and T == 0:  # strict causality with T = 1 leaves no query with a key
        return sum(t.to(acc).sum(-1) for t in (q, k, w))  # empty; zero gradients for all three
    if row_mask is not None and (R == 0 or T == 0):
        keys = (k.to(acc).sum((2, 3)) + w.to(acc).sum((2, 3)))[..., None]  # [B, H, 1]
        return q.to(acc).sum(-1) + 0 * keys  # [B, H, R]; zero gradients for k and w
    n_out = min(OUTLIERS, T)
    k_acc, w_acc = k.to(acc), w.to(acc)
    index, rest, kc, wc = _split_outliers(k_acc, w_acc, key_mask, n_out)
    k_rest, w_rest = kc * rest, wc * rest
    # Powers of two that bring the rest's columns to |x| <= 1 (exact scalings):
    # float16 cannot hold g = <k, w> of keys and values of magnitude ~40.
    s_k, s_w = _pow2_scale(k_rest), _pow2_scale(w_rest)
    # [B, H, T, n]: key s is outlier j (a comparison: F.one_hot reads values, which vmap refuses)
    positions = torch.arange(T, device=q.device)[:, None]
    indicator = (positions == index[:, :, None, :]).to(acc)
    value = torch.cat([
        k_rest / s_k, w_rest / s_w, (k_rest * w_rest).sum(-1, keepdim=True) / (s_k * s_w),
        indicator, rest,
    ], dim=-1)

    rescale = io == torch.float16
    query, key = q, kc
    if rescale:
        query, key, value, token = _UnscaleInputGrads.apply(q.to(acc), kc, value)
    # Key padding by the extra logit column, unless a row set's mask holds it.
    masked = key_mask is not None and row_mask is None
    # The logits come from the centred keys (so that SDPA's dq = c sum dS k
    # does not cancel a large mean). In 16 bits each key is split into
    # hi + lo (q' = [q | q], k' = [hi | lo]): rounded once, an outlier's
    # centred key (offset ~40) would move its logits by ~40 * 2^-9 * |q|.
    split = io in (torch.float16, torch.bfloat16)
    v_cols = value_width(d, n_out)
    qk_width, parts = value_parts(q.device.type, (2 * d if split else d) + int(masked), v_cols,
                                  value_split(q.device))
    if split:
        hi = key.to(io)
        query, key = torch.cat([query, query], dim=-1), torch.cat([hi, key - hi.to(acc)], dim=-1)
    query, key, value = query.to(io), key.to(io), value.to(io)
    if masked:
        big = math.sqrt(_PADDED_LOGIT.get(io, _PADDED_LOGIT_DEFAULT) / scale)
        padded = (~key_mask)[:, None, :, None].expand(B, H, T, 1)
        query = torch.cat([query, query.new_full((B, H, R, 1), big)], dim=-1)
        key = torch.cat([key, padded.to(io) * -big], dim=-1)
    query = F.pad(query, (0, qk_width - query.shape[-1]))
    key = F.pad(key, (0, qk_width - key.shape[-1]))

    # One SDPA call per part of V' (one part unless split): same logits, same
    # weights, so the parts' outputs are columns of the one attention.
    outs = []
    for first, end, width in parts:
        part = F.pad(value[..., first:end], (0, width - (end - first)))
        attended = F.scaled_dot_product_attention(query, key, part, attn_mask=row_mask,
                                                  is_causal=is_causal, scale=scale)
        outs.append(attended[..., : end - first])
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)).to(acc)
    if rescale:
        out = _ScaleOutputGrad.apply(out, token)
    sum_k = out[..., :d] * s_k  # sum over the rest of alpha (k - mu), [B, H, R, d]
    sum_w = out[..., d : 2 * d] * s_w
    sum_g = out[..., 2 * d] * (s_k * s_w)[..., 0]  # [B, H, R]
    p = out[..., 2 * d + 1 : 2 * d + 1 + n_out]  # each outlier's weight, [B, H, R, n]
    p_rest = out[..., 2 * d + 1 + n_out]  # the rest's total weight
    # The outliers' centred k and w, exact (float32/64): [B, H, n, d].
    gather = index[..., None].expand(B, H, n_out, d)
    k_out, w_out = kc.gather(2, gather), wc.gather(2, gather)
    g_out = (k_out * w_out).sum(-1)  # [B, H, n]
    # kappa / c = sum alpha g - <sum alpha k, sum alpha w> with the outliers'
    # terms taken out of SDPA and recombined without cancellation (module docstring).
    within = sum_g - (sum_k * sum_w).sum(-1)
    between = p_rest * (p * g_out[:, :, None, :]).sum(-1)
    cross = (p * (torch.einsum("bhtd,bhnd->bhtn", sum_k, w_out)
                  + torch.einsum("bhnd,bhtd->bhtn", k_out, sum_w))).sum(-1)
    diff_k = k_out[:, :, :, None, :] - k_out[:, :, None, :, :]  # [B, H, n, n, d]
    diff_w = w_out[:, :, :, None, :] - w_out[:, :, None, :, :]
    spread = (diff_k * diff_w).sum(-1)  # [B, H, n, n]
    pairs = 0.5 * torch.einsum("bhtn,bhnm,bhtm->bht", p, spread, p)
    return scale * (within + between - cross + pairs)


def _kappa_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    causal: str,
    key_padding_mask: Optional[torch.Tensor],
    query_positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """kappa [B, H, R] through SDPA; q, k, w one slice per query head, padding zeroed.

    Values at invalid rows are arbitrary (finite); the caller masks them.
    """
    if query_positions is not None:
        # Causality by each row's position: an explicit [B, 1, R, T] mask
        # (O(R T), with the key padding in it) instead of is_causal.
        row_mask = _row_mask(query_positions, k.shape[2], causal, key_padding_mask)
        return _attention_form(q, k, w, scale, False, key_padding_mask, row_mask)
    if causal != "strict":
        return _attention_form(q, k, w, scale, causal == "inclusive", key_padding_mask)
    # s < t: query t against keys 0..t-1 is the inclusive problem of q[1:] against k[:-1].
    shifted_mask = None if key_padding_mask is None else key_padding_mask[:, :-1]
    rest = _attention_form(q[:, :, 1:], k[:, :, :-1], w[:, :, :-1], scale, True, shifted_mask)
    return F.pad(rest, (1, 0))


def kappa_sdpa(q, k, w, scale, causal, key_padding_mask, query_positions=None):
    """kappa [B, H, R] through SDPA; q, k, w one slice per query head, padding zeroed, uncentred.

    query_positions: None (R = T, row t is position t) or int64 [B, R], the
    position in [0, T) of each row of q (gathered by the caller), -1 for an
    empty slot. Causality compares a key's index with the row's position; a
    row set costs O(R T d) work and an O(R T) bool mask. Values at invalid rows
    (empty slot, padded position, no allowed key) are arbitrary but finite;
    the caller masks them.
    """
    return _kappa_sdpa(q, k, w, scale, causal, key_padding_mask, query_positions)


# The caller passes k and w as they are: the centring on the rest's mean
# happens inside (_rest_means), after the outlier split.
kappa_sdpa.centres_itself = True
