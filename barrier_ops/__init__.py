"""barrier_ops: fused C++/CUDA ops for the stability-margin log-barrier of causal attention.

Public API::

    token_margins(q, k, v, *, coupling=None, scale=None, causal=True,
                  key_padding_mask=None, combine_heads=False) -> Tensor
    margin_barrier_loss(q, k, v, *, ..., eps=1e-2, reduction="mean") -> Tensor
    support_token_argmin(margins, key_padding_mask=None) -> (indices, values)
    attach(model, weight=0.02, *, layers=None, coupling="identity", ...) -> handle
    detach(model); get_handle(model)   (training integration, docs/integrations.md)

The pure-PyTorch reference of the same math is in :mod:`barrier_ops.reference`.
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
