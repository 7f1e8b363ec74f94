"""Tiny models and an independent oracle for the training-integration tests.

The oracle captures each attention layer's q, k, v from an *un-attached* copy
of the model (a test-only attention implementation for transformers, a hook on
c_attn for nanoGPT) and evaluates the pure-PyTorch reference barrier on them,
building the couplings head by head with explicit loops.
"""

from __future__ import annotations

import copy
import os
import sys

import torch

from barrier_ops.reference import margin_barrier_loss_reference

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

from nanogpt_model import GPT, GPTConfig  # noqa: E402


def tiny_nanogpt(seed=0, dtype=torch.float64, scale=8.0, **overrides):
    """A nanoGPT model whose weights are scaled up so that margins move away from 1."""
    torch.manual_seed(seed)
    cfg = GPTConfig(**{"block_size": 32, "vocab_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 16, **overrides})
    model = GPT(cfg).to(dtype)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(scale)
            block.attn.c_proj.weight.mul_(scale)
    return model


def tiny_gpt2(seed=0, attn="sdpa", dtype=torch.float64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, initializer_range=0.3,
        bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )
    return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn).to(dtype)


def tiny_llama(seed=0, attn="sdpa", dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.3,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).to(dtype)


# ---------------------------------------------------------------------------
# Couplings, head by head
# ---------------------------------------------------------------------------


def coupling_loop(w_q_rows, w_o_cols, heads):
    """A_h = W_Q^h W_O^h with W_Q^h = rows of head h ([d, D]), W_O^h = columns of head h ([D, dv])."""
    d = w_q_rows.shape[0] // heads
    dv = w_o_cols.shape[1] // heads
    return torch.stack(
        [w_q_rows[h * d:(h + 1) * d] @ w_o_cols[:, h * dv:(h + 1) * dv] for h in range(heads)]
    )


def nanogpt_coupling(attn):
    C = attn.n_embd
    return coupling_loop(attn.c_attn.weight[:C], attn.c_proj.weight, attn.n_head)


def hf_coupling(attn, heads):
    if hasattr(attn, "q_proj"):
        return coupling_loop(attn.q_proj.weight, attn.o_proj.weight, heads)
    # GPT-2 Conv1D: y = x @ W with W [in, out]; the out x in matrices are the transposes.
    C = attn.c_attn.weight.shape[0]
    return coupling_loop(attn.c_attn.weight[:, :C].t(), attn.c_proj.weight.t(), heads)


# ---------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------


def nanogpt_oracle(model, idx, targets, *, weight, coupling="identity", combine_heads=False, eps=1e-2, layers=None,
                   **reference_kwargs):
    """(ce, reference term, per-layer barriers) from the un-attached model; differentiable.

    reference_kwargs (target_margin, causal, ...) go to margin_barrier_loss_reference.
    """
    captured = []
    hooks = []
    for block in model.transformer.h:
        attn = block.attn

        def hook(lin, inp, out, attn=attn):
            B, T, _ = out.shape
            C, H = attn.n_embd, attn.n_head
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in out.split(C, dim=2))
            captured.append((attn, q, k, v))

        hooks.append(attn.c_attn.register_forward_hook(hook))
    try:
        _, ce = model(idx, targets)
    finally:
        for h in hooks:
            h.remove()
    barriers = []
    for i, (attn, q, k, v) in enumerate(captured):
        if layers is not None and i not in layers:
            continue
        A = nanogpt_coupling(attn) if coupling == "weights" else None
        barriers.append(
            margin_barrier_loss_reference(q, k, v, coupling=A, combine_heads=combine_heads, eps=eps,
                                          **reference_kwargs)
        )
    return ce, weight * torch.stack(barriers).mean(), barriers


_CAPTURE = []


def _make_capture(original):
    def capture(module, query, key, value, attention_mask, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        _CAPTURE.append((module, query, key, value, kwargs.get("scaling")))
        if original == "eager":
            fn = sys.modules[type(module).__module__].eager_attention_forward
        else:
            fn = ALL_ATTENTION_FUNCTIONS[original]
        return fn(module, query, key, value, attention_mask, **kwargs)

    return capture


def hf_oracle(model, *, input_ids, attention_mask, labels, weight, coupling="identity", combine_heads=False,
              eps=1e-2, reduction="mean", num_items_in_batch=None, layers=None):
    """(ce, reference term, logits) for an un-attached HF model, key padding from the batch's 2-D mask.

    The q, k, v come from a test-only attention implementation that records
    them and runs the model's own implementation (sdpa or eager). layers: the
    indices (in call order) of the attention layers whose barriers the term
    averages (None: all).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    previous = model.config._attn_implementation
    name = f"test_capture_{previous}"
    AttentionInterface.register(name, _make_capture(previous))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    model.config._attn_implementation = name
    _CAPTURE.clear()
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
    finally:
        model.config._attn_implementation = previous
    kpm = None if attention_mask is None else attention_mask.bool()
    barriers = []
    for i, (module, q, k, v, scaling) in enumerate(_CAPTURE):
        if layers is not None and i not in layers:
            continue
        A = hf_coupling(module, q.shape[1]) if coupling == "weights" else None
        b = margin_barrier_loss_reference(
            q, k, v, coupling=A, scale=scaling, key_padding_mask=kpm, combine_heads=combine_heads, eps=eps,
            reduction=reduction,
        )
        barriers.append(b if num_items_in_batch is None else b / num_items_in_batch)
    _CAPTURE.clear()
    return out.loss, weight * torch.stack(barriers).mean(), out.logits


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def clone(model):
    return copy.deepcopy(model)
