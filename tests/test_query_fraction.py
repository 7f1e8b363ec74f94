"""query_fraction: the sampled barrier (row sets, the Horvitz-Thompson estimate, its options).

Unbiasedness is tested by Monte Carlo at small shapes, cheaply: a batch of M
copies of the same sequences draws M independent row sets in ONE call (each
sequence draws its own), and reduction="none" (per position) and the
gradients w.r.t. each copy's q, k, v give M independent draws of the
estimator. Their mean is compared with the full value (query_fraction=1)
within 4.5 measured standard errors, element by element.
"""

from __future__ import annotations

import math

import pytest
import torch

import barrier_ops
from barrier_ops.ops import (
    _margin_barrier_loss_impl,
    barrier_and_margins,
    margin_barrier_loss,
    sample_query_positions,
    support_token_argmin,
    token_margins,
    valid_positions,
)
from barrier_ops.options import ceil_fraction

BACKENDS = ["fused", "sdpa"]
CAUSAL = {True: "inclusive", False: "none", "strict": "strict"}


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def make_inputs(B=2, H=2, Hkv=None, T=9, d=4, masked=True, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Hkv = H if Hkv is None else Hkv
    q = 1.5 * torch.randn(B, H, T, d, generator=g, dtype=dtype)
    k = 1.5 * torch.randn(B, Hkv, T, d, generator=g, dtype=dtype)
    v = 1.5 * torch.randn(B, Hkv, T, d, generator=g, dtype=dtype)
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[-1, :3] = False  # left padding
        if B > 1:
            mask[0, -2:] = False  # right padding
    return q, k, v, mask


def replicate(t, M):
    return None if t is None else t.repeat(M, *([1] * (t.dim() - 1)))


def assert_unbiased(draws, full, name, z=4.5):
    """mean(draws, dim 0) == full within z standard errors (measured), element by element."""
    M = draws.shape[0]
    mean = draws.mean(0)
    se = draws.std(0) / math.sqrt(M)
    err = (mean - full).abs()
    tol = z * se + 1e-9 * (1.0 + full.abs())
    bad = err > tol
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements off by more than {z} standard errors; "
        f"worst error {float((err - tol).max()):.3g} beyond tolerance, full {full[bad][:4].tolist()}, "
        f"mean {mean[bad][:4].tolist()}"
    )
    # The test must be able to see a bias: the estimator varies somewhere.
    assert float(se.detach().max()) > 0, f"{name}: no variance at all (every row drawn?)"


