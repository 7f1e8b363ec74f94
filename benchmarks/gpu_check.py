"""GPU check: validate, measure and pick the CUDA backend, in one run.

Run through ``bash benchmarks/gpu_check.sh [OUTDIR]`` (which builds the
extension and runs the CUDA tests first), or directly once the extension is
built:

    python benchmarks/gpu_check.py --outdir runs/gpu_check            # CUDA, full
    python benchmarks/gpu_check.py --smoke --device cpu --outdir DIR   # tiny CPU run (CI)

Ordered so that the most important rows run first; a time budget
(``--budget-s``) stops it starting new rows, and a hard limit
(``--hard-limit-s``, faulthandler) ends a row that hangs. Every row (and the
report writer) catches its own exceptions, a broken CUDA context skips the
remaining GPU rows instead of failing each, and the report is rewritten after
every row, so any single failure still leaves report.md / report.json; the
shell's final step (gpu_check_kit.py --finalize) adds the build, test and
phase outcomes. The yardstick row at the headline shape runs before
``barrier_ops`` is imported: a failed build still leaves the device's plain
attention timings.

1. parity: ``backend="fused"`` and ``"sdpa"`` against the float64 reference
   (where T x T fits, T <= ``--ref-max-t``), and against each other beyond
   that; fp32/bf16/fp16, d = 64/128, T from 1 to 16384, GQA, right and left
   padding, every coupling form (none, scalar [H], matrix [H, d, dv]), keys
   and values with a mean of 3-10x their std, strict causality, at the
   barrier's real gradient scale (``loss = 0.02 * margin_barrier_loss(mean)``
   as one slice of a batch of 262144 tokens; float16 under GradScaler's 2^16).
   Max relative error (max|x - ref| / max|ref|) of the margins and of every
   gradient, pass/fail against per-dtype tolerances. Every row catches its
   own exceptions.
2. speed and memory (bf16, B=4, H=16, d = 64/128, T = 1k..16k): forward and
   forward+backward time (CUDA events, warm-up, median of reps) and peak
   memory of fused, sdpa, plain SDPA attention fwd+bwd (the yardstick), the
   eager and the torch.compile'd reference; each row's ratio to the
   yardstick; the SDPA kernel PyTorch picks for the sdpa backend's widened
   q', k', V' (``torch._fused_sdp_choice``) and for the yardstick.
2b. the sdpa backend's value split (barrier_ops._sdpa.SDPA_VALUE_SPLIT):
   "whole", "equal", "narrow" at d = 128 and 64, with key padding and with a
   row set; per variant the SDPA kernel of each call (torch._fused_sdp_choice
   on the real tensors), which kernels take every call alone
   (torch.nn.attention.sdpa_kernel, with PyTorch's reasons when not), fwd and
   fwd+bwd time with PyTorch's choice and with each other available fused
   kernel forced, and kappa's difference from the whole variant. The report
   recommends the fastest variant that agrees (a split only if >= 5% faster).
3. end to end: GPT-2 small (124M, from GPT2Config(), no download), bf16
   autocast, T = 1024, AdamW step time without and with
   ``barrier_ops.attach(model, weight=0.02)`` for each backend.
4. report: OUTDIR/report.json and OUTDIR/report.md (rewritten after every
   row, so an interrupted run still leaves one), with a "recommended auto
   backend" line: per shape class, the fastest backend among those that
   passed every parity row. It recommends only; it edits nothing.

The timing helpers (:func:`time_ms`, :func:`measure`, :func:`speed_callables`)
are also what benchmarks/bench_cuda.py times with.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

BACKENDS = ("fused", "sdpa")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Relative tolerances (max error / max|reference|) for margins and gradients,
# those of tests/test_cuda.py (CUDA_VALUE_TOL / CUDA_GRAD_TOL): the CUDA
# tensor-core paths round softmax weights and gradient operands to 16 bits.
TOL = {
    "fp32": {"margin": 5e-4, "grad": 2e-3},
    "bf16": {"margin": 5e-2, "grad": 1e-1},
    "fp16": {"margin": 1e-2, "grad": 3e-2},
}
# Two kernels against each other (no reference): each may be off by its tolerance.
CROSS_FACTOR = 2.0

REAL_BATCH_TOKENS = 262_144  # B * H * T of the batch whose gradient scale the rows emulate
BARRIER_WEIGHT = 0.02
FP16_LOSS_SCALE = 2.0**16  # GradScaler's initial scale

SPEED_IMPLS = ("fused", "sdpa", "attention", "eager_reference", "compiled_reference")
YARDSTICK = "attention"


# ---------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------


def _finite_or_str(x):
    """JSON-safe floats: NaN/inf become strings (json.dumps would write bare NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite_or_str(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_str(v) for v in x]
    return x


def _short_error(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| (NaN if actual is not finite)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64).to(a.device)
    if a.shape != e.shape:
        raise ValueError(f"shape {tuple(a.shape)} != {tuple(e.shape)}")
    if not e.numel():
        return 0.0
    if not torch.isfinite(a).all():
        return float("nan")
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    if scale == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / scale


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    """Release cached blocks; never raises (after a sticky CUDA error every CUDA call
    raises, and a cleanup in a `finally` must not replace the row's own error)."""
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception:
            pass


def cuda_context_error(device: torch.device) -> Optional[str]:
    """None while the device still works; the error text once the context is broken
    (an illegal address or a device-side assert poisons every later CUDA call)."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
        return None
    except Exception as exc:
        return _short_error(exc)


def sdpa_kernel_name(q, k, v, is_causal: bool = True) -> str:
    """The SDPA kernel PyTorch picks for these tensors (torch._fused_sdp_choice)."""
    from torch.nn.attention import SDPBackend

    choice = torch._fused_sdp_choice(q, k, v, is_causal=is_causal)
    try:
        return SDPBackend(choice).name
    except (ValueError, TypeError):
        return f"SDPBackend({choice})"


def sdpa_backend_kernel(device, dtype, B, H, T, d, masked=False, requires_grad=True,
                        split=None) -> str:
    """Kernel(s) for the sdpa backend's q', k' and V' at this dtype, one per SDPA call.

    q' and k' are d wide (2d in bf16/fp16, where each key is split into a high
    and a low half), +1 with a mask; V' carries the centred keys, values, the
    <k, w> column and the outlier keys' indicator columns, in one part or, with
    a value split, several (" + " between the parts' kernels); all padded.

    Shapes from barrier_ops._sdpa.value_layout, the layout _attention_form builds
    (a private helper: if it is gone, the row says so and keeps its timings).
    split: None for the one in force (barrier_ops._sdpa.value_split).
    """
    try:
        from barrier_ops import _sdpa

        split = _sdpa.value_split(device) if split is None else split
        qk_w, v_w = _sdpa.value_layout(device, d, masked, split_keys=dtype in (torch.float16, torch.bfloat16),
                                       split=split)
    except Exception as exc:
        return f"unknown ({_short_error(exc)})"
    make = lambda w: torch.empty(B, H, T, w, device=device, dtype=dtype,  # noqa: E731
                                 requires_grad=requires_grad)
    widths = (v_w,) if isinstance(v_w, int) else v_w
    return " + ".join(sdpa_kernel_name(make(qk_w), make(qk_w), make(w), is_causal=True) for w in widths)


# ---------------------------------------------------------------------------
# Timing: one implementation, shared with benchmarks/bench_cuda.py
# ---------------------------------------------------------------------------


def time_ms(fn: Callable[[], None], device: torch.device, warmup: int, reps: int) -> Tuple[float, List[float]]:
    """(median, samples) of fn's time in ms: CUDA events on CUDA, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), samples


def measure(fwd: Callable[[], None], fwd_bwd: Callable[[], None], device: torch.device,
            warmup: int, reps: int) -> Dict:
    """fwd_ms, fwd_bwd_ms (medians) and peak_mib: the allocator's peak during one
    forward+backward above what was allocated before it (CUDA only; None elsewhere)."""
    row = {}
    row["fwd_ms"], _ = time_ms(fwd, device, warmup, reps)
    row["fwd_bwd_ms"], samples = time_ms(fwd_bwd, device, warmup, reps)
    row["fwd_bwd_ms_range"] = [min(samples), max(samples)]
    row["peak_mib"] = None
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fwd_bwd()
        sync(device)
        row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return row


_COMPILED = {}


def _compiled_reference():
    if "ref" not in _COMPILED:
        from barrier_ops import reference

        _COMPILED["ref"] = torch.compile(reference.margin_barrier_loss_reference, dynamic=False)
    return _COMPILED["ref"]


def speed_callables(impl: str, q, k, v, grad_out=None):
    """(fwd, fwd_bwd) closures for one implementation on (q, k, v), which require grad.

    impl: "fused" / "sdpa" (barrier_ops.margin_barrier_loss with that backend),
    "attention" (F.scaled_dot_product_attention(q, k, v, is_causal=True) with
    PyTorch's own kernel choice: the yardstick), "attention_flash" (the same,
    FlashAttention forced), "eager_reference", "compiled_reference".
    """
    if impl in ("attention", "attention_flash"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        grad_out = torch.randn_like(q) if grad_out is None else grad_out

        def attention():
            if impl == "attention_flash":
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwd():
            with torch.no_grad():
                attention()

        def fwd_bwd():
            torch.autograd.grad(attention(), (q, k, v), grad_out)

        return fwd, fwd_bwd

    # Imported here, not above: the yardstick rows must not need the extension.
    import barrier_ops
    from barrier_ops import reference

    if impl in BACKENDS:
        def loss_fn(q, k, v):
            return barrier_ops.margin_barrier_loss(q, k, v, backend=impl)
    elif impl == "eager_reference":
        loss_fn = reference.margin_barrier_loss_reference
    elif impl == "compiled_reference":
        loss_fn = _compiled_reference()
    else:
        raise ValueError(f"unknown impl {impl!r}")

    def fwd():
        with torch.no_grad():
            loss_fn(q, k, v)

    def fwd_bwd():
        torch.autograd.grad(loss_fn(q, k, v), (q, k, v))

    return fwd, fwd_bwd


def reference_bytes(B: int, H: int, T: int) -> int:
    """Rough peak of the materialised reference's fwd+bwd: ~8 float32 T x T tensors per (b, h)."""
    return 8 * 4 * B * H * T * T


def free_bytes(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


# ---------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------


@dataclass
class ParityCase:
    T: int
    d: int
    B: int = 2
    H: int = 4
    Hkv: int = 2
    coupling: str = "none"  # none | scalar | matrix
    mask: str = "none"  # none | right | left
    mean: float = 0.0  # keys and values: mean x std
    causal: object = True

    @property
    def name(self) -> str:
        parts = [f"B{self.B} H{self.H}/{self.Hkv} T{self.T} d{self.d}", f"A={self.coupling}"]
        if self.mask != "none":
            parts.append(f"{self.mask}-pad")
        if self.mean:
            parts.append(f"mean {self.mean:g}std")
        if self.causal == "strict":
            parts.append("strict")
        return " ".join(parts)


def parity_inputs(case: ParityCase, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """q, k, v, coupling (leaves in dtype on device) and the bool mask [B, T] (or None)."""
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv, T, d = case.B, case.H, case.Hkv, case.T, case.d

    def rand(*shape, scale=1.0, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = rand(B, H, T, d)
    k = rand(B, Hkv, T, d, mean=case.mean)
    v = rand(B, Hkv, T, d, mean=case.mean)
    coupling = None
    if case.coupling == "scalar":
        coupling = rand(H, scale=0.3)
    elif case.coupling == "matrix":
        coupling = rand(H, d, d, scale=0.3 / math.sqrt(d))
    mask = None
    if case.mask != "none":
        mask = torch.ones(B, T, dtype=torch.bool)
        pad = max(1, T // 4) if T > 1 else 0
        # Sequence 0 is full; the others are padded, the last one by more.
        for b in range(1, B):
            n = min(T - 1, pad * b) if T > 1 else 0
            if n <= 0:
                continue
            if case.mask == "right":
                mask[b, T - n:] = False
            else:
                mask[b, :n] = False
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    if coupling is not None:
        coupling = coupling.to(device=device, dtype=dtype).requires_grad_()
    return (*tensors, coupling, None if mask is None else mask.to(device))


def _barrier_weight(case: ParityCase, mask, dtype) -> Tuple[float, float]:
    """(weight, loss_scale): loss = weight * mean barrier gives each token the gradient
    BARRIER_WEIGHT / REAL_BATCH_TOKENS (times the fp16 loss scale), as in a real batch."""
    valid_tokens = case.B * case.T if mask is None else int(mask.sum())
    if case.causal == "strict":
        valid_tokens = max(valid_tokens - case.B, 1)  # position 0 has no key (approximately)
    loss_scale = FP16_LOSS_SCALE if dtype == torch.float16 else 1.0
    return loss_scale * BARRIER_WEIGHT * valid_tokens * case.H / REAL_BATCH_TOKENS, loss_scale


def _evaluate(fn_margins, fn_loss, q, k, v, coupling, weight):
    """(margins, {grad name: tensor}) of one implementation."""
    inputs = {"q": q, "k": k, "v": v}
    if coupling is not None:
        inputs["coupling"] = coupling
    with torch.no_grad():
        margins = fn_margins(q, k, v, coupling)
    loss = weight * fn_loss(q, k, v, coupling)
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return margins.detach(), {f"d{n}": g.detach() for n, g in zip(inputs, grads)}


def parity_case(case: ParityCase, dtype_name: str, device: torch.device, ref_max_t: int) -> List[Dict]:
    """Rows (one per backend) for one case; exceptions recorded per backend."""
    import barrier_ops
    from barrier_ops import reference

    dtype = DTYPES[dtype_name]
    t0 = time.monotonic()
    q, k, v, coupling, mask = parity_inputs(case, dtype, device)
    weight, loss_scale = _barrier_weight(case, mask, dtype)
    kw = dict(causal=case.causal, key_padding_mask=mask)
    base = {"case": case.name, **asdict(case), "causal": str(case.causal), "dtype": dtype_name,
            "loss_weight": weight, "loss_scale": loss_scale,
            "tol_margin": TOL[dtype_name]["margin"], "tol_grad": TOL[dtype_name]["grad"]}

    results, errors = {}, {}
    for backend in BACKENDS:
        try:
            results[backend] = _evaluate(
                lambda q, k, v, c: barrier_ops.token_margins(q, k, v, coupling=c, backend=backend, **kw),
                lambda q, k, v, c: barrier_ops.margin_barrier_loss(q, k, v, coupling=c, backend=backend, **kw),
                q, k, v, coupling, weight)
        except Exception as exc:  # one failing backend must not stop the other or the run
            errors[backend] = _short_error(exc)
        empty_cache(device)

    expected, compared_to, ref_error = None, None, None
    if case.T <= ref_max_t:
        compared_to = "reference"
        try:
            up = [None if t is None else t.detach().to(torch.float64).requires_grad_() for t in (q, k, v, coupling)]
            expected = _evaluate(
                lambda q, k, v, c: reference.token_margins_reference(q, k, v, coupling=c, **kw),
                lambda q, k, v, c: reference.margin_barrier_loss_reference(q, k, v, coupling=c, **kw),
                *up, weight)
        except Exception as exc:
            ref_error = "reference: " + _short_error(exc)
        empty_cache(device)

    rows = []
    for backend in BACKENDS:
        row = dict(base, backend=backend)
        other = [b for b in BACKENDS if b != backend][0]
        if backend in errors:
            row.update(passed=False, error=errors[backend])
        elif ref_error:
            row.update(passed=False, error=ref_error, compared_to="reference")
        else:
            if expected is not None:
                want, row["compared_to"], factor = expected, compared_to, 1.0
            elif other in results:
                want, row["compared_to"], factor = results[other], other, CROSS_FACTOR
            else:
                row.update(passed=False, error=f"no reference (T > {ref_max_t}) and {other} failed")
                rows.append(row)
                continue
            got = results[backend]
            row["margin_rel_err"] = max_rel_error(got[0], want[0])
            row["grad_rel_err"] = {n: max_rel_error(g, want[1][n]) for n, g in got[1].items()}
            row["max_grad_rel_err"] = max(row["grad_rel_err"].values())
            row["underflow"] = sorted(n for n, g in got[1].items()
                                      if not (g != 0).any().item() and (want[1][n] != 0).any().item())
            ok_m = row["margin_rel_err"] <= factor * row["tol_margin"]
            ok_g = all(e <= factor * row["tol_grad"] for e in row["grad_rel_err"].values())
            row["passed"] = bool(ok_m and ok_g and not row["underflow"])
            row["tol_factor"] = factor
        rows.append(row)
    for row in rows:
        row["seconds"] = time.monotonic() - t0
    return rows


def parity_cases(device: torch.device, smoke: bool) -> Tuple[List[Tuple[ParityCase, str]], List[Tuple[ParityCase, str]]]:
    """(cases with a reference, long cases checked fused vs sdpa), as (case, dtype) pairs."""
    if smoke:
        dims, dtypes, long_T = (8, 16), ("fp32", "bf16"), 96
        shapes = [
            dict(T=1, B=2, H=2, Hkv=2),
            dict(T=17, coupling="scalar", mask="right"),
            dict(T=33, Hkv=1, coupling="matrix", mask="left", mean=3.0),
            dict(T=24, Hkv=4, mean=10.0, causal="strict"),
            dict(T=48, mask="right", mean=3.0),
        ]
    else:
        dims, dtypes, long_T = (64, 128), ("fp32", "bf16", "fp16"), 16384
        shapes = [
            dict(T=1, B=2, H=4, Hkv=4),
            dict(T=257, coupling="scalar", mask="right"),
            dict(T=1024, Hkv=1, coupling="matrix", mask="left", mean=3.0),
            dict(T=1024, Hkv=4, mean=10.0, causal="strict"),
            dict(T=4096, mask="right", mean=3.0),
            dict(T=4096, coupling="matrix", mean=10.0),
        ]
    with_ref = [(ParityCase(d=d, **s), dt) for s in shapes for dt in dtypes for d in dims]
    long_rows = [(ParityCase(T=long_T, d=d, B=1, H=2, Hkv=1, mask="left", mean=3.0), dt)
                 for dt in dtypes for d in dims]
    return with_ref, long_rows


# ---------------------------------------------------------------------------
# Speed and memory
# ---------------------------------------------------------------------------


def speed_row(impl: str, B: int, H: int, T: int, d: int, dtype: torch.dtype, device: torch.device,
              warmup: int, reps: int) -> Dict:
    row = {"impl": impl, "B": B, "H": H, "T": T, "d": d, "dtype": str(dtype).replace("torch.", "")}
    t0 = time.monotonic()
    q = k = v = None
    try:
        if impl in ("eager_reference", "compiled_reference"):
            free = free_bytes(device)
            need = reference_bytes(B, H, T)
            if free is not None and need > 0.9 * free:
                row["status"] = f"skipped: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
                return row
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, T, d, device=device, dtype=dtype, generator=gen).requires_grad_()
                   for _ in range(3))
        fwd, fwd_bwd = speed_callables(impl, q, k, v)
        row.update(measure(fwd, fwd_bwd, device, warmup, reps))
        if impl == "sdpa":
            row["sdpa_kernel"] = sdpa_backend_kernel(device, dtype, B, H, T, d)
        elif impl == "attention":
            row["sdpa_kernel"] = sdpa_kernel_name(q, k, v, is_causal=True)
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as exc:  # a failing implementation must not hide the others
        row["status"] = "error: " + _short_error(exc)
    finally:
        q = k = v = None
        empty_cache(device)
        row["seconds"] = time.monotonic() - t0
    return row


def add_ratios(rows: List[Dict]) -> None:
    """Each ok row's fwd and fwd+bwd time over the yardstick's at its shape."""
    yard = {(r["T"], r["d"]): r for r in rows if r["impl"] == YARDSTICK and r.get("status") == "ok"}
    for r in rows:
        y = yard.get((r["T"], r["d"]))
        if r.get("status") == "ok" and y:
            r["fwd_ratio_to_yardstick"] = r["fwd_ms"] / y["fwd_ms"]
            r["fwd_bwd_ratio_to_yardstick"] = r["fwd_bwd_ms"] / y["fwd_bwd_ms"]


# ---------------------------------------------------------------------------
# End to end: GPT-2 training step with and without the barrier
# ---------------------------------------------------------------------------


def gpt2_model(device: torch.device, smoke: bool, T: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    if smoke:
        cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=T, vocab_size=128)
    else:
        cfg = GPT2Config()  # GPT-2 small, 124M parameters
    torch.manual_seed(0)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").to(device)
    model.train()
    return model


def e2e_rows(device: torch.device, smoke: bool, batch: int, T: int, warmup: int, reps: int,
             deadline: float) -> List[Dict]:
    import barrier_ops

    use_bf16 = not smoke or device.type == "cuda"
    model = gpt2_model(device, smoke, T)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (batch, T), generator=gen).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    accepts_backend = "backend" in inspect.signature(barrier_ops.attach).parameters
    variants = [("none", None)] + ([(f"attach {b}", b) for b in BACKENDS] if accepts_backend
                                   else [("attach (default backend)", "default")])
    base = {"model": "gpt2-small" if not smoke else "gpt2-tiny", "params": n_params, "batch": batch,
            "T": T, "autocast": "bf16" if use_bf16 else "off", "weight": BARRIER_WEIGHT}
    rows = [dict(base, variant=name, backend=backend) for name, backend in variants]

    def attached(backend):
        if backend is not None:
            barrier_ops.attach(model, weight=BARRIER_WEIGHT,
                               **({} if backend == "default" else {"backend": backend}))

    def detached(backend):
        if backend is not None and barrier_ops.get_handle(model) is not None:
            barrier_ops.detach(model)

    # Warm-up per variant (lazy optimizer state, autotuning, first-call costs),
    # then the variants take turns within each repeat, so a slow phase of a
    # shared machine hits all of them. attach/detach sit outside the timed step.
    live = []
    for row in rows:
        if time.monotonic() > deadline:
            row["status"] = "skipped: budget"
            continue
        try:
            attached(row["backend"])
            try:
                for _ in range(warmup):
                    step()
                sync(device)
            finally:
                detached(row["backend"])
            row["status"], row["_samples"] = "ok", []
            live.append(row)
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        except Exception as exc:  # one failing variant must not stop the others
            row["status"] = "error: " + _short_error(exc)
        opt.zero_grad(set_to_none=True)
        empty_cache(device)
    for _ in range(reps):
        for row in live:
            if row["status"] != "ok":
                continue
            try:
                attached(row["backend"])
                try:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    row["_samples"].append(time_ms(step, device, 0, 1)[0])
                    if device.type == "cuda":
                        row["peak_mib"] = max(row.get("peak_mib") or 0.0,
                                              torch.cuda.max_memory_allocated(device) / 2**20)
                finally:
                    detached(row["backend"])
            except Exception as exc:
                row["status"] = "error: " + _short_error(exc)
                opt.zero_grad(set_to_none=True)
    for row in rows:
        samples = row.pop("_samples", None)
        if row.get("status") == "ok" and samples:
            row["step_ms"] = statistics.median(samples)
            row["step_ms_range"] = [min(samples), max(samples)]
    baseline = rows[0].get("step_ms")
    for r in rows[1:]:
        if baseline and r.get("status") == "ok":
            r["overhead_pct"] = 100.0 * (r["step_ms"] / baseline - 1.0)
    return rows


# ---------------------------------------------------------------------------
# The sdpa backend's value split: which variant, which kernel
# ---------------------------------------------------------------------------

VALUE_SPLITS = ("whole", "equal", "narrow")
# Probed one at a time under torch.nn.attention.sdpa_kernel: does every SDPA
# call of the variant run on it (forward and backward)? Not math: it always
# runs, and at T = 4096 it materialises T x T (seconds of GPU time for nothing).
PROBE_KERNELS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
FUSED_KERNELS = PROBE_KERNELS  # each timed where available and not PyTorch's own choice
# A split is recommended only if its summed fwd+bwd time beats "whole" by this fraction.
SPLIT_MARGIN = 0.05


@dataclass
class SplitCase:
    T: int
    d: int
    B: int
    H: int
    mask: bool = False  # key padding (a quarter of every other sequence, right)
    rows: int = 0  # a row set of this many sorted positions per sequence (0: every row)

    @property
    def name(self) -> str:
        extra = (" key-pad" if self.mask else "") + (f" rows={self.rows}" if self.rows else "")
        return f"B{self.B} H{self.H} T{self.T} d{self.d}{extra}"


def split_cases(smoke: bool) -> List[SplitCase]:
    """d = 128 and 64 without a mask (V' 262 / 134 wide), d = 64 with key padding (the
    extra logit column makes q' 136 wide, as wide as V'), d = 64 with a row set
    (an explicit [B, 1, R, T] mask, which FlashAttention does not take)."""
    if smoke:
        return [SplitCase(T=128, d=16, B=1, H=2), SplitCase(T=128, d=16, B=1, H=2, mask=True),
                SplitCase(T=128, d=16, B=1, H=2, rows=16)]
    return [SplitCase(T=4096, d=128, B=4, H=16), SplitCase(T=4096, d=64, B=4, H=16),
            SplitCase(T=4096, d=64, B=4, H=16, mask=True), SplitCase(T=4096, d=64, B=4, H=16, rows=512)]


def split_inputs(case: SplitCase, dtype: torch.dtype, device: torch.device):
    """q, k, v leaves [B, H, T, d], the key padding mask (or None), the positions (or None)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(case.B, case.H, case.T, case.d, device=device, dtype=dtype, generator=gen)
               .requires_grad_() for _ in range(3))
    mask = positions = None
    if case.mask:
        mask = torch.ones(case.B, case.T, dtype=torch.bool, device=device)
        mask[1::2, case.T - case.T // 4:] = False
    if case.rows:
        cpu = torch.Generator().manual_seed(0)
        positions = torch.stack([torch.randperm(case.T, generator=cpu)[: case.rows].sort().values
                                 for _ in range(case.B)]).to(device)
    return q, k, v, mask, positions


def kappa_callables(case: SplitCase, q, k, v, mask, positions):
    """(kappa, fwd, fwd_bwd) of the sdpa backend's core (barrier_ops._sdpa.kappa_sdpa), as the
    composite calls it: rows gathered, w = v in float32; the split is whatever is in force."""
    from barrier_ops import _sdpa

    scale = 1.0 / math.sqrt(case.d)

    def kappa():
        query = q
        if positions is not None:
            index = positions[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])
            query = q.gather(2, index)
        return _sdpa.kappa_sdpa(query, k, v.float(), scale, "inclusive", mask, positions)

    def fwd():
        with torch.no_grad():
            kappa()

    def fwd_bwd():
        torch.autograd.grad(kappa().sum(), (q, k, v))

    return kappa, fwd, fwd_bwd


class _SplitInForce:
    """barrier_ops._sdpa.SDPA_VALUE_SPLIT set to one variant, and put back."""

    def __init__(self, split: str):
        self.split = split

    def __enter__(self):
        from barrier_ops import _sdpa

        self.saved = _sdpa.SDPA_VALUE_SPLIT
        _sdpa.SDPA_VALUE_SPLIT = self.split

    def __exit__(self, *exc):
        from barrier_ops import _sdpa

        _sdpa.SDPA_VALUE_SPLIT = self.saved
        return False


def sdpa_calls(fn: Callable[[], None]) -> List[Dict]:
    """The SDPA calls one run of fn makes: q/k and v widths, and the kernel PyTorch picks for each
    (torch._fused_sdp_choice on the very tensors and mask)."""
    calls = []
    original = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kw):
        try:
            choice = torch._fused_sdp_choice(query, key, value, attn_mask=attn_mask, **kw)
            from torch.nn.attention import SDPBackend
            kernel = SDPBackend(choice).name
        except Exception as exc:
            kernel = f"unknown ({_short_error(exc)})"
        calls.append({"qk": query.shape[-1], "v": value.shape[-1], "mask": attn_mask is not None,
                      "kernel": kernel})
        return original(query, key, value, attn_mask=attn_mask, **kw)

    F.scaled_dot_product_attention = spy
    try:
        fn()
    finally:
        F.scaled_dot_product_attention = original
    return calls


def probe_kernel(name: str, fn: Callable[[], None], device: torch.device) -> str:
    """"ok" if fn (forward and backward) runs with only SDPA kernel `name` enabled, else why not:
    PyTorch's own reasons (the warnings sdp_utils prints) when it has no kernel left."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        backend = getattr(SDPBackend, name)
    except AttributeError:
        return f"not in this torch ({torch.__version__})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([backend]):
                fn()
            sync(device)
            return "ok"
        except torch.cuda.OutOfMemoryError:
            empty_cache(device)
            return "OOM"
        except RuntimeError as exc:
            reasons = [str(w.message).strip().splitlines()[0][:200] for w in caught
                       if "kernel not used because" not in str(w.message)]
            return "unavailable: " + ("; ".join(dict.fromkeys(reasons)) if reasons else _short_error(exc))


def split_rows(case: SplitCase, dtype: torch.dtype, device: torch.device, warmup: int, reps: int) -> List[Dict]:
    """One row per value-split variant: the SDPA calls and their kernels, which kernels can take
    every call, fwd and fwd+bwd time with PyTorch's choice and with each other available fused
    kernel forced, and kappa's and its gradients' largest differences from the whole variant's
    (within the parity tolerances of the dtype, or the variant is not recommended)."""
    from barrier_ops import _sdpa

    dtype_name = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
    q, k, v, mask, positions = split_inputs(case, dtype, device)
    kappa, fwd, fwd_bwd = kappa_callables(case, q, k, v, mask, positions)
    rows, whole_kappa = [], None

    def each_variant(work):
        # Every variant in turn, each failure its own row's (one variant failing must not hide the others).
        for row in rows:
            if row["status"] != "ok":
                continue
            t0 = time.monotonic()
            try:
                with _SplitInForce(row["split"]):
                    work(row)
            except torch.cuda.OutOfMemoryError:
                row["status"] = "OOM"
            except Exception as exc:
                row["status"] = "error: " + _short_error(exc)
            finally:
                empty_cache(device)
                row["seconds"] = row.get("seconds", 0.0) + time.monotonic() - t0

    def check(row):
        nonlocal whole_kappa
        masked = mask is not None and positions is None
        row["layout"] = list(_sdpa.value_layout(device, case.d, masked, split_keys=dtype in (
            torch.float16, torch.bfloat16), split=row["split"]))
        row["calls"] = sdpa_calls(fwd_bwd)
        row["kernels"] = " + ".join(c["kernel"] for c in row["calls"])
        value = kappa()
        beta = torch.randn(value.shape, device=device, generator=torch.Generator(device=device).manual_seed(1))
        got = [value.detach().float()] + [g.float() for g in torch.autograd.grad(
            (value.float() * beta).sum(), (q, k, v))]
        value = beta = None
        if row["split"] == "whole":
            whole_kappa = got
        if whole_kappa is not None:
            tol = TOL.get(dtype_name, TOL["fp32"])
            row["kappa_rel_diff_vs_whole"] = max_rel_error(got[0], whole_kappa[0])
            row["grad_rel_diff_vs_whole"] = {n: max_rel_error(g, w) for n, g, w in
                                             zip(("dq", "dk", "dv"), got[1:], whole_kappa[1:])}
            row["agrees"] = bool(row["kappa_rel_diff_vs_whole"] <= tol["margin"]
                                 and all(e <= tol["grad"] for e in row["grad_rel_diff_vs_whole"].values()))
        got = None
        row["probe"] = {name: probe_kernel(name, fwd_bwd, device) for name in PROBE_KERNELS}

    def time_it(row):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        row.update(measure(fwd, fwd_bwd, device, warmup, reps))
        chosen = {c["kernel"] for c in row["calls"]}
        row["forced_fwd_bwd_ms"] = {}
        for name in FUSED_KERNELS:
            if row["probe"].get(name) != "ok" or chosen == {name}:
                continue
            with sdpa_kernel([getattr(SDPBackend, name)]):
                row["forced_fwd_bwd_ms"][name], _ = time_ms(fwd_bwd, device, warmup, reps)

    try:
        rows.extend({"case": case.name, **asdict(case), "dtype": dtype_name, "split": split, "status": "ok"}
                    for split in VALUE_SPLITS)
        # Layouts, kernels, agreement and probes first (they also warm every variant
        # up), then the timings, so that no variant pays the first calls' costs.
        each_variant(check)
        each_variant(time_it)
    finally:
        q = k = v = whole_kappa = None
        empty_cache(device)
    return rows


def recommend_split(rows: List[Dict], device: torch.device) -> Dict:
    """The variant with the smallest fwd+bwd time (PyTorch's kernel choice) summed over the cases
    where every variant ran and agreed with the whole one; and the fastest forced kernel seen."""
    by_case: Dict[str, Dict[str, Dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["split"]] = r
    totals = {s: 0.0 for s in VALUE_SPLITS}
    per_case, used = {}, []
    for case, variants in by_case.items():
        ok = {s: r for s, r in variants.items() if r.get("status") == "ok" and r.get("agrees", False)}
        if ok:
            per_case[case] = min(ok, key=lambda s: ok[s]["fwd_bwd_ms"])
        if len(ok) == len(VALUE_SPLITS):
            used.append(case)
            for s in VALUE_SPLITS:
                totals[s] += ok[s]["fwd_bwd_ms"]
    # Per case, the fastest (variant, kernel) seen, PyTorch's choice or forced.
    fastest = {}
    for r in rows:
        if r.get("status") != "ok" or not r.get("agrees", False):
            continue
        options = [(r["fwd_bwd_ms"], r["split"], r.get("kernels", "?"))]
        options += [(ms, r["split"], f"{kernel} (forced)") for kernel, ms in r.get("forced_fwd_bwd_ms", {}).items()]
        best = min(options)
        if r["case"] not in fastest or best[0] < fastest[r["case"]]["fwd_bwd_ms"]:
            fastest[r["case"]] = {"fwd_bwd_ms": best[0], "split": best[1], "kernels": best[2]}
    try:
        from barrier_ops import _sdpa
        current = _sdpa.AUTO_VALUE_SPLIT.get(device.type, "whole")
    except Exception:
        current = None
    pick = min(totals, key=totals.get) if used else None
    if pick and pick != "whole" and totals[pick] > (1.0 - SPLIT_MARGIN) * totals["whole"]:
        pick = "whole"  # a split must earn its extra SDPA calls: not faster by the margin, keep one call
    return {"device_type": device.type, "recommended": pick or "n/a (no case where every variant ran and agreed)",
            "totals_fwd_bwd_ms": totals if used else {}, "cases_counted": used, "per_case": per_case,
            "current_auto": current,
            "speedup_vs_whole": (totals["whole"] / totals[pick]) if used and totals[pick] > 0 else None,
            "fastest_seen": fastest}


# ---------------------------------------------------------------------------
# Recommendation and report
# ---------------------------------------------------------------------------


def shape_class(T: int, d: int) -> str:
    return f"d={d} T<=2048" if T <= 2048 else f"d={d} T>=4096"


def recommend(parity: List[Dict], speed: List[Dict], device: torch.device) -> Dict:
    """Fastest fwd+bwd per shape class among the backends that passed every parity row."""
    checked = {b: [r for r in parity if r["backend"] == b] for b in BACKENDS}
    passed = {b: bool(rows) and all(r.get("passed") for r in rows) for b, rows in checked.items()}
    per_class: Dict[str, Dict[str, float]] = {}
    for (T, d) in sorted({(r["T"], r["d"]) for r in speed}):
        times = {r["impl"]: r["fwd_bwd_ms"] for r in speed
                 if r["T"] == T and r["d"] == d and r["impl"] in BACKENDS and r.get("status") == "ok"}
        if len(times) < len(BACKENDS):
            continue  # compare classes on shapes where both were measured
        cls = per_class.setdefault(shape_class(T, d), {b: 0.0 for b in BACKENDS})
        for b in BACKENDS:
            cls[b] += times[b]
    eligible = [b for b in BACKENDS if passed[b]]
    winners = {}
    for cls, totals in per_class.items():
        cands = {b: t for b, t in totals.items() if b in eligible}
        winners[cls] = min(cands, key=cands.get) if cands else None
    distinct = sorted({w for w in winners.values() if w})
    if not any(checked.values()):
        line = "n/a: no parity rows ran"
    elif not eligible:
        line = "none: no backend passed every parity row"
    elif not winners:
        line = f"{eligible[0]} (no speed rows with both backends; parity passed: {', '.join(eligible)})"
    elif len(distinct) == 1:
        line = distinct[0]
    else:
        line = "by shape class: " + "; ".join(f"{c}: {w}" for c, w in sorted(winners.items()))
    try:
        from barrier_ops.backends import AUTO
        current = AUTO.get(device.type)
    except Exception:
        current = None
    return {"device_type": device.type, "recommended": line, "per_class": winners,
            "class_fwd_bwd_ms": per_class, "parity_passed": passed, "current_auto": current}


def environment(device: torch.device) -> Dict:
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device_type": device.type,
        "threads": torch.get_num_threads(),
    }
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except Exception:
        env["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["fused_cuda_kernels"] = None  # set once barrier_ops has been imported
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def import_barrier_ops(device: torch.device) -> Tuple[bool, Optional[str], Optional[bool]]:
    """(imported, error, CUDA kernels registered) without letting a failure escape."""
    try:
        import barrier_ops  # noqa: F401
    except Exception as exc:
        return False, _short_error(exc), None
    registered = None
    if device.type == "cuda":
        try:
            registered = bool(torch._C._dispatch_has_kernel_for_dispatch_key("barrier_ops::kappa", "CUDA"))
        except Exception:
            registered = False
    return True, None, registered


def _fmt(x, spec=".3g"):
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return format(x, spec)


def value_split_markdown(rows: List[Dict], rec: Dict) -> List[str]:
    """The report's section on the sdpa backend's value-split variants."""
    L = ["", "## sdpa backend: value split (which SDPA kernel V' reaches)", "",
         f"**recommended SDPA_VALUE_SPLIT on {rec.get('device_type', '?')}: {rec.get('recommended', 'n/a')}** "
         f"(current AUTO_VALUE_SPLIT = {rec.get('current_auto')!r}; a split only if >= "
         f"{100 * SPLIT_MARGIN:.0f}% faster than whole in fwd+bwd summed over "
         f"{len(rec.get('cases_counted', []))} case(s) where every variant ran and agreed"
         + (f", {rec['speedup_vs_whole']:.2f}x the whole variant" if rec.get("speedup_vs_whole") else "")
         + "; recommends only, changes nothing)", "",
         "barrier_ops._sdpa.kappa_sdpa fwd+bwd (rows gathered, w = v in float32). kernels: "
         "torch._fused_sdp_choice for each SDPA call (one per V' part). probe: the kernels that "
         "run every call alone (torch.nn.attention.sdpa_kernel), F flash, C cuDNN, E memory-efficient. "
         "forced: fwd+bwd ms with another available kernel forced. diff: max|kappa - "
         "kappa_whole| / max|kappa_whole|, and the worst of dq, dk, dv likewise (a random weight per row).", "",
         "| case | split | q' / V' parts | kernels | probe F C E | fwd ms | fwd+bwd ms | forced | diff |",
         "|---|---|---|---|---|---:|---:|---|---:|"]
    for r in rows:
        layout = r.get("layout") or ["?", "?"]
        parts = layout[1] if isinstance(layout[1], (list, tuple)) else [layout[1]]
        shape = f"{layout[0]} / {'+'.join(str(p) for p in parts)}"
        if r.get("status") != "ok":
            L.append(f"| {r['case']} | {r['split']} | {shape} | {r.get('status')} | | | | | |")
            continue
        probe = " ".join("y" if r["probe"].get(k) == "ok" else "-" for k in PROBE_KERNELS)
        forced = ", ".join(f"{k.split('_')[0].lower()} {ms:.2f}" for k, ms in r.get("forced_fwd_bwd_ms", {}).items())
        grads = r.get("grad_rel_diff_vs_whole") or {}
        diff = _fmt(r.get("kappa_rel_diff_vs_whole"), ".1e") + (
            f" / {max(grads.values()):.1e}" if grads else "") + ("" if r.get("agrees", True) else " **disagrees**")
        L.append(f"| {r['case']} | {r['split']} | {shape} | {r['kernels']} | {probe} | {r['fwd_ms']:.3f} | "
                 f"{r['fwd_bwd_ms']:.3f} | {forced} | {diff} |")
    if rec.get("fastest_seen"):
        L += ["", "Fastest seen per case (PyTorch's choice or forced): " + "; ".join(
            f"{c}: {f['split']} {f['kernels']} {f['fwd_bwd_ms']:.2f} ms" for c, f in rec["fastest_seen"].items())]
    reasons = sorted({f"{k}: {v[len('unavailable: '):]}" for r in rows for k, v in (r.get("probe") or {}).items()
                      if isinstance(v, str) and v.startswith("unavailable")})
    if reasons:
        L += ["", "Why a kernel could not take a variant (PyTorch's reasons, deduplicated):", ""]
        L += [f"- {x[:400]}" for x in reasons[:20]]
    return L


def markdown(report: Dict) -> str:
    env, rec = report["environment"], report.get("recommendation") or {}
    what = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('threads')} threads)"
    L = [f"# barrier_ops GPU check{' (CPU smoke)' if report['smoke'] else ''}", "",
         f"- device: {what}" + (f", compute capability {env['capability']}, {env['gpu_memory_gib']} GiB"
                                 if env.get("gpu") else ""),
         f"- torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
         f"transformers {env.get('transformers')}, python {env['python']}",
         f"- date {env['date']}; harness time {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget"]
    if report.get("import_error"):
        L.append(f"- **barrier_ops did not import**: {report['import_error']} (yardstick rows only)")
    elif env.get("device_type") == "cuda":
        L.append(f"- fused CUDA kernels registered: {env.get('fused_cuda_kernels')}")
    if report.get("cuda_context_error"):
        L.append(f"- **CUDA context broken** (later GPU rows skipped): {report['cuda_context_error']}")
    L += ["", f"**recommended auto backend on {env['device_type'].upper() if env['device_type'] == 'cuda' else env['device_type']}: "
          f"{rec.get('recommended', 'n/a')}** (current AUTO[{env['device_type']!r}] = {rec.get('current_auto')!r}; "
          "this run recommends only, it changes nothing)", ""]
    if rec.get("per_class"):
        L.append("| shape class | " + " | ".join(f"{b} fwd+bwd ms (sum)" for b in BACKENDS) + " | pick |")
        L.append("|---|" + "---:|" * len(BACKENDS) + "---|")
        for cls, totals in sorted(rec["class_fwd_bwd_ms"].items()):
            L.append(f"| {cls} | " + " | ".join(f"{totals[b]:.2f}" for b in BACKENDS)
                     + f" | {rec['per_class'].get(cls)} |")
        L.append("")
    L.append("parity passed: " + ", ".join(f"{b}: {'yes' if ok else 'NO'}"
                                         for b, ok in rec.get("parity_passed", {}).items()))

    parity = report["parity"]
    n_fail = sum(1 for r in parity if not r.get("passed"))
    L += ["", f"## Parity ({len(parity)} rows, {n_fail} failed)", "",
          "Max relative error (max|x - ref| / max|ref|) vs the float64 reference, or vs the other "
          f"backend (tolerance x{CROSS_FACTOR:g}) where T x T does not fit. Gradients at the barrier's "
          f"real scale: loss = {BARRIER_WEIGHT} * mean barrier as one slice of {REAL_BATCH_TOKENS} tokens "
          f"(fp16: x{FP16_LOSS_SCALE:g} loss scale).", "",
          "| case | dtype | backend | vs | margins | worst grad | tol m / g | pass |",
          "|---|---|---|---|---:|---:|---:|---|"]
    for r in parity:
        if "margin_rel_err" in r:
            worst = max(r["grad_rel_err"], key=lambda n: (not math.isfinite(r["grad_rel_err"][n]), r["grad_rel_err"][n]))
            grad = f"{worst} {_fmt(r['grad_rel_err'][worst], '.2e')}"
            m = _fmt(r["margin_rel_err"], ".2e")
        else:
            grad, m = "", r.get("error", "")
        uf = f" (underflow: {', '.join(r['underflow'])})" if r.get("underflow") else ""
        L.append(f"| {r['case']} | {r['dtype']} | {r['backend']} | {r.get('compared_to', '–')} | {m} | {grad}{uf} | "
                 f"{r['tol_margin']:.0e} / {r['tol_grad']:.0e} | {'pass' if r.get('passed') else '**FAIL**'} |")

    speed = report["speed"]
    L += ["", "## Speed and memory", "",
          f"x yardstick: time over plain SDPA attention fwd+bwd (F.scaled_dot_product_attention, "
          "is_causal=True) at the same shape. kernel: torch._fused_sdp_choice for the sdpa backend's "
          "q', k', V' (and for the yardstick's q, k, v).", "",
          "| d | T | impl | fwd ms | fwd+bwd ms | peak MiB | fwd+bwd x yardstick | kernel |",
          "|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in sorted(speed, key=lambda r: (r["d"], r["T"], SPEED_IMPLS.index(r["impl"]))):
        if r.get("status") != "ok":
            L.append(f"| {r['d']} | {r['T']} | {r['impl']} | {r.get('status')} | | | | |")
            continue
        L.append(f"| {r['d']} | {r['T']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                 f"{_fmt(r['peak_mib'], '.0f')} | {_fmt(r.get('fwd_bwd_ratio_to_yardstick'), '.2f')} | "
                 f"{r.get('sdpa_kernel', '')} |")

    L += value_split_markdown(report.get("value_split") or [], report.get("value_split_recommendation") or {})

    e2e = report["e2e"]
    L += ["", "## End to end: GPT-2 AdamW step", ""]
    if e2e:
        r0 = e2e[0]
        L += [f"{r0['model']} ({r0['params'] / 1e6:.2f}M params), batch {r0['batch']}, T {r0['T']}, "
              f"autocast {r0['autocast']}, barrier weight {r0['weight']}", "",
              "| variant | step ms | overhead % | peak MiB |", "|---|---:|---:|---:|"]
        for r in e2e:
            if r.get("status") != "ok":
                L.append(f"| {r['variant']} | {r.get('status')} | | |")
                continue
            L.append(f"| {r['variant']} | {r['step_ms']:.1f} | {_fmt(r.get('overhead_pct'), '+.1f')} | "
                     f"{_fmt(r.get('peak_mib'), '.0f')} |")
    if report.get("skipped"):
        L += ["", f"## Skipped for the time budget ({len(report['skipped'])})", ""]
        L += [f"- {s}" for s in report["skipped"]]
    if report.get("errors"):
        L += ["", "## Harness errors", ""] + [f"- {e}" for e in report["errors"]]
    return "\n".join(L) + "\n"


def write_report(report: Dict, outdir: str) -> None:
    """report.json, then report.md; a failure in the summary or the markdown is
    recorded in the report and never stops the run."""
    report["elapsed_s"] = time.monotonic() - report["_t0"]
    try:
        report["recommendation"] = recommend(report["parity"], report["speed"], report["_device"])
    except Exception as exc:
        report["recommendation"] = {"recommended": f"n/a (recommend failed: {_short_error(exc)})"}
    try:
        report["value_split_recommendation"] = recommend_split(report.get("value_split", []), report["_device"])
    except Exception as exc:
        report["value_split_recommendation"] = {"recommended": f"n/a (recommend_split failed: {_short_error(exc)})"}
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    os.makedirs(outdir, exist_ok=True)
    tmp = os.path.join(outdir, "report.json.tmp")
    with open(tmp, "w") as f:
        json.dump(_finite_or_str(public), f, indent=1, default=str)
    os.replace(tmp, os.path.join(outdir, "report.json"))
    try:
        text = markdown(public)
    except Exception as exc:
        text = (f"# barrier_ops GPU check\n\nreport.md could not be rendered ({_short_error(exc)}); "
                "report.json holds every row.\n")
    with open(os.path.join(outdir, "report.md"), "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", default="runs/gpu_check")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU smoke run)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new rows after this many seconds (default 300; smoke 60)")
    p.add_argument("--hard-limit-s", type=float, default=None,
                   help="after this many seconds, dump every thread's stack to stderr and exit "
                        "(a hang inside a row); default budget + 60")
    p.add_argument("--ref-max-t", type=int, default=None, help="largest T checked against the reference")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    return p.parse_args(argv)


class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)

    def allows(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


def _simulated_hang() -> None:
    """Test hook (GPU_CHECK_FAKE_HARNESS_HANG_S): a row that does not return."""
    seconds = float(os.environ.get("GPU_CHECK_FAKE_HARNESS_HANG_S", "0") or 0)
    if seconds > 0:
        print(f"[gpu_check] simulating a hang of {seconds:.0f} s (GPU_CHECK_FAKE_HARNESS_HANG_S)", flush=True)
        time.sleep(seconds)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    smoke = args.smoke
    budget = Budget(args.budget_s if args.budget_s is not None else (60.0 if smoke else 300.0))
    # A row that hangs (a kernel that never returns, a deadlock) cannot be skipped by the
    # budget: at the hard limit faulthandler prints where every thread is and exits. The
    # report on disk is the one written after the last finished row.
    hard_limit = args.hard_limit_s if args.hard_limit_s is not None else budget.seconds + 60.0
    faulthandler.dump_traceback_later(max(hard_limit, 1.0), exit=True)
    ref_max_t = args.ref_max_t or (48 if smoke else 4096)
    report = {"_t0": budget.t0, "_device": device, "smoke": smoke, "budget_s": budget.seconds,
              "hard_limit_s": hard_limit, "elapsed_s": 0.0, "finished": False,
              "environment": environment(device), "parity": [], "speed": [], "value_split": [], "e2e": [],
              "recommendation": None, "skipped": [], "errors": [], "import_error": None,
              "cuda_context_error": None,
              "settings": {"ref_max_t": ref_max_t, "tolerances": TOL, "cross_factor": CROSS_FACTOR,
                           "real_batch_tokens": REAL_BATCH_TOKENS, "barrier_weight": BARRIER_WEIGHT,
                           "fp16_loss_scale": FP16_LOSS_SCALE}}
    out = args.outdir

    def log(msg):
        print(f"[gpu_check {time.monotonic() - budget.t0:6.1f}s] {msg}", flush=True)

    def device_broken() -> bool:
        """True once the CUDA context is poisoned: the later GPU rows are skipped, not run."""
        if report["cuda_context_error"] is None:
            report["cuda_context_error"] = cuda_context_error(device)
        return report["cuda_context_error"] is not None

    def guarded(label: str, estimate_s: float, fn: Callable[[], None]) -> None:
        """One unit of work: skipped past the budget or on a broken device; any
        exception recorded; the report rewritten after it whatever happened."""
        if not budget.allows(estimate_s):
            report["skipped"].append(f"{label} (needs ~{estimate_s:.0f} s, {max(budget.left(), 0):.0f} s left)")
            return
        if device_broken():
            report["skipped"].append(f"{label} (CUDA context broken)")
            return
        log(label)
        try:
            fn()
        except Exception as exc:  # the harness itself must finish and write its report
            report["errors"].append(f"{label}: {_short_error(exc)}")
            traceback.print_exc()
            device_broken()
        try:
            write_report(report, out)
        except Exception as exc:  # a full disk must not end the run either
            print(f"[gpu_check] could not write the report: {_short_error(exc)}", flush=True)

    # Sizes
    if smoke:
        speed_B, speed_H, speed_dims, speed_T = 1, 2, (16,), (64, 128)
        speed_dtype, warmup, reps = torch.float32, 1, 3
        first_speed = (128, 16)
        e2e_batch, e2e_T, e2e_warm, e2e_reps = 2, 32, 1, 3
    else:
        speed_B, speed_H, speed_dims, speed_T = 4, 16, (128, 64), (1024, 2048, 4096, 8192, 16384)
        speed_dtype, warmup, reps = torch.bfloat16, 3, 10
        first_speed = (4096, 128)
        e2e_batch, e2e_T, e2e_warm, e2e_reps = 8, 1024, 3, 10
    row_est = 1.0 if smoke else 5.0
    with_ref, long_cases = parity_cases(device, smoke)

    def parity(case, dt):
        report["parity"].extend(parity_case(case, dt, device, ref_max_t))

    def run_parity(cases):
        for case, dt in cases:
            guarded(f"parity {case.name} {dt}", row_est, lambda case=case, dt=dt: parity(case, dt))

    def speed(impl, T, d):
        report["speed"].append(speed_row(impl, speed_B, speed_H, T, d, speed_dtype, device, warmup, reps))
        add_ratios(report["speed"])

    def run_speed(shapes, impls):
        for T, d in shapes:
            for impl in impls:
                if impl != YARDSTICK and report["import_error"]:
                    continue  # said once in the report header, not once per row
                est = (90.0 if not smoke else 20.0) if impl == "compiled_reference" else row_est + T / 2048
                guarded(f"speed {impl} T={T} d={d}", est, lambda impl=impl, T=T, d=d: speed(impl, T, d))

    def run_value_split():
        for case in split_cases(smoke):
            est = 3 * (row_est + case.T / 1024)
            guarded(f"sdpa value split {case.name}", est,
                    lambda case=case: report["value_split"].extend(
                        split_rows(case, speed_dtype, device, warmup, reps)))

    def run_e2e():
        report["e2e"] = e2e_rows(device, smoke, e2e_batch, e2e_T, e2e_warm, e2e_reps,
                                 deadline=budget.t0 + budget.seconds)

    compile_ok = not args.no_compile and not smoke
    fast_impls = [i for i in SPEED_IMPLS if i != "compiled_reference"]
    other_shapes = [(T, d) for d in speed_dims for T in speed_T if (T, d) != first_speed]

    write_report(report, out)
    # 0. The yardstick first: plain SDPA needs no extension, so a failed build still
    #    leaves the device's attention timings.
    run_speed([first_speed], [YARDSTICK])
    imported, report["import_error"], registered = import_barrier_ops(device)
    report["environment"]["fused_cuda_kernels"] = registered
    if not imported:
        log(f"barrier_ops did not import: {report['import_error']}; yardstick rows only")
        report["errors"].append(f"import barrier_ops: {report['import_error']}")
        run_speed(other_shapes, [YARDSTICK])
    else:
        _simulated_hang()
        run_parity(with_ref)                                     # 1. parity where the reference fits
        run_speed([first_speed], [i for i in fast_impls if i != YARDSTICK])  # 2. headline speed shape
        run_value_split()                                        # 2b. sdpa value split variants
        guarded("end to end GPT-2", 15.0 if smoke else 45.0, run_e2e)  # 3. end to end
        run_parity(long_cases)                                   # 4. long T, fused vs sdpa
        run_speed(other_shapes, fast_impls)                      # 5. the rest of the speed grid
        if compile_ok:                                           # 6. torch.compile'd reference
            run_speed([first_speed] + other_shapes, ["compiled_reference"])
        else:
            report["skipped"].append("compiled_reference speed rows (--no-compile or smoke)")
    report["finished"] = True
    write_report(report, out)
    faulthandler.cancel_dump_traceback_later()
    log(f"recommended auto backend on {device.type}: {report['recommendation']['recommended']}")
    log(f"wrote {os.path.join(out, 'report.md')} and report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
