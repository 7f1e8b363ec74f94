"""Hugging Face transformers: the barrier as a registered attention implementation.

For every original implementation ``X`` in use (``sdpa``, ``eager``, ...)
``attach`` registers ``barrier_X`` with ``AttentionInterface`` (and with
``AttentionMaskInterface``, so the model builds exactly the mask ``X`` gets)
and switches ``config._attn_implementation`` of the attention layers' configs
to it; ``detach`` switches back. ``barrier_X`` calls ``X`` unchanged (the
model's logits do not move) and passes the same q, k, v (after RoPE, before
the GQA repeat) to the handle of the layer that called it. No model class is
patched, so every model that dispatches through ``AttentionInterface`` works.

The first attach also wraps ``transformers.Trainer.training_step`` (once per
process, inert for models without a barrier) so that trainers whose
``compute_loss`` ignores the model's loss (TRL's ``SFTTrainer``) get the term
added to the loss they return; see :class:`_ComputeLossWithTerm`.

This module imports transformers; ``barrier_ops`` imports it only when a
transformers model is attached.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

try:  # AttentionInterface arrived in 4.51, AttentionMaskInterface in 4.53
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
except ImportError as error:  # pragma: no cover - depends on the installed transformers
    import transformers

    raise ImportError(
        "barrier_ops' Hugging Face integration needs transformers>=4.53 (AttentionInterface and "
        f"AttentionMaskInterface); found transformers {transformers.__version__}. "
        "pip install 'barrier-ops[hf]' installs a suitable one."
    ) from error

from ._core import (
    LAYER_ATTR,
    BarrierHandle,
    SetAttr,
    _LayerState,
    add_loss_hooks,
    padding_from_attention_mask,
    select_layers,
    set_module_attr,
)
from ._coupling import coupling_from_weights, projection_weight

PREFIX = "barrier_"
_registered: Dict[str, Callable] = {}


def _eager_of(module: nn.Module) -> Callable:
    """The eager attention of the module's own modeling file (what ``get_interface`` falls back to)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(
            f"barrier_ops.attach: {type(module).__name__} uses eager attention but its module "
            f"{type(module).__module__} defines no eager_attention_forward; load the model with "
            "attn_implementation='sdpa'"
        )
    return fn


def _original_of(name: str, module: nn.Module) -> Callable:
    if name == "eager":
        return _eager_of(module)
    if name not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"barrier_ops.attach: attention implementation {name!r} is not registered")
    return ALL_ATTENTION_FUNCTIONS[name]


def _make_attention(original_name: str) -> Callable:
    def barrier_attention(module, query, key, value, attention_mask, **kwargs):
        state = getattr(module, LAYER_ATTR, None)
        if state is None:
            # A layer left out by `layers=` (or one attach did not see) keeps its original.
            return _original_of(original_name, module)(module, query, key, value, attention_mask, **kwargs)
        out = state.original(module, query, key, value, attention_mask, **kwargs)
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", None)
        # The layer's own flag first: the is_causal kwarg is a dispatch hint to
        # SDPA. GPT-2 in transformers 4.5x passes is_causal=False whenever the
        # causal structure is already inside attention_mask.
        is_causal = getattr(module, "is_causal", None)
        if is_causal is None:
            is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = True
        padding = padding_from_attention_mask(attention_mask, query.shape[0], query.shape[2])
        state.handle._record(
            state, query, key, value, scale=scaling, causal=bool(is_causal), key_padding_mask=padding,
            module=module,
        )
        return out

    barrier_attention.__name__ = f"barrier_{original_name}_attention"
    return barrier_attention


def register(original_name: str) -> str:
    """Register ``barrier_<original_name>`` with transformers (idempotent); return its name."""
    if original_name.startswith(PREFIX):
        raise ValueError(f"barrier_ops.attach: the model already uses {original_name!r}; detach first")
    name = PREFIX + original_name
    if name not in _registered:
        fn = _make_attention(original_name)
        AttentionInterface.register(name, fn)
        if original_name in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original_name])
        _registered[name] = fn
    return name


