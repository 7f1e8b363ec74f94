"""One-line training integration: ``barrier_ops.attach(model, weight=0.02)``.

Supported models:
* Hugging Face transformers models whose attention dispatches through
  ``AttentionInterface`` (GPT-2, Llama / Mistral / Qwen-style GQA models, ...):
  see :mod:`barrier_ops.integrations.hf`. transformers is imported only when
  such a model is attached.
* nanoGPT-style models (``CausalSelfAttention`` with ``c_attn``, ``c_proj``,
  ``n_head``): see :mod:`barrier_ops.integrations.nanogpt`.
* models whose attention calls ``record_qkv`` itself (the experiments' char-level
  GPT): see :mod:`barrier_ops.integrations.chargpt`.

The HF ``BarrierStatsCallback`` and ``add_stats_callback`` are importable from
here and import transformers on first use.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence, Union

from torch import nn

from ._core import HANDLE_ATTR, BarrierHandle, BarrierStats, DeleteAttr, LayerStats, check_options

__all__ = [
    "attach",
    "detach",
    "get_handle",
    "BarrierHandle",
    "BarrierStats",
    "LayerStats",
    "BarrierStatsCallback",
    "add_stats_callback",
]


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model under DDP / FSDP1 (``.module``), torch.compile (``._orig_mod``) and PEFT wrappers.

    PEFT's ``PeftModel`` calls its base model (``get_base_model()``) through
    ``__call__``, so the base model's hooks run on every forward of the PEFT
    model; its layers (with their LoRA projections) are the ones to attach to.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if type(model).__module__.startswith("peft."):
            # PeftModel: get_base_model(); a tuner (LoraModel, its .base_model): .model
            getter = getattr(model, "get_base_model", None)
            inner = getter() if callable(getter) else getattr(model, "model", None)
            if isinstance(inner, nn.Module) and inner is not model:
                model = inner
                continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"
        ):
            model = inner
            continue
        return model


def _is_hf(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:  # an HF model cannot exist without it
        return False
    from . import hf

    return hf.is_hf_model(model)


def attach(
    model: nn.Module,
    weight: float = 0.02,
    *,
    layers: Optional[Union[int, str, Sequence[Union[int, str]]]] = None,
    coupling: str = "identity",
    combine_heads: bool = False,
    eps: float = 1e-2,
    target_margin: Optional[float] = None,
    causal: Optional[Union[bool, str]] = None,
    backend: str = "auto",
    track_stats: bool = True,
    term_in_eval: bool = False,
    query_fraction: float = 1.0,
) -> BarrierHandle:
    """Add ``weight * mean_over_layers(margin barrier)`` to the loss ``model`` returns.

    After this call, every forward computes :func:`barrier_ops.margin_barrier_loss`
    from each selected attention layer's own q, k, v (the fused op; its
    gradients reach the model through q, k, v and, with ``coupling="weights"``,
    the projection weights) and adds the weighted mean over layers to the
    returned loss: ``ModelOutput.loss`` for transformers models, the ``loss`` of
    a nanoGPT ``(logits, loss)`` tuple. Logits are unchanged; a forward without
    labels/targets returns no loss and gets none, but statistics are recorded.
    The term is added only while the model is in training mode (``model.train()``);
    eval forwards record statistics and return the plain loss
    (``term_in_eval=True``: add it in eval too).

    Losses computed outside the model (cross-entropy from the logits, Lightning,
    plain loops) add ``handle.term()``, the same differentiable term
    (:meth:`BarrierHandle.term`); a training forward whose term never enters a
    backward is warned about once. ``transformers.Trainer`` subclasses whose
    ``compute_loss`` ignores the model's loss (TRL's ``SFTTrainer``) get the
    term added to their loss automatically.

    Args:
        model: a transformers ``PreTrainedModel`` (also inside a PEFT
            ``PeftModel``) or a nanoGPT-style model (wrappers from DDP, FSDP1,
            torch.compile and PEFT are looked through; attach before wrapping
            when you can).
        weight: lambda, the barrier's weight (the paper's best was about 0.02).
        layers: which attention layers: None (all), or positions (ints, in
            module order; negative counts from the end) and/or module names.
        coupling: ``"identity"`` (``A_h = I``) or ``"weights"`` (the exact
            ``A_h = W_Q^h W_O^h`` built from the layer's projections inside the
            forward and differentiated through; LoRA-adapted projections give
            ``W0 + scaling * B A`` of their active adapters).
        combine_heads: barrier on the layer margin ``1 - sum_h kappa_h`` instead
            of per-head margins.
        eps: where the barrier turns from ``-log m`` to its quadratic extension.
        target_margin: ``None`` for the paper's barrier ``-log m``, or a target
            ``m0 > eps`` that makes it a hinge (margins at or above ``m0`` cost
            nothing; see :func:`barrier_ops.margin_barrier_loss`).
        causal: ``None`` (default) takes each layer's own causality; ``"strict"``
            computes margins for strictly-past attention (``s < t``, the paper's
            setting); ``True``/``False`` force ``s <= t`` / all keys.
        backend: where the O(T^2) work runs: ``"auto"``, ``"fused"`` or ``"sdpa"``
            (:mod:`barrier_ops.backends`).
        track_stats: keep per-layer margin statistics of every forward in
            ``handle.stats`` (a few small reductions per layer).
        term_in_eval: also add the term to the loss of eval-mode forwards
            (the behaviour before 0.2; biases validation losses by the term).
        query_fraction: f in (0, 1]: each layer's barrier on every forward
            computes a random ``ceil(f * n)`` of the ``n`` valid query rows of
            each sequence (the same rows for all heads of the layer, drawn
            independently for each layer and forward from torch's global
            generator) and adds the unbiased estimate of the full barrier, at
            about f of its O(T^2) cost (docs/sampling.md). ``handle.stats``
            then describes the drawn rows. 1 (default) computes every row.

    Loss normalisation: when the forward receives ``num_items_in_batch`` (as
    ``transformers.Trainer`` passes it), each layer's barrier is the *sum* over
    valid positions divided by ``num_items_in_batch`` — the rule the model's
    cross-entropy follows, so gradient accumulation and multi-device averaging
    match the big batch. Otherwise it is the mean over the layer's valid
    positions (heads included).

    Returns:
        The :class:`BarrierHandle` (options, ``stats``, ``enabled``, ``detach()``).

    Raises:
        ValueError: already attached, no attention layer found, bad option
            (or, with ``coupling="weights"``, projections it cannot read).
        TypeError: an option of the wrong type.
    """
    weight, options = check_options(
        weight, coupling, combine_heads, eps, target_margin, causal, backend, term_in_eval,
        query_fraction,
    )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _unwrap(model)
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise ValueError("barrier_ops.attach: the model already has a barrier attached; call detach(model) first")
    kind = "hf" if _is_hf(model) else "nanogpt"
    if kind == "nanogpt":
        from . import chargpt

        if chargpt.is_chargpt_model(model):
            kind = "chargpt"
    handle = BarrierHandle(
        model, weight=weight, coupling=coupling, options=options,
        track_stats=bool(track_stats), kind=kind, term_in_eval=term_in_eval,
    )
    if kind == "hf":
        from . import hf as adapter
    elif kind == "chargpt":
        from . import chargpt as adapter
    else:
        from . import nanogpt as adapter
    try:
        adapter.attach(handle, model, layers)
    except Exception:
        handle.detach()
        raise
    setattr(model, HANDLE_ATTR, handle)
    handle._undo.insert(0, DeleteAttr(model, HANDLE_ATTR))
    return handle


def get_handle(model: nn.Module) -> Optional[BarrierHandle]:
    """The :class:`BarrierHandle` of an attached model (wrappers looked through), or None."""
    return getattr(_unwrap(model), HANDLE_ATTR, None)


def detach(model: nn.Module) -> None:
    """Undo :func:`attach`: remove the hooks, restore the attention implementation.

    Raises ValueError when nothing is attached.
    """
    handle = get_handle(model)
    if handle is None:
        raise ValueError("barrier_ops.detach: the model has no barrier attached")
    handle.detach()


def __getattr__(name):
    if name in ("BarrierStatsCallback", "add_stats_callback"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
