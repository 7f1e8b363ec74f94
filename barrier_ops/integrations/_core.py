"""Model-independent machinery of :func:`barrier_ops.attach`.

An attached model carries one :class:`BarrierHandle`. Each selected attention
layer holds a :class:`_LayerState` that knows how to build the layer's coupling
and calls :meth:`BarrierHandle._record` with the q, k, v the layer attends with.
A forward pre-hook on the top model opens a collection window, a forward hook
closes it and adds ``weight * mean_over_layers(penalty)`` to the loss the model
returns. Everything that runs inside ``forward`` is plain tensor code plus list
and attribute mutation, which torch.compile traces without a graph break.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import _checks
from ..backends import BACKEND_NAMES
from ..ops import barrier_and_margins, support_token_argmin, valid_positions

COUPLINGS = ("identity", "weights")
HANDLE_ATTR = "_barrier_ops_handle"
LAYER_ATTR = "_barrier_ops_layer"


def padding_from_attention_mask(mask: Any, batch: int, length: int) -> Optional[torch.Tensor]:
    """Key padding ``[B, T]`` (True = real token) from the mask an attention function receives.

    The rule: a position is a real token iff it may attend to itself.
    * ``None``: no padding.
    * 2-D ``[B, T]`` (flash-attention style padding mask, 1/True = real): used as is.
    * 4-D ``[B or 1, 1 or H, T, T]``: its diagonal. A bool mask is True where
      attention is allowed; a float (additive) mask allows a pair when its
      value is above half the dtype's lowest value (0 vs. ``finfo.min``/-inf).
    Patterns other than causal + key padding (packed documents, sliding
    windows) are not represented: the barrier always uses full causal
    attention over the real tokens.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            "barrier_ops.attach: the attention mask must be None or a tensor "
            f"(sdpa / eager / flash attention), got {type(mask).__name__}; flex attention's "
            "BlockMask is not supported"
        )
    if mask.dim() == 2:
        real = mask if mask.dtype == torch.bool else mask > 0
        return real[:, -length:].expand(batch, length)
    if mask.dim() != 4:
        raise ValueError(
            f"barrier_ops.attach: expected a [B, T] or [B, H, Tq, Tk] attention mask, got shape {list(mask.shape)}"
        )
    diag = mask[:, 0, -length:, -length:].diagonal(dim1=-2, dim2=-1)
    if diag.dtype == torch.bool:
        real = diag
    else:
        real = diag > torch.finfo(diag.dtype).min / 2
    return real.expand(batch, length)


@dataclass
class LayerStats:
    """Detached statistics of one layer from the last forward (tensors, no host sync)."""

    name: str
    barrier: torch.Tensor  # the layer's penalty as added (mean or sum, see BarrierHandle)
    margin_mean: torch.Tensor  # mean margin over valid positions
    margin_min: torch.Tensor  # smallest margin over valid positions
    support_index: torch.Tensor  # [B] or [B, H]: position of the smallest margin (-1: none)
    support_margin: torch.Tensor  # the margins there


@dataclass
class BarrierStats:
    """What the last forward of an attached model computed."""

    penalty: Optional[torch.Tensor] = None  # mean over layers of the layer penalties
    loss_term: Optional[torch.Tensor] = None  # weight * penalty, the term added to the loss
    normalization: str = "mean"  # "mean" or "num_items_in_batch"
    layers: List[LayerStats] = field(default_factory=list)

    def tensors(self, prefix: str = "barrier/") -> Dict[str, torch.Tensor]:
        """Flat ``{name: 0-d tensor}`` (no host sync). Names ending in ``margin_min`` are minima."""
        if self.penalty is None:
            return {}
        out = {f"{prefix}penalty": self.penalty, f"{prefix}loss_term": self.loss_term}
        for s in self.layers:
            out[f"{prefix}{s.name}/margin_mean"] = s.margin_mean
            out[f"{prefix}{s.name}/margin_min"] = s.margin_min
            out[f"{prefix}{s.name}/barrier"] = s.barrier
            found = s.support_index >= 0
            positions = torch.where(found, s.support_index, torch.zeros_like(s.support_index)).sum()
            out[f"{prefix}{s.name}/support_pos_mean"] = positions.double() / found.sum().clamp(min=1)
        if self.layers:
            out[f"{prefix}margin_mean"] = torch.stack([s.margin_mean for s in self.layers]).mean()
            out[f"{prefix}margin_min"] = torch.stack([s.margin_min for s in self.layers]).amin()
        return out

    def scalars(self, prefix: str = "barrier/") -> Dict[str, float]:
        """Flat ``{name: float}`` for loggers (synchronises with the device once per value)."""
        return {k: float(v) for k, v in self.tensors(prefix).items()}


