"""barrier_ops: fused C++/CUDA ops for the stability-margin log-barrier of causal attention.

Public API (q: [B, H, T, d]; k: [B, Hkv, T, d]; v: [B, Hkv, T, dv], the SDPA layout)::

    token_margins(q, k, v, *, coupling=None, scale=None, causal=True, key_padding_mask=None,
                  combine_heads=False, backend="auto") -> Tensor            # m = 1 - kappa
    margin_barrier_loss(q, k, v, *, coupling=None, scale=None, causal=True, key_padding_mask=None,
                        combine_heads=False, eps=1e-2, target_margin=None, reduction="mean",
                        backend="auto", query_fraction=1.0, generator=None) -> Tensor
    support_token_argmin(margins, key_padding_mask=None) -> (indices, values)
    attach(model, weight=0.02, *, layers=None, coupling="identity", combine_heads=False, eps=1e-2,
           target_margin=None, causal=None, backend="auto", query_fraction=1.0, ...) -> handle
    detach(model); get_handle(model)   (training integration, docs/integrations.md)

``causal``: True (keys s <= t), "strict" (s < t, the paper's setting) or False.
``target_margin=m0``: a hinge that costs nothing for margins >= m0 (None: the paper's -log m).
``backend``: "auto", "fused" (the compiled kernels) or "sdpa" (PyTorch's attention kernels).
``query_fraction=f < 1``: an unbiased estimate of the barrier from a random share f of the
query rows per call, at about f of the cost (docs/sampling.md).
The options travel as one validated :class:`barrier_ops.options.BarrierOptions`.
The math is in docs/math.md; the pure-PyTorch reference of it is :mod:`barrier_ops.reference`.
"""

from .ops import margin_barrier_loss, support_token_argmin, token_margins
from .integrations import attach, detach, get_handle

__version__ = "0.1.0"

__all__ = [
    "token_margins",
    "margin_barrier_loss",
    "support_token_argmin",
    "attach",
    "detach",
    "get_handle",
    "__version__",
]
