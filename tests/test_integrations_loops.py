"""attach in training loops that compute their own loss, and the handle's per-forward state.

* ``handle.term()``: a custom loss (CE from the logits + term) trains exactly
  like the model's own loss (same value, same gradients);
* nothing silently lost: a training forward whose term never entered a
  backward is warned about once; so is a term counted twice; loops that use
  the term, eval, ``no_grad`` and generation get no warning;
* eval forwards do not add the term (``term_in_eval`` keeps the old behaviour);
* deep copies and pickles are independent attached models;
* concurrent forwards on one model, a layer called twice per forward;
* torch.compile: as many graphs with attach as without.
"""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import barrier_ops
import _integration_helpers as H
from _cases import assert_grads_close

TOL = 1e-10
WEIGHT = 0.3


def _batch(B=3, T=12, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def _padded_batch(B=3, T=12, seed=1, lengths=(12, 7, 9)):
    idx, _ = _batch(B, T, seed=seed)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return idx, mask, idx.masked_fill(mask == 0, -100)


def _hf_ce(logits, labels):
    """The causal-LM cross-entropy a user writes: shift, ignore -100, mean over the real targets."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def _nanogpt_ce(logits, targets):
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


@pytest.fixture
def barrier_warnings():
    """``messages()``: the barrier_ops warnings raised so far in the test, as strings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lambda: [str(w.message) for w in caught if str(w.message).startswith("barrier_ops")]


# ---------------------------------------------------------------------------
# handle.term(): custom losses
# ---------------------------------------------------------------------------


def test_nanogpt_custom_loss_with_term_trains_like_the_model_loss():
    idx, targets = _batch()
    model = H.tiny_nanogpt()
    custom = H.clone(model)
    barrier_ops.attach(model, WEIGHT, coupling="weights")
    handle = barrier_ops.attach(custom, WEIGHT, coupling="weights")
    _, loss = model(idx, targets)
    loss.backward()
    logits, _ = custom(idx, targets)  # the returned loss is ignored: the loop builds its own
    mine = _nanogpt_ce(logits, targets) + handle.term()
    mine.backward()
    torch.testing.assert_close(mine, loss, rtol=0, atol=TOL)
    assert_grads_close(H.grads(custom), H.grads(model), 1e-12)
    # The same tensor on every call for one forward.
    assert handle.term() is handle.term()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_custom_loss_with_term_matches_the_labels_path(arch):
    pytest.importorskip("transformers")
    idx, mask, labels = _padded_batch()
    build = {"gpt2": H.tiny_gpt2, "llama": H.tiny_llama}[arch]
    model = build()
    custom = H.clone(model)
    barrier_ops.attach(model, WEIGHT, coupling="weights")
    handle = barrier_ops.attach(custom, WEIGHT, coupling="weights")
    want = model(input_ids=idx, attention_mask=mask, labels=labels).loss
    want.backward()
    out = custom(input_ids=idx, attention_mask=mask)  # no labels: no loss, the loop computes it
    assert out.loss is None
    got = _hf_ce(out.logits, labels) + handle.term()
    got.backward()
    torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=1e-6)  # the HF loss is float32
    assert_grads_close(H.grads(custom), H.grads(model), 1e-6)


def test_term_before_any_forward_raises_and_eval_term_is_zero():
    model = H.tiny_nanogpt()
    handle = barrier_ops.attach(model, WEIGHT)
    with pytest.raises(RuntimeError, match="no forward"):
        handle.term()
    idx, targets = _batch()
    model.eval()
    with torch.no_grad():
        model(idx, targets)
    assert float(handle.term()) == 0.0  # eval adds nothing, so the custom loss gets nothing either
    model.train()
    model(idx, targets)
    assert handle.term().requires_grad
    # A training-mode forward under no_grad (a metrics pass) does not replace the training term.
    term = handle.term()
    with torch.no_grad():
        model(idx[:1], targets[:1])
    assert handle.term() is term


# ---------------------------------------------------------------------------
# Nothing silently lost
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["nanogpt", "llama"])
def test_custom_loss_without_the_term_warns_once(barrier_warnings, arch):
    idx, targets = _batch()
    if arch == "llama":
        pytest.importorskip("transformers")
        model = H.tiny_llama()
        barrier_ops.attach(model, WEIGHT)
        for _ in range(3):
            logits = model(input_ids=idx).logits
            F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    else:
        model = H.tiny_nanogpt()
        barrier_ops.attach(model, WEIGHT)
        for _ in range(3):
            logits, _ = model(idx, targets)
            _nanogpt_ce(logits, targets).backward()
    lost = [w for w in barrier_warnings() if "never entered a backward" in w]
    assert len(lost) == 1
    assert "term()" in lost[0] and "docs/integrations.md" in lost[0]


