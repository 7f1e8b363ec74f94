"""Python face of the compiled kappa core, ``torch.ops.barrier_ops.kappa``.

The schema and the fused CPU/CUDA kernels live in C++ (csrc/); this module
registers the fake (meta) kernels and the autograd formula. kappa's lse and
stats outputs are saved state for the fused backward, not results: they are
non-differentiable.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the shared library, which registers the schemas)
from . import _checks

_ops = torch.ops.barrier_ops


@torch.library.register_fake("barrier_ops::kappa")
def _kappa_fake(q, k, w, scale, causal, key_padding_mask):
    B, H, T, d = q.shape
    acc = _checks.margin_dtype(q.dtype)
    return (
        q.new_empty((B, H, T), dtype=acc),
        q.new_empty((B, H, T), dtype=acc),
        q.new_empty((B, H, T, 2 * d), dtype=acc),
    )


@torch.library.register_fake("barrier_ops::kappa_backward")
def _kappa_backward_fake(grad_kappa, q, k, w, scale, causal, key_padding_mask, kappa, lse, stats):
    # The kernels return contiguous gradients in the inputs' dtypes.
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, w))


def _kappa_setup(ctx, inputs, output):
    q, k, w, scale, causal, key_padding_mask = inputs
    kappa, lse, stats = output
    ctx.save_for_backward(q, k, w, key_padding_mask, kappa, lse, stats)
    ctx.scale = scale
    ctx.causal = causal
    ctx.mark_non_differentiable(lse, stats)


def _kappa_backward(ctx, grad_kappa, grad_lse, grad_stats):
    # Read once: non-reentrant activation checkpointing allows one read per backward.
    q, k, w, key_padding_mask, kappa, lse, stats = ctx.saved_tensors
    if grad_kappa is None:
        return None, None, None, None, None, None
    dq, dk, dw = _ops.kappa_backward.default(
        grad_kappa.contiguous(), q, k, w, ctx.scale, ctx.causal, key_padding_mask, kappa, lse, stats
    )
    return dq, dk, dw, None, None, None


torch.library.register_autograd("barrier_ops::kappa", _kappa_backward, setup_context=_kappa_setup)


def kappa_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    causal: str,
    key_padding_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """kappa [B, H, T] from the fused kernels; q, k, w one slice per query head.

    k and w may come in the accumulation dtype (centred by the caller). The CPU
    kernels compute in it anyway, so they get all three in it (no rounding of
    the centred values); the CUDA kernels run on tensor cores in q's dtype.
    """
    dtype = q.dtype if q.device.type == "cuda" else k.dtype
    q, k, w = q.to(dtype), k.to(dtype), w.to(dtype)
    return _ops.kappa.default(q, k, w, scale, causal, key_padding_mask)[0]