def is_hf_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def find_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Self-attention modules that dispatch through AttentionInterface (outermost only)."""
    found = []
    for name, m in model.named_modules():
        if not type(m).__name__.endswith("Attention"):
            continue
        config = getattr(m, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            continue
        if getattr(m, "is_cross_attention", False):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, m))
    return found


class WeightsCoupling:
    """``(module, heads, dtype) -> [H, d, dv]`` from the projections the layer has at call time.

    Llama-style layers: ``q_proj`` / ``o_proj``; GPT-2: the query third of
    ``c_attn`` and ``c_proj`` (Conv1D). Each may be wrapped by a PEFT LoRA
    layer, whose adapted weight ``W0 + scaling * B A`` is used
    (:func:`~barrier_ops.integrations._coupling.projection_weight`). The
    projections are looked up on every forward, so adapters added after
    ``attach`` are seen, and their training moves the coupling.
    """

    def __init__(self, name: str, query: str, output: str, fused_qkv: bool):
        self.name, self.query, self.output, self.fused_qkv = name, query, output, fused_qkv

    def __call__(self, module: nn.Module, heads: int, dtype: torch.dtype) -> torch.Tensor:
        w_q = projection_weight(getattr(module, self.query), f"{self.name}.{self.query}")
        if self.fused_qkv:  # [3C, D]: the queries are the first third
            w_q = w_q[: w_q.shape[0] // 3]
        w_o = projection_weight(getattr(module, self.output), f"{self.name}.{self.output}")
        return coupling_from_weights(w_q, w_o, heads, dtype)


def _weights_coupling(name: str, attn: nn.Module) -> WeightsCoupling:
    """The layer's coupling builder, checked once on the layer as it is now."""
    if hasattr(attn, "q_proj") and hasattr(attn, "o_proj"):
        coupling = WeightsCoupling(name, "q_proj", "o_proj", fused_qkv=False)
    elif hasattr(attn, "c_attn") and hasattr(attn, "c_proj"):
        coupling = WeightsCoupling(name, "c_attn", "c_proj", fused_qkv=True)
    else:
        raise ValueError(
            f"barrier_ops.attach(coupling='weights'): {name} ({type(attn).__name__}) has neither "
            "q_proj/o_proj nor c_attn/c_proj projections; use coupling='identity'"
        )
    for attr in (coupling.query, coupling.output):
        projection_weight(getattr(attn, attr), f"{name}.{attr}")  # raises a clear error now, not mid-training
    return coupling


def _add_term(output, term, args, kwargs):
    """Add the term to ``ModelOutput.loss`` (or to element 0 of a tuple output when labels were given)."""
    if term is None:
        return output
    if isinstance(output, dict):  # ModelOutput is an OrderedDict
        loss = output.get("loss")
        if loss is not None:
            output["loss"] = loss + term.to(loss.dtype)
        return output
    if isinstance(output, tuple) and kwargs.get("labels") is not None and output and output[0] is not None:
        if isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
            return (output[0] + term.to(output[0].dtype),) + tuple(output[1:])
    return output


def attach(handle: BarrierHandle, model: nn.Module, layers) -> None:
    chosen = select_layers(find_layers(model), layers)
    softcap = {getattr(attn.config, "attn_logit_softcapping", None) for _, attn in chosen} - {None}
    if softcap:
        # The margins are those of the uncapped logits c <q, k>; with cap * tanh(z / cap)
        # they differ where |z| nears the cap (Gemma2 uses 50).
        warnings.warn(
            f"barrier_ops.attach: this model caps its attention logits (attn_logit_softcapping="
            f"{sorted(softcap)}); the barrier's margins are computed from the uncapped logits, "
            "which match the layer only where the logits stay well below the cap",
            stacklevel=3,
        )
    # Switch every config the chosen layers read (a ForCausalLM shares one with its base model).
    configs = {}
    for name, attn in chosen:
        configs.setdefault(id(attn.config), attn.config)
    originals = {key: cfg._attn_implementation or "eager" for key, cfg in configs.items()}
    for name, attn in chosen:
        original_name = originals[id(attn.config)]
        coupling_fn = _weights_coupling(name, attn) if handle.coupling == "weights" else None
        state = _LayerState(handle, name, coupling_fn, original=_original_of(original_name, attn))
        set_module_attr(handle, attn, LAYER_ATTR, state)
        handle.layer_names.append(name)
    handle.hf_originals = sorted(set(originals.values()))
    for key, cfg in configs.items():
        previous = cfg._attn_implementation
        cfg._attn_implementation = register(originals[key])
        handle._undo.append(SetAttr(cfg, "_attn_implementation", previous))
    add_loss_hooks(handle, model, _add_term)
    patch_trainer()


def register_for(handle: BarrierHandle) -> None:
    """Register the attention implementations an attached model's configs name (after unpickling)."""
    for original_name in getattr(handle, "hf_originals", ()):
        register(original_name)


# ---------------------------------------------------------------------------
# Trainers whose loss is not the model's loss (TRL's SFTTrainer, custom compute_loss)
# ---------------------------------------------------------------------------


