"""The public ops: margins, the barrier loss and support tokens of one attention layer.

``torch.ops.barrier_ops.token_margins`` and ``margin_barrier_loss`` are
torch.library ops with C++ schemas (csrc/schemas.cpp) whose implementation
is registered here as CompositeImplicitAutograd: ATen ops around the one
compiled O(T^2) core, kappa (``backend="fused"``, barrier_ops/_kappa.py), or
around PyTorch's attention kernels (``backend="sdpa"``, barrier_ops/_sdpa.py).
Autograd derives every gradient outside kappa (coupling, GQA, psi,
reductions), and torch.compile traces the composite with no graph break.
``support_token_argmin`` is a fused kernel with a fake kernel.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from . import _checks
from . import _C  # noqa: F401  (loads the shared library, which registers the schemas)
from ._kappa import _under_grad_transform
from .backends import kappa_function
from .barriers import penalty
from .options import _CEIL_SLACK, BarrierOptions, ceil_fraction

__all__ = [
    "token_margins", "margin_barrier_loss", "support_token_argmin", "barrier_and_margins",
    "sample_query_positions",
]

_ops = torch.ops.barrier_ops


# ---------------------------------------------------------------------------
# The composite: everything but the O(T^2) core is ATen, differentiated by autograd.
# ---------------------------------------------------------------------------


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _coupled_values(v: torch.Tensor, coupling: Optional[torch.Tensor]) -> torch.Tensor:
    """w = A_h v for v one slice per query head [B, H, T, dv] -> [B, H, T, d]."""
    if coupling is None:
        return v
    if coupling.dim() == 1:
        return v * coupling.view(1, -1, 1, 1)
    return torch.matmul(v, coupling.transpose(-1, -2))  # [B,H,T,dv] x [H,dv,d]


def valid_positions(
    B: int, T: int, causal: str, key_padding_mask: Optional[torch.Tensor], device: torch.device
) -> torch.Tensor:
    """[B, T] bool: the query is a real token and has at least one allowed key.

    A real query is its own allowed key unless causality is strict; under
    "strict" it needs a real key before it, and position 0 never has one.
    """
    if key_padding_mask is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=device)
        if causal == "strict" and T > 0:
            valid[:, 0] = False
        return valid
    if causal != "strict":
        return key_padding_mask
    real_before = torch.cummax(key_padding_mask.to(torch.uint8), dim=1).values.bool()
    real_before = torch.nn.functional.pad(real_before[:, :-1], (1, 0), value=False)
    return key_padding_mask & real_before


def _centred(
    k: torch.Tensor, w: torch.Tensor, key_padding_mask: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """k - mu_k and w - mu_w in the accumulation dtype; means over real keys per (b, h), held constant.

    Each backend rounds them to the precision its kernels compute in.

    kappa is a covariance and the logits move by a constant per query, so
    neither changes, nor do their gradients (exact for any constant mu). What
    changes is precision: keys and values with a large mean make
    sum alpha g and <kbar, wbar> two big numbers whose difference is kappa
    (measured on CPU, keys/values with a mean of 10 std: float32 margin error
    5e-4 uncentred, 5e-7 centred). Centring here serves every backend.
    """
    acc = _checks.margin_dtype(k.dtype)
    k_acc, w_acc = k.to(acc), w.to(acc)
    k_const, w_const = k_acc.detach(), w_acc.detach()
    if key_padding_mask is None:
        mu_k, mu_w = k_const.mean(2, keepdim=True), w_const.mean(2, keepdim=True)
    else:
        real = key_padding_mask.to(acc)[:, None, :, None]
        count = real.sum(2, keepdim=True).clamp(min=1.0)
        mu_k = (k_const * real).sum(2, keepdim=True) / count
        mu_w = (w_const * real).sum(2, keepdim=True) / count
    return k_acc - mu_k, w_acc - mu_w


def _gather_rows(q: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """q's rows at the positions of a row set [B, R] -> [B, H, R, d]; an empty slot's row is zeros."""
    B, H, _, d = q.shape
    filled = query_positions >= 0
    index = torch.where(filled, query_positions, torch.zeros_like(query_positions))
    rows = q.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], d))
    return torch.where(filled[:, None, :, None], rows, torch.zeros_like(rows))


def _kappa_and_validity(q, k, v, coupling, scale, causal, key_padding_mask, backend,
                        query_positions=None):
    """kappa and its validity; with a row set, kappa [B, H, R] and validity [B, R] of the rows.

    A row is valid when its slot is filled and its position is valid
    (:func:`valid_positions`). Returns ``(kappa, valid_rows, valid)``, ``valid``
    the [B, T] validity of all positions (the same tensor as ``valid_rows``
    without a row set).
    """
    _checks.check_attention_inputs(q, k, v, coupling, key_padding_mask)
    scale = _checks.resolve_scale(scale, q.shape[-1])
    kappa_fn = kappa_function(backend, q.device)
    dtype = _autocast_dtype(q.device)
    if dtype is not None:
        # As autocast casts an op's inputs: float16/bfloat16/float32 to the
        # autocast dtype, float64 left alone (float64 in, float64 out).
        def cast(t):
            return t if t is None or t.dtype == torch.float64 else t.to(dtype)

        q, k, v, coupling = cast(q), cast(k), cast(v), cast(coupling)
        if len({t.dtype for t in (q, k, v, coupling) if t is not None}) > 1:
            raise TypeError(
                "under torch.autocast, q, k, v (and the coupling) must be all float64 or all "
                f"of autocast-eligible dtypes, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
                + ("" if coupling is None else f", coupling {coupling.dtype}")
            )
    B, H, T, _ = q.shape
    if query_positions is not None:
        query_positions = _checks.check_query_positions(query_positions, B, T, q.device)
    if key_padding_mask is not None:
        # Padded positions may hold anything (NaN, 1e30): zero them, so that
        # neither backend nor the coupling's gradient sum_s dw_s v_s^T reads them.
        real = key_padding_mask[:, None, :, None]
        q, k, v = (torch.where(real, t, torch.zeros_like(t)) for t in (q, k, v))
    group = H // k.shape[1]
    if group > 1:  # GQA: one slice per query head; autograd sums the group's gradients
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    # w = A v in the accumulation dtype: rounded to 16 bits, an attention
    # sink's w_0 (|v_0| ~ 40) would be off by ~40 * 2^-9 before any kernel ran.
    acc = _checks.margin_dtype(q.dtype)
    w = _coupled_values(v.to(acc), None if coupling is None else coupling.to(acc))
    if not getattr(kappa_fn, "centres_itself", False):
        k, w = _centred(k, w, key_padding_mask)
    valid = valid_positions(B, T, causal, key_padding_mask, q.device)
    if query_positions is None:
        kappa = kappa_fn(q, k, w, scale, causal, key_padding_mask)
        valid_rows = valid
    else:
        # Only the drawn rows: O(R T d) work in the backend, keys and values whole.
        q = _gather_rows(q, query_positions)
        kappa = kappa_fn(q, k, w, scale, causal, key_padding_mask, query_positions)
        filled = query_positions >= 0
        index = torch.where(filled, query_positions, torch.zeros_like(query_positions))
        valid_rows = filled & valid.gather(1, index)
    # NaN/inf in a real input must reach the result, the same way on every
    # backend: a query, its own row; a key or value (or the coupling), every
    # row of the heads that read it. The kernels alone differ: a backend may
    # map an all -inf logit row to zero weights (SDPA does), or leave an inf key
    # that no valid query attends to out of every result. Padding is zeroed
    # above, so only real positions count. An added NaN, not a torch.where:
    # the gradient still flows (and is NaN).
    # x * 0 is exactly (+-)0 where x is finite and NaN where it is inf or NaN,
    # so these sums are 0 for finite rows and NaN otherwise: one multiply and
    # one fast reduction per tensor (isfinite(x).all(-1) took ~13x as long, 5%
    # of a CPU fwd + bwd at T = 1024), and adding 0 leaves kappa unchanged.
    # With a row set q holds the drawn rows only: each drawn row carries its own.
    def nan_if_not_finite(x):
        return (x.detach() * 0).sum(-1)

    poison = nan_if_not_finite(q) + (nan_if_not_finite(k) + nan_if_not_finite(w)).sum(
        -1, keepdim=True)
    kappa = kappa + poison.to(kappa.dtype)
    kappa = torch.where(valid_rows[:, None, :], kappa, torch.zeros_like(kappa))
    return kappa, valid_rows, valid


def _margins(kappa: torch.Tensor, combine_heads: bool) -> torch.Tensor:
    return 1.0 - (kappa.sum(dim=1) if combine_heads else kappa)


def _per_head(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B, n] tensor broadcast to ``like`` ([B, n] or [B, H, n])."""
    return x if like.dim() == 2 else x[:, None, :].expand_as(like)