class _LayerState:
    """Per-layer settings, attached to the attention module as ``_barrier_ops_layer``."""

    def __init__(
        self,
        handle: "BarrierHandle",
        name: str,
        coupling_fn: Optional[Callable[[int, torch.dtype], torch.Tensor]],
        original: Optional[Callable] = None,
    ):
        self.handle = handle
        self.name = name
        self.coupling_fn = coupling_fn
        self.original = original


class BarrierHandle:
    """The result of :func:`barrier_ops.attach`; also reachable as ``barrier_ops.get_handle(model)``.

    Attributes:
        weight, coupling, combine_heads, eps, layer_names: the options in use.
        stats: :class:`BarrierStats` of the most recent forward (detached).
        enabled: set to False to skip the penalty (and its cost) temporarily.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        weight: float,
        coupling: str,
        combine_heads: bool,
        eps: float,
        track_stats: bool,
        kind: str,
        target_margin: Optional[float] = None,
        causal: Optional[Union[bool, str]] = None,
        backend: str = "auto",
    ):
        self.model = model
        self.weight = weight
        self.coupling = coupling
        self.combine_heads = combine_heads
        self.eps = eps
        self.target_margin = target_margin
        self.causal = causal  # None: each layer's own
        self.backend = backend
        self.track_stats = track_stats
        self.kind = kind
        self.enabled = True
        self.layer_names: List[str] = []
        self.stats = BarrierStats()
        self._collecting = False
        self._warned = False
        self._grad_at_begin = False
        self._num_items: Optional[Union[int, torch.Tensor]] = None
        self._penalties: List[torch.Tensor] = []
        self._layer_stats: List[LayerStats] = []
        self._undo: List[Callable[[], None]] = []

    # -- called from inside the model's forward ---------------------------------

    def _begin(self, num_items_in_batch=None) -> None:
        self._collecting = True
        self._grad_at_begin = torch.is_grad_enabled()
        self._num_items = num_items_in_batch
        self._penalties = []
        self._layer_stats = []

    def _record(
        self,
        layer: _LayerState,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: Optional[float],
        causal: bool,
        key_padding_mask: Optional[torch.Tensor],
    ) -> None:
        """Compute one layer's barrier from the q, k, v it attends with and keep it for the hook."""
        if not self.enabled:
            return
        # Decoding with a KV cache (fewer queries than keys) has no margins to regularise.
        if q.shape[2] != k.shape[2] or q.shape[2] == 0:
            return
        if self._collecting and self._grad_at_begin and not torch.is_grad_enabled() and not self._warned:
            # The model's forward started with gradients on, this layer runs without:
            # reentrant activation checkpointing runs the block under no_grad and
            # backpropagates only the block's outputs, so this term gets no gradient.
            self._warned = True
            warnings.warn(
                "barrier_ops: the barrier was computed with gradients disabled in training mode, so it "
                "will not train the model; with activation checkpointing use use_reentrant=False",
                stacklevel=2,
            )
        coupling = None if layer.coupling_fn is None else layer.coupling_fn(q.shape[1], q.dtype)
        reduction = "mean" if self._num_items is None else "sum"
        if self.causal is not None:
            causal = self.causal
        barrier, margins = barrier_and_margins(
            q, k, v,
            coupling=coupling, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
            combine_heads=self.combine_heads, eps=self.eps, target_margin=self.target_margin,
            reduction=reduction, backend=self.backend,
        )
        # Recomputation under activation checkpointing calls the layer again after
        # the hook has run: the op must run again (the checkpoint replays the same
        # saved tensors), but its result belongs to no forward and is dropped.
        if not self._collecting:
            return
        if self._num_items is not None:
            barrier = barrier / self._num_items
        self._penalties.append(barrier)
        if self.track_stats:
            self._layer_stats.append(_layer_stats(layer.name, barrier, margins, key_padding_mask, causal))

    def _finish(self) -> Optional[torch.Tensor]:
        """Close the window; return ``weight * mean_over_layers(penalty)`` or None."""
        self._collecting = False
        penalties, self._penalties = self._penalties, []
        layer_stats, self._layer_stats = self._layer_stats, []
        if not penalties:
            return None
        penalty = torch.stack([p.to(penalties[0].dtype) for p in penalties]).mean()
        term = self.weight * penalty
        self.stats = BarrierStats(
            penalty=penalty.detach(),
            loss_term=term.detach(),
            normalization="mean" if self._num_items is None else "num_items_in_batch",
            layers=layer_stats,
        )
        return term

    # -- user API ---------------------------------------------------------------

    def detach(self) -> None:
        """Remove every hook and restore the model (same as ``barrier_ops.detach(model)``)."""
        while self._undo:
            self._undo.pop()()

    def __repr__(self) -> str:
        return (
            f"BarrierHandle(kind={self.kind!r}, weight={self.weight}, coupling={self.coupling!r}, "
            f"combine_heads={self.combine_heads}, eps={self.eps}, target_margin={self.target_margin}, "
            f"causal={self.causal}, backend={self.backend!r}, layers={len(self.layer_names)})"
        )