def test_term_counted_twice_warns(barrier_warnings):
    idx, targets = _batch()
    model = H.tiny_nanogpt()
    handle = barrier_ops.attach(model, WEIGHT)
    for _ in range(2):
        _, loss = model(idx, targets)
        (loss + handle.term()).backward()
    assert [w for w in barrier_warnings() if "twice" in w]


def test_loops_that_use_the_term_eval_no_grad_and_generate_do_not_warn(barrier_warnings):
    idx, targets = _batch()
    model = H.tiny_nanogpt()
    handle = barrier_ops.attach(model, WEIGHT)
    for _ in range(2):  # the model's own loss
        model(idx, targets)[1].backward()
    for _ in range(2):  # a custom loss with the term, gradient accumulation included
        for part in (slice(0, 2), slice(2, 3)):
            logits, _ = model(idx[part], targets[part])
            ((_nanogpt_ce(logits, targets[part]) + handle.term()) / 2).backward()
    model.eval()  # estimate_loss
    with torch.no_grad():
        model(idx, targets)
    model.train()
    with torch.no_grad():  # training-mode no_grad forwards
        model(idx, targets)
    model(idx, targets)[1].backward()
    assert barrier_warnings() == []


def test_hf_generate_does_not_warn(barrier_warnings):
    pytest.importorskip("transformers")
    model = H.tiny_gpt2()
    barrier_ops.attach(model, WEIGHT)
    idx, _ = _batch(B=1, T=5)
    model.train()
    model(input_ids=idx, labels=idx).loss.backward()
    model.eval()
    model.generate(idx, max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.generate(idx, max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.train()
    model(input_ids=idx, labels=idx).loss.backward()
    assert barrier_warnings() == []


# ---------------------------------------------------------------------------
# Eval
# ---------------------------------------------------------------------------


def test_eval_loss_is_the_plain_loss_and_stats_are_recorded():
    idx, targets = _batch()
    model = H.tiny_nanogpt()
    with torch.no_grad():
        _, plain = model(idx, targets)
    handle = barrier_ops.attach(model, WEIGHT)
    model.eval()
    with torch.no_grad():
        _, val = model(idx, targets)
    assert torch.equal(val, plain)  # estimate_loss / best_val_loss see the cross-entropy only
    assert handle.stats.penalty is not None and not handle.stats.added and len(handle.stats.layers) == 2
    model.train()
    _, train = model(idx, targets)
    assert handle.stats.added
    torch.testing.assert_close(train - handle.stats.loss_term, plain, rtol=0, atol=TOL)


def test_term_in_eval_keeps_the_old_behaviour():
    idx, targets = _batch()
    model = H.tiny_nanogpt()
    with torch.no_grad():
        _, plain = model(idx, targets)
    handle = barrier_ops.attach(model, WEIGHT, term_in_eval=True)
    assert "term_in_eval=True" in repr(handle)
    model.eval()
    with torch.no_grad():
        _, val = model(idx, targets)
    assert handle.stats.added
    torch.testing.assert_close(val, plain + handle.stats.loss_term, rtol=0, atol=TOL)
    with pytest.raises(TypeError, match="term_in_eval"):
        barrier_ops.attach(H.tiny_nanogpt(), term_in_eval=1)


def test_hf_eval_loss_excludes_the_term():
    pytest.importorskip("transformers")
    idx, mask, labels = _padded_batch()
    model = H.tiny_llama()
    with torch.no_grad():
        plain = model(input_ids=idx, attention_mask=mask, labels=labels).loss
    handle = barrier_ops.attach(model, WEIGHT)
    model.eval()
    with torch.no_grad():
        val = model(input_ids=idx, attention_mask=mask, labels=labels).loss
    assert torch.equal(val, plain) and handle.stats.loss_term.abs() > 1e-4


# ---------------------------------------------------------------------------
# Copies
# ---------------------------------------------------------------------------


def _nanogpt_loss_and_term(model, idx, targets):
    _, loss = model(idx, targets)
    return loss.detach(), barrier_ops.get_handle(model).stats.loss_term


def test_nanogpt_deepcopy_is_an_independent_attached_model():
    idx, targets = _batch()
    model = H.tiny_nanogpt()
    ce, term, _ = H.nanogpt_oracle(H.clone(model), idx, targets, weight=WEIGHT, coupling="weights")
    handle = barrier_ops.attach(model, WEIGHT, coupling="weights")
    twin = copy.deepcopy(model)
    twin_handle = barrier_ops.get_handle(twin)
    assert twin_handle is not None and twin_handle is not handle and twin_handle.model is twin
    # The copy's forward is recorded in the copy's handle, not the original's.
    handle.stats = barrier_ops.integrations.BarrierStats()
    loss, _ = _nanogpt_loss_and_term(twin, idx, targets)
    assert handle.stats.penalty is None and twin_handle.stats.penalty is not None
    torch.testing.assert_close(loss, (ce + term).detach(), rtol=0, atol=TOL)
    # Training the copy (an EMA / teacher update) moves the copy's coupling only.
    with torch.no_grad():
        twin.transformer.h[0].attn.c_proj.weight.mul_(1.5)
    torch.testing.assert_close(_nanogpt_loss_and_term(model, idx, targets)[0], (ce + term).detach(), rtol=0, atol=TOL)
    # detach(copy) leaves the original attached, with the term counted once.
    barrier_ops.detach(twin)
    assert barrier_ops.get_handle(twin) is None and barrier_ops.get_handle(model) is handle
    assert not twin._forward_hooks and not any(m._forward_hooks for m in twin.modules())
    torch.testing.assert_close(_nanogpt_loss_and_term(model, idx, targets)[0], (ce + term).detach(), rtol=0, atol=TOL)
    barrier_ops.attach(twin, WEIGHT, coupling="weights")
    torch.testing.assert_close(_nanogpt_loss_and_term(model, idx, targets)[0], (ce + term).detach(), rtol=0, atol=TOL)


def test_hf_deepcopy_has_its_own_term_and_detach_stays_on_the_copy():
    pytest.importorskip("transformers")
    idx, mask, labels = _padded_batch()
    model = H.tiny_llama()
    ce, term, _ = H.hf_oracle(H.clone(model), input_ids=idx, attention_mask=mask, labels=labels, weight=WEIGHT)
    handle = barrier_ops.attach(model, WEIGHT)
    twin = copy.deepcopy(model)
    twin_handle = barrier_ops.get_handle(twin)
    assert twin_handle is not handle
    out = twin(input_ids=idx, attention_mask=mask, labels=labels)
    torch.testing.assert_close(twin_handle.stats.loss_term, term.detach(), rtol=0, atol=TOL)
    torch.testing.assert_close(out.loss, (ce + term).detach().float(), rtol=1e-6, atol=1e-6)
    assert handle.stats.penalty is None
    barrier_ops.detach(twin)
    assert twin.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "barrier_sdpa" and barrier_ops.get_handle(model) is handle
    with torch.no_grad():
        assert torch.equal(twin(input_ids=idx, attention_mask=mask, labels=labels).loss, ce.detach())


def test_pickle_and_torch_save_give_an_attached_model():
    idx, targets = _batch()
    model = H.tiny_nanogpt()
    barrier_ops.attach(model, WEIGHT, coupling="weights")
    want, _ = _nanogpt_loss_and_term(model, idx, targets)
    for restored in (pickle.loads(pickle.dumps(model)), _torch_roundtrip(model)):
        handle = barrier_ops.get_handle(restored)
        assert handle is not None and handle.model is restored
        got, _ = _nanogpt_loss_and_term(restored, idx, targets)
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)
        barrier_ops.detach(restored)
        assert barrier_ops.get_handle(model) is not None


def _torch_roundtrip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_hf_pickle_loads_in_a_fresh_process(tmp_path):
    pytest.importorskip("transformers")
    model = H.tiny_llama()
    barrier_ops.attach(model, WEIGHT)
    idx, mask, labels = _padded_batch()
    want = float(model(input_ids=idx, attention_mask=mask, labels=labels).loss)
    path = tmp_path / "model.pt"
    torch.save({"model": model, "batch": (idx, mask, labels)}, path)
    # A process that never attached anything: "barrier_sdpa" must be registered by the unpickling.
    code = (
        "import sys, torch, barrier_ops\n"
        f"d = torch.load({str(path)!r}, weights_only=False)\n"
        "idx, mask, labels = d['batch']\n"
        "m = d['model']\n"
        "assert barrier_ops.get_handle(m) is not None\n"
        "print(float(m(input_ids=idx, attention_mask=mask, labels=labels).loss))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------------
# Threads, repeated layers
# ---------------------------------------------------------------------------


def test_concurrent_forwards_on_one_model_do_not_mix():
    model = H.tiny_nanogpt()
    barrier_ops.attach(model, WEIGHT)
    batches = [_batch(B=2, T=16, seed=s) for s in range(2)]
    with torch.no_grad():
        want = [model(idx, targets)[1] for idx, targets in batches]
    assert (want[0] - want[1]).abs() > 1e-3
    rounds = 40
    wrong = [0, 0]
    start = threading.Barrier(2)

    def run(i):
        idx, targets = batches[i]
        start.wait()
        for _ in range(rounds):
            with torch.no_grad():
                _, loss = model(idx, targets)
            wrong[i] += int(not torch.allclose(loss, want[i], rtol=0, atol=1e-12))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [0, 0], f"{sum(wrong)} of {2 * rounds} forwards got another thread's barrier"


def test_a_layer_called_twice_gets_distinct_stats_keys():
    idx, targets = _batch()
    model = H.tiny_nanogpt(n_layer=1)
    block = model.transformer.h[0]
    model.transformer.h = torch.nn.ModuleList([block, block])  # weight sharing across depth
    oracle = H.clone(model)
    handle = barrier_ops.attach(model, WEIGHT)
    assert handle.layer_names == ["transformer.h.0.attn"]
    _, loss = model(idx, targets)
    ce, term, barriers = H.nanogpt_oracle(oracle, idx, targets, weight=WEIGHT)
    # The oracle hooks c_attn once per entry of transformer.h: each call is captured twice.
    assert len(barriers) == 4
    barriers = barriers[0::2]
    assert len(barriers) == 2 and (barriers[0] - barriers[1]).abs() > 1e-6
    torch.testing.assert_close(loss, ce + term, rtol=0, atol=TOL)
    names = [s.name for s in handle.stats.layers]
    assert names == ["transformer.h.0.attn", "transformer.h.0.attn#1"]
    scalars = handle.stats.scalars()
    assert scalars["barrier/transformer.h.0.attn/barrier"] == pytest.approx(float(barriers[0]), abs=1e-12)
    assert scalars["barrier/transformer.h.0.attn#1/barrier"] == pytest.approx(float(barriers[1]), abs=1e-12)


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------


def _graphs(fn, steps=2):
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    fn(counter, steps)
    torch._dynamo.reset()
    return counter.frame_count


@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()"])
def test_compiled_model_has_as_many_graphs_with_attach_as_without(how):
    idx, targets = _batch()

    def count(attached):
        model = H.tiny_nanogpt()
        if attached:
            barrier_ops.attach(model, WEIGHT)

        def run(counter, steps):
            if how == "model.compile()":
                model.compile(backend=counter)
                call = model
            else:
                call = torch.compile(model, backend=counter)
            for _ in range(steps):
                call(idx, targets)[1].backward()

        return _graphs(run)

    assert count(False) == 1
    assert count(True) == 1


def test_compiled_training_step_with_term_is_one_graph_and_matches_eager():
    idx, targets = _batch()
    model = H.tiny_nanogpt()
    reference = H.clone(model)
    handle = barrier_ops.attach(model, WEIGHT, coupling="weights")
    barrier_ops.attach(reference, WEIGHT, coupling="weights")

    def step(i, t):
        logits, _ = model(i, t)
        return _nanogpt_ce(logits, t) + handle.term()

    losses = []

    def run(counter, steps):
        compiled = torch.compile(step, backend=counter, fullgraph=True)
        for _ in range(steps):
            model.zero_grad()
            loss = compiled(idx, targets)
            loss.backward()
            losses.append(loss.detach())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _graphs(run) == 1
    assert not [w for w in caught if str(w.message).startswith("barrier_ops")]
    want = reference(idx, targets)[1]
    want.backward()
    torch.testing.assert_close(losses[-1], want.detach(), rtol=0, atol=TOL)
    assert_grads_close(H.grads(model), H.grads(reference), 1e-12)


# ---------------------------------------------------------------------------
# HF integer masks, the example
# ---------------------------------------------------------------------------


def test_hf_integer_padding_masks_reach_the_ops_as_bool():
    from barrier_ops.integrations._core import padding_from_attention_mask

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # HF's attention_mask: int64, 1 = real
    got = padding_from_attention_mask(mask, 2, 4)
    assert got.dtype == torch.bool and torch.equal(got, mask.bool())
    # The last T columns when the mask covers a cache as well (flash-attention style).
    assert torch.equal(padding_from_attention_mask(torch.ones(2, 6, dtype=torch.long), 2, 4), torch.ones(2, 4).bool())


@pytest.mark.slow
def test_custom_loss_example_runs():
    pytest.importorskip("transformers")
    import custom_loss  # examples/ is on sys.path via _integration_helpers

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, handle = custom_loss.main(["--steps", "2", "--seq-len", "16", "--batch-size", "2"])
    assert not [w for w in caught if str(w.message).startswith("barrier_ops")]
    assert handle.stats.penalty is not None and barrier_ops.get_handle(model) is handle


def test_readme_attach_snippet_runs_and_trains_with_the_term():
    pytest.importorskip("transformers")
    import os
    import re

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    usage = open(readme, encoding="utf-8").read().split("## Usage", 1)[1].split("\n## ", 1)[0]
    code = [block for block in re.findall(r"```python\n(.*?)```", usage, re.S) if "attach(" in block][0]
    model = H.tiny_llama()
    reference = H.clone(model)
    batches = [_batch(B=2, T=10, seed=s) for s in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(code, {"barrier_ops": barrier_ops, "torch": torch, "model": model, "batches": batches})
    assert not [w for w in caught if str(w.message).startswith("barrier_ops")]
    # The same two backward passes with the term computed by the reference barrier.
    for input_ids, targets in batches:
        ce_ref, term, logits = H.hf_oracle(reference, input_ids=input_ids, attention_mask=None, labels=None,
                                           weight=0.02)
        (F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + term).backward()
    assert_grads_close(H.grads(model), H.grads(reference), 1e-6)


def test_two_forwards_before_one_backward_do_not_warn(barrier_warnings):
    """Both model losses enter one backward (two views, a policy and its KL pass): nothing is lost."""
    idx, targets = _batch()
    model = H.tiny_nanogpt()
    barrier_ops.attach(model, WEIGHT)
    for _ in range(3):
        _, first = model(idx[:2], targets[:2])
        _, second = model(idx[1:], targets[1:])
        (first + second).backward()
    assert barrier_warnings() == []
    # ... while the same loop on custom losses without the term is caught.
    for _ in range(2):
        logits, _ = model(idx[:2], targets[:2])
        logits2, _ = model(idx[1:], targets[1:])
        (_nanogpt_ce(logits, targets[:2]) + _nanogpt_ce(logits2, targets[1:])).backward()
    assert len([w for w in barrier_warnings() if "never entered a backward" in w]) == 1


@pytest.mark.parametrize("use_term", [False, True])
def test_compiled_model_custom_loss_is_checked_too(use_term, barrier_warnings):
    """torch.compile(model): the forward runs compiled, the hooks eagerly; the next forward decides."""
    import torch._dynamo.testing

    idx, targets = _batch()
    model = H.tiny_nanogpt()
    handle = barrier_ops.attach(model, WEIGHT)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=torch._dynamo.testing.CompileCounter())
    for _ in range(3):
        logits, _ = compiled(idx, targets)
        loss = _nanogpt_ce(logits, targets)
        (loss + handle.term() if use_term else loss).backward()
    torch._dynamo.reset()
    lost = [w for w in barrier_warnings() if "never entered a backward" in w]
    assert len(lost) == (0 if use_term else 1)


def test_checkpoint_recomputation_on_another_thread_matches():
    """CUDA runs the backward (and so the checkpoint's recomputation) on autograd's device thread;
    a backward called from another Python thread does the same on CPU."""
    pytest.importorskip("transformers")
    idx, mask, labels = _padded_batch()
    kwargs = {"num_items_in_batch": labels[:, 1:].ne(-100).sum()}
    model = H.tiny_llama()
    ckpt = H.clone(model)
    barrier_ops.attach(model, WEIGHT, coupling="weights")
    barrier_ops.attach(ckpt, WEIGHT, coupling="weights")
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(), ckpt.train()
    model(input_ids=idx, attention_mask=mask, labels=labels, **kwargs).loss.backward()
    loss = ckpt(input_ids=idx, attention_mask=mask, labels=labels, **kwargs).loss
    errors = []

    def backward():
        try:
            loss.backward()
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    worker = threading.Thread(target=backward)
    worker.start()
    worker.join()
    assert not errors, errors
    assert_grads_close(H.grads(ckpt), H.grads(model), 1e-9)
