"""Accuracy of the margins with an attention-sink token, every backend and dtype (CPU).

Real LLMs have a first token whose key and value are far from the others
(massive activations). This script plants one such token (key and value
offset by `offset` standard deviations in every coordinate; a second variant
offsets the key only; a third has no sink but keys and values of std 20) and
compares each backend's margins with the float64 reference on the same
(rounded) inputs (B=2, H=4, T=256, d=64). It prints a table and writes JSON;
--bench times the sdpa backend instead; --bench-variants times its core
(kappa_sdpa fwd+bwd) with a row set of T/8 rows against every row, and the
value-split variants (whole / equal / narrow), interleaved, one thread.

    python3 benchmarks/sdpa_outliers.py [--out benchmarks/results/sdpa_outliers.json]
    python3 benchmarks/sdpa_outliers.py --bench-variants [--out FILE.json]

Error columns: the largest |m - m_ref| over tokens with |kappa_ref| < 2 (the
ones near the boundary, where the barrier acts), and over all tokens relative
to max(1, |m_ref|). "fp16 nonfinite" counts margins that are NaN/inf where the
reference is finite (overflow).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import barrier_ops
from barrier_ops import reference as ref


def sink_inputs(dtype, offset, *, value_offset=True, spread=1.0, B=2, H=4, T=256, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = spread * k, spread * v
    k[:, :, 0] += offset
    if value_offset:
        v[:, :, 0] += offset
    return [t.to(dtype) for t in (q, k, v)]


def errors(margins, expected):
    kappa_ref = 1 - expected
    near = kappa_ref.abs() < 2
    diff = (margins.double() - expected).abs()
    finite = torch.isfinite(margins)
    bad = int((~finite & torch.isfinite(expected)).sum())
    diff = torch.where(finite, diff, torch.full_like(diff, float("inf")))
    near_err = diff[near].max().item() if near.any() else 0.0
    rel = (diff / expected.abs().clamp(min=1)).max().item()
    return near_err, rel, bad


def bench(reps=15):
    """Seconds per forward + backward of the sdpa backend (min over reps, one thread)."""
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for T in (512, 2048):
                q, k, v = sink_inputs(dtype, 10.0, B=1, H=4, T=T)
                for t in (q, k, v):
                    t.requires_grad_()
                best = float("inf")
                for _ in range(reps + 1):
                    start = time.perf_counter()
                    loss = barrier_ops.margin_barrier_loss(q, k, v, backend="sdpa")
                    torch.autograd.grad(loss, [q, k, v])
                    best = min(best, time.perf_counter() - start)
                out.append(dict(dtype=str(dtype).replace("torch.", ""), B=1, H=4, T=T, d=64,
                                seconds=best))
                print(f"sdpa fwd+bwd {out[-1]['dtype']:>9} B1 H4 T{T:<5} d64: {best * 1e3:8.1f} ms")
    finally:
        torch.set_num_threads(threads)
    return out


def bench_variants(reps=7):
    """ms per fwd+bwd of _sdpa.kappa_sdpa (min and median over interleaved reps, one thread):
    every row vs a row set of T/8 sorted positions (T = 2048), and the value splits (T = 1024)."""
    import math
    import statistics
    import time

    from barrier_ops import _sdpa

    def case(T, d, R, dtype, B=1, H=4):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, T, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
        pos = None
        if R:
            pos = torch.stack([torch.randperm(T, generator=g)[:R].sort().values for _ in range(B)])

        def run():
            query = q if pos is None else q.gather(2, pos[:, None, :, None].expand(B, H, R, d))
            kappa = _sdpa.kappa_sdpa(query, k, v.float(), 1 / math.sqrt(d), "inclusive", None, pos)
            torch.autograd.grad(kappa.sum(), (q, k, v))
        return run

    def interleaved(fns):
        times = {name: [] for name in fns}
        for _ in range(reps + 1):  # the first round warms up
            for name, (fn, split) in fns.items():
                _sdpa.SDPA_VALUE_SPLIT = split
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
        return {name: (min(t[1:]), statistics.median(t[1:])) for name, t in times.items()}

    threads, saved = torch.get_num_threads(), _sdpa.SDPA_VALUE_SPLIT
    torch.set_num_threads(1)
    out = []
    try:
        groups = [("rows", torch.float32, 2048, {"every row": (case(2048, 64, 0, torch.float32), "whole"),
                                                 "R = T/8": (case(2048, 64, 256, torch.float32), "whole")})]
        for dtype in (torch.float32, torch.bfloat16):
            run = case(1024, 64, 0, dtype)
            groups.append(("split", dtype, 1024, {s: (run, s) for s in ("whole", "equal", "narrow")}))
        for what, dtype, T, fns in groups:
            for name, (best, median) in interleaved(fns).items():
                out.append(dict(what=what, variant=name, dtype=str(dtype).replace("torch.", ""), B=1, H=4,
                                T=T, d=64, min_ms=best, median_ms=median))
                print(f"{what:5} {out[-1]['dtype']:>9} T{T:<5} d64 {name:10}: min {best:7.1f} ms, "
                      f"median {median:7.1f} ms")
    finally:
        torch.set_num_threads(threads)
        _sdpa.SDPA_VALUE_SPLIT = saved
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--offsets", default="0,5,10,30,40")
    parser.add_argument("--bench", action="store_true", help="time the sdpa backend only")
    parser.add_argument("--bench-variants", action="store_true",
                        help="time the sdpa core with a row set and with each value split")
    args = parser.parse_args(argv)
    if args.bench or args.bench_variants:
        timings = bench_variants() if args.bench_variants else bench()
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"torch": torch.__version__, "timings": timings}, f, indent=1)
        return
    rows = []
    print(f"{'variant':>10} {'dtype':>9} {'offset':>6} {'backend':>7} {'err |kappa|<2':>14} "
          f"{'rel err all':>12} {'nonfinite':>9}")
    for variant in ("key+value", "key", "std 20"):
        offsets = [0.0] if variant == "std 20" else [float(x) for x in args.offsets.split(",")]
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for offset in offsets:
                q, k, v = sink_inputs(dtype, offset, value_offset=variant == "key+value",
                                      spread=20.0 if variant == "std 20" else 1.0)
                expected = ref.token_margins_reference(q.double(), k.double(), v.double())
                for backend in ("fused", "sdpa"):
                    with torch.no_grad():
                        m = barrier_ops.token_margins(q, k, v, backend=backend)
                    near, rel, bad = errors(m, expected)
                    rows.append(dict(variant=variant, dtype=str(dtype).replace("torch.", ""),
                                     offset=offset, backend=backend, err_near=near,
                                     rel_err=rel, nonfinite=bad))
                    print(f"{variant:>10} {rows[-1]['dtype']:>9} {offset:>6.0f} {backend:>7} "
                          f"{near:>14.3g} {rel:>12.3g} {bad:>9d}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