def _scatter_rows(rows: torch.Tensor, query_positions: torch.Tensor, valid_rows: torch.Tensor,
                  base: torch.Tensor) -> torch.Tensor:
    """``base`` [B, (H), T] with ``rows`` [B, (H), R] written at the valid rows' positions.

    Invalid rows go to a scratch column T that is cut off again. Repeated
    positions (a caller's row set; the sampler draws distinct ones) are summed.
    """
    T = base.shape[-1]
    index = torch.where(valid_rows, query_positions, torch.full_like(query_positions, T))
    index = _per_head(index, rows)
    padded = torch.nn.functional.pad(base, (0, 1))
    return padded.scatter_add(-1, index, rows)[..., :T]


def _reduce_barrier(margins, valid, options, reduction, query_positions=None, valid_all=None):
    """reduce(penalty(m)) over valid positions; valid is [B, T] (or [B, R] rows), margins [B, (H), T or R].

    With a row set (``query_positions`` [B, R], ``valid`` the rows' validity,
    ``valid_all`` [B, T] that of all positions) it is the Horvitz-Thompson
    estimate: a valid row of sequence b weighs n_b / R_b (n_b valid positions,
    R_b valid rows), so that for rows drawn uniformly without replacement the
    expectation is the full value (docs/sampling.md). "mean" divides by the
    full count of valid positions (times H per head), "none" is [B, (H), T]
    with the weighted penalties at the drawn positions and 0 elsewhere.
    """
    valid_e = _per_head(valid, margins)
    per_token = torch.where(valid_e, penalty(margins, options), torch.zeros_like(margins))
    if query_positions is not None:
        n_valid = valid_all.sum(1).to(margins.dtype)
        n_rows = valid.sum(1).clamp(min=1).to(margins.dtype)
        weight = n_valid / n_rows
        per_token = per_token * (weight[:, None] if margins.dim() == 2 else weight[:, None, None])
        if reduction == "none":
            base = margins.new_zeros(margins.shape[:-1] + valid_all.shape[-1:])
            return _scatter_rows(per_token, query_positions, valid, base)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if query_positions is not None:  # the full count: N of the estimator
        heads = 1 if margins.dim() == 2 else margins.shape[1]
        return total / (valid_all.sum() * heads).clamp(min=1).to(total.dtype)
    # No valid position (all padding) gives 0, not 0/0.
    return total / valid_e.sum().clamp(min=1).to(total.dtype)