def _loss_scaled_for_ga(trainer, num_items_in_batch) -> bool:
    """Whether ``Trainer.training_step`` leaves this step's loss undivided by the accumulation steps."""
    flag = getattr(trainer, "loss_is_scaled_for_ga", None)
    if flag is not None:
        return bool(flag)
    accepts = bool(getattr(trainer, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None
    return accepts or getattr(trainer, "compute_loss_func", None) is not None


class _ComputeLossWithTerm:
    """``trainer.compute_loss`` for one training step: the loss it returns gets the term if it lacks it.

    Runs the trainer's own ``compute_loss``; when its loss's autograd graph
    does not contain the barrier term of the step's training forward (TRL's
    SFTTrainer computes its loss from per-token log-probabilities and ignores
    the model's ``loss``), adds ``handle.term()``. Normalisation follows the
    trainer's: when the step's loss is a sum over ``num_items_in_batch`` (not
    divided by the accumulation steps afterwards), the forwards inside compute
    the barrier with the same rule, and the multi-device factor of
    ``average_tokens_across_devices`` is applied to the term too.
    """

    def __init__(self, trainer, handle: BarrierHandle, compute_loss):
        self.trainer, self.handle, self.compute_loss = trainer, handle, compute_loss

    def __call__(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        state = self.handle._state
        previous = state.default_num_items
        if num_items_in_batch is not None and _loss_scaled_for_ga(self.trainer, num_items_in_batch):
            state.default_num_items = num_items_in_batch
        try:
            result = self.compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs
            )
        finally:
            state.default_num_items = previous
        loss = result[0] if return_outputs else result
        record = state.record
        if (
            not model.training
            or record is None
            or not record.trainable
            or not isinstance(loss, torch.Tensor)
            or self.handle._loss_contains_term(loss)
        ):
            return result
        term = self.handle.term()
        args = getattr(self.trainer, "args", None)
        if num_items_in_batch is not None and getattr(args, "average_tokens_across_devices", False):
            term = term * getattr(getattr(self.trainer, "accelerator", None), "num_processes", 1)
        loss = loss + term.to(loss.dtype)
        return (loss,) + tuple(result[1:]) if return_outputs else loss


_MISSING = object()


def patch_trainer() -> None:
    """Wrap ``transformers.Trainer.training_step`` (once per process; inert for models without a barrier).

    During a training step of an attached model, the trainer's
    ``compute_loss`` (its class's, a subclass's such as TRL's, or one set on
    the instance) is wrapped by :class:`_ComputeLossWithTerm`. Subclasses that
    override ``training_step`` and call ``super()`` (TRL's do) are covered.
    """
    from transformers import Trainer

    current = Trainer.training_step
    if getattr(current, "_barrier_ops_wrapped", False):
        return

    @functools.wraps(current)
    def training_step(self, model, inputs, *args, **kwargs):
        from . import get_handle

        handle = get_handle(model) if isinstance(model, nn.Module) else None
        if handle is None:
            return current(self, model, inputs, *args, **kwargs)
        own = self.__dict__.get("compute_loss", _MISSING)
        self.compute_loss = _ComputeLossWithTerm(self, handle, self.compute_loss)
        try:
            return current(self, model, inputs, *args, **kwargs)
        finally:
            if own is _MISSING:
                self.__dict__.pop("compute_loss", None)
            else:
                self.compute_loss = own

    training_step._barrier_ops_wrapped = True
    Trainer.training_step = training_step


def _handle_of(model: nn.Module) -> BarrierHandle:
    from . import get_handle

    handle = get_handle(model)
    if handle is None:
        raise ValueError("BarrierStatsCallback: the model has no barrier attached (call barrier_ops.attach first)")
    return handle


from transformers import TrainerCallback  # noqa: E402  (transformers is already imported above)


class BarrierStatsCallback(TrainerCallback):
    """Adds the barrier statistics to the Trainer's training logs.

    On every optimizer step it accumulates, as tensors (no host sync), the
    statistics of the last forward of that step (the last micro-batch under
    gradient accumulation); on every training log it averages them over the
    steps since the previous log (``*margin_min`` entries take the minimum),
    adds them to ``logs`` and to ``state.log_history``, and resets.

    ``barrier/penalty`` is the barrier before the weight: negative whenever
    the margins are above 1 under the paper's ``-log m`` (see
    :class:`~barrier_ops.integrations.BarrierStats`). With
    ``attach(query_fraction=f < 1)`` the values come from the query rows drawn
    in each step: the penalty is the unbiased estimate that trained the model,
    the margin statistics and support positions describe the drawn rows.

    Reporting callbacks (TensorBoard, W&B, ...) see the values only if this
    callback runs before them: use :func:`add_stats_callback`, which puts it
    first, rather than ``Trainer(callbacks=[...])``, which puts it after the
    reporters (the console and ``log_history`` get the values either way).
    """

    def __init__(self, prefix: str = "barrier/"):
        self.prefix = prefix
        self._sums: Dict[str, torch.Tensor] = {}
        self._steps = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        handle = _handle_of(model)
        values = handle.stats.tensors(self.prefix)
        if not values:
            return
        for key, value in values.items():
            value = value.detach().double()
            if key not in self._sums:
                self._sums[key] = value
            elif key.endswith("margin_min"):
                self._sums[key] = torch.minimum(self._sums[key], value)
            else:
                self._sums[key] = self._sums[key] + value
        self._steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self._steps == 0 or "loss" not in logs:
            return
        out = {
            key: float(value) if key.endswith("margin_min") else float(value) / self._steps
            for key, value in self._sums.items()
        }
        logs.update(out)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(out)
        self._sums, self._steps = {}, 0


def add_stats_callback(trainer, prefix: str = "barrier/") -> BarrierStatsCallback:
    """Insert a :class:`BarrierStatsCallback` ahead of the Trainer's reporting callbacks."""
    _handle_of(trainer.model)
    callback = BarrierStatsCallback(prefix)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
