"""Model-independent machinery of :func:`barrier_ops.attach`.

An attached model carries one :class:`BarrierHandle`. Each selected attention
layer holds a :class:`_LayerState` that knows how to build the layer's coupling
and calls :meth:`BarrierHandle._record` with the q, k, v the layer attends with.
A forward pre-hook on the top model opens a collection window, a forward hook
closes it and adds ``weight * mean_over_layers(penalty)`` to the loss the model
returns (in training mode) and keeps it for :meth:`BarrierHandle.term`.
Everything that runs inside ``forward`` is plain tensor code plus list and
attribute mutation, which torch.compile traces without a graph break.

The per-forward state lives in a ``threading.local``: threads running
forwards of one model (``nn.DataParallel`` replicas, a served model) do not
mix their layers. Hooks and undo steps are objects, not closures, so a deep
copy or a pickle of an attached model is an attached model of its own.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import _checks
from ..ops import _barrier_and_margins, support_token_argmin, valid_positions
from ..options import BarrierOptions

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
        real = mask if mask.dtype == torch.bool else mask != 0
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
    margin_mean: torch.Tensor  # mean margin over valid positions (the drawn rows with query_fraction < 1)
    margin_min: torch.Tensor  # smallest margin over valid positions (the drawn rows with query_fraction < 1)
    support_index: torch.Tensor  # [B] or [B, H]: position of the smallest margin (-1: none)
    support_margin: torch.Tensor  # the margins there


@dataclass
class BarrierStats:
    """What the last forward of an attached model computed.

    ``penalty`` is the barrier itself, ``mean_over_layers(mean_t psi(m_t))``
    (sums divided by ``num_items_in_batch`` under that normalisation), before
    the weight. Its sign is the barrier's: with the paper's ``psi(m) = -log m``
    it is negative whenever the margins are above 1 (the barrier then rewards
    larger margins; only its gradient trains), with a ``target_margin`` it is
    ``>= 0`` and 0 once every margin reaches the target. ``loss_term`` is
    ``weight * penalty``, the term added to the loss (``added`` says whether
    this forward added it: False for eval forwards unless ``term_in_eval``).
    """

    penalty: Optional[torch.Tensor] = None  # the barrier, mean over layers (sign: see above)
    loss_term: Optional[torch.Tensor] = None  # weight * penalty
    normalization: str = "mean"  # "mean" or "num_items_in_batch"
    layers: List[LayerStats] = field(default_factory=list)
    added: bool = True  # whether loss_term was added to the loss this forward returned

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


class _TermRecord:
    """The term of one forward, and whether a backward has reached it.

    The tensor added to the model's loss (``placed``) and the one
    :meth:`BarrierHandle.term` hands out (``user``) are separate autograd nodes
    with a gradient hook each, so the handle can tell, at the next training
    forward, whether the term entered a backward at all, and whether it
    entered it twice.
    """

    __slots__ = ("term", "placed", "user", "loss_grad", "user_grad", "tracked", "probe")

    def __init__(self, term: Optional[torch.Tensor], probe: Optional["_Probe"] = None):
        self.term = term
        self.placed: Optional[torch.Tensor] = None
        self.user: Optional[torch.Tensor] = None
        self.loss_grad = False
        self.user_grad = False
        self.probe = probe
        # Inside a region dynamo traces, a gradient hook that sets a flag is a side effect
        # it refuses (fullgraph) or breaks the graph on: such terms go untracked.
        self.tracked = not torch.compiler.is_compiling()

    @property
    def trainable(self) -> bool:
        return self.term is not None and self.term.requires_grad

    def place(self) -> torch.Tensor:
        """The tensor to add to the loss the model returns."""
        if not self.trainable or not self.tracked:
            return self.term
        placed = self.term.clone()
        placed.register_hook(self._mark_loss)
        self.placed = placed
        return placed

    def take(self) -> torch.Tensor:
        """The tensor :meth:`BarrierHandle.term` returns (the same one on every call)."""
        if self.term is None:
            return torch.zeros(())
        if not self.trainable or not self.tracked or torch.compiler.is_compiling():
            return self.term
        if self.user is None:
            user = self.term.clone()
            user.register_hook(self._mark_user)
            self.user = user
        return self.user

    def nodes(self) -> List[Any]:
        """The autograd nodes through which the term enters a loss."""
        if not self.tracked:  # no tap: the term's own node
            return [] if self.term is None or self.term.grad_fn is None else [self.term.grad_fn]
        return [t.grad_fn for t in (self.placed, self.user) if t is not None and t.grad_fn is not None]

    def _mark_loss(self, grad):
        self.loss_grad = True

    def _mark_user(self, grad):
        self.user_grad = True


class _Probe:
    """Whether a backward reached the model's attention at all in one forward's graph.

    A gradient hook on the first q (or k, v) that requires grad: a backward
    that reaches the model without reaching the term is a lost term, while no
    backward yet (two forwards before one backward) is not decided.
    """

    __slots__ = ("hooked", "model_grad")

    def __init__(self):
        self.hooked = False
        self.model_grad = False

    def watch(self, tensors) -> None:
        for t in tensors:
            if t.requires_grad:
                t.register_hook(self._mark)
                self.hooked = True
                return

    def _mark(self, grad):
        self.model_grad = True


class _ThreadState(threading.local):
    """Per-thread state of the forward in progress (threads running forwards of one model do not mix)."""

    def __init__(self):
        self.collecting = False
        self.grad_at_begin = False
        self.training = True
        self.num_items: Optional[Union[int, torch.Tensor]] = None
        # num_items_in_batch for forwards that do not receive it (set by trainer integrations).
        self.default_num_items: Optional[Union[int, torch.Tensor]] = None
        self.penalties: List[torch.Tensor] = []
        self.layer_stats: List[LayerStats] = []
        self.record: Optional[_TermRecord] = None
        self.probe: Optional[_Probe] = None
        self.pending: List[_TermRecord] = []  # training terms whose backward is not decided yet


class _LayerState:
    """Per-layer settings, attached to the attention module as ``_barrier_ops_layer``.

    ``coupling_fn(module, heads, dtype)`` builds the layer's couplings from
    the projections ``module`` has at call time (so adapters added later, and
    their training, are seen).
    """

    def __init__(
        self,
        handle: "BarrierHandle",
        name: str,
        coupling_fn: Optional[Callable[[torch.nn.Module, int, torch.dtype], torch.Tensor]],
        original: Optional[Callable] = None,
    ):
        self.handle = handle
        self.name = name
        self.coupling_fn = coupling_fn
        self.original = original


# warn <- _warn_once <- _judge <- _check_pending <- _begin <- pre-hook <- Module._call_impl's inner call
# <- Module._call_impl <- _wrapped_call_impl <- the caller of model(...)
_USER_FRAME = 9
CUSTOM_LOSS_DOCS = "docs/integrations.md, 'Custom losses: handle.term()'"


class BarrierHandle:
    """The result of :func:`barrier_ops.attach`; also reachable as ``barrier_ops.get_handle(model)``.

    Attributes:
        options: the :class:`barrier_ops.options.BarrierOptions` in use (eps,
            target_margin, causal, backend, combine_heads, query_fraction; each
            also readable and settable as an attribute of the handle).
        weight, coupling, term_in_eval, layer_names: the other options in use.
        stats: :class:`BarrierStats` of the most recent forward (detached).
        enabled: set to False to skip the penalty (and its cost) temporarily.

    :meth:`term` gives the differentiable term of the most recent training
    forward, for losses computed outside the model.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        weight: float,
        coupling: str,
        options: BarrierOptions,
        track_stats: bool,
        kind: str,
        term_in_eval: bool = False,
    ):
        self.model = model
        self.weight = weight
        self.coupling = coupling
        # eps, target_margin, causal (None: each layer's own), backend, combine_heads,
        # query_fraction: one validated value, read where each is used.
        self.options = options
        self.term_in_eval = term_in_eval
        self.track_stats = track_stats
        self.kind = kind
        self.enabled = True
        self.layer_names: List[str] = []
        self.stats = BarrierStats()
        self._warned: set = set()
        self._state = _ThreadState()
        self._last_num_items: Optional[Union[int, torch.Tensor]] = None
        self._undo: List[Callable[[], None]] = []

    # The options as attributes (setting one validates and replaces ``options``).
    eps = property(lambda self: self.options.eps,
                   lambda self, value: self._set_option(eps=value))
    target_margin = property(lambda self: self.options.target_margin,
                             lambda self, value: self._set_option(target_margin=value))
    causal = property(lambda self: self.options.causal,
                      lambda self, value: self._set_option(causal=value))
    backend = property(lambda self: self.options.backend,
                       lambda self, value: self._set_option(backend=value))
    combine_heads = property(lambda self: self.options.combine_heads,
                             lambda self, value: self._set_option(combine_heads=value))
    query_fraction = property(lambda self: self.options.query_fraction,
                              lambda self, value: self._set_option(query_fraction=value))

    def _set_option(self, **change) -> None:
        self.options = self.options.replace(**change)

    # -- copies: deepcopy / pickle give an independent handle ---------------------

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_state"]  # per-thread, per-forward: a copy starts with none
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._state = _ThreadState()
        if self.kind == "hf" and self._undo:
            # In a fresh process the config names an attention implementation
            # ("barrier_sdpa") that nobody has registered yet.
            from . import hf

            hf.register_for(self)

    # -- called from inside the model's forward ---------------------------------

    def _begin(self, module: torch.nn.Module, kwargs) -> None:
        state = self._state
        grad = torch.is_grad_enabled()
        training = bool(module.training)
        state.probe = None
        if grad and training and not torch.compiler.is_compiling():
            self._check_pending(state)
            state.probe = _Probe()
        state.collecting = True
        state.grad_at_begin = grad
        state.training = training
        num_items = kwargs.get("num_items_in_batch")
        state.num_items = state.default_num_items if num_items is None else num_items
        self._last_num_items = state.num_items
        state.penalties = []
        state.layer_stats = []

    def _check_pending(self, state: _ThreadState) -> None:
        """Warn (once each) when an earlier training forward's term trained nothing, or trained twice.

        A term is lost when a backward reached the model's attention but not
        the term; while no backward has reached either (several forwards
        before one backward), it stays pending. Without a probe (the forward
        ran compiled) the next training forward decides.
        """
        undecided = []
        for record in state.pending:
            probe = record.probe
            if not (record.loss_grad or record.user_grad) and probe is not None and probe.hooked \
                    and not probe.model_grad:
                undecided.append(record)
                continue
            self._judge(record)
        state.pending = undecided[-8:]

    def _judge(self, record: _TermRecord) -> None:
        if not (record.loss_grad or record.user_grad):
            self._warn_once(
                "lost",
                "barrier_ops: the barrier term of the previous training forward never entered a backward, so "
                "it did not train the model (the loss that was backpropagated does not contain it: a loss "
                "computed from the logits, or a trainer that ignores the model's loss). Add "
                f"barrier_ops.get_handle(model).term() to that loss; see {CUSTOM_LOSS_DOCS}",
                stacklevel=_USER_FRAME,
            )
        elif record.loss_grad and record.user_grad:
            self._warn_once(
                "twice",
                "barrier_ops: the barrier term of the previous training forward entered the backward twice: "
                "once through the loss the model returned (which already contains it) and once through "
                f"handle.term(). Use one of them; see {CUSTOM_LOSS_DOCS}",
                stacklevel=_USER_FRAME,
            )

    def _warn_once(self, key: str, message: str, stacklevel: int = 2) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=stacklevel)

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
        module: Optional[torch.nn.Module] = None,
        used: Optional[Sequence[torch.Tensor]] = None,
    ) -> None:
        """Compute one layer's barrier from the q, k, v it attends with and keep it for the hook.

        ``used``: tensors the layer's own computation consumes (default q, k, v),
        for the probe that tells whether a backward reached the model.
        """
        if not self.enabled:
            return
        # Decoding with a KV cache (fewer queries than keys) has no margins to regularise.
        if q.shape[2] != k.shape[2] or q.shape[2] == 0:
            return
        state = self._state
        if state.collecting and state.grad_at_begin and not torch.is_grad_enabled():
            # The model's forward started with gradients on, this layer runs without:
            # reentrant activation checkpointing runs the block under no_grad and
            # backpropagates only the block's outputs, so this term gets no gradient.
            self._warn_once(
                "no_grad",
                "barrier_ops: the barrier was computed with gradients disabled in training mode, so it "
                "will not train the model; with activation checkpointing use use_reentrant=False",
            )
        coupling = None if layer.coupling_fn is None else layer.coupling_fn(module, q.shape[1], q.dtype)
        # Activation checkpointing recomputes the layer in the backward, on autograd's
        # device thread for CUDA tensors: take the normalisation of the forward that
        # began last, so the recomputation runs the same op.
        num_items = state.num_items if state.collecting else self._last_num_items
        reduction = "mean" if num_items is None else "sum"
        options = self.options
        causal_mode = options.causal_mode(causal)
        barrier, margins = _barrier_and_margins(
            q, k, v, coupling, scale, key_padding_mask, options, causal_mode, reduction,
        )
        # Recomputation under activation checkpointing calls the layer again after
        # the hook has run (in the backward, possibly on autograd's own thread): the
        # op must run again (the checkpoint replays the same saved tensors), but its
        # result belongs to no forward and is dropped.
        if not state.collecting:
            return
        if not torch.compiler.is_compiling() and state.probe is not None and not state.probe.hooked:
            state.probe.watch((q, k, v) if used is None else used)
        # Division by num_items_in_batch happens in _finish, outside any checkpointed
        # region: a tensor divisor is saved for the backward, and the recomputation
        # (which returns above) must save exactly the tensors the forward saved.
        state.penalties.append(barrier)
        if self.track_stats:
            shown = barrier.detach() if num_items is None else barrier.detach() / num_items
            state.layer_stats.append(
                _layer_stats(layer.name, shown, margins, key_padding_mask, causal_mode, options.sampled))

    def _finish(self, module: torch.nn.Module) -> Tuple[bool, Optional[torch.Tensor]]:
        """Close the window; return (whether a barrier was computed, the tensor to add to the loss or None).

        The term is ``weight * mean_over_layers(penalty)``; it is added only in
        training mode unless ``term_in_eval``. Forwards with gradients enabled,
        and evaluation forwards, become the one :meth:`term` refers to; a
        training-mode forward under ``no_grad`` (a metrics pass) does not.
        """
        state = self._state
        state.collecting = False
        penalties, state.penalties = state.penalties, []
        layer_stats, state.layer_stats = state.layer_stats, []
        adds = state.training or self.term_in_eval
        replaces = state.grad_at_begin or not state.training
        if not penalties:
            if replaces:
                state.record = _TermRecord(None)
            return False, None
        penalty = torch.stack([p.to(penalties[0].dtype) for p in penalties]).mean()
        if state.num_items is not None:
            penalty = penalty / state.num_items
        term = self.weight * penalty
        self.stats = BarrierStats(
            penalty=penalty.detach(),
            loss_term=term.detach(),
            normalization="mean" if state.num_items is None else "num_items_in_batch",
            layers=_distinct_names(layer_stats),
            added=adds,
        )
        record = _TermRecord(term if adds else None, probe=state.probe)
        if replaces:
            state.record = record
        if record.trainable and record.tracked:
            state.pending.append(record)
        return True, (record.place() if adds else None)

    # -- user API ---------------------------------------------------------------

    def term(self) -> torch.Tensor:
        """The differentiable barrier term of the most recent training forward (this thread).

        ``weight * mean_over_layers(barrier)``, with its autograd graph: for a
        loss computed outside the model (cross-entropy from the logits, TRL,
        Lightning), ``loss = my_ce + handle.term()`` trains exactly as the
        model's own ``loss`` (which already contains the term) does. Use one or
        the other, not both: the term would count twice (the handle warns at
        the next training forward when it sees that).

        Which forward: the most recent one in this thread with gradients
        enabled, or in eval mode; a training-mode forward under ``no_grad``
        (e.g. a metrics pass) does not replace it. After an eval forward, or a
        forward that computed no barrier (``enabled=False``, a KV-cache decoding
        step), it is a zero tensor, matching what the model added to its loss
        (``term_in_eval=True``: the eval term). The same tensor is returned on
        every call for one forward.

        Raises:
            RuntimeError: no forward of the model has run in this thread.
        """
        record = self._state.record
        if record is None:
            raise RuntimeError(
                "handle.term(): no forward of the attached model has run in this thread yet; call it after "
                "the forward whose loss you build"
            )
        return record.take()

    def _loss_contains_term(self, loss: Any) -> bool:
        """Whether ``loss``'s autograd graph contains the current term (placed in the model's loss or taken)."""
        record = self._state.record
        targets = set() if record is None else {id(n) for n in record.nodes()}
        if not targets or not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
            return False
        seen, stack = set(), [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            if id(node) in targets:
                return True
            seen.add(id(node))
            stack.extend(next_node for next_node, _ in node.next_functions)
        return False

    def detach(self) -> None:
        """Remove every hook and restore the model (same as ``barrier_ops.detach(model)``)."""
        while self._undo:
            self._undo.pop()()

    def __repr__(self) -> str:
        o = self.options
        return (
            f"BarrierHandle(kind={self.kind!r}, weight={self.weight}, coupling={self.coupling!r}, "
            f"combine_heads={o.combine_heads}, eps={o.eps}, target_margin={o.target_margin}, "
            f"causal={o.causal}, backend={o.backend!r}, query_fraction={o.query_fraction}, "
            f"term_in_eval={self.term_in_eval}, layers={len(self.layer_names)})"
        )


def _distinct_names(layer_stats: List[LayerStats]) -> List[LayerStats]:
    """A layer called k times in one forward logs as ``name``, ``name#1``, ..., ``name#{k-1}``."""
    counts: Dict[str, int] = {}
    for s in layer_stats:
        seen = counts.get(s.name, 0)
        counts[s.name] = seen + 1
        if seen:
            s.name = f"{s.name}#{seen}"
    return layer_stats


def _layer_stats(name, barrier, margins, key_padding_mask, causal_mode, sampled=False) -> LayerStats:
    """Statistics over the valid positions; with sampled rows, over the drawn ones (margins NaN elsewhere)."""
    m = margins.detach()
    key_padding_mask = _checks.as_bool_mask(key_padding_mask)
    positions = valid_positions(m.shape[0], m.shape[-1], causal_mode, key_padding_mask, m.device)
    valid = positions if m.dim() == 2 else positions.unsqueeze(1).expand_as(m)
    if sampled:
        valid = valid & ~torch.isnan(m)
    count = valid.sum().clamp(min=1).to(m.dtype)
    mean = torch.where(valid, m, torch.zeros_like(m)).sum() / count
    low = torch.where(valid, m, torch.full_like(m, math.inf)).amin()
    # Strict causality leaves position 0 (and tokens with no real key before them) without a margin.
    index, value = support_token_argmin(m, positions)
    return LayerStats(name, barrier.detach(), mean, low, index, value)


def check_options(weight, coupling, combine_heads, eps, target_margin=None, causal=None,
                  backend="auto", term_in_eval=False, query_fraction=1.0) -> Tuple[float, BarrierOptions]:
    """Validated (weight, options) of attach; raises on any bad option."""
    weight = _checks.check_weight(weight)
    if not isinstance(term_in_eval, bool):
        raise TypeError(f"term_in_eval must be a bool, got {type(term_in_eval).__name__}")
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be 'identity' or 'weights', got {coupling!r}")
    options = BarrierOptions(
        eps=eps, target_margin=target_margin, causal=causal, backend=backend,
        combine_heads=combine_heads, query_fraction=query_fraction,
    )
    return weight, options


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


class _BeginForward:
    """Forward pre-hook on the top model: opens the collection window."""

    def __init__(self, handle: BarrierHandle):
        self.handle = handle

    def __call__(self, module, args, kwargs):
        self.handle._begin(module, kwargs)


class _FinishForward:
    """Forward hook on the top model: closes the window and adds the term to the returned loss.

    ``add_term(output, term, args, kwargs)`` returns the output with the term
    added to its loss (or the output unchanged when it has no loss, or when
    ``term`` is None: an eval forward that computed the barrier for its
    statistics only).
    """

    def __init__(self, handle: BarrierHandle, add_term: Callable):
        self.handle = handle
        self.add_term = add_term

    def __call__(self, module, args, kwargs, output):
        computed, term = self.handle._finish(module)
        if not computed:
            return output
        return self.add_term(output, term, args, kwargs)


def _run_hooks_eagerly_at_top_level(*functions) -> None:
    """Let dynamo inline these hooks into a caller it traces, but never compile them as frames of their own.

    ``torch.compile(model)`` traces ``forward`` only; the model's own hooks run
    around it as separate frames, and the loss hook would become a second
    graph (one add). Run on their own, the hooks are a few Python statements
    and one add, cheapest eager. Traced from a compiled caller
    (``model.compile()``, a compiled training step) they are inlined as
    before. Uses a private dynamo API; without it the hooks compile as before.
    """
    try:
        from torch._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:  # pragma: no cover - depends on the torch version
        return
    for fn in functions:
        try:
            set_code_exec_strategy(fn.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))
        except Exception:  # pragma: no cover - depends on the torch version
            return