def _token_margins_impl(q, k, v, coupling, scale, causal, key_padding_mask, combine_heads, backend):
    _checks.check_causal_mode(causal)
    key_padding_mask = _checks.as_bool_mask(key_padding_mask)
    kappa, _, _ = _kappa_and_validity(q, k, v, coupling, scale, causal, key_padding_mask, backend)
    return _margins(kappa, combine_heads)


def _margin_barrier_loss_impl(
    q, k, v, coupling, scale, causal, key_padding_mask, combine_heads, eps, target_margin,
    reduction, backend, query_positions=None,
):
    _checks.check_causal_mode(causal)
    key_padding_mask = _checks.as_bool_mask(key_padding_mask)
    eps = _checks.check_eps_for_dtype(eps, q.dtype)
    target_margin = _checks.check_target_margin(target_margin, eps)
    _checks.check_reduction(reduction)
    options = _OpOptions(eps, target_margin)
    kappa, valid_rows, valid = _kappa_and_validity(
        q, k, v, coupling, scale, causal, key_padding_mask, backend, query_positions
    )
    return _reduce_barrier(
        _margins(kappa, combine_heads), valid_rows, options, reduction, query_positions, valid
    )


class _OpOptions:
    """The barrier's fields as the op schema passes them (already checked), read by penalty()."""

    __slots__ = ("eps", "target_margin")

    def __init__(self, eps, target_margin):
        self.eps, self.target_margin = eps, target_margin


# Kept at module level: the registrations live as long as this Library object.
_lib = torch.library.Library("barrier_ops", "IMPL")
_lib.impl("token_margins", _token_margins_impl, "CompositeImplicitAutograd")
_lib.impl("margin_barrier_loss", _margin_barrier_loss_impl, "CompositeImplicitAutograd")


@torch.library.register_fake("barrier_ops::support_token_argmin")
def _support_token_argmin_fake(margins, key_padding_mask):
    _checks.check_margins_and_mask(margins, key_padding_mask)
    rows = margins.shape[:-1]
    return margins.new_empty(rows, dtype=torch.int64), margins.new_empty(rows)


