"""BarrierOptions: one validated value for the barrier's options, from the entry points to their use."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import barrier_ops
from barrier_ops import barriers
from barrier_ops.options import BarrierOptions


def test_defaults_match_the_public_keywords():
    o = BarrierOptions()
    assert (o.eps, o.target_margin, o.causal, o.backend, o.combine_heads, o.query_fraction) == (
        1e-2, None, True, "auto", False, 1.0)
    assert not o.sampled and BarrierOptions(query_fraction=0.5).sampled


def test_frozen_and_hashable():
    o = BarrierOptions(eps=0.05, target_margin=2.0, causal="strict", query_fraction=0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.eps = 0.1
    same = BarrierOptions(eps=0.05, target_margin=2.0, causal="strict", query_fraction=0.25)
    assert o == same and hash(o) == hash(same) and len({o, same}) == 1
    assert o != o.replace(query_fraction=0.5)
    # Numbers are normalised to float (an int eps and a float eps are one option).
    assert BarrierOptions(eps=1, target_margin=2) == BarrierOptions(eps=1.0, target_margin=2.0)
    assert isinstance(BarrierOptions(query_fraction=1).query_fraction, float)


@pytest.mark.parametrize("field,value,error", [
    ("eps", 0.0, ValueError),
    ("eps", -1.0, ValueError),
    ("eps", math.nan, ValueError),
    ("eps", "0.1", TypeError),
    ("eps", True, TypeError),
    ("target_margin", 0.005, ValueError),  # <= eps
    ("target_margin", math.inf, ValueError),
    ("target_margin", "2", TypeError),
    ("causal", "yes", ValueError),
    ("causal", 1, ValueError),
    ("backend", "cuda", ValueError),
    ("backend", None, ValueError),
    ("combine_heads", 1, TypeError),
    ("query_fraction", 0.0, ValueError),
    ("query_fraction", 1.5, ValueError),
    ("query_fraction", math.nan, ValueError),
    ("query_fraction", True, TypeError),
    ("query_fraction", "0.5", TypeError),
])
def test_validation_names_the_argument(field, value, error):
    with pytest.raises(error, match=field):
        BarrierOptions(**{field: value})
    with pytest.raises(error, match=field):
        BarrierOptions().replace(**{field: value})


def test_causal_none_means_the_layers_own():
    o = BarrierOptions(causal=None)
    assert o.causal_mode(True) == "inclusive" and o.causal_mode(False) == "none"
    assert BarrierOptions(causal="strict").causal_mode(True) == "strict"


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("kwargs,error,name", [
    ({"eps": 0.0}, ValueError, "eps"),
    ({"target_margin": 0.001}, ValueError, "target_margin"),
    ({"causal": None}, ValueError, "causal"),
    ({"backend": "triton"}, ValueError, "backend"),
    ({"query_fraction": 0}, ValueError, "query_fraction"),
    ({"reduction": "max"}, ValueError, "reduction"),
])
def test_public_ops_errors_name_the_argument(kwargs, error, name):
    q, k, v = _qkv()
    with pytest.raises(error, match=name):
        barrier_ops.margin_barrier_loss(q, k, v, **kwargs)
    with pytest.raises(error, match=name):
        barrier_ops.ops.barrier_and_margins(q, k, v, **kwargs)


def test_attach_builds_the_options_once_and_the_handle_exposes_them():
    from _integration_helpers import tiny_nanogpt

    model = tiny_nanogpt()
    handle = barrier_ops.attach(model, 0.1, eps=0.02, target_margin=1.5, causal="strict",
                                backend="sdpa", combine_heads=True, query_fraction=0.5)
    assert handle.options == BarrierOptions(eps=0.02, target_margin=1.5, causal="strict",
                                            backend="sdpa", combine_heads=True, query_fraction=0.5)
    assert (handle.eps, handle.target_margin, handle.causal, handle.backend, handle.combine_heads,
            handle.query_fraction) == (0.02, 1.5, "strict", "sdpa", True, 0.5)
    handle.query_fraction = 1.0  # setting an option validates and replaces the value
    assert handle.options.query_fraction == 1.0 and handle.options.eps == 0.02
    with pytest.raises(ValueError, match="eps"):
        handle.eps = -1.0
    assert handle.eps == 0.02
    assert "query_fraction=1.0" in repr(handle)
    barrier_ops.detach(model)
    for bad, error in (({"eps": 0}, ValueError), ({"combine_heads": "yes"}, TypeError),
                       ({"backend": "x"}, ValueError), ({"query_fraction": 2.0}, ValueError)):
        with pytest.raises(error, match=next(iter(bad))):
            barrier_ops.attach(model, 0.1, **bad)


@dataclasses.dataclass(frozen=True)
class _ScaledOptions(BarrierOptions):
    """A new option, as a future one would be added: one field ..."""

    penalty_scale: float = 1.0


def _scaled_penalty(m, options):
    """... plus its use, at the one place that reads it."""
    return barriers.barrier(m, options.eps, options.target_margin) * getattr(options, "penalty_scale", 1.0)


def test_a_new_field_reaches_its_use_without_signature_changes(monkeypatch):
    """From the handle (what attach builds) through the layer state and the composite to penalty()."""
    from _integration_helpers import tiny_nanogpt

    monkeypatch.setattr(barrier_ops.ops, "penalty", _scaled_penalty)
    model = tiny_nanogpt()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    handle = barrier_ops.attach(model, 0.1, target_margin=1.5)
    model(idx, idx)
    plain = handle.stats.penalty
    assert plain != 0
    handle.options = _ScaledOptions(target_margin=1.5, penalty_scale=3.0)
    model(idx, idx)
    torch.testing.assert_close(handle.stats.penalty, 3.0 * plain, rtol=1e-12, atol=0)
    # The internal entry point of the integrations takes the object as it is.
    q, k, v = _qkv()
    loss, _ = barrier_ops.ops._barrier_and_margins(
        q, k, v, None, None, None, _ScaledOptions(penalty_scale=2.0), "inclusive", "mean")
    torch.testing.assert_close(loss, 2.0 * barrier_ops.margin_barrier_loss(q, k, v), rtol=1e-12, atol=0)