_run_hooks_eagerly_at_top_level(_BeginForward.__call__, _FinishForward.__call__)


def add_loss_hooks(handle: BarrierHandle, model: torch.nn.Module, add_term: Callable) -> None:
    """Open the window before ``model.forward`` and add the term to its output after it."""
    h1 = model.register_forward_pre_hook(_BeginForward(handle), with_kwargs=True)
    h2 = model.register_forward_hook(_FinishForward(handle, add_term), with_kwargs=True)
    handle._undo.append(h1.remove)
    handle._undo.append(h2.remove)


class DeleteAttr:
    """Undo step: remove an attribute set on an instance (a deep copy of the model gets its own)."""

    def __init__(self, obj: Any, name: str):
        self.obj, self.name = obj, name

    def __call__(self) -> None:
        if self.name in self.obj.__dict__:
            delattr(self.obj, self.name)


class SetAttr:
    """Undo step: set an attribute back to a value."""

    def __init__(self, obj: Any, name: str, value: Any):
        self.obj, self.name, self.value = obj, name, value

    def __call__(self) -> None:
        setattr(self.obj, self.name, self.value)


def set_module_attr(handle: BarrierHandle, module: torch.nn.Module, name: str, value) -> None:
    setattr(module, name, value)
    handle._undo.append(DeleteAttr(module, name))
