"""attach with the training libraries users combine it with: TRL's SFTTrainer, PEFT (LoRA), Lightning.

Each library is optional (``pip install 'barrier-ops[integrations]'``); its
tests skip only when it is not installed. Tiny models built from configs,
tokenizers built in memory, no downloads.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import barrier_ops
import _integration_helpers as H
from _cases import assert_grads_close

WEIGHT = 0.5


def _barrier_messages(caught):
    return [str(w.message) for w in caught if str(w.message).startswith("barrier_ops")]


# ---------------------------------------------------------------------------
# TRL SFTTrainer
# ---------------------------------------------------------------------------


def _char_tokenizer():
    """A character-level tokenizer built in memory (no hub download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{chr(97 + i): i + 2 for i in range(26)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _sft_trainer(model, tmp_path, accumulation=1, batch=4, peft_config=None):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(2, 28, (n,), generator=g).tolist()} for n in (12, 7, 9, 5)]
    args = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, bf16=False, fp16=False, dataloader_drop_last=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=_char_tokenizer(), peft_config=peft_config)


def _sft_step(trainer, model, num_items_in_batch=None):
    """One Trainer.training_step on the first batch; (returned loss, gradients, the batch)."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step reads it
    loss = trainer.training_step(model, dict(batch), num_items_in_batch)
    return loss, H.grads(model), batch


@pytest.mark.parametrize("normalised", [False, True], ids=["mean", "num_items_in_batch"])
def test_trl_sft_loss_and_gradients_get_the_term(tmp_path, normalised):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    base = H.tiny_llama(dtype=torch.float32)
    plain = copy.deepcopy(base)
    attached = copy.deepcopy(base)
    handle = barrier_ops.attach(attached, WEIGHT)
    plain_trainer = _sft_trainer(plain, tmp_path / "plain")
    trainer = _sft_trainer(attached, tmp_path / "attached")
    plain_loss, plain_grads, batch = _sft_step(plain_trainer, plain)
    labels = batch["labels"]
    num_items = int(labels[:, 1:].ne(-100).sum()) if normalised else None
    if normalised:
        plain_loss, plain_grads, _ = _sft_step(plain_trainer, plain, num_items)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, grads, _ = _sft_step(trainer, attached, num_items)
        loss2, _, _ = _sft_step(trainer, attached, num_items)  # a second step: the first term trained
    assert _barrier_messages(caught) == []
    # The oracle: the reference barrier on q, k, v captured from an un-attached copy.
    oracle = copy.deepcopy(base)
    _, term, _ = H.hf_oracle(
        oracle, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels,
        weight=WEIGHT, reduction="sum" if normalised else "mean", num_items_in_batch=num_items,
    )
    assert handle.stats.normalization == ("num_items_in_batch" if normalised else "mean")
    assert term.abs() > 1e-2
    torch.testing.assert_close(loss, plain_loss + term.detach(), rtol=1e-5, atol=1e-5)
    oracle.zero_grad()
    term.backward()
    barrier_grads = H.grads(oracle)
    want = {name: g + barrier_grads.get(name, torch.zeros_like(g)) for name, g in plain_grads.items()}
    assert_grads_close(grads, want, 1e-4)


def test_trl_sft_train_logs_the_term_it_trains_with(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    base = H.tiny_llama(dtype=torch.float32)
    runs = {}
    for attach in (False, True):
        model = copy.deepcopy(base)
        if attach:
            barrier_ops.attach(model, WEIGHT)
        trainer = _sft_trainer(model, tmp_path / str(attach), accumulation=2, batch=2)
        if attach:
            barrier_ops.integrations.add_stats_callback(trainer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        assert _barrier_messages(caught) == []
        runs[attach] = (model, [e for e in trainer.state.log_history if "loss" in e][0])
    (plain, plain_log), (model, log) = runs[False], runs[True]
    assert "barrier/loss_term" in log and abs(log["barrier/loss_term"]) > 1e-2
    assert log["loss"] > plain_log["loss"] + 0.5 * abs(log["barrier/loss_term"])  # the logged loss has it
    moved = (model.model.layers[0].self_attn.q_proj.weight - plain.model.layers[0].self_attn.q_proj.weight)
    assert moved.abs().max() > 1e-3  # and the update differs


def test_trl_sft_with_peft_config_trains_the_adapters_with_the_term(tmp_path):
    """attach, then SFTTrainer(peft_config=...) wraps the attached model in LoRA."""
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    from peft import LoraConfig

    base = H.tiny_llama(dtype=torch.float32)
    results = {}
    for attach in (False, True):
        model = copy.deepcopy(base)
        handle = barrier_ops.attach(model, WEIGHT, coupling="weights") if attach else None
        torch.manual_seed(5)  # the same LoRA init in both runs
        trainer = _sft_trainer(model, tmp_path / str(attach), peft_config=LoraConfig(
            r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
        assert type(trainer.model).__name__ == "PeftModel"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, grads, _ = _sft_step(trainer, trainer.model)
        assert _barrier_messages(caught) == []
        results[attach] = (loss, grads, handle)
    (plain_loss, plain_grads, _), (loss, grads, handle) = results[False], results[True]
    assert handle.stats.loss_term.abs() > 1e-2
    torch.testing.assert_close(loss, plain_loss + handle.stats.loss_term.float(), rtol=1e-5, atol=1e-5)
    lora_b = [name for name in grads if "q_proj.lora_B" in name]
    assert lora_b and all((grads[n] - plain_grads[n]).abs().max() > 1e-3 for n in lora_b)


# ---------------------------------------------------------------------------
# PEFT
# ---------------------------------------------------------------------------


def _lora(model, targets=("q_proj", "o_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    # init_lora_weights=False: B != 0, so the adapters change the weights from the start.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    return get_peft_model(model, config)


def _padded_batch():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    return idx, mask, idx.masked_fill(mask == 0, -100)


def _merged_term(peft_model, idx, mask, labels, coupling):
    merged = copy.deepcopy(peft_model)
    if barrier_ops.get_handle(merged) is not None:
        barrier_ops.detach(merged)
    merged = merged.merge_and_unload()
    handle = barrier_ops.attach(merged, WEIGHT, coupling=coupling)
    merged(input_ids=idx, attention_mask=mask, labels=labels)
    return handle.stats.loss_term


@pytest.mark.parametrize("when", ["after", "before"])
def test_peft_weights_coupling_uses_the_adapted_weights(when):
    pytest.importorskip("peft")
    idx, mask, labels = _padded_batch()
    base = H.tiny_llama()
    if when == "before":  # attach, then PEFT wraps the attached model
        model = copy.deepcopy(base)
        handle = barrier_ops.attach(model, WEIGHT, coupling="weights")
        peft_model = _lora(model)
    else:
        peft_model = _lora(copy.deepcopy(base))
        handle = barrier_ops.attach(peft_model, WEIGHT, coupling="weights")
    assert barrier_ops.get_handle(peft_model) is handle
    assert handle.layer_names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    out = peft_model(input_ids=idx, attention_mask=mask, labels=labels)
    term = handle.stats.loss_term
    # Equal to the term of the merged model (W0 + scaling * B A as plain weights).
    torch.testing.assert_close(term, _merged_term(peft_model, idx, mask, labels, "weights"), rtol=0, atol=1e-10)
    # ... and not the frozen base weights' term.
    frozen = copy.deepcopy(base)
    frozen_handle = barrier_ops.attach(frozen, WEIGHT, coupling="weights")
    frozen(input_ids=idx, attention_mask=mask, labels=labels)
    assert (term - frozen_handle.stats.loss_term).abs() > 1e-3
    # The barrier's gradient reaches the adapters, and training them moves the coupling (re-read per forward).
    out.loss.backward()
    lora_b = peft_model.base_model.model.model.layers[1].self_attn.o_proj.lora_B["default"].weight
    assert lora_b.grad is not None and lora_b.grad.abs().max() > 0
    with torch.no_grad():
        lora_b.add_(0.5)
    peft_model(input_ids=idx, attention_mask=mask, labels=labels)
    moved = handle.stats.loss_term
    assert (moved - term).abs() > 1e-6
    torch.testing.assert_close(moved, _merged_term(peft_model, idx, mask, labels, "weights"), rtol=0, atol=1e-10)


def test_peft_identity_loss_and_gradients_match_the_reference():
    pytest.importorskip("peft")
    idx, mask, labels = _padded_batch()
    peft_model = _lora(H.tiny_llama())
    oracle = copy.deepcopy(peft_model)
    ce, term, _ = H.hf_oracle(oracle.get_base_model(), input_ids=idx, attention_mask=mask, labels=labels,
                              weight=WEIGHT)
    barrier_ops.attach(peft_model, WEIGHT)
    out = peft_model(input_ids=idx, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, (ce + term).float(), rtol=1e-6, atol=1e-6)
    out.loss.backward()
    (ce + term).backward()
    assert_grads_close(H.grads(peft_model), H.grads(oracle), 1e-5)
    # The same handle from the PEFT model, its tuner and the base model inside.
    handle = barrier_ops.get_handle(peft_model)
    assert barrier_ops.get_handle(peft_model.base_model) is handle
    assert barrier_ops.get_handle(peft_model.get_base_model()) is handle
    barrier_ops.detach(peft_model.base_model)
    assert barrier_ops.get_handle(peft_model) is None


def test_peft_dora_and_other_adapters_are_refused_with_weights_coupling():
    pytest.importorskip("peft")
    from peft import IA3Config, LoraConfig, get_peft_model

    dora = get_peft_model(H.tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        barrier_ops.attach(dora, WEIGHT, coupling="weights")
    ia3 = get_peft_model(H.tiny_llama(), IA3Config(target_modules=["q_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="only LoRA adapters"):
        barrier_ops.attach(ia3, WEIGHT, coupling="weights")
    barrier_ops.attach(ia3, WEIGHT)  # identity coupling needs only q, k, v


# ---------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------


def test_lightning_training_step_with_its_own_ce_and_the_term():
    L = pytest.importorskip("lightning")

    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 64, (2, 4, 16), generator=g)  # 2 steps of batch 4
    targets = torch.randint(0, 64, (2, 4, 16), generator=g)

    class LitGPT(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.barrier = barrier_ops.attach(model, WEIGHT, coupling="weights")

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits, _ = self.model(x, y)
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            loss = ce + self.barrier.term()  # <- the custom-loss pattern
            self.log("barrier/loss_term", self.barrier.stats.loss_term)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    base = H.tiny_nanogpt()
    reference = H.clone(base)
    barrier_ops.attach(reference, WEIGHT, coupling="weights")
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(2):  # the model's own loss (CE + term), plain PyTorch
        optimizer.zero_grad()
        reference(idx[step], targets[step])[1].backward()
        optimizer.step()

    module = LitGPT(H.clone(base))
    loader = torch.utils.data.DataLoader(list(zip(idx, targets)), batch_size=None)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, precision="64-true")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    assert _barrier_messages(caught) == []
    for (name, got), want in zip(module.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=name)


@pytest.mark.slow
def test_trl_example_runs(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import trl_sft  # examples/ is on sys.path via _integration_helpers

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = trl_sft.main(["--steps", "1", "--seq-len", "16", "--output-dir", str(tmp_path)])
    assert _barrier_messages(caught) == []
    assert any("barrier/loss_term" in e for e in trainer.state.log_history)


def test_hf_trainer_label_smoothing_gets_the_term(tmp_path):
    """Trainer's label smoother pops the labels: the model returns no loss, the trainer's loss gets the term."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    idx, mask, labels = _padded_batch()
    rows = [{"input_ids": idx[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(3)]
    base = H.tiny_llama(dtype=torch.float32)
    results = {}
    for attach in (False, True):
        model = copy.deepcopy(base)
        handle = barrier_ops.attach(model, WEIGHT) if attach else None
        args = TrainingArguments(output_dir=str(tmp_path / str(attach)), per_device_train_batch_size=3,
                                 label_smoothing_factor=0.1, report_to=[], use_cpu=True, save_strategy="no",
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        model.train()
        trainer.current_gradient_accumulation_steps = 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = trainer.training_step(model, dict(batch), None)
            trainer.training_step(model, dict(batch), None)
        assert _barrier_messages(caught) == []
        results[attach] = (loss, handle)
    (plain, _), (loss, handle) = results[False], results[True]
    assert handle.stats.loss_term.abs() > 1e-2
    torch.testing.assert_close(loss, plain + handle.stats.loss_term.float(), rtol=1e-5, atol=1e-5)
