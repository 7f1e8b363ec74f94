"""What ``query_fraction`` saves: the barrier op and an attached training step at f < 1 against f = 1.

    python benchmarks/bench_query_fraction.py [--threads 1] [--T 1024 2048] [--repeats 5]
        [--fractions 1 0.25 0.125 0.0625] [--out benchmarks/results/cpu_query_fraction_op.json]

Two tables, every setting of a table timed in turn within each repeat (interleaved, so machine load
hits all of them alike), minimum over repeats:

1. ``margin_barrier_loss`` forward + backward (B=1 H=8 d=64 float32, causal) per backend and T, at
   each fraction, and its ratio to f = 1 (the issue's target: <= 0.3 at f = 1/8, T = 2048).
2. One training step (forward + backward of the LM loss) of a GPT-2-style model from transformers
   (4 layers, width 256, 4 heads, B=2, T=1024, CPU) without the barrier and with
   ``barrier_ops.attach(model, 0.02, query_fraction=f)``: the step's overhead over no barrier.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import barrier_ops


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def op_table(T_list, fractions, repeats, backends=("fused", "sdpa")):
    rows = []
    for T in T_list:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 8, T, 64, generator=g).requires_grad_() for _ in range(3))
        for backend in backends:
            def step(f, backend=backend):
                q.grad = k.grad = v.grad = None
                barrier_ops.margin_barrier_loss(q, k, v, query_fraction=f, backend=backend).backward()

            for f in fractions:
                step(f)  # warm-up
            times = {f: [] for f in fractions}
            for _ in range(repeats):
                for f in fractions:
                    times[f].append(_time(lambda: step(f)))
            full = min(times[1.0]) if 1.0 in times else None
            for f in fractions:
                best = min(times[f])
                rows.append({"T": T, "backend": backend, "fraction": f, "ms": 1e3 * best,
                             "ratio_to_full": None if full is None else best / full})
    return rows


def attach_table(fractions, repeats, T=1024, B=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=512, n_positions=T, n_embd=256, n_layer=4, n_head=4,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").train()
    idx = torch.randint(0, 512, (B, T))
    handle = barrier_ops.attach(model, 0.02)

    def step(mode):
        handle.enabled = mode != "none"
        if mode != "none":
            handle.query_fraction = mode
        model.zero_grad(set_to_none=True)
        model(input_ids=idx, labels=idx).loss.backward()

    modes = ["none"] + list(fractions)
    for m in modes:
        step(m)
    times = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            times[m].append(_time(lambda: step(m)))
    base = min(times["none"])
    full_overhead = min(times[1.0]) - base if 1.0 in times else None
    rows = []
    for m in modes:
        best = min(times[m])
        overhead = best - base
        rows.append({"mode": "no barrier" if m == "none" else m, "ms": 1e3 * best,
                     "overhead_pct": 100 * overhead / base,
                     "overhead_vs_full": None if m == "none" or not full_overhead else overhead / full_overhead})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--T", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.25, 0.125, 0.0625])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-attach", action="store_true", help="skip the GPT-2 training-step table")
    p.add_argument("--out", default="benchmarks/results/cpu_query_fraction_op.json")
    args = p.parse_args(argv)
    if 1.0 not in args.fractions:
        args.fractions = [1.0] + args.fractions
    torch.set_num_threads(args.threads)
    meta = {"device": platform.processor() or platform.machine(), "threads": args.threads,
            "torch": torch.__version__, "repeats": args.repeats, "load_average_start": os.getloadavg()}
    ops = op_table(args.T, args.fractions, args.repeats)
    print("margin_barrier_loss fwd+bwd, B=1 H=8 d=64 float32 causal, "
          f"{args.threads} thread(s), min of {args.repeats} interleaved")
    print("| backend | T | f | ms | / f=1 |\n|---|---|---|---|---|")
    for r in ops:
        print(f"| {r['backend']} | {r['T']} | {r['fraction']:g} | {r['ms']:.1f} | {r['ratio_to_full']:.3f} |")
    steps = [] if args.no_attach else attach_table(args.fractions, args.repeats)
    if steps:
        print("\nGPT-2-style training step (4 layers, width 256, 4 heads, B=2, T=1024), attach weight 0.02")
        print("| barrier | step ms | overhead over no barrier | overhead / overhead at f=1 |\n|---|---|---|---|")
        for r in steps:
            rel = "" if r["overhead_vs_full"] is None else f"{r['overhead_vs_full']:.2f}"
            mode = r["mode"] if isinstance(r["mode"], str) else f"f = {r['mode']:g}"
            print(f"| {mode} | {r['ms']:.0f} | {r['overhead_pct']:+.1f}% | {rel} |")
    meta["load_average_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "op": ops, "attach_step": steps}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
