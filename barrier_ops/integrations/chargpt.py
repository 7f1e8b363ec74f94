"""Models that hand their q, k, v to the barrier themselves (the char-level GPT of ``barrier_ops.experiments``).

Protocol (what a model opts in with):

* the attention module's class has ``barrier_ops_adapter = "chargpt"``, separate
  ``q_proj`` and ``o_proj`` (``nn.Linear``, ``out x in`` weights, heads in
  contiguous blocks) and an int ``n_head``;
* its ``forward`` calls :func:`record_qkv` with the q, k, v (``[B, H, T, d]``)
  it attends with, once per call; this is a no-op when nothing is attached;
* the top model returns an object with a ``loss`` attribute (``None`` without
  targets). The forward hook adds ``weight * mean_over_layers(barrier)`` to it
  and, when the object has them, fills ``penalty`` (the detached mean over
  layers, unweighted) and ``margins`` (per layer ``[B, T]`` or ``[B, H, T]``,
  only while ``handle.keep_margins`` is True).

``coupling="weights"`` builds ``A_h = W_Q^h W_O^h`` from ``q_proj.weight`` and
``o_proj.weight`` inside the forward (gradients reach both), exactly as for the
other adapters. Setting ``handle.enabled = False`` skips the barrier and its
cost (plain cross-entropy training); ``handle.keep_margins = True`` also keeps
every token's margin (computed with :func:`barrier_ops.token_margins` under
``no_grad``, with the handle's coupling, causality and head combination), for
evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

import torch
from torch import nn

from ..ops import token_margins
from ._core import (
    LAYER_ATTR,
    BarrierHandle,
    _LayerState,
    _run_hooks_eagerly_at_top_level,
    add_loss_hooks,
    select_layers,
    set_module_attr,
)
from ._coupling import coupling_from_weights

ADAPTER_NAME = "chargpt"


def is_chargpt_attention(module: nn.Module) -> bool:
    return (
        getattr(type(module), "barrier_ops_adapter", None) == ADAPTER_NAME
        and isinstance(getattr(module, "q_proj", None), nn.Linear)
        and isinstance(getattr(module, "o_proj", None), nn.Linear)
        and isinstance(getattr(module, "n_head", None), int)
    )


def find_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_chargpt_attention(m)]


def is_chargpt_model(model: nn.Module) -> bool:
    return any(is_chargpt_attention(m) for m in model.modules())


def record_qkv(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               causal=True, scale=None) -> None:
    """Called by an opted-in attention layer with the q, k, v it attends with (no-op when not attached)."""
    state = module.__dict__.get(LAYER_ATTR)
    if state is None:
        return
    handle = state.handle
    if not handle.enabled:
        return
    handle._record(state, q, k, v, scale=scale, causal=causal, key_padding_mask=None, module=module)
    if getattr(handle, "keep_margins", False) and handle._state.collecting:
        coupling = None if state.coupling_fn is None else state.coupling_fn(module, q.shape[1], q.dtype)
        options = handle.options
        with torch.no_grad():  # every token's margin, whatever the barrier's query_fraction
            m = token_margins(
                q.detach(), k.detach(), v.detach(),
                coupling=None if coupling is None else coupling.detach(), scale=scale,
                causal=causal if options.causal is None else options.causal,
                combine_heads=options.combine_heads, backend=options.backend,
            )
        handle.last_margins.append(m)


class AddTerm:
    """Adds the term to ``output.loss`` and fills ``penalty`` / ``margins`` when the output has them."""

    def __init__(self, handle: BarrierHandle):
        self.handle = handle

    def __call__(self, output, term, args, kwargs):
        handle = self.handle
        changes = {}
        if term is not None and getattr(output, "loss", None) is not None:
            changes["loss"] = output.loss + term.to(output.loss.dtype)
        if hasattr(output, "penalty"):
            changes["penalty"] = handle.stats.penalty
        if hasattr(output, "margins") and getattr(handle, "keep_margins", False):
            changes["margins"] = list(handle.last_margins)
        if not changes:
            return output
        if dataclasses.is_dataclass(output):
            return dataclasses.replace(output, **changes)
        for key, value in changes.items():
            setattr(output, key, value)
        return output


class WeightsCoupling:
    def __call__(self, attn: nn.Module, heads: int, dtype: torch.dtype) -> torch.Tensor:
        return coupling_from_weights(attn.q_proj.weight, attn.o_proj.weight, heads, dtype)


class ResetMargins:
    def __init__(self, handle: BarrierHandle):
        self.handle = handle

    def __call__(self, module, args, kwargs):
        self.handle.last_margins = []


_run_hooks_eagerly_at_top_level(ResetMargins.__call__)


def attach(handle: BarrierHandle, model: nn.Module, layers) -> None:
    chosen = select_layers(find_layers(model), layers)
    handle.keep_margins = False
    handle.last_margins = []
    for name, attn in chosen:
        coupling_fn = WeightsCoupling() if handle.coupling == "weights" else None
        set_module_attr(handle, attn, LAYER_ATTR, _LayerState(handle, name, coupling_fn))
        handle.layer_names.append(name)
    h = model.register_forward_pre_hook(ResetMargins(handle), with_kwargs=True)
    handle._undo.append(h.remove)
    add_loss_hooks(handle, model, AddTerm(handle))
