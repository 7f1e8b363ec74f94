"""Python face of the compiled kappa core, ``torch.ops.barrier_ops.kappa``.

The schema and the fused CPU/CUDA kernels live in C++ (csrc/); this module
registers the fake (meta) kernels and the autograd formula. kappa's lse and
stats outputs are saved state for the fused backward, not results: they are
non-differentiable.

Row sets. Both ops take an optional ``query_positions`` (int64 [B, R]; entry
[b, r] a position in [0, T) or -1 for an empty slot). q then holds the R
gathered query rows [B, H, R, d] while k and w keep all T keys; kappa, lse,
stats and dq have R rows, dk and dw T. Causality and the padding mask apply to
a row through its position; an empty slot is no query (kappa 0, no gradient).
The work is O(R T d) instead of O(T^2 d).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the shared library, which registers the schemas)
from . import _checks

_ops = torch.ops.barrier_ops


@torch.library.register_fake("barrier_ops::kappa")
def _kappa_fake(q, k, w, scale, causal, key_padding_mask, query_positions=None):
    B, H, T, d = q.shape  # T = R, the query rows, with a row set
    acc = _checks.margin_dtype(q.dtype)
    return (
        q.new_empty((B, H, T), dtype=acc),
        q.new_empty((B, H, T), dtype=acc),
        q.new_empty((B, H, T, 2 * d), dtype=acc),
    )


@torch.library.register_fake("barrier_ops::kappa_backward")
def _kappa_backward_fake(
    grad_kappa, q, k, w, scale, causal, key_padding_mask, kappa, lse, stats, query_positions=None
):
    # The kernels return contiguous gradients in the inputs' dtypes.
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, w))


def _kappa_setup(ctx, inputs, output):
    q, k, w, scale, causal, key_padding_mask, *rest = inputs
    query_positions = rest[0] if rest else None
    kappa, lse, stats = output
    ctx.save_for_backward(q, k, w, key_padding_mask, kappa, lse, stats, query_positions)
    ctx.scale = scale
    ctx.causal = causal
    ctx.mark_non_differentiable(lse, stats)


DOUBLE_BACKWARD_ERROR = (
    "barrier_ops: the fused kappa kernels (backend='fused', the CPU default of backend='auto') "
    "are differentiable once: a gradient of their gradient (double backward, create_graph=True, "
    "torch.func.hessian) is not implemented. The pure-PyTorch "
    "barrier_ops.reference.margin_barrier_loss_reference is differentiable twice (O(T^2) memory)."
)


class _RaiseOnBackward(torch.autograd.Function):
    """Identity on the gradients, linked to the inputs they depend on; its backward raises."""

    @staticmethod
    def forward(ctx, dq, dk, dw, *inputs):
        return dq.view_as(dq), dk.view_as(dk), dw.view_as(dw)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _once_differentiable(grads, inputs):
    """The gradients, made to raise DOUBLE_BACKWARD_ERROR if a second backward reaches them.

    kappa_backward has no derivative of its own; without this, a backward run
    with create_graph=True would return gradients that silently carry no
    graph (second-order terms of exactly 0, with only a UserWarning).
    """
    inputs = [t for t in inputs if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        return grads
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in inputs):
        return grads  # torch.func: nested transforms are refused in _KappaFunction.backward
    return _RaiseOnBackward.apply(*grads, *inputs)


def _kappa_grads(saved, scale, causal, grad_kappa):
    # Read once: non-reentrant activation checkpointing allows one read per backward.
    q, k, w, key_padding_mask, kappa, lse, stats, query_positions = saved
    with torch.no_grad():
        grads = _ops.kappa_backward.default(
            grad_kappa.contiguous(), q, k, w, scale, causal, key_padding_mask, kappa, lse, stats,
            query_positions,
        )
    return _once_differentiable(grads, (grad_kappa, q, k, w))


def _kappa_backward(ctx, grad_kappa, grad_lse, grad_stats):
    if grad_kappa is None:
        return None, None, None, None, None, None, None
    dq, dk, dw = _kappa_grads(ctx.saved_tensors, ctx.scale, ctx.causal, grad_kappa)
    return dq, dk, dw, None, None, None, None


torch.library.register_autograd("barrier_ops::kappa", _kappa_backward, setup_context=_kappa_setup)


class _KappaFunction(torch.autograd.Function):
    """kappa as an autograd.Function with setup_context, for torch.func transforms.

    The autograd formula registered above is what eager autograd and
    torch.compile use. torch.func.grad cannot run it (PyTorch wraps it in an
    autograd.Function without setup_context), so under a grad or jvp
    transform kappa_fused calls this class instead: same kernels, same formula.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, w, scale, causal, key_padding_mask, query_positions=None):
        return _ops.kappa.default(q, k, w, scale, causal, key_padding_mask, query_positions)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _kappa_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_kappa, grad_lse, grad_stats):
        # This backward runs under the transform being differentiated (depth
        # 1); another grad/jvp level on the stack would differentiate it
        # (hessian, grad of grad) and get zeros from the kernels: refuse instead.
        if _grad_transform_depth() > 1:
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        return _kappa_backward(ctx, grad_kappa, grad_lse, grad_stats)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(
            "barrier_ops: forward-mode AD (torch.func.jvp, jacfwd) through the fused kappa "
            "kernels is not implemented; use reverse mode (torch.func.grad, vjp, jacrev)"
        )


def _grad_transform_depth() -> int:
    """How many torch.func grad or jvp transforms are active."""
    stack = torch._C._functorch.get_interpreter_stack() or ()
    grad_like = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    return sum(interpreter.key() in grad_like for interpreter in stack)


def _under_grad_transform() -> bool:
    """A torch.func grad or jvp transform is active (torch.compile traces the registered formula)."""
    return not torch.compiler.is_compiling() and _grad_transform_depth() > 0


def kappa_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    causal: str,
    key_padding_mask: Optional[torch.Tensor],
    query_positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """kappa [B, H, R] from the fused kernels; q, k, w one slice per query head.

    Without ``query_positions`` R = T. With it (int64 [B, R], positions in
    [0, T) or -1 for an empty slot), q is [B, H, R, d], the queries already
    gathered at those positions, and k, w stay [B, H, T, d].

    k and w may come in the accumulation dtype (centred by the caller). The CPU
    kernels compute in it anyway, so they get all three in it (no rounding of
    the centred values); the CUDA kernels run on tensor cores in q's dtype.
    """
    dtype = q.dtype if q.device.type == "cuda" else k.dtype
    q, k, w = q.to(dtype), k.to(dtype), w.to(dtype)
    if _under_grad_transform():
        return _KappaFunction.apply(q, k, w, scale, causal, key_padding_mask, query_positions)[0]
    return _ops.kappa.default(q, k, w, scale, causal, key_padding_mask, query_positions)[0]
