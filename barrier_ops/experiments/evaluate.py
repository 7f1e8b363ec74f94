"""Evaluation: clean and embedding-noise bits-per-character, margins and support tokens."""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Sequence

import torch

import barrier_ops

from .data import eval_batches

LN2 = math.log(2.0)


def autocast_context(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _progress(iterable, enabled: bool, desc: str, total: Optional[int] = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


@torch.no_grad()
def evaluate_split(
    model,
    data: torch.Tensor,
    *,
    n_batches: int,
    batch_size: int,
    device: torch.device,
    bf16: bool = True,
    sigma: float = 0.0,
    seed: int = 0,
    with_penalty: bool = False,
    with_margins: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> Dict:
    """BPC over fixed, evenly spaced windows of ``data``; the noise (if any) comes from ``seed``.

    Returns {"bpc", "penalty" (if asked), "margins" (list per layer of a flat
    CPU tensor of all valid margins, if asked), "support_pos" (per layer, the
    support token's position in each sequence, if asked)}.
    """
    was_training = model.training
    model.eval()
    block = model.cfg.block_size
    gen = torch.Generator(device=device).manual_seed(int(seed)) if sigma > 0 else None
    total_ce, total_pen, n = 0.0, 0.0, 0
    margins: List[List[torch.Tensor]] = [[] for _ in range(model.cfg.n_layer)]
    support: List[List[torch.Tensor]] = [[] for _ in range(model.cfg.n_layer)]
    batches = eval_batches(data, n_batches, batch_size, block)
    for x, y in _progress(batches, progress, desc, total=n_batches):
        x, y = x.to(device), y.to(device)
        with autocast_context(device, bf16):
            out = model(x, y, want_penalty=with_penalty, want_margins=with_margins,
                        noise_sigma=sigma, noise_generator=gen)
        total_ce += float(out.ce)
        if with_penalty:
            total_pen += float(out.penalty)
        if with_margins:
            for layer, m in enumerate(out.margins):
                m2 = m.reshape(-1, m.shape[-1])  # [B, T] or [B*H, T]
                idx, _ = barrier_ops.support_token_argmin(m2)
                support[layer].append(idx.cpu())
                margins[layer].append(m2.flatten().float().cpu())
        n += 1
    model.train(was_training)
    result = {"bpc": total_ce / n / LN2}
    if with_penalty:
        result["penalty"] = total_pen / n
    if with_margins:
        result["margins"] = [torch.cat(ms) for ms in margins]
        result["support_pos"] = [torch.cat(s) for s in support]
    return result


def margin_summary(margins: Sequence[torch.Tensor], support_pos: Sequence[torch.Tensor], block_size: int,
                   bins: int = 40) -> Dict:
    """Per-layer mean/min/quantiles and histograms of margins and support-token positions."""
    layers = []
    for m, pos in zip(margins, support_pos):
        m = m.double()
        lo, hi = float(m.min()), float(m.max())
        if hi <= lo:
            hi = lo + 1e-6
        counts = torch.histc(m, bins=bins, min=lo, max=hi)
        pos_counts = torch.bincount(pos.clamp(min=0), minlength=block_size)
        layers.append({
            "mean": float(m.mean()),
            "min": lo,
            "max": float(m.max()),
            "q01": float(torch.quantile(m[: 1 << 20], 0.01)),
            "median": float(m.median()),
            "frac_below_0.1": float((m < 0.1).double().mean()),
            "hist_edges": torch.linspace(lo, hi, bins + 1).tolist(),
            "hist_counts": counts.long().tolist(),
            "support_pos_counts": pos_counts.tolist(),
            "support_pos_mean": float(pos.double().mean()),
        })
    return {"layers": layers}


def noise_eval(model, data: torch.Tensor, *, sigmas: Sequence[float], draws: int, n_batches: int,
               batch_size: int, device: torch.device, bf16: bool = True, seed: int = 0,
               progress: bool = False) -> Dict[str, Dict]:
    """BPC under N(0, sigma^2) token-embedding noise, averaged over ``draws`` seeded draws.

    The ratio is BPC(sigma) / BPC(0) (the paper's "grows to 2.58x"); draws use
    seeds ``seed * 1000 + draw`` so every model sees the same noise.
    """
    clean = evaluate_split(model, data, n_batches=n_batches, batch_size=batch_size, device=device,
                           bf16=bf16, sigma=0.0)["bpc"]
    results = {}
    for sigma in _progress(list(sigmas), progress, "noise eval"):
        if sigma == 0:
            results[f"{sigma:g}"] = {"bpc": clean, "bpc_draw_std": 0.0, "ratio": 1.0}
            continue
        vals = [
            evaluate_split(model, data, n_batches=n_batches, batch_size=batch_size, device=device, bf16=bf16,
                           sigma=sigma, seed=seed * 1000 + d)["bpc"]
            for d in range(draws)
        ]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5
        results[f"{sigma:g}"] = {"bpc": mean, "bpc_draw_std": std, "ratio": mean / clean}
    return results
