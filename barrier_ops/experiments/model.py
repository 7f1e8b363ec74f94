"""A small pre-LN nanoGPT-style character GPT, regularised through ``barrier_ops.attach``.

Each layer's attention output goes through ``F.scaled_dot_product_attention``
and hands the *same* q, k, v to the attached barrier
(:func:`barrier_ops.integrations.chargpt.record_qkv`; a no-op when nothing is
attached). The model itself knows nothing about couplings or barrier ops:
:func:`attach_barrier` attaches the product (``barrier_ops.attach``) with the
experiment's options, the handle adds ``lambda_m * mean_l barrier_l`` to
``ModelOutput.loss`` and fills ``ModelOutput.penalty`` (and ``margins`` when
asked for), so the paper's "margin" objective is ``out.loss``.

Coupling (``barrier.coupling``, the names of ``barrier_ops.attach``):
    "weights" (default; the old config name "exact" is accepted as an alias):
        A_h = W_Q^h W_O^h, the map through which a change in head h's output
        moves the residual stream and then that head's query (LayerNorm in
        between is ignored), so kappa is the trace of the layer's diagonal
        Jacobian block. Gradients flow into W_Q and W_O through A_h.
    "identity": A_h = I (needs head_dim == value dim, true here): a cheaper
        proxy that only sees q, k, v.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import barrier_ops
from barrier_ops.integrations.chargpt import record_qkv

from .config import BarrierConfig, ModelConfig


@dataclass
class ModelOutput:
    logits: torch.Tensor
    ce: Optional[torch.Tensor]  # mean next-char cross-entropy in nats (None without targets)
    loss: Optional[torch.Tensor] = None  # ce, plus lambda_m * penalty when a barrier is attached and enabled
    penalty: Optional[torch.Tensor] = None  # mean over layers of the mean barrier (detached; None if not computed)
    margins: Optional[List[torch.Tensor]] = None  # per layer [B, T] or [B, H, T] (handle.keep_margins only)


class CausalSelfAttention(nn.Module):
    barrier_ops_adapter = "chargpt"  # barrier_ops.attach finds this layer and its q_proj / o_proj

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H, d = self.n_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, H, d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, d).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        # The barrier ops compute in fp32; under bf16 autocast q, k, v arrive in bf16.
        record_qkv(self, q.float(), k.float(), v.float(), causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying, as in nanoGPT
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        *,
        noise_sigma: float = 0.0,
        noise_generator: Optional[torch.Generator] = None,
    ) -> ModelOutput:
        """Forward pass.

        noise_sigma: std of Gaussian noise added to the token embeddings (before
            the first block); drawn from ``noise_generator`` (on idx's device) so
            a seeded generator gives the same noise every time.
        """
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"idx has {T} positions, the model's block_size is {self.cfg.block_size}")
        tok = self.tok_emb(idx)
        if noise_sigma > 0:
            noise = torch.randn(tok.shape, generator=noise_generator, device=tok.device, dtype=torch.float32)
            tok = tok + noise_sigma * noise.to(tok.dtype)
        x = self.drop(tok + self.pos_emb(torch.arange(T, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        ce = None
        if targets is not None:
            ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return ModelOutput(logits, ce, loss=ce)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def attach_barrier(model: CharGPT, barrier: BarrierConfig, lam: float) -> "barrier_ops.BarrierHandle":
    """``barrier_ops.attach`` with the experiment's options; the handle's weight is lambda_m.

    lambda_m = 0 ("ce" mode) attaches with weight 0 and the handle disabled:
    training never pays for the barrier, evaluation enables it to measure the
    penalty and the margins of the plain CE model.
    """
    handle = barrier_ops.attach(
        model, weight=lam, coupling=barrier.coupling, combine_heads=barrier.combine_heads, eps=barrier.eps,
        target_margin=barrier.target_margin, causal=True, query_fraction=barrier.query_fraction,
    )
    handle.enabled = lam > 0
    return handle


@contextlib.contextmanager
def measuring(model: nn.Module, margins: bool = True):
    """Enable the attached barrier (and keep every token's margin) inside the block; restores the handle.

    Measurements are exact: a barrier attached with ``query_fraction < 1`` computes
    every query row inside the block.
    """
    handle = barrier_ops.get_handle(model)
    if handle is None:
        raise ValueError("the model has no barrier attached (experiments.model.attach_barrier)")
    enabled, keep, options = handle.enabled, handle.keep_margins, handle.options
    handle.enabled, handle.keep_margins = True, margins
    handle.options = options.replace(query_fraction=1.0)
    try:
        yield handle
    finally:
        handle.enabled, handle.keep_margins, handle.options = enabled, keep, options


@contextlib.contextmanager
def barrier_off(model: nn.Module):
    """Skip the attached barrier (if any) inside the block, e.g. for plain BPC evaluation."""
    handle = barrier_ops.get_handle(model)
    if handle is None:
        yield None
        return
    enabled = handle.enabled
    handle.enabled = False
    try:
        yield handle
    finally:
        handle.enabled = enabled


def training_loss(out: ModelOutput, lam: float) -> torch.Tensor:
    """The paper's objective: CE (lambda = 0, "ce" mode) or CE + lambda_m * penalty ("margin" mode).

    The attached handle already added ``lambda_m * penalty`` to ``out.loss``;
    this checks that it did when lambda_m > 0.
    """
    if lam == 0:
        return out.ce
    if out.penalty is None:
        raise ValueError("lambda > 0 needs a barrier attached and enabled (experiments.model.attach_barrier)")
    return out.loss
