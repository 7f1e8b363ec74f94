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


def projection_weight(module: torch.nn.Module, what: str) -> torch.Tensor:
    """The weight a projection applies, ``[out, in]``, read from its parameters at call time.

    * ``nn.Linear``: its weight.
    * transformers' ``Conv1D`` (GPT-2, stores ``[in, out]``): the transpose.
    * a PEFT LoRA layer (``base_layer``, ``lora_A``, ``lora_B``, ``scaling``):
      ``W0 + sum_a scaling[a] * B_a A_a`` over its active adapters; ``W0`` alone
      when the adapters are merged into it (it then holds the sum) or disabled.
      Differentiable in ``W0``, ``A`` and ``B``.

    Raises ValueError naming ``what`` for any other layer (other PEFT methods, DoRA).
    """
    if isinstance(module, torch.nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return module.weight.t()
    base = getattr(module, "base_layer", None)
    if isinstance(base, torch.nn.Module):
        if not (hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "scaling")):
            raise ValueError(
                f"coupling='weights': {what} is a {type(module).__name__} adapter layer; only LoRA adapters "
                "(W0 + scaling * B A) are supported; use coupling='identity'"
            )
        weight = projection_weight(base, what)
        if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
            return weight
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            if getattr(module, "use_dora", {}).get(name, False):
                raise ValueError(
                    f"coupling='weights': {what} uses DoRA (adapter {name!r}), whose weight is not "
                    "W0 + scaling * B A; use coupling='identity'"
                )
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            if a.dim() != 2 or b.dim() != 2:
                raise ValueError(f"coupling='weights': {what} has a LoRA adapter that is not a linear map")
            weight = weight + module.scaling[name] * (b @ a).to(weight.dtype)
        return weight
    raise ValueError(
        f"coupling='weights': {what} is a {type(module).__name__}; expected nn.Linear, transformers' "
        "Conv1D, or a PEFT LoRA layer over one"
    )