def _layer_stats(name, barrier, margins, key_padding_mask, causal) -> LayerStats:
    m = margins.detach()
    positions = valid_positions(
        m.shape[0], m.shape[-1], _checks.check_causal(causal), key_padding_mask, m.device
    )
    valid = positions if m.dim() == 2 else positions.unsqueeze(1).expand_as(m)
    count = valid.sum().clamp(min=1).to(m.dtype)
    mean = torch.where(valid, m, torch.zeros_like(m)).sum() / count
    low = torch.where(valid, m, torch.full_like(m, math.inf)).amin()
    # Strict causality leaves position 0 (and tokens with no real key before them) without a margin.
    index, value = support_token_argmin(m, positions)
    return LayerStats(name, barrier.detach(), mean, low, index, value)


def check_options(weight, coupling, combine_heads, eps, target_margin=None, causal=None,
                  backend="auto") -> Tuple[float, float, Optional[float]]:
    """Validated (weight, eps, target_margin) of attach; raises on any bad option."""
    weight = _checks.check_weight(weight)
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be 'identity' or 'weights', got {coupling!r}")
    if not isinstance(combine_heads, bool):
        raise TypeError(f"combine_heads must be a bool, got {type(combine_heads).__name__}")
    eps = _checks.check_eps(eps)
    if causal is not None:
        _checks.check_causal(causal)
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    return weight, eps, _checks.check_target_margin(target_margin, eps)


def select_layers(candidates: Sequence[tuple], layers) -> List[tuple]:
    """Filter ``[(name, module), ...]`` by ``layers``: None (all), ints (positions) or names."""
    if not candidates:
        raise ValueError(
            "barrier_ops.attach found no attention layer in the model (expected Hugging Face "
            "attention modules using AttentionInterface, or nanoGPT-style CausalSelfAttention "
            "modules with c_attn, c_proj and n_head)"
        )
    if layers is None:
        return list(candidates)
    if isinstance(layers, (int, str)):
        layers = [layers]
    chosen = []
    names = [n for n, _ in candidates]
    for item in layers:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise TypeError(f"layers must hold ints (layer positions) or str (module names), got {item!r}")
        if isinstance(item, int):
            if not -len(candidates) <= item < len(candidates):
                raise ValueError(
                    f"layers: position {item} is out of range for {len(candidates)} attention layers"
                )
            pick = candidates[item]
        else:
            if item not in names:
                raise ValueError(f"layers: no attention layer named {item!r}; the layers are {names}")
            pick = candidates[names.index(item)]
        if pick not in chosen:
            chosen.append(pick)
    if not chosen:
        raise ValueError("layers selects no attention layer")
    return chosen


def add_loss_hooks(handle: BarrierHandle, model: torch.nn.Module, add_term: Callable) -> None:
    """Open the window before ``model.forward`` and add the term to its output after it.

    ``add_term(output, term, args, kwargs)`` returns the output with the term
    added to its loss (or the output unchanged when it has no loss).
    """

    def pre_hook(module, args, kwargs):
        handle._begin(kwargs.get("num_items_in_batch"))

    def post_hook(module, args, kwargs, output):
        term = handle._finish()
        if term is None:
            return output
        return add_term(output, term, args, kwargs)

    h1 = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    h2 = model.register_forward_hook(post_hook, with_kwargs=True)
    handle._undo.append(h1.remove)
    handle._undo.append(h2.remove)


def set_module_attr(handle: BarrierHandle, module: torch.nn.Module, name: str, value) -> None:
    setattr(module, name, value)

    def undo():
        if name in module.__dict__:
            delattr(module, name)

    handle._undo.append(undo)