UNBIASED_CASES = [
    # causal, masked, combine_heads, Hkv
    (True, False, False, None),
    (True, True, False, 1),
    ("strict", True, True, None),
    ("strict", False, False, None),
    (False, True, True, None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,masked,combine_heads,Hkv", UNBIASED_CASES)
def test_estimate_and_its_gradient_are_unbiased(backend, causal, masked, combine_heads, Hkv):
    M, f, target = 600, 0.3, (None if combine_heads else 1.3)
    q, k, v, mask = make_inputs(Hkv=Hkv, masked=masked)
    B, H, T, _ = q.shape
    kw = dict(causal=causal, combine_heads=combine_heads, backend=backend, target_margin=target)

    # Full values on the base batch.
    base = [t.clone().requires_grad_() for t in (q, k, v)]
    full_none = margin_barrier_loss(*base, key_padding_mask=mask, reduction="none", **kw)
    full_sum = margin_barrier_loss(*base, key_padding_mask=mask, reduction="sum", **kw)
    full_mean = margin_barrier_loss(*base, key_padding_mask=mask, reduction="mean", **kw)
    full_grads = torch.autograd.grad(full_sum, base)

    # M draws at once.
    reps = [replicate(t, M).detach().requires_grad_() for t in (q, k, v)]
    mask_rep = replicate(mask, M)
    torch.manual_seed(1234)
    est_none = margin_barrier_loss(*reps, key_padding_mask=mask_rep, reduction="none",
                                   query_fraction=f, **kw)
    torch.manual_seed(1234)  # the same rows: the three reductions of one estimate
    est_sum = margin_barrier_loss(*reps, key_padding_mask=mask_rep, reduction="sum",
                                  query_fraction=f, **kw)
    torch.manual_seed(1234)
    est_mean = margin_barrier_loss(*reps, key_padding_mask=mask_rep, reduction="mean",
                                   query_fraction=f, **kw)
    est_grads = torch.autograd.grad(est_sum, reps)

    assert est_none.shape == (B * M,) + full_none.shape[1:]
    # "sum" and "mean" reduce "none": the sum, and the sum over the FULL count of valid positions.
    valid = valid_positions(B * M, T, CAUSAL[causal], mask_rep, q.device)
    count = valid.sum() * (1 if combine_heads else H)
    torch.testing.assert_close(est_sum, est_none.sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(est_mean, est_none.sum() / count, rtol=1e-12, atol=1e-12)
    # Drawn positions only: invalid positions and most valid ones are exactly 0.
    drawn = (est_none != 0).reshape(B * M, -1, T).any(1)
    assert not (drawn & ~valid).any()

    per_copy = est_none.reshape(M, B, *full_none.shape[1:])
    assert_unbiased(per_copy, full_none.detach(), "reduction='none'")
    assert_unbiased(per_copy.sum(dim=tuple(range(1, per_copy.dim()))), full_sum.detach(), "sum")
    n_full = valid[:B].sum() * (1 if combine_heads else H)
    assert_unbiased(per_copy.sum(dim=tuple(range(1, per_copy.dim()))) / n_full, full_mean.detach(),
                    "mean")
    for name, g_est, g_full in zip("qkv", est_grads, full_grads):
        assert_unbiased(g_est.reshape(M, *g_full.shape), g_full, f"d loss / d {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine_heads", [False, True])
@pytest.mark.parametrize("causal", [True, "strict", False])
def test_full_fraction_is_bit_identical(backend, causal, combine_heads):
    q, k, v, mask = make_inputs(Hkv=1)
    results = []
    for extra in ({}, {"query_fraction": 1.0}, {"query_fraction": 1}):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        for reduction in ("mean", "sum", "none"):
            loss = margin_barrier_loss(*inputs, key_padding_mask=mask, causal=causal,
                                       combine_heads=combine_heads, backend=backend,
                                       reduction=reduction, **extra)
            grads = torch.autograd.grad(loss.sum(), inputs)
            results.append((loss, *grads))
    per_call = len(results) // 3
    for i in range(per_call):
        for a, b, c in zip(results[i], results[per_call + i], results[2 * per_call + i]):
            assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine_heads", [False, True])
@pytest.mark.parametrize("causal", [True, "strict"])
def test_every_row_drawn_gives_the_full_value(backend, causal, combine_heads):
    """f just below 1 draws every valid row (ceil(0.99 n) = n for n < 100): the gathered path
    must then give the full loss, margins and gradients (weights n_b / R_b = 1)."""
    q, k, v, mask = make_inputs(Hkv=1)
    kw = dict(key_padding_mask=mask, causal=causal, combine_heads=combine_heads, backend=backend)
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    full_loss, full_margins = barrier_and_margins(*a, **kw)
    loss, margins = barrier_and_margins(*b, query_fraction=0.99, **kw)
    torch.testing.assert_close(loss, full_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(margins, full_margins, rtol=1e-12, atol=1e-12)
    for ga, gb in zip(torch.autograd.grad(full_loss, a), torch.autograd.grad(loss, b)):
        torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-12)
    for reduction in ("none", "sum"):
        torch.testing.assert_close(
            margin_barrier_loss(q, k, v, reduction=reduction, query_fraction=0.99, **kw),
            margin_barrier_loss(q, k, v, reduction=reduction, **kw), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# The row set
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("f", [0.1, 0.25, 1 / 3, 0.5, 0.7, 0.999])
def test_row_count_and_distinct_valid_sorted_positions(f):
    T = 30
    valid = torch.ones(6, T, dtype=torch.bool)
    valid[1, :10] = False
    valid[2, 20:] = False
    valid[3] = False  # no valid position
    valid[4, :] = False
    valid[4, 7] = True  # one
    valid[5, ::3] = False
    torch.manual_seed(0)
    rows = sample_query_positions(valid, f)
    assert rows.dtype == torch.int64 and rows.shape == (6, ceil_fraction(f, T))
    for b in range(6):
        n = int(valid[b].sum())
        picked = rows[b][rows[b] >= 0]
        assert picked.numel() == math.ceil(round(f * n, 9)), (b, n, picked)
        assert torch.equal(rows[b], rows[b].sort().values), "ascending, -1 first"
        assert picked.unique().numel() == picked.numel(), "without replacement"
        assert valid[b, picked].all(), "valid positions only"
        assert (rows[b][rows[b] < 0] == -1).all()


def test_ceil_of_a_float_product():
    # 0.07 * 100 = 7.000000000000001 in floating point: 7 rows, not 8.
    assert 0.07 * 100 > 7 and 0.28 * 25 > 7
    assert ceil_fraction(0.07, 100) == 7 and ceil_fraction(0.28, 25) == 7
    assert ceil_fraction(0.7, 10) == 7 and ceil_fraction(0.29, 100) == 29
    assert ceil_fraction(0.0700001, 100) == 8 and ceil_fraction(1.0, 5) == 5
    valid = torch.ones(1, 100, dtype=torch.bool)
    rows = sample_query_positions(valid, 0.07)
    assert rows.shape == (1, 7) and int((rows >= 0).sum()) == 7


def test_rows_are_uniform():
    """Each valid position is drawn with probability R_b / n_b (chi-square-free: 5 sigma per position)."""
    T, n_draws = 12, 4000
    valid = torch.ones(n_draws, T, dtype=torch.bool)
    valid[:, :2] = False  # n_b = 10, R_b = ceil(0.3 * 10) = 3
    torch.manual_seed(7)
    rows = sample_query_positions(valid, 0.3)
    counts = torch.zeros(T)
    counts.index_add_(0, rows[rows >= 0], torch.ones(int((rows >= 0).sum())))
    p = 0.3
    expected, sd = n_draws * p, math.sqrt(n_draws * p * (1 - p))
    assert counts[:2].sum() == 0
    assert ((counts[2:] - expected).abs() < 5 * sd).all(), counts
    # Pairs too (a scheme drawing neighbouring blocks would fail): P(both of 2 and 11) = 3/10 * 2/9.
    both = ((rows == 2).any(1) & (rows == 11).any(1)).sum()
    p2 = 0.3 * 2 / 9
    assert abs(float(both) - n_draws * p2) < 5 * math.sqrt(n_draws * p2 * (1 - p2))


def test_reproducible_under_manual_seed_and_generator():
    q, k, v, mask = make_inputs()
    kw = dict(key_padding_mask=mask, query_fraction=0.4, reduction="none")
    torch.manual_seed(11)
    a = margin_barrier_loss(q, k, v, **kw)
    torch.manual_seed(11)
    b = margin_barrier_loss(q, k, v, **kw)
    assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    c = margin_barrier_loss(q, k, v, generator=g1, **kw)
    d = margin_barrier_loss(q, k, v, generator=g2, **kw)
    assert torch.equal(c, d)
    # The generator's state advances: the next draw differs (with overwhelming probability).
    draws = {tuple((margin_barrier_loss(q, k, v, generator=g1, **kw) != 0).flatten().tolist())
             for _ in range(5)}
    assert len(draws) > 1
    # A generator does not touch the global one.
    torch.manual_seed(11)
    margin_barrier_loss(q, k, v, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(margin_barrier_loss(q, k, v, **kw), a)


def test_same_rows_for_every_head():
    q, k, v, mask = make_inputs(H=4, masked=True)
    est = margin_barrier_loss(q, k, v, key_padding_mask=mask, query_fraction=0.3, reduction="none")
    drawn = est != 0
    assert torch.equal(drawn, drawn[:, :1].expand_as(drawn))


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.0000001, 2, float("nan"), float("inf")])
def test_query_fraction_out_of_range(bad):
    q, k, v, _ = make_inputs()
    with pytest.raises(ValueError, match="query_fraction"):
        margin_barrier_loss(q, k, v, query_fraction=bad)
    with pytest.raises(ValueError, match="query_fraction"):
        barrier_and_margins(q, k, v, query_fraction=bad)


@pytest.mark.parametrize("bad", [True, "0.5", None, torch.tensor(0.5)])
def test_query_fraction_wrong_type(bad):
    q, k, v, _ = make_inputs()
    with pytest.raises(TypeError, match="query_fraction"):
        margin_barrier_loss(q, k, v, query_fraction=bad)


def test_generator_errors():
    q, k, v, _ = make_inputs()
    for f in (0.5, 1.0):
        with pytest.raises(TypeError, match="generator"):
            margin_barrier_loss(q, k, v, query_fraction=f, generator=3)
        with pytest.raises(TypeError, match="generator"):
            barrier_and_margins(q, k, v, query_fraction=f, generator="seed")
    valid = torch.ones(2, 5, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="generator must be on the device"):
        sample_query_positions(valid, 0.5, generator=torch.Generator())


def test_query_positions_checks():
    q, k, v, mask = make_inputs()
    B, H, T, _ = q.shape
    args = (q, k, v, None, 0.5, "inclusive", mask, False, 1e-2, None, "mean", "fused")
    good = torch.tensor([[-1, 2, 5], [3, 4, 8]])
    _margin_barrier_loss_impl(*args, good)
    for bad, err, match in [
        (good.to(torch.int32), TypeError, "int64"),
        (good[:1], ValueError, r"\[B, R\]"),
        (good[:, :, None], ValueError, r"\[B, R\]"),
        (torch.tensor([[0, 1, T], [0, 1, 2]]), ValueError, r"\[0, T=9\)"),
        (torch.tensor([[0, 1, -2], [0, 1, 2]]), ValueError, r"\[0, T=9\)"),
    ]:
        with pytest.raises(err, match=match):
            _margin_barrier_loss_impl(*args, bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_row_set_is_the_weighted_subset(backend):
    """With a given row set the op is deterministic: the valid rows' penalties weighted n_b / R_b.

    A slot at an invalid position (batch 1 pads positions 0-2) counts as empty.
    """
    q, k, v, mask = make_inputs()
    rows = torch.tensor([[-1, 1, 4], [1, 5, 7]])  # batch 1: positions 3.. are valid (n = 6)
    est = _margin_barrier_loss_impl(q, k, v, None, 0.5, "inclusive", mask, False, 1e-2, None, "none",
                                    backend, rows)
    full = margin_barrier_loss(q, k, v, scale=0.5, key_padding_mask=mask, reduction="none",
                               backend=backend)
    n = valid_positions(2, 9, "inclusive", mask, q.device).sum(1)  # 7 and 6
    expected = torch.zeros_like(full)
    for b, positions in enumerate(([1, 4], [5, 7])):
        expected[b, :, positions] = full[b, :, positions] * n[b] / 2
    torch.testing.assert_close(est, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_a_row_set(backend):
    q, k, v, mask = make_inputs()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    rows = torch.tensor([[-1, 1, 4], [-1, 5, 7]])
    for reduction in ("mean", "none"):
        torch.library.opcheck(
            torch.ops.barrier_ops.margin_barrier_loss.default,
            (q, k, v, None, 0.5, "inclusive", mask, False, 1e-2, None, reduction, backend, rows),
        )


# ---------------------------------------------------------------------------
# NaN, margins and support tokens with f < 1
# ---------------------------------------------------------------------------


def test_nan_in_a_drawn_row_reaches_the_loss_and_an_undrawn_one_does_not():
    q, k, v, _ = make_inputs(masked=False)
    q = q.clone()
    q[0, 0, 5] = float("nan")
    rows = torch.tensor([[5, 6], [0, 1]])
    args = (k, v, None, 0.5, "inclusive", None, False, 1e-2, None, "sum", "fused")
    assert torch.isnan(_margin_barrier_loss_impl(q, *args, rows))
    assert torch.isfinite(_margin_barrier_loss_impl(q, *args, torch.tensor([[4, 6], [0, 1]])))
    k = k.clone()
    k[1, 0, 8] = float("inf")  # a key: every row of that sequence's head
    assert torch.isnan(_margin_barrier_loss_impl(q.nan_to_num(), k, *args[1:], rows))


@pytest.mark.parametrize("combine_heads", [False, True])
def test_barrier_and_margins_marks_undrawn_positions_nan(combine_heads):
    q, k, v, mask = make_inputs()
    torch.manual_seed(3)
    loss, margins = barrier_and_margins(q, k, v, key_padding_mask=mask, query_fraction=0.3,
                                        combine_heads=combine_heads, causal="strict")
    torch.manual_seed(3)
    est = margin_barrier_loss(q, k, v, key_padding_mask=mask, query_fraction=0.3,
                              combine_heads=combine_heads, causal="strict")
    torch.testing.assert_close(loss, est, rtol=1e-12, atol=1e-12)
    exact = token_margins(q, k, v, key_padding_mask=mask, combine_heads=combine_heads, causal="strict")
    valid = valid_positions(2, 9, "strict", mask, q.device)
    valid = valid if combine_heads else valid[:, None].expand_as(exact)
    drawn = ~torch.isnan(margins) & valid
    assert torch.equal(margins[~valid], torch.ones_like(margins[~valid]))
    torch.testing.assert_close(margins[drawn], exact[drawn], rtol=1e-12, atol=1e-12)
    per_seq = drawn.reshape(2, -1, 9)[:, 0].sum(1)
    assert per_seq.tolist() == [math.ceil(0.3 * 6), math.ceil(0.3 * 5)]
    # The support token among the drawn rows (NaN skipped), as the integrations search it.
    idx, val = support_token_argmin(margins, valid_positions(2, 9, "strict", mask, q.device))
    assert (idx >= 0).all()
    assert drawn.reshape(-1, 9).gather(1, idx.reshape(-1, 1)).all()
    torch.testing.assert_close(val, torch.where(drawn, margins, math.inf).amin(-1))


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_sampled(backend):
    torch._dynamo.reset()
    q, k, v, mask = make_inputs(dtype=torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step(q, k, v, mask):
        return margin_barrier_loss(q, k, v, key_padding_mask=mask, causal="strict",
                                   query_fraction=0.4, backend=backend, reduction="none")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(2)
    eager = step(q, k, v, mask)
    eager_grads = torch.autograd.grad(eager.sum(), (q, k, v))
    torch.manual_seed(2)
    out = compiled(q, k, v, mask)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    # The same global generator state: the same rows, the same estimate.
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (out != 0).sum() < (eager.new_ones(eager.shape) != 0).sum()


def test_compile_inductor_sampled_runs_without_graph_breaks():
    torch._dynamo.reset()
    q, k, v, mask = make_inputs(dtype=torch.float32)
    q.requires_grad_()

    def step(q, k, v, mask):
        return margin_barrier_loss(q, k, v, key_padding_mask=mask, query_fraction=0.5)

    out = torch.compile(step, fullgraph=True)(q, k, v, mask)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(q.grad).all()


# ---------------------------------------------------------------------------
# attach and the experiments
# ---------------------------------------------------------------------------


def _gpt2_batch(B=3, T=12):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0
    return idx, mask


@pytest.mark.parametrize("num_items", [None, "tensor"])
def test_attach_hf_gpt2_estimates_the_full_term(num_items):
    """Mean over 200 sampled forwards vs the full term (per-layer "mean", or the sum over
    num_items_in_batch as Trainer normalises)."""
    pytest.importorskip("transformers")
    from _integration_helpers import tiny_gpt2

    idx, mask = _gpt2_batch()
    extra = {} if num_items is None else {"num_items_in_batch": mask[:, 1:].sum()}
    model = tiny_gpt2()
    model.train()
    handle = barrier_ops.attach(model, 0.5, query_fraction=0.3, target_margin=1.2)
    assert handle.query_fraction == 0.3 and handle.options.query_fraction == 0.3
    terms = []
    torch.manual_seed(0)
    for _ in range(200):
        out = model(input_ids=idx, attention_mask=mask, labels=idx, **extra)
        terms.append(handle.stats.loss_term)
        for name, value in handle.stats.tensors().items():
            assert not torch.isnan(value).any(), f"{name} logged as NaN"
        assert torch.isfinite(out.loss)
    terms = torch.stack(terms)
    handle.query_fraction = 1.0
    model(input_ids=idx, attention_mask=mask, labels=idx, **extra)
    full = handle.stats.loss_term
    assert handle.stats.normalization == ("mean" if num_items is None else "num_items_in_batch")
    assert terms.std() > 0, "the sampled term varies between forwards"
    assert_unbiased(terms[:, None], full.reshape(1), "attach term")
    with pytest.raises(ValueError, match="query_fraction"):
        handle.query_fraction = 0.0
    barrier_ops.detach(model)
    with pytest.raises(ValueError, match="query_fraction"):
        barrier_ops.attach(model, 0.5, query_fraction=1.5)


def test_attach_nanogpt_sampled_trains_and_logs_drawn_rows():
    from _integration_helpers import tiny_nanogpt

    model = tiny_nanogpt()
    handle = barrier_ops.attach(model, 0.1, query_fraction=0.25, causal="strict")
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)
    scalars = handle.stats.scalars()
    assert all(math.isfinite(v) for v in scalars.values()), scalars
    for layer in handle.stats.layers:
        assert (layer.support_index >= 1).all()  # strict: never position 0


def test_experiment_config_and_cli_accept_query_fraction(tmp_path):
    from barrier_ops.experiments.config import ConfigError, from_dict, load_config
    from barrier_ops.experiments.train import build_parser, overrides_from_args

    cfg = from_dict({"barrier": {"query_fraction": 0.25}})
    assert cfg.barrier.query_fraction == 0.25
    assert from_dict({}).barrier.query_fraction == 1.0
    for bad in (0, 1.5, -0.1, True, "half"):
        with pytest.raises(ConfigError, match="query_fraction"):
            from_dict({"barrier": {"query_fraction": bad}})
    path = tmp_path / "c.yaml"
    path.write_text("barrier:\n  query_fraction: 0.5\n")
    args = build_parser().parse_args(["--config", str(path), "--query-fraction", "0.125"])
    assert load_config(args.config, overrides_from_args(args)).barrier.query_fraction == 0.125
    args = build_parser().parse_args(["--config", str(path)])
    assert load_config(args.config, overrides_from_args(args)).barrier.query_fraction == 0.5


def test_experiment_model_attaches_with_query_fraction_and_measures_exactly():
    from barrier_ops.experiments.config import from_dict
    from barrier_ops.experiments.model import CharGPT, attach_barrier, measuring

    cfg = from_dict({"barrier": {"query_fraction": 0.25}, "model": {"n_layer": 1, "n_head": 2,
                                                                    "n_embd": 8, "block_size": 16}})
    torch.manual_seed(0)
    model = CharGPT(11, cfg.model)
    handle = attach_barrier(model, cfg.barrier, 0.5)
    assert handle.query_fraction == 0.25
    with measuring(model):
        assert handle.query_fraction == 1.0
    assert handle.query_fraction == 0.25


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_attach_sampled_nanogpt_compiles_fullgraph_and_matches_eager_rows():
    """One graph with the draw inside; under aot_eager the global generator gives eager's rows."""
    import copy

    from _integration_helpers import tiny_nanogpt

    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_nanogpt()
    compiled_model = copy.deepcopy(model)
    barrier_ops.attach(model, 0.3, coupling="weights", query_fraction=0.25)
    handle = barrier_ops.attach(compiled_model, 0.3, coupling="weights", query_fraction=0.25)
    torch.manual_seed(5)
    _, loss = model(idx, idx)
    loss.backward()
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    _, closs = compiled(idx, idx)
    closs.backward()
    torch.testing.assert_close(closs, loss, rtol=0, atol=1e-9)
    for name, g in _grads(model).items():
        torch.testing.assert_close(_grads(compiled_model)[name], g, rtol=1e-7, atol=1e-9)
    assert all(math.isfinite(v) for v in handle.stats.scalars().values())
    explanation = torch._dynamo.explain(lambda i, t: compiled_model(i, t)[1])(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_attach_sampled_with_activation_checkpointing_draws_the_same_rows():
    """The recomputation in the backward restores the RNG state: the same rows, the same gradients."""
    pytest.importorskip("transformers")
    import copy

    from _integration_helpers import tiny_llama

    idx, mask = _gpt2_batch()
    model = tiny_llama()
    ckpt = copy.deepcopy(model)
    barrier_ops.attach(model, 0.3, query_fraction=0.3)
    barrier_ops.attach(ckpt, 0.3, query_fraction=0.3)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(), ckpt.train()
    torch.manual_seed(9)
    loss = model(input_ids=idx, attention_mask=mask, labels=idx).loss
    loss.backward()
    torch.manual_seed(9)
    closs = ckpt(input_ids=idx, attention_mask=mask, labels=idx).loss
    closs.backward()
    torch.testing.assert_close(closs, loss, rtol=0, atol=1e-9)
    grads, cgrads = _grads(model), _grads(ckpt)
    assert grads.keys() == cgrads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(cgrads[name], g, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,combine_heads,reduction", [
    (True, False, "mean"), ("strict", True, "sum"), (False, False, "none"), ("strict", False, "none"),
])
def test_fixed_row_sets_against_the_reference(backend, causal, combine_heads, reduction):
    """The op with a row set (empty slots, invalid and repeated positions, any order) vs the
    pure-PyTorch reference (its own kappa, slot counts in loops): values and q/k/v gradients."""
    from barrier_ops.reference import margin_barrier_loss_reference

    q, k, v, mask = make_inputs(Hkv=1)
    coupling = torch.tensor([0.7, -1.3], dtype=torch.float64)
    rows = torch.tensor([[8, -1, 0, 3, 3, 5], [-1, -1, 2, 6, 4, 8]])  # b1: 0-2 padded; b0: 7-8 padded
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    got = _margin_barrier_loss_impl(*a, coupling, 0.4, CAUSAL[causal], mask, combine_heads, 1e-2, 1.3,
                                    reduction, backend, rows)
    want = margin_barrier_loss_reference(*b, coupling=coupling, scale=0.4, causal=causal,
                                         key_padding_mask=mask, combine_heads=combine_heads,
                                         target_margin=1.3, reduction=reduction, query_positions=rows)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert want.abs().sum() > 0
    for ga, gb in zip(torch.autograd.grad(got.sum(), a), torch.autograd.grad(want.sum(), b)):
        torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-11)
