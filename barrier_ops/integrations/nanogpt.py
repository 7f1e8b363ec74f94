"""nanoGPT-style models: ``CausalSelfAttention`` with ``c_attn``, ``c_proj``, ``n_head``.

The model file is not edited. A forward hook on each layer's ``c_attn``
(the fused q|k|v projection, an ``nn.Linear`` of width ``3 * C``) splits its
output into the same q, k, v the layer feeds to
``F.scaled_dot_product_attention`` and hands them to the handle; no
projection is recomputed. A forward hook on the top model adds the term to
the loss of its ``(logits, loss)`` output.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from ._core import BarrierHandle, _LayerState, add_loss_hooks, select_layers, set_module_attr, LAYER_ATTR
from ._coupling import coupling_from_weights, projection_weight


def is_nanogpt_attention(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "c_attn", None), nn.Linear)
        and isinstance(getattr(module, "c_proj", None), nn.Linear)
        and isinstance(getattr(module, "n_head", None), int)
    )


def find_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_nanogpt_attention(m)]


def _add_term(output, term, args, kwargs):
    """``(logits, loss, ...)`` -> ``(logits, loss + term, ...)``; a None loss (or term) changes nothing."""
    if term is None:
        return output
    if isinstance(output, tuple) and len(output) >= 2:
        loss = output[1]
        if loss is None:
            return output
        return (output[0], loss + term.to(loss.dtype)) + tuple(output[2:])
    if isinstance(output, dict) and output.get("loss") is not None:
        output = dict(output)
        output["loss"] = output["loss"] + term.to(output["loss"].dtype)
        return output
    return output


class WeightsCoupling:
    """``A_h = W_Q^h W_O^h`` from the layer's ``c_attn`` (query rows) and ``c_proj``, read at call time."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, attn: nn.Module, heads: int, dtype: torch.dtype) -> torch.Tensor:
        w_qkv = projection_weight(attn.c_attn, f"{self.name}.c_attn")
        w_o = projection_weight(attn.c_proj, f"{self.name}.c_proj")
        return coupling_from_weights(w_qkv[: w_qkv.shape[0] // 3], w_o, heads, dtype)


class QKVHook:
    """Forward hook on ``c_attn``: splits its output into the layer's q, k, v and hands them to the handle."""

    def __init__(self, attn: nn.Module, state: _LayerState):
        self.attn, self.state = attn, state

    def __call__(self, linear, inputs, qkv):
        attn = self.attn
        batch, length, width = qkv.shape
        embed, heads = width // 3, attn.n_head
        q, k, v = qkv.split(embed, dim=2)
        q = q.view(batch, length, heads, embed // heads).transpose(1, 2)
        k = k.view(batch, length, heads, embed // heads).transpose(1, 2)
        v = v.view(batch, length, heads, embed // heads).transpose(1, 2)
        # q, k, v are views of our own; the layer attends with its own views of qkv.
        self.state.handle._record(self.state, q, k, v, scale=None, causal=True, key_padding_mask=None, module=attn,
                                  used=(qkv,))


def attach(handle: BarrierHandle, model: nn.Module, layers) -> None:
    chosen = select_layers(find_layers(model), layers)
    for name, attn in chosen:
        width = attn.c_attn.out_features
        if width % 3 or width // 3 % attn.n_head:
            raise ValueError(
                f"barrier_ops.attach: {name}.c_attn has {width} outputs; expected 3 * C with C "
                f"divisible by n_head={attn.n_head}"
            )
        coupling_fn = WeightsCoupling(name) if handle.coupling == "weights" else None
        state = _LayerState(handle, name, coupling_fn)
        set_module_attr(handle, attn, LAYER_ATTR, state)
        h = attn.c_attn.register_forward_hook(QKVHook(attn, state))
        handle._undo.append(h.remove)
        handle.layer_names.append(name)
    add_loss_hooks(handle, model, _add_term)
