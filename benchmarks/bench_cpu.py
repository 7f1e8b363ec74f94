"""CPU benchmark: fused barrier_ops kernels vs the sdpa backend and the pure-PyTorch reference.

For each T it times forward and forward+backward of margin_barrier_loss for
  fused     barrier_ops.margin_barrier_loss(backend="fused") (the C++ op)
  sdpa      barrier_ops.margin_barrier_loss(backend="sdpa") (PyTorch's CPU flash attention)
  eager     barrier_ops.reference.margin_barrier_loss_reference
  compiled  torch.compile(reference)   (skip with --no-compile)
  attention PyTorch's plain causal attention, F.scaled_dot_product_attention with
            value width d (the yardstick: not the barrier, a kernel of known quality)
and measures each one's peak memory in a fresh subprocess (peak RSS growth of
one forward+backward after a warm-up), since CPU tensors have no allocator
statistics. Prints a table and writes JSON.

It also prints a roofline table: achieved GFLOP/s of each fwd+bwd (FLOPs counted
as in docs/benchmarks.md: the barrier is T^2 (10 d + 3) per (b, h), plain causal
attention T^2 (4 d + 3 dv)), the sgemm ceiling measured in the same process and
thread count (torch.mm, 2048^3 float32), the percentage of it, and the fused op's
time over the attention yardstick's next to the FLOP ratio of the two.

    python benchmarks/bench_cpu.py                    # T = 512 1024 2048 4096, d = 64
    python benchmarks/bench_cpu.py --quick            # T = 256 512, no compile
    python benchmarks/bench_cpu.py --out results.json --threads 2
    python benchmarks/bench_cpu.py --T 512 1024 --impls fused sdpa --repeats 5
    python benchmarks/bench_cpu.py --threads 1 --impls fused sdpa attention --no-memory \
        --T 512 1024 2048 4096 8192 --out benchmarks/results/cpu_roofline_1thread.json

With --query-fractions it times instead the fused kappa core alone
(torch.ops.barrier_ops.kappa forward, then kappa_backward) on a row set of
ceil(f T) query rows drawn uniformly without replacement and sorted (as the
sampled barrier draws them), for each fraction f, against f = 1 (no row set,
the full problem). Float32, causal; the fractions take turns within each
repeat and the minimum over repeats is kept (a shared machine's noise only
ever adds time):

    python benchmarks/bench_cpu.py --threads 1 --T 1024 2048 4096 --repeats 7 \
        --query-fractions 1 0.25 0.125 0.0625
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

IMPLS = ("fused", "sdpa", "eager", "compiled", "attention")
SGEMM_N = 2048


def barrier_flops(B, H, T, d):
    """FLOPs of one causal fwd+bwd of margin_barrier_loss, counted in the attention form.

    The barrier's core is attention with value [k | w | g] of width dv = 2d + 1;
    causal attention with key width d and value width dv costs T^2 (4 d + 3 dv)
    per (b, h) (see attention_flops), so T^2 (10 d + 3).
    """
    return attention_flops(B, H, T, d, 2 * d + 1)


def attention_flops(B, H, T, d, dv=None):
    """FLOPs of one causal fwd+bwd of attention, key width d, value width dv (default d).

    A GEMM over all T x T (query, key) pairs with inner width n costs 2 T^2 n;
    causal keeps half the pairs: T^2 n. Forward: Q K^T (n = d), P V (dv).
    Backward: Q K^T again (d), dP = dO V^T (dv), dV = P^T dO (dv), dQ = dS K (d),
    dK = dS^T Q (d). Total T^2 (4 d + 3 dv) per (b, h); element-wise softmax
    work is not counted.
    """
    dv = d if dv is None else dv
    return B * H * T * T * (4 * d + 3 * dv)


def sgemm_gflops(n=SGEMM_N, repeats=5):
    """Median GFLOP/s of torch.mm on n x n float32 matrices in this process (2 n^3 FLOPs)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def _inputs(B, H, Hkv, T, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=gen, requires_grad=True)
    k = torch.randn(B, Hkv, T, d, generator=gen, requires_grad=True)
    v = torch.randn(B, Hkv, T, d, generator=gen, requires_grad=True)
    return q, k, v


