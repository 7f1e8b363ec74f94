"""attach's barrier options: backend, target_margin, causal, numeric types, and warnings."""

from __future__ import annotations

import warnings

import pytest
import torch

import barrier_ops
from _integration_helpers import clone, grads, nanogpt_oracle, tiny_nanogpt

WEIGHT = 0.5


def _oracle(model, idx, targets, weight, **reference_kwargs):
    """CE + weight * mean over layers of the reference barrier, from the un-attached model."""
    ce, term, _ = nanogpt_oracle(model, idx, targets, weight=weight, **reference_kwargs)
    return ce + term


def _batch(seed=0, T=24):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 64, (2, T), generator=g)
    return idx, torch.randint(0, 64, (2, T), generator=g)


def _loss_and_grads(model, idx, targets):
    model.zero_grad()
    _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), grads(model)


@pytest.mark.parametrize("backend", ["fused", "sdpa"])
def test_backends_give_the_same_training_loss_and_gradients(backend):
    base = tiny_nanogpt()
    idx, targets = _batch()
    model = clone(base)
    barrier_ops.attach(model, WEIGHT, backend=backend)
    loss, got = _loss_and_grads(model, idx, targets)
    reference = clone(base)
    barrier_ops.attach(reference, WEIGHT, backend="fused")
    want_loss, want = _loss_and_grads(reference, idx, targets)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("target_margin", [None, 1.5])
def test_target_margin_reaches_the_loss(target_margin):
    base = tiny_nanogpt()
    idx, targets = _batch()
    model = clone(base)
    handle = barrier_ops.attach(model, WEIGHT, target_margin=target_margin)
    assert handle.target_margin == target_margin
    _, loss = model(idx, targets)
    expected = _oracle(clone(base), idx, targets, WEIGHT, target_margin=target_margin)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)


def test_strict_causality_changes_the_penalty_and_leaves_position_zero_out():
    base = tiny_nanogpt()
    idx, targets = _batch()
    plain, strict = clone(base), clone(base)
    barrier_ops.attach(plain, WEIGHT)
    h = barrier_ops.attach(strict, WEIGHT, causal="strict")
    _, loss_plain = plain(idx, targets)
    _, loss_strict = strict(idx, targets)
    expected = _oracle(clone(base), idx, targets, WEIGHT, causal="strict")
    torch.testing.assert_close(loss_strict, expected, rtol=1e-9, atol=0)
    assert not torch.allclose(loss_plain, loss_strict)
    for layer in h.stats.layers:
        assert (layer.support_index != 0).all()


def test_numpy_weight_and_bad_options():
    np = pytest.importorskip("numpy")
    for w in (np.float32(0.02), np.float64(0.02), 1):
        model = tiny_nanogpt()
        assert barrier_ops.attach(model, w).weight == pytest.approx(0.02 if w != 1 else 1.0)
    for kwargs, exc, match in [
        ({"backend": "triton"}, ValueError, "backend must be one of"),
        ({"target_margin": 0.001}, ValueError, "target_margin must be"),
        ({"causal": "future"}, ValueError, "causal must be True, False or 'strict'"),
        ({"weight": True}, TypeError, "weight must be a real number"),
        ({"weight": -1.0}, ValueError, "weight must be a finite number >= 0"),
    ]:
        with pytest.raises(exc, match=match):
            barrier_ops.attach(tiny_nanogpt(), **kwargs)


def test_gemma2_logit_softcapping_is_warned_about():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma2Config"):
        pytest.skip("transformers without Gemma2")
    cfg = transformers.Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32,
        attn_logit_softcapping=50.0,
    )
    model = transformers.Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager")
    with pytest.warns(UserWarning, match="attn_logit_softcapping"):
        barrier_ops.attach(model, 0.02)
    barrier_ops.detach(model)
    cfg.attn_logit_softcapping = None
    model = transformers.Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        barrier_ops.attach(model, 0.02)
