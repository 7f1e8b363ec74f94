"""A small pre-LN nanoGPT-style character GPT whose attention layers also compute the margin barrier.

Each layer's attention output goes through ``F.scaled_dot_product_attention``;
the barrier is ``barrier_ops.margin_barrier_loss`` on the *same* q, k, v, so the
penalty is exactly about the attention the model uses. The model's penalty is
the mean over layers, and the paper's "margin" objective is
``ce + lambda_m * penalty``.

Coupling (``barrier.coupling``):
    "exact" (default): A_h = W_Q^h W_O^h, the map through which a change in
        head h's output moves the residual stream and then that head's query
        (LayerNorm in between is ignored), so kappa is the trace of the layer's
        diagonal Jacobian block. Gradients flow into W_Q and W_O through A_h.
    "identity": A_h = I (needs head_dim == value dim, true here): a cheaper
        proxy that only sees q, k, v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import barrier_ops

from .config import BarrierConfig, ModelConfig


@dataclass
class ModelOutput:
    logits: torch.Tensor
    ce: Optional[torch.Tensor]  # mean next-char cross-entropy in nats (None without targets)
    penalty: Optional[torch.Tensor]  # mean over layers of the mean barrier (None unless requested)
    margins: Optional[List[torch.Tensor]] = None  # per layer [B, T] or [B, H, T] (only if requested)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, barrier: BarrierConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.barrier = barrier

    def coupling(self) -> Optional[torch.Tensor]:
        """[H, d, d] exact couplings A_h = W_Q^h W_O^h, or None for the identity."""
        if self.barrier.coupling == "identity":
            return None
        H, d = self.n_head, self.head_dim
        wq = self.q_proj.weight.view(H, d, H * d)  # rows of head h: W_Q^h is d x D
        wo = self.o_proj.weight.view(H * d, H, d).transpose(0, 1)  # columns of head h: W_O^h is D x d
        return torch.bmm(wq, wo).float()

    def forward(self, x: torch.Tensor, want_penalty: bool, want_margins: bool):
        B, T, C = x.shape
        H, d = self.n_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, H, d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, d).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, C))
        penalty = margins = None
        if want_penalty or want_margins:
            A = self.coupling()
            # The barrier ops compute in fp32; under bf16 autocast q, k, v arrive in bf16.
            qf, kf, vf = q.float(), k.float(), v.float()
            kw = dict(coupling=A, causal=True, combine_heads=self.barrier.combine_heads)
            if want_penalty:
                penalty = barrier_ops.margin_barrier_loss(qf, kf, vf, eps=self.barrier.eps, **kw)
            if want_margins:
                with torch.no_grad():
                    margins = barrier_ops.token_margins(qf.detach(), kf.detach(), vf.detach(),
                                                        **{**kw, "coupling": None if A is None else A.detach()})
        return y, penalty, margins


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, barrier: BarrierConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, barrier)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x, want_penalty: bool, want_margins: bool):
        a, penalty, margins = self.attn(self.ln1(x), want_penalty, want_margins)
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return x, penalty, margins


class CharGPT(nn.Module):
    def __init__(self, vocab_size: int, cfg: ModelConfig, barrier: Optional[BarrierConfig] = None):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, barrier or BarrierConfig()) for _ in range(cfg.n_layer))
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
        want_penalty: bool = False,
        want_margins: bool = False,
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
        penalties, margins = [], []
        for block in self.blocks:
            x, p, m = block(x, want_penalty, want_margins)
            penalties.append(p)
            margins.append(m)
        logits = self.head(self.ln_f(x))
        ce = None
        if targets is not None:
            ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        penalty = torch.stack(penalties).mean() if want_penalty else None
        return ModelOutput(logits, ce, penalty, margins if want_margins else None)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def training_loss(out: ModelOutput, lam: float) -> torch.Tensor:
    """The paper's objective: CE (lambda = 0, "ce" mode) or CE + lambda_m * penalty ("margin" mode)."""
    if lam == 0:
        return out.ce
    if out.penalty is None:
        raise ValueError("lambda > 0 needs the forward pass to run with want_penalty=True")
    return out.ce + lam * out.penalty
