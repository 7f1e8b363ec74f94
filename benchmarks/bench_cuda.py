"""CUDA benchmark: the fused margin-barrier op against the eager reference,
torch.compile(reference) and PyTorch SDPA (flash attention) on the same shapes.

bf16, B * H = 32, causal, T in 1024..16384, d in {64, 128}. For each shape and
implementation: forward time, forward+backward time (median of CUDA-event
timed runs after warm-up), peak memory of forward+backward, and TFLOP/s
counted per the spec's "Cost" section (shared/spec/barrier-math.md):

    margin forward          ~ 3 d T^2 per (b, h)  (causal)
    margin forward+backward ~ 1.4 x attention's,  attention: 2 d T^2 fwd, 7 d T^2 fwd+bwd

Out-of-memory cases are reported as "OOM". Results go to
benchmarks/results/<device>.json and a markdown table (printed and written
next to it). Usage:

    python benchmarks/bench_cuda.py            # full sweep
    python benchmarks/bench_cuda.py --quick    # T in {1024, 4096}, d = 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMPLS = ["fused", "eager_reference", "compiled_reference", "sdpa_flash"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T in {1024, 4096}, d = 64, fewer runs")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None,
                   help="sequence lengths (default 1024 2048 4096 8192 16384)")
    p.add_argument("--head-dims", type=int, nargs="+", default=None, help="head dims (default 64 128)")
    p.add_argument("--batch", type=int, default=4, help="B (H = 32 / B; default 4)")
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default results/<device>.json)")
    args = p.parse_args(argv)
    if args.seq_lens is None:
        args.seq_lens = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    if args.head_dims is None:
        args.head_dims = [64] if args.quick else [64, 128]
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    if args.iters is None:
        args.iters = 5 if args.quick else 10
    if 32 % args.batch:
        p.error("--batch must divide 32 (B * H = 32)")
    return args


def flops(kind: str, T: int, d: int, BH: int, fwd_only: bool) -> float:
    attention = (2.0 if fwd_only else 7.0) * d * T * T * BH
    if kind == "sdpa_flash":
        return attention
    return 3.0 * d * T * T * BH if fwd_only else 1.4 * 7.0 * d * T * T * BH


def cuda_time_ms(fn: Callable[[], None], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_callables(impl: str, q, k, v):
    import barrier_ops
    from barrier_ops import reference as ref

    if impl == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        grad_out = torch.randn_like(q)

        def fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwd_bwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.autograd.grad(out, (q, k, v), grad_out)

        return fwd, fwd_bwd

    if impl == "fused":
        loss_fn = barrier_ops.margin_barrier_loss
    elif impl == "eager_reference":
        loss_fn = ref.margin_barrier_loss_reference
    else:
        loss_fn = torch.compile(ref.margin_barrier_loss_reference, fullgraph=True)

    def fwd():
        with torch.no_grad():
            loss_fn(q, k, v)

    def fwd_bwd():
        torch.autograd.grad(loss_fn(q, k, v), (q, k, v))

    return fwd, fwd_bwd


def run_one(impl: str, B: int, H: int, T: int, d: int, warmup: int, iters: int) -> Dict:
    row = {"impl": impl, "B": B, "H": H, "T": T, "d": d, "dtype": "bfloat16"}
    torch.cuda.empty_cache()
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                   .requires_grad_() for _ in range(3))
        fwd, fwd_bwd = make_callables(impl, q, k, v)
        row["fwd_ms"] = cuda_time_ms(fwd, warmup, iters)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        row["fwd_bwd_ms"] = cuda_time_ms(fwd_bwd, warmup, iters)
        row["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        BH = B * H
        row["fwd_tflops"] = flops(impl, T, d, BH, True) / (row["fwd_ms"] * 1e-3) / 1e12
        row["fwd_bwd_tflops"] = flops(impl, T, d, BH, False) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as exc:  # a failing baseline (e.g. compile) must not hide the others
        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        q = k = v = None
        torch.cuda.empty_cache()
    return row


def markdown(rows: List[Dict]) -> str:
    lines = [
        "| T | d | impl | fwd ms | fwd+bwd ms | peak MiB | fwd TFLOP/s | fwd+bwd TFLOP/s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['T']} | {r['d']} | {r['impl']} | {r['status']} | | | | |")
            continue
        lines.append(
            f"| {r['T']} | {r['d']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
            f"{r['peak_mem_mib']:.0f} | {r['fwd_tflops']:.1f} | {r['fwd_bwd_tflops']:.1f} |"
        )
    return "\n".join(lines)


def speedups(rows: List[Dict]) -> List[str]:
    """The issue's targets at each shape: fused vs eager, compiled, SDPA (fwd+bwd)."""
    out = []
    by_shape: Dict = {}
    for r in rows:
        by_shape.setdefault((r["T"], r["d"]), {})[r["impl"]] = r
    for (T, d), impls in sorted(by_shape.items()):
        fused = impls.get("fused")
        if not fused or fused["status"] != "ok":
            continue
        parts = []
        for other in ("eager_reference", "compiled_reference"):
            o = impls.get(other)
            if o and o["status"] == "ok":
                parts.append(f"{o['fwd_bwd_ms'] / fused['fwd_bwd_ms']:.1f}x faster than {other}")
            elif o:
                parts.append(f"{other}: {o['status']}")
        s = impls.get("sdpa_flash")
        if s and s["status"] == "ok":
            parts.append(f"{fused['fwd_bwd_ms'] / s['fwd_bwd_ms']:.2f}x SDPA fwd+bwd time")
        out.append(f"T={T} d={d}: " + ", ".join(parts))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    import barrier_ops  # noqa: F401

    if not torch._C._dispatch_has_kernel_for_dispatch_key("barrier_ops::margin_barrier_loss", "CUDA"):
        print("barrier_ops was built without CUDA kernels (BARRIER_OPS_CUDA=1)", file=sys.stderr)
        return 1
    device = torch.cuda.get_device_name()
    B = args.batch
    H = 32 // B
    rows = []
    for d in args.head_dims:
        for T in args.seq_lens:
            for impl in args.impls:
                t0 = time.time()
                row = run_one(impl, B, H, T, d, args.warmup, args.iters)
                rows.append(row)
                shown = f"{row['fwd_bwd_ms']:.2f} ms fwd+bwd" if row["status"] == "ok" else row["status"]
                print(f"T={T:6d} d={d:3d} {impl:20s} {shown}  ({time.time() - t0:.0f} s)", flush=True)
    table = markdown(rows)
    notes = speedups(rows)
    print()
    print(table)
    print()
    print("\n".join(notes))
    meta = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "B": B,
        "H": H,
        "dtype": "bfloat16",
        "causal": True,
        "warmup": args.warmup,
        "iters": args.iters,
        "flop_count": "spec Cost section: fused fwd 3dT^2, fwd+bwd 9.8dT^2; SDPA 2dT^2 / 7dT^2 (per b,h)",
    }
    out = args.out or os.path.join(
        RESULTS_DIR, re.sub(r"[^A-Za-z0-9_.-]+", "_", device).strip("_") + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "summary": notes}, f, indent=2)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(f"# bench_cuda on {device}\n\n{table}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
