"""CUDA benchmark: the margin-barrier op with each backend against plain SDPA
attention and the materialised reference, on the same shapes.

Implementations (--impls):
  fused               barrier_ops.margin_barrier_loss(backend="fused"), our kernels
  sdpa                barrier_ops.margin_barrier_loss(backend="sdpa"), PyTorch's attention kernels
  attention           plain F.scaled_dot_product_attention(q, k, v, is_causal=True)
                      fwd+bwd, PyTorch's own kernel choice: the yardstick
  eager_reference     barrier_ops.reference.margin_barrier_loss_reference
  compiled_reference  torch.compile(reference)
  sdpa_flash          plain SDPA attention with FlashAttention forced (not in the default set)

bf16, B * H = 32, causal, T in 1024..16384, d in {64, 128}. For each shape and
implementation: forward time, forward+backward time (median of CUDA-event
timed runs after warm-up), peak memory of forward+backward, the time over the
yardstick's, the SDPA kernel PyTorch picks (torch._fused_sdp_choice, for the
sdpa backend on its widened q', k', V'), and TFLOP/s counted per the
"Cost" section of docs/math.md:

    margin forward          ~ 3 d T^2 per (b, h)  (causal)
    margin forward+backward ~ 1.4 x attention's,  attention: 2 d T^2 fwd, 7 d T^2 fwd+bwd

Timing and memory come from benchmarks/gpu_check.py (one implementation of
both; gpu_check.sh runs the same rows at B=4, H=16 next to its parity checks).
The reference is skipped where its T x T tensors would not fit, out-of-memory
cases are reported as "OOM". Results go to benchmarks/results/<device>.json
and a markdown table (printed and written next to it). Usage:

    python benchmarks/bench_cuda.py            # full sweep
    python benchmarks/bench_cuda.py --quick    # T in {1024, 4096}, d = 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check  # noqa: E402  (the shared timing: benchmarks/gpu_check.py)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMPLS = ["fused", "sdpa", "attention", "eager_reference", "compiled_reference"]
ALL_IMPLS = IMPLS + ["sdpa_flash"]
ATTENTION = ("attention", "sdpa_flash")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T in {1024, 4096}, d = 64, fewer runs")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None,
                   help="sequence lengths (default 1024 2048 4096 8192 16384)")
    p.add_argument("--head-dims", type=int, nargs="+", default=None, help="head dims (default 64 128)")
    p.add_argument("--batch", type=int, default=4, help="B (H = 32 / B; default 4)")
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=ALL_IMPLS)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default results/<device>.json)")
    p.add_argument("--sdpa-split", default=None, choices=("auto", "whole", "equal", "narrow"),
                   help="the sdpa backend's value split (barrier_ops._sdpa.SDPA_VALUE_SPLIT) for this run")
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
    if kind in ATTENTION:
        return attention
    return 3.0 * d * T * T * BH if fwd_only else 1.4 * 7.0 * d * T * T * BH


def run_one(impl: str, B: int, H: int, T: int, d: int, warmup: int, iters: int) -> Dict:
    """One row, timed by gpu_check.speed_row (CUDA events, median; peak memory of one fwd+bwd)."""
    row = gpu_check.speed_row("attention_flash" if impl == "sdpa_flash" else impl, B, H, T, d,
                              torch.bfloat16, torch.device("cuda"), warmup, iters)
    row["impl"] = impl
    if impl == "sdpa_flash" and row.get("status") == "ok":
        row["sdpa_kernel"] = "FLASH_ATTENTION (forced)"
    if row.get("status") == "ok":
        BH = B * H
        row["peak_mem_mib"] = row["peak_mib"]
        row["fwd_tflops"] = flops(impl, T, d, BH, True) / (row["fwd_ms"] * 1e-3) / 1e12
        row["fwd_bwd_tflops"] = flops(impl, T, d, BH, False) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    return row


def markdown(rows: List[Dict]) -> str:
    lines = [
        "| T | d | impl | fwd ms | fwd+bwd ms | peak MiB | fwd+bwd x attention | fwd TFLOP/s | "
        "fwd+bwd TFLOP/s | SDPA kernel |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['T']} | {r['d']} | {r['impl']} | {r['status']} | | | | | | |")
            continue
        ratio = r.get("fwd_bwd_ratio_to_yardstick")
        lines.append(
            f"| {r['T']} | {r['d']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
            f"{r['peak_mem_mib']:.0f} | {f'{ratio:.2f}' if ratio else 'n/a'} | {r['fwd_tflops']:.1f} | "
            f"{r['fwd_bwd_tflops']:.1f} | {r.get('sdpa_kernel', '')} |"
        )
    return "\n".join(lines)


def speedups(rows: List[Dict]) -> List[str]:
    """At each shape: fused vs eager, compiled and the sdpa backend; both backends vs attention (fwd+bwd)."""
    out = []
    by_shape: Dict = {}
    for r in rows:
        by_shape.setdefault((r["T"], r["d"]), {})[r["impl"]] = r
    for (T, d), impls in sorted(by_shape.items()):
        parts = []
        fused = impls.get("fused")
        if fused and fused["status"] == "ok":
            for other in ("eager_reference", "compiled_reference", "sdpa"):
                o = impls.get(other)
                if o and o["status"] == "ok":
                    parts.append(f"fused {o['fwd_bwd_ms'] / fused['fwd_bwd_ms']:.2f}x faster than {other}")
                elif o:
                    parts.append(f"{other}: {o['status']}")
        elif fused:
            parts.append(f"fused: {fused['status']}")
        for name in ("fused", "sdpa"):
            r = impls.get(name)
            if r and r.get("fwd_bwd_ratio_to_yardstick"):
                parts.append(f"{name} {r['fwd_bwd_ratio_to_yardstick']:.2f}x attention's fwd+bwd time")
        if parts:
            out.append(f"T={T} d={d}: " + ", ".join(parts))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    import barrier_ops  # noqa: F401
    from barrier_ops import _sdpa

    if args.sdpa_split is not None:
        _sdpa.SDPA_VALUE_SPLIT = args.sdpa_split

    # margin_barrier_loss is a composite; the fused CUDA kernels are the kappa op's.
    if "fused" in args.impls and not torch._C._dispatch_has_kernel_for_dispatch_key("barrier_ops::kappa", "CUDA"):
        print("barrier_ops was built without CUDA kernels (BARRIER_OPS_CUDA=1); "
              "leave out fused (--impls sdpa attention ...) to run the rest", file=sys.stderr)
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
    gpu_check.add_ratios(rows)  # each row's time over plain attention's at its shape
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
        "sdpa_value_split": _sdpa.SDPA_VALUE_SPLIT,
        "flop_count": "docs/math.md Cost section: barrier (fused, sdpa, reference) fwd 3dT^2, fwd+bwd 9.8dT^2; "
                      "attention 2dT^2 / 7dT^2 (per b,h)",
        "yardstick": "attention: F.scaled_dot_product_attention(q, k, v, is_causal=True) fwd+bwd",
        "timing": "benchmarks/gpu_check.py: CUDA events, median of iters after warmup",
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
