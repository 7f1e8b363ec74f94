"""Evaluation: clean and embedding-noise bits-per-character, margins and support tokens."""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Sequence

import torch

import barrier_ops

from .data import eval_batches
from .model import barrier_off, measuring

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


def substitute_chars(x: torch.Tensor, rate: float, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """``x`` with each entry replaced, independently with probability ``rate``, by another character.

    The replacement is uniform over the ``vocab_size - 1`` characters that differ from the original, so
    every selected position really changes. Both draws are made for every position whatever ``x`` holds,
    so a seeded CPU ``generator`` corrupts the same positions for every model (seed-paired).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 to substitute characters, got {vocab_size}")
    x = x.cpu()
    replace = torch.rand(x.shape, generator=generator) < rate
    shift = torch.randint(1, vocab_size, x.shape, generator=generator)
    return torch.where(replace, (x + shift) % vocab_size, x)


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
    sub_rate: float = 0.0,
) -> Dict:
    """BPC over fixed, evenly spaced windows of ``data``; the noise (if any) comes from ``seed``.

    ``sub_rate`` > 0 replaces input characters at random (:func:`substitute_chars`, a CPU generator
    seeded with ``seed``, so the corrupted windows do not depend on the model or the device); the
    targets stay the clean next characters.

    Returns {"bpc", "penalty" (if asked), "margins" (list per layer of a flat
    CPU tensor of all valid margins, if asked), "support_pos" (per layer, the
    support token's position in each sequence, if asked)}.
    """
    was_training = model.training
    model.eval()
    block = model.cfg.block_size
    gen = torch.Generator(device=device).manual_seed(int(seed)) if sigma > 0 else None
    if not 0.0 <= sub_rate < 1.0:
        raise ValueError(f"sub_rate must be in [0, 1), got {sub_rate}")
    sub_gen = torch.Generator().manual_seed(int(seed)) if sub_rate > 0 else None
    vocab_size = model.tok_emb.num_embeddings
    total_ce, total_pen, n = 0.0, 0.0, 0
    margins: List[List[torch.Tensor]] = [[] for _ in range(model.cfg.n_layer)]
    support: List[List[torch.Tensor]] = [[] for _ in range(model.cfg.n_layer)]
    support1: List[List[torch.Tensor]] = [[] for _ in range(model.cfg.n_layer)]
    batches = eval_batches(data, n_batches, batch_size, block)
    measure = measuring(model, margins=with_margins) if with_penalty or with_margins else barrier_off(model)
    with measure:
        outs = []
        for x, y in _progress(batches, progress, desc, total=n_batches):
            if sub_gen is not None:
                x = substitute_chars(x, sub_rate, vocab_size, sub_gen)
            x, y = x.to(device), y.to(device)
            with autocast_context(device, bf16):
                outs.append(model(x, y, noise_sigma=sigma, noise_generator=gen))
    for out in outs:
        total_ce += float(out.ce)
        if with_penalty:
            total_pen += float(out.penalty)
        if with_margins:
            for layer, m in enumerate(out.margins):
                m2 = m.reshape(-1, m.shape[-1])  # [B, T] or [B*H, T]
                idx, _ = barrier_ops.support_token_argmin(m2)
                # Under s <= t position 0 attends only to itself: m = 1 exactly, whatever the weights. Once a
                # barrier lifts every other margin above 1 the argmin sits there by construction, so the
                # support token among t >= 1 is recorded too.
                idx1, _ = barrier_ops.support_token_argmin(m2[:, 1:])
                support[layer].append(idx.cpu())
                support1[layer].append((idx1 + 1).cpu())
                margins[layer].append(m2.flatten().float().cpu())
        n += 1
    model.train(was_training)
    result = {"bpc": total_ce / n / LN2}
    if with_penalty:
        result["penalty"] = total_pen / n
    if with_margins:
        result["margins"] = [torch.cat(ms) for ms in margins]
        result["support_pos"] = [torch.cat(s) for s in support]
        result["support_pos_excl0"] = [torch.cat(s) for s in support1]
    return result


# Fixed, log-spaced histogram edges shared by every run (margins from 1e-3 to 1e4), plus under/overflow
# counts: histograms of different runs are comparable and a reader can see margins of 0.8 and of 800.
HIST_EDGES = [10 ** (-3 + 0.1 * i) for i in range(71)]
THRESHOLDS = (0.1, 0.5, 1.0, 2.0, 5.0)
QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def margin_summary(margins: Sequence[torch.Tensor], support_pos: Sequence[torch.Tensor], block_size: int,
                   target_margin: Optional[float] = None, bins: int = 40,
                   support_pos_excl0: Optional[Sequence[torch.Tensor]] = None) -> Dict:
    """Per-layer statistics of the margins of every valid token and of the support-token positions.

    mean/min/max, quantiles ``q<p>``, fractions below thresholds ``frac_below_<x>``,
    ``active_frac`` (tokens where the barrier has a nonzero gradient: margin < m0 for the
    target-margin barrier, every token for the paper's -log m), a histogram on the fixed
    log-spaced ``HIST_EDGES`` (``hist_below`` counts margins < 1e-3, non-positive included;
    ``hist_above`` > 1e4), and support-token positions (``support_pos_counts``, mean, and the
    fraction at position 0; with ``support_pos_excl0``, the same over positions t >= 1).
    """
    layers = []
    edges = torch.tensor(HIST_EDGES, dtype=torch.float64)
    for layer_index, (m, pos) in enumerate(zip(margins, support_pos)):
        m = m.double()
        sample = m[: 1 << 22]
        qs = torch.quantile(sample, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        idx = torch.bucketize(m, edges, right=True)  # 0: below edges[0]; len(edges): >= edges[-1]
        counts = torch.bincount(idx, minlength=len(HIST_EDGES) + 1)
        pos_counts = torch.bincount(pos.clamp(min=0), minlength=block_size)
        layer = {
            "mean": float(m.mean()),
            "min": float(m.min()),
            "max": float(m.max()),
            "median": float(m.median()),
            **{f"q{p:g}": q for p, q in zip(QUANTILES, qs)},
            **{f"frac_below_{x:g}": float((m < x).double().mean()) for x in THRESHOLDS},
            "active_frac": 1.0 if target_margin is None else float((m < target_margin).double().mean()),
            "hist_edges": HIST_EDGES,
            "hist_counts": counts[1:len(HIST_EDGES)].tolist(),
            "hist_below": int(counts[0]),
            "hist_above": int(counts[len(HIST_EDGES)]),
            "support_pos_counts": pos_counts.tolist(),
            "support_pos_mean": float(pos.double().mean()),
            "support_pos0_frac": float((pos == 0).double().mean()),
        }
        if support_pos_excl0 is not None:
            p1 = support_pos_excl0[layer_index]
            layer["support_pos_excl0_counts"] = torch.bincount(p1.clamp(min=0), minlength=block_size).tolist()
            layer["support_pos_excl0_mean"] = float(p1.double().mean())
        layers.append(layer)
    return {"layers": layers}


def embedding_rms(model) -> float:
    """RMS over all entries of the token embedding table (the scale the embedding noise is added to)."""
    w = model.tok_emb.weight.detach().double()
    return float(w.pow(2).mean().sqrt())


def noise_eval(model, data: torch.Tensor, *, sigmas: Sequence[float], draws: int, n_batches: int,
               batch_size: int, device: torch.device, bf16: bool = True, seed: int = 0,
               progress: bool = False, rel_sigmas: Sequence[float] = ()) -> Dict[str, Dict]:
    """BPC under N(0, sigma^2) token-embedding noise, averaged over ``draws`` seeded draws.

    The ratio is BPC(sigma) / BPC(0) (the paper's "grows to 2.58x"); draws use
    seeds ``seed * 1000 + draw`` so every model sees the same noise. Keys are
    ``f"{sigma:g}"`` for the absolute sigmas and ``f"r{r:g}"`` for the relative
    ones, sigma = r * embedding_rms(model) (each entry records its ``sigma``).
    """
    clean = evaluate_split(model, data, n_batches=n_batches, batch_size=batch_size, device=device,
                           bf16=bf16, sigma=0.0)["bpc"]
    rms = embedding_rms(model)
    todo = [(f"{s:g}", s) for s in sigmas] + [(f"r{r:g}", r * rms) for r in rel_sigmas]
    results = {}
    for key, sigma in _progress(todo, progress, "noise eval"):
        if sigma == 0:
            results[key] = {"bpc": clean, "bpc_draw_std": 0.0, "ratio": 1.0, "sigma": 0.0}
            continue
        vals = [
            evaluate_split(model, data, n_batches=n_batches, batch_size=batch_size, device=device, bf16=bf16,
                           sigma=sigma, seed=seed * 1000 + d)["bpc"]
            for d in range(draws)
        ]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5
        results[key] = {"bpc": mean, "bpc_draw_std": std, "ratio": mean / clean, "sigma": sigma}
    return results


def substitution_eval(model, data: torch.Tensor, *, rates: Sequence[float], draws: int, n_batches: int,
                      batch_size: int, device: torch.device, bf16: bool = True, seed: int = 0,
                      clean_bpc: Optional[float] = None) -> Dict[str, Dict]:
    """BPC when a fraction ``p`` of the input characters is replaced at random, averaged over ``draws``.

    Keys ``f"s{p:g}"``; draws use CPU generators seeded ``seed * 1000 + draw`` (as :func:`noise_eval`), so
    every model of a seed sees the same corrupted windows. ``ratio`` is BPC(p) / clean BPC.
    """
    if clean_bpc is None:
        clean_bpc = evaluate_split(model, data, n_batches=n_batches, batch_size=batch_size, device=device,
                                   bf16=bf16)["bpc"]
    results = {}
    for p in rates:
        vals = [evaluate_split(model, data, n_batches=n_batches, batch_size=batch_size, device=device, bf16=bf16,
                               sub_rate=p, seed=seed * 1000 + d)["bpc"] for d in range(draws)]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5
        results[f"s{p:g}"] = {"bpc": mean, "bpc_draw_std": std, "ratio": mean / clean_bpc, "rate": p}
    return results