def _loss_fn(impl):
    import barrier_ops
    from barrier_ops import reference

    if impl in ("fused", "sdpa"):
        return functools.partial(barrier_ops.margin_barrier_loss, backend=impl)
    if impl == "eager":
        return reference.margin_barrier_loss_reference
    if impl == "compiled":
        return torch.compile(reference.margin_barrier_loss_reference, dynamic=False)
    if impl == "attention":
        return _attention_loss
    raise ValueError(impl)


def _attention_loss(q, k, v):
    """Plain causal attention, value width d, reduced to a scalar so it can be timed like a loss.

    The reduction is a dot with a fixed random tensor, so the backward gets a
    dense, non-constant output gradient as in training. The weight is drawn
    once per shape and cached, so the timed calls do not pay for drawing it.
    """
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return (out * _output_weight(tuple(out.shape), out.dtype)).sum()


@functools.lru_cache(maxsize=4)
def _output_weight(shape, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _closures(impl, shape):
    q, k, v = _inputs(*shape)
    loss_fn = _loss_fn(impl)

    def forward():
        with torch.no_grad():
            loss_fn(q, k, v)

    def forward_backward():
        loss = loss_fn(q, k, v)
        torch.autograd.grad(loss, [q, k, v])

    return {"forward_s": forward, "fwd_bwd_s": forward_backward}


def time_impls(impls, shape, repeats):
    """Median seconds per call for each impl, timed round-robin.

    The implementations take turns within each repeat, so a slow phase of a
    shared machine hits all of them rather than whichever ran then; the
    per-repeat ratios to the fused op are kept for the same reason. The
    garbage collector is off while timing, as in timeit.
    """
    fns, samples = {}, {}
    for impl in impls:
        try:
            fns[impl] = _closures(impl, shape)
            for fn in fns[impl].values():
                fn()  # warm-up: compilation, first-touch allocations
        except RuntimeError as e:  # out of memory and the like: report, keep going
            fns.pop(impl, None)
            samples[impl] = {"error": str(e).splitlines()[0]}
            continue
        samples[impl] = {key: [] for key in fns[impl]}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for impl, impl_fns in fns.items():
                for key, fn in impl_fns.items():
                    t0 = time.perf_counter()
                    fn()
                    samples[impl][key].append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    results = {}
    for impl in impls:
        if "error" in samples[impl]:
            results[impl] = {"forward_s": None, "fwd_bwd_s": None, **samples[impl]}
            continue
        results[impl] = {key: statistics.median(v) for key, v in samples[impl].items()}
        if impl != "fused" and "fused" in fns:
            paired = [a / b for a, b in zip(samples[impl]["fwd_bwd_s"], samples["fused"]["fwd_bwd_s"])]
            results[impl]["fwd_bwd_ratio_range"] = [min(paired), max(paired)]
    return results


def query_fraction_problem(B, H, T, d, fraction, seed=0):
    """Arguments of kappa and kappa_backward for ceil(fraction T) sorted rows drawn without replacement.

    fraction = 1 is the full problem without a row set (R = T), the path the
    sampled barrier takes at f = 1.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=gen)
    k = torch.randn(B, H, T, d, generator=gen)
    w = 0.3 * torch.randn(B, H, T, d, generator=gen)
    positions = None
    if fraction < 1:
        R = math.ceil(fraction * T)
        positions = torch.stack([torch.randperm(T, generator=gen)[:R].sort().values
                                 for _ in range(B)])
        q = torch.gather(q, 2, positions.view(B, 1, R, 1).expand(B, H, R, d)).contiguous()
    beta = 1e-3 * torch.randn(q.shape[:3], generator=gen)
    return q, k, w, positions, beta


def time_query_fractions(B, H, T, d, fractions, repeats):
    """Minimum seconds of the kappa forward and forward+backward per fraction, interleaved."""
    import barrier_ops  # noqa: F401  (loads the compiled ops)

    ops = torch.ops.barrier_ops
    scale = d ** -0.5
    problems = {f: query_fraction_problem(B, H, T, d, f) for f in fractions}

    def forward(f):
        q, k, w, positions, _ = problems[f]
        return ops.kappa.default(q, k, w, scale, "inclusive", None, positions)

    def forward_backward(f):
        q, k, w, positions, beta = problems[f]
        kappa, lse, stats = ops.kappa.default(q, k, w, scale, "inclusive", None, positions)
        ops.kappa_backward.default(beta, q, k, w, scale, "inclusive", None, kappa, lse, stats,
                                   positions)

    samples = {f: {"forward_s": [], "fwd_bwd_s": []} for f in fractions}
    for f in fractions:  # warm-up
        forward_backward(f)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for f in fractions:
                for key, fn in (("forward_s", forward), ("fwd_bwd_s", forward_backward)):
                    t0 = time.perf_counter()
                    fn(f)
                    samples[f][key].append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {f: {"R": problems[f][0].shape[2], **{k: min(v) for k, v in samples[f].items()},
                "samples": samples[f]} for f in fractions}


def query_fraction_main(args):
    fractions = sorted(set(args.query_fractions), reverse=True)
    if fractions[0] != 1:
        fractions.insert(0, 1.0)  # the reference every ratio is taken to
    if not all(0 < f <= 1 for f in fractions):
        raise SystemExit("--query-fractions must lie in (0, 1]")
    device = f"{_cpu_model()} ({args.threads} threads), torch {torch.__version__}"
    rows = []
    for T in args.T:
        timings = time_query_fractions(args.B, args.H, T, args.d, fractions, args.repeats)
        full = timings[fractions[0]]
        for f in fractions:
            t = timings[f]
            row = {"T": T, "B": args.B, "H": args.H, "d": args.d, "fraction": f, "R": t["R"],
                   "forward_s": t["forward_s"], "fwd_bwd_s": t["fwd_bwd_s"],
                   "forward_ratio": t["forward_s"] / full["forward_s"],
                   "fwd_bwd_ratio": t["fwd_bwd_s"] / full["fwd_bwd_s"],
                   "samples": t["samples"]}
            rows.append(row)
            print(f"  T={T} f={f:g}: fwd+bwd {t['fwd_bwd_s'] * 1e3:.1f} ms "
                  f"({row['fwd_bwd_ratio']:.3f} of f=1)", file=sys.stderr, flush=True)
    header = (f"{'T':>6} | {'f':>7} | {'R':>5} | {'fwd ms':>8} | {'fwd+bwd ms':>10} | "
              f"{'fwd / f=1':>9} | {'fwd+bwd / f=1':>13}")
    lines = [f"fused kappa core with a row set (ceil(f T) sorted rows), B={args.B} H={args.H} "
             f"d={args.d} float32, causal, min of {args.repeats} interleaved repeats; {device}",
             header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['T']:>6} | {row['fraction']:>7.4g} | {row['R']:>5} | "
                     f"{row['forward_s'] * 1e3:>8.2f} | {row['fwd_bwd_s'] * 1e3:>10.2f} | "
                     f"{row['forward_ratio']:>9.3f} | {row['fwd_bwd_ratio']:>13.3f}")
    lines.append("f = 1 is the full problem without a row set; ratios are times over its time "
                 "at the same T.")
    print("\n".join(lines))
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "cpu_query_fraction.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"device": device, "cpu_model": _cpu_model(), "threads": args.threads,
                   "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                   "rows": rows, "table": lines}, f, indent=2)
    print(f"wrote {out}")


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(impl, shape):
    """Runs in a subprocess: peak RSS growth of one forward+backward.

    A warm-up run first (for torch.compile, the compilation), then the kernel's
    peak-RSS mark is reset (/proc/self/clear_refs, Linux >= 4.0) so only the
    measured run counts. The parent pins glibc's mmap threshold so freed tensors
    go back to the OS instead of being reused silently from the heap.
    """
    loss_fn = _loss_fn(impl)
    q, k, v = _inputs(*shape)
    torch.autograd.grad(loss_fn(q, k, v), [q, k, v])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    loss = loss_fn(q, k, v)
    torch.autograd.grad(loss, [q, k, v])
    print(json.dumps({"peak_bytes": max(0, _status_kib("VmHWM") - base) * 1024}))


def measure_memory(impl, shape, threads):
    cmd = [sys.executable, __file__, "--child-memory", impl, ",".join(map(str, shape)),
           "--threads", str(threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return None, out.stderr.strip().splitlines()[-1] if out.stderr else "failed"
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"], None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _add_roofline(row, impls, sgemm):
    """Adds fwd_bwd_flops / fwd_bwd_gflops / pct_of_sgemm to each timed impl of a row."""
    B, H, T, d = row["B"], row["H"], row["T"], row["d"]
    for impl in impls:
        r = row[impl]
        flops = attention_flops(B, H, T, d) if impl == "attention" else barrier_flops(B, H, T, d)
        r["fwd_bwd_flops"] = flops
        if r.get("fwd_bwd_s"):
            r["fwd_bwd_gflops"] = flops / r["fwd_bwd_s"] / 1e9
            r["pct_of_sgemm"] = 100 * r["fwd_bwd_gflops"] / sgemm
    if "attention" in impls and row["fused"].get("fwd_bwd_s") and row["attention"].get("fwd_bwd_s"):
        row["fused_over_attention_time"] = row["fused"]["fwd_bwd_s"] / row["attention"]["fwd_bwd_s"]
        row["barrier_over_attention_flops"] = barrier_flops(B, H, T, d) / attention_flops(B, H, T, d)


def roofline_lines(rows, impls, args, sgemm_before, sgemm_after):
    sgemm = max(sgemm_before, sgemm_after)
    shown = [i for i in ("fused", "sdpa", "attention") if i in impls]
    head = f"{'T':>6} | " + " | ".join(f"{i + ' ms':>12} | {'GFLOP/s':>7} | {'%':>3}" for i in shown)
    if "attention" in shown:
        head += f" | {'fused/attn time':>15} | {'FLOP ratio':>10}"
    out = ["", f"Roofline, fwd+bwd, {args.threads} thread(s): sgemm ceiling (torch.mm {SGEMM_N}^3 "
           f"float32, same process) {sgemm:.1f} GFLOP/s (before rows {sgemm_before:.1f}, after "
           f"{sgemm_after:.1f}); FLOPs: barrier B H T^2 (10 d + 3), attention B H T^2 7 d",
           head, "-" * len(head)]
    for row in rows:
        cells = []
        for impl in shown:
            r = row[impl]
            if r.get("fwd_bwd_s"):
                cells.append(f"{r['fwd_bwd_s'] * 1e3:>12.1f} | {r['fwd_bwd_gflops']:>7.1f} | "
                             f"{r['pct_of_sgemm']:>3.0f}")
            else:
                cells.append(f"{'n/a':>12} | {'n/a':>7} | {'n/a':>3}")
        line = f"{row['T']:>6} | " + " | ".join(cells)
        if "attention" in shown:
            t = row.get("fused_over_attention_time")
            flop_ratio = row.get("barrier_over_attention_flops", 0)
            line += f" | {(f'{t:.2f}' if t else 'n/a'):>15} | {flop_ratio:>10.2f}"
        out.append(line)
    if "attention" in shown:
        out.append("fused/attn time <= FLOP ratio means the fused op does at least as many FLOP/s "
                   "as PyTorch's causal attention.")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--Hkv", type=int, default=4)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS,
                   help="implementations to run (fused is always included: the ratios are to it)")
    p.add_argument("--quick", action="store_true", help="T = 256 512, no compile, 2 repeats")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/cpu.json, or "
                        "cpu_query_fraction.json with --query-fractions)")
    p.add_argument("--query-fractions", type=float, nargs="+", default=None, metavar="F",
                   help="time the fused kappa core at these query fractions against f = 1 "
                        "(float32, causal) instead of the implementations")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory subprocesses (roofline runs: time only)")
    p.add_argument("--child-memory", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.child_memory:
        impl, shape = args.child_memory
        memory_child(impl, tuple(int(x) for x in shape.split(",")))
        return

    if args.query_fractions:
        query_fraction_main(args)
        return
    if args.out is None:
        args.out = os.path.join(os.path.dirname(__file__), "results", "cpu.json")
    if args.quick:
        args.T, args.no_compile, args.repeats = [256, 512], True, 2
    impls = [i for i in IMPLS if (i in args.impls or i == "fused")
             and not (i == "compiled" and args.no_compile)]
    device = f"{_cpu_model()} ({args.threads} threads), torch {torch.__version__}"
    # The ceiling is measured before and after the rows, so drift of the
    # machine over the run shows; the larger of the two is the ceiling.
    sgemm_before = sgemm_gflops()
    print(f"  sgemm {SGEMM_N}^3 float32: {sgemm_before:.1f} GFLOP/s", file=sys.stderr, flush=True)
    rows = []
    for T in args.T:
        shape = (args.B, args.H, args.Hkv, T, args.d)
        row = {"T": T, "B": args.B, "H": args.H, "Hkv": args.Hkv, "d": args.d}
        timings = time_impls(impls, shape, args.repeats)
        for impl in impls:
            peak, err = (None, "not measured (--no-memory)") if args.no_memory else \
                measure_memory(impl, shape, args.threads)
            row[impl] = dict(timings[impl], peak_bytes=peak, **({"memory_error": err} if err else {}))
            print(f"  T={T} {impl}: {row[impl]}", file=sys.stderr, flush=True)
        rows.append(row)
    sgemm_after = sgemm_gflops()
    sgemm = max(sgemm_before, sgemm_after)
    for row in rows:
        _add_roofline(row, impls, sgemm)

    def ratio(row, impl, key):
        a, b = row[impl].get(key), row["fused"].get(key)
        return a / b if a and b else None

    header = (f"{'T':>6} | {'impl':>8} | {'fwd ms':>9} | {'fwd+bwd ms':>10} | {'peak MiB':>9} | "
              f"{'fwd+bwd x':>9} | {'paired x range':>14} | {'mem x':>7}")
    lines = [f"CPU benchmark, margin_barrier_loss, B={args.B} H={args.H} Hkv={args.Hkv} d={args.d}, causal; {device}",
             header, "-" * len(header)]
    for row in rows:
        for impl in impls:
            r = row[impl]
            fmt = lambda x, s=1e3: f"{x * s:.1f}" if x is not None else "n/a"  # noqa: E731
            sp = ratio(row, impl, "fwd_bwd_s")
            mem = ratio(row, impl, "peak_bytes")
            span = r.get("fwd_bwd_ratio_range")
            span = f"{span[0]:.2f}-{span[1]:.2f}" if span else "-"
            lines.append(
                f"{row['T']:>6} | {impl:>8} | {fmt(r['forward_s']):>9} | {fmt(r['fwd_bwd_s']):>10} | "
                f"{fmt(r['peak_bytes'], 1 / 2**20):>9} | {(f'{sp:.2f}' if sp else 'n/a'):>9} | "
                f"{span:>14} | {(f'{mem:.1f}' if mem else 'n/a'):>7}"
            )
    lines.append("x columns: the implementation's time (memory) over the fused op's; > 1 means fused is better.")
    lines.append("paired x range: min-max over repeats of that repeat's fwd+bwd time over the fused op's.")
    summary = []
    for row in rows:
        sp = ratio(row, "sdpa", "fwd_bwd_s") if "sdpa" in impls else None
        if sp:
            span = row["sdpa"].get("fwd_bwd_ratio_range")
            summary.append(f"T={row['T']}: fused fwd+bwd is {sp:.2f}x faster than sdpa"
                           + (f" (paired {span[0]:.2f}-{span[1]:.2f})" if span else ""))
    lines += summary
    roofline = roofline_lines(rows, impls, args, sgemm_before, sgemm_after)
    lines += roofline
    print("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": device, "cpu_model": _cpu_model(), "threads": args.threads,
                   "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                   "sgemm_gflops": {"n": SGEMM_N, "before": sgemm_before, "after": sgemm_after,
                                    "ceiling": sgemm},
                   "flop_count": {"barrier": "B H T^2 (10 d + 3)", "attention": "B H T^2 7 d"},
                   "rows": rows, "table": lines, "summary": summary}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
