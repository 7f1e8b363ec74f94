"""Exact per-head couplings ``A_h = W_Q^h W_O^h`` from a layer's own projection weights."""

from __future__ import annotations

import torch


def coupling_from_weights(
    query_weight: torch.Tensor, output_weight: torch.Tensor, heads: int, dtype: torch.dtype
) -> torch.Tensor:
    """``[H, d, dv]`` couplings from the query rows and the output projection.

    Args:
        query_weight: ``[H*d, D]``, the query projection in ``out x in`` form
            (``nn.Linear.weight`` layout): rows ``h*d:(h+1)*d`` are ``W_Q^h``.
        output_weight: ``[D, H*dv]``, the output projection in ``out x in`` form:
            columns ``h*dv:(h+1)*dv`` are ``W_O^h``.
        heads: H.
        dtype: the dtype of q (the op wants the coupling in q's dtype).

    Built inside the forward from the parameters themselves, so it sees the
    gathered weights under FSDP / ZeRO-3 and gradients flow into both
    projections.
    """
    if query_weight.dim() != 2 or output_weight.dim() != 2:
        raise ValueError(
            f"coupling='weights': projection weights must be 2-D, got query {list(query_weight.shape)} "
            f"and output {list(output_weight.shape)}"
        )
    model_dim = query_weight.shape[1]
    if query_weight.shape[0] % heads or output_weight.shape[1] % heads or output_weight.shape[0] != model_dim:
        raise ValueError(
            f"coupling='weights': query weight {list(query_weight.shape)} and output weight "
            f"{list(output_weight.shape)} do not fit {heads} heads of a model of width {model_dim}"
        )
    w_q = query_weight.reshape(heads, -1, model_dim)  # [H, d, D]
    w_o = output_weight.reshape(model_dim, heads, -1).permute(1, 0, 2)  # [H, D, dv]
    return torch.matmul(w_q, w_o).to(dtype)