def support_token_argmin_aten(
    margins: torch.Tensor, key_padding_mask: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """support_token_argmin in ATen ops, with the fused kernels' contract.

    Ties to the smallest index, NaN skipped like padding, -1 / +inf for a row
    with no valid position. The kernel for devices this build has no fused
    kernel for (a CPU-only build on a GPU machine): attach's statistics and the
    experiment call support_token_argmin, so it must not fail there.
    """
    _checks.check_margins_and_mask(margins, key_padding_mask)
    valid = ~torch.isnan(margins)
    if key_padding_mask is not None:
        valid = valid & (key_padding_mask if margins.dim() == 2 else key_padding_mask[:, None, :])
    inf = torch.full((), float("inf"), dtype=margins.dtype, device=margins.device)
    values, indices = torch.where(valid, margins, inf).min(dim=-1)  # first index of the minimum
    # A minimum of +inf ties with every invalid position: take the first valid +inf instead.
    first_valid_inf = (valid & (margins == inf)).to(torch.uint8).argmax(dim=-1)
    indices = torch.where(values == inf, first_valid_inf, indices)
    indices = torch.where(valid.any(dim=-1), indices, torch.full_like(indices, -1))
    return indices.contiguous(), values.contiguous()


# A build without CUDA kernels (setup.py compiles them only where a GPU is
# visible or BARRIER_OPS_CUDA=1) still answers on CUDA tensors.
if not torch._C._dispatch_has_kernel_for_dispatch_key("barrier_ops::support_token_argmin", "CUDA"):
    _lib.impl("support_token_argmin", support_token_argmin_aten, "CUDA")


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------

Causal = Union[bool, str]


def token_margins(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    coupling: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: Causal = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    combine_heads: bool = False,
    backend: str = "auto",
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
        causal: ``True``: key ``s`` is allowed for query ``t`` iff ``s <= t``
            (GPT-style); ``"strict"``: iff ``s < t`` (the paper's setting;
            position 0 then has no margin); ``False``: every key.
        key_padding_mask: ``[B, T]``, bool (True for real tokens) or integer
            (nonzero for real tokens, as Hugging Face's ``attention_mask``).
            Padded keys are never attended; padded queries have no margin.
            Padded positions of q, k, v may hold anything, NaN included; NaN
            or inf at a real position makes the margins it reaches NaN.
        combine_heads: return the layer margin ``1 - sum_h kappa`` ``[B, T]``
            instead of per-head margins ``[B, H, T]``.
        backend: where the O(T^2) work runs: ``"fused"`` (our kernels, CPU and
            CUDA), ``"sdpa"`` (PyTorch's scaled_dot_product_attention, any
            device) or ``"auto"`` (see :mod:`barrier_ops.backends`).

    Returns:
        Margins ``[B, H, T]`` (or ``[B, T]``), float32 (float64 for float64
        inputs). Invalid positions (padded queries, queries without an allowed
        key) read exactly 1.0. Differentiable w.r.t. q, k, v and coupling.
    """
    key_padding_mask = _checks.as_bool_mask(key_padding_mask)
    _checks.check_attention_inputs(q, k, v, coupling, key_padding_mask)
    # Under torch.func.grad the Python composite runs directly: the fused
    # kernels' autograd.Function must see the transform (barrier_ops/_kappa.py).
    op = _token_margins_impl if _under_grad_transform() else _ops.token_margins.default
    return op(
        q, k, v, coupling, _checks.resolve_scale(scale, q.shape[-1]), _checks.check_causal(causal),
        key_padding_mask, bool(combine_heads), backend,
    )


def _check_generator(generator: Optional[torch.Generator], device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"generator must be on the device of q ({device}), got a generator on {generator.device}"
        )


def sample_query_positions(
    valid: torch.Tensor, query_fraction: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Draw a row set: in each sequence b, ``ceil(f * n_b)`` of its n_b valid positions.

    Args:
        valid: ``[B, T]`` bool, the valid positions (:func:`valid_positions`).
        query_fraction: f in (0, 1].
        generator: a ``torch.Generator`` on valid's device; None draws from
            torch's global generator (reproducible under ``torch.manual_seed``).

    Returns:
        int64 ``[B, R]`` with ``R = ceil(f * T)`` (a static shape): row b holds
        ``R_b = ceil(f * n_b)`` distinct positions drawn uniformly without
        replacement among the valid ones, and -1 in the other slots, sorted
        ascending (the -1 slots first).
    """
    from .options import check_query_fraction

    f = check_query_fraction(query_fraction)
    B, T = valid.shape
    _check_generator(generator, valid.device)
    R = ceil_fraction(f, T)
    # Uniform keys, +inf at invalid positions: the R_b smallest keys of the n_b
    # valid positions are a uniform subset of size R_b (float64: ties have
    # probability ~T^2 2^-54, not ~T^2 2^-25 as with float32 keys).
    keys = torch.rand(B, T, generator=generator, device=valid.device, dtype=torch.float64)
    keys = torch.where(valid, keys, torch.full_like(keys, math.inf))
    ranked = keys.topk(R, dim=1, largest=False, sorted=True).indices
    n_valid = valid.sum(1, keepdim=True).to(torch.float64)
    n_rows = torch.ceil(n_valid * f * _CEIL_SLACK).to(torch.int64)
    rank = torch.arange(R, device=valid.device)
    chosen = torch.where(rank[None, :] < n_rows, ranked, torch.full_like(ranked, -1))
    return chosen.sort(dim=1).values


def margin_barrier_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    coupling: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: Causal = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    combine_heads: bool = False,
    eps: float = 1e-2,
    target_margin: Optional[float] = None,
    reduction: str = "mean",
    backend: str = "auto",
    query_fraction: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Smooth log-barrier on the stability margins: ``reduce(psi(m))`` over valid positions.

    ``psi(m) = -log m`` for ``m >= eps`` and its C2 quadratic continuation below
    ``eps``, so configurations past the degeneracy boundary (``m <= 0``) give a
    large, finite loss whose gradient pushes the margin back up. Train with
    ``loss = ce + weight * margin_barrier_loss(...)`` (the paper's best weight
    was about 0.02).

    Arguments are those of :func:`token_margins`, plus:
        eps: where the barrier switches from ``-log m`` to the quadratic (> 0,
            and at least :func:`barrier_ops._checks.min_eps` of the margins'
            dtype, 1.2e-9 for float32, so that the quadratic cannot overflow).
        target_margin: ``None`` for the paper's barrier, or ``m0 > eps``: the
            hinge ``psi(m) - psi(m0) - psi'(m0)(m - m0)`` below ``m0`` and 0
            above, so margins at or above the target cost nothing
            (:func:`barrier_ops.barriers.barrier`).
        reduction: ``"mean"`` (over valid positions; 0 when there are none),
            ``"sum"`` or ``"none"`` (per position, 0 at invalid positions).
        query_fraction: f in (0, 1]. 1 (default) computes every query row.
            With f < 1 each call draws ``ceil(f * n_b)`` of the ``n_b`` valid
            positions of each sequence uniformly without replacement (the same
            rows for every head), computes kappa for those rows only (about f
            of the O(T^2) work) and returns the Horvitz-Thompson estimate: a
            random value whose expectation, and that of its gradient, is the
            full loss (docs/sampling.md). ``"none"`` then holds the weighted
            penalty at the drawn positions and 0 elsewhere.
        generator: the ``torch.Generator`` the rows are drawn from (on q's
            device); None uses torch's global generator (reproducible under
            ``torch.manual_seed``). Under torch.compile use the global one:
            dynamo does not trace a generator (fullgraph=True raises).
            Checked, but unused, when ``query_fraction == 1``.

    Returns:
        A scalar (or ``[B, H, T]`` / ``[B, T]`` for ``"none"``), float32
        (float64 for float64 inputs), differentiable w.r.t. q, k, v, coupling.
    """
    key_padding_mask = _checks.as_bool_mask(key_padding_mask)
    _checks.check_attention_inputs(q, k, v, coupling, key_padding_mask)
    options = BarrierOptions(
        eps=eps, target_margin=target_margin, causal=causal, backend=backend,
        combine_heads=bool(combine_heads), query_fraction=query_fraction,
    )
    return _margin_barrier_loss(q, k, v, coupling, scale, key_padding_mask, options,
                                options.causal_mode(), reduction, generator)


def _margin_barrier_loss(q, k, v, coupling, scale, key_padding_mask, options, causal, reduction,
                         generator=None):
    """margin_barrier_loss with checked inputs and options; ``causal`` in the op's spelling."""
    eps = _checks.check_eps_for_dtype(options.eps, q.dtype)
    args = (
        q, k, v, coupling, _checks.resolve_scale(scale, q.shape[-1]), causal, key_padding_mask,
        options.combine_heads, eps, options.target_margin, _checks.check_reduction(reduction),
        options.backend,
    )
    _check_generator(generator, q.device)
    op = _margin_barrier_loss_impl if _under_grad_transform() else _ops.margin_barrier_loss.default
    if not options.sampled:
        return op(*args)
    valid = valid_positions(q.shape[0], q.shape[2], causal, key_padding_mask, q.device)
    return op(*args, sample_query_positions(valid, options.query_fraction, generator))


def barrier_and_margins(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    coupling: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: Causal = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    combine_heads: bool = False,
    eps: float = 1e-2,
    target_margin: Optional[float] = None,
    reduction: str = "mean",
    backend: str = "auto",
    query_fraction: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(margin_barrier_loss, token_margins)`` from one kappa pass.

    For callers that need both (the training integrations log the margins).
    Arguments and checks are those of :func:`margin_barrier_loss`. With
    ``query_fraction < 1`` the loss is the sampled estimate and the margins
    ``[B, (H), T]`` hold the drawn rows' margins, NaN at the valid positions
    that were not drawn and 1.0 at invalid positions (as token_margins);
    :func:`support_token_argmin` skips NaN, so it searches the drawn rows.
    """
    options = BarrierOptions(
        eps=eps, target_margin=target_margin, causal=causal, backend=backend,
        combine_heads=bool(combine_heads), query_fraction=query_fraction,
    )
    return _barrier_and_margins(q, k, v, coupling, scale, key_padding_mask, options,
                                options.causal_mode(), reduction, generator)


def _barrier_and_margins(q, k, v, coupling, scale, key_padding_mask, options, causal, reduction,
                         generator=None):
    """barrier_and_margins with checked inputs and options; ``causal`` in the op's spelling.

    The entry point of the integrations (their layer state holds the options).
    """
    key_padding_mask = _checks.as_bool_mask(key_padding_mask)
    _checks.check_attention_inputs(q, k, v, coupling, key_padding_mask)
    eps = _checks.check_eps_for_dtype(options.eps, q.dtype)
    if eps != options.eps:  # a SymFloat under torch.compile(dynamic=True)
        options = options.replace(eps=eps)
    _checks.check_reduction(reduction)
    scale = _checks.resolve_scale(scale, q.shape[-1])
    _check_generator(generator, q.device)
    valid = valid_positions(q.shape[0], q.shape[2], causal, key_padding_mask, q.device)
    if not options.sampled:
        op = _token_margins_impl if _under_grad_transform() else _ops.token_margins.default
        margins = op(q, k, v, coupling, scale, causal, key_padding_mask, options.combine_heads,
                     options.backend)
        return _reduce_barrier(margins, valid, options, reduction), margins
    _checks.check_causal_mode(causal)
    rows = sample_query_positions(valid, options.query_fraction, generator)
    kappa, valid_rows, valid = _kappa_and_validity(
        q, k, v, coupling, scale, causal, key_padding_mask, options.backend, rows
    )
    row_margins = _margins(kappa, options.combine_heads)
    loss = _reduce_barrier(row_margins, valid_rows, options, reduction, rows, valid)
    # Undrawn valid positions read NaN (no value), invalid ones 1.0 (as token_margins).
    zeros = row_margins.new_zeros(row_margins.shape[:-1] + valid.shape[-1:])
    drawn_rows = _per_head(valid_rows, row_margins)
    values = _scatter_rows(torch.where(drawn_rows, row_margins, torch.zeros_like(row_margins)),
                           rows, valid_rows, zeros)
    drawn = _scatter_rows(drawn_rows.to(zeros.dtype), rows, valid_rows, zeros) > 0
    undrawn = torch.where(_per_head(valid, zeros), math.nan, 1.0).to(zeros.dtype)
    margins = torch.where(drawn, values, undrawn)
    return loss, margins


def support_token_argmin(
    margins: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The support token of each sequence: the position of the smallest margin.

    Args:
        margins: ``[B, T]`` or ``[B, H, T]`` (e.g. from :func:`token_margins`).
        key_padding_mask: optional ``[B, T]`` (broadcast over heads), bool or
            integer (nonzero = real); padded positions are never chosen.

    Returns:
        ``(indices, values)`` over the last dimension: int64 indices and the
        margins there. Ties go to the smallest index; NaN margins are skipped;
        a row with no valid position gives index -1 and value +inf. Not
        differentiable (values are detached; index ``margins`` with
        ``indices`` for a differentiable value).
    """
    key_padding_mask = _checks.as_bool_mask(key_padding_mask)
    _checks.check_margins_and_mask(margins, key_padding_mask)
    return _ops.support_token_argmin.default(margins.detach(), key_padding_mask)
