"""Registers and spills of every CUDA kernel, from ``nvcc -Xptxas -v``: the table in docs/cuda.md.

    python benchmarks/ptxas_table.py [--arch 80 90] [--out benchmarks/results/ptxas.json]

Compiles csrc/cuda/kappa_forward.cu and kappa_backward.cu (one nvcc call per file, every arch at
once; ~1-2 min a file on one core) with the flags setup.py uses, demangles the kernel names and
prints a markdown table: kernel, dtype, d tile, and per arch the registers and the spill stores /
loads in bytes. Needs nvcc and a CUDA build of torch (for its headers); no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("kappa_forward.cu", "kappa_backward.cu")
DTYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32", "double": "fp64"}
KERNELS = {"kappa_forward_kernel": "forward", "row_prep_kernel": "row prep",
           "kappa_backward_key_kernel": "backward key", "kappa_backward_query_kernel": "backward query"}

ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
REGS = re.compile(r"Used (\d+) registers")
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def nvcc_command(source: str, archs: List[str], out: str) -> List[str]:
    import torch.utils.cpp_extension as ext

    includes = [f"-I{p}" for p in ext.include_paths(device_type="cuda")]
    cmd = ["nvcc", "-std=c++20", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DBARRIER_OPS_WITH_CUDA",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           f"-I{os.path.join(ROOT, 'csrc')}", *includes, f"-I{sysconfig.get_paths()['include']}",
           "-D_GLIBCXX_USE_CXX11_ABI=1", "--compiler-options", "-fPIC", "-Xptxas", "-v"]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return cmd + ["-c", os.path.join(ROOT, "csrc", "cuda", source), "-o", out]


def demangle(names: List[str]) -> Dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def describe(demangled: str) -> Tuple[str, str, str]:
    """(kernel, dtype, d tile) from e.g. ``void kappa_forward_kernel<__nv_bfloat16, 128>(...)``."""
    m = re.search(r"(\w+)<([^,>]+)(?:,\s*(\d+))?>", demangled)
    if not m:
        return demangled, "-", "-"
    name, dtype, d = m.groups()
    return KERNELS.get(name, name), DTYPES.get(dtype.strip(), dtype.strip()), d or "-"


def parse(log: str) -> List[Dict]:
    """One record per (entry function, arch), with registers and spills."""
    records, current = [], None
    for line in log.splitlines():
        m = ENTRY.search(line)
        if m:
            current = {"mangled": m.group(1), "arch": m.group(2), "regs": None, "spill_st": 0, "spill_ld": 0}
            records.append(current)
            continue
        if current is None:
            continue
        m = SPILL.search(line)
        if m:
            current["spill_st"], current["spill_ld"] = int(m.group(1)), int(m.group(2))
        m = REGS.search(line)
        if m:
            current["regs"] = int(m.group(1))
    return records


def table(records: List[Dict], archs: List[str]) -> str:
    names = demangle(sorted({r["mangled"] for r in records}))
    rows: Dict[Tuple[str, str, str], Dict[str, Dict]] = {}
    for r in records:
        rows.setdefault(describe(names[r["mangled"]]), {})[r["arch"]] = r
    head = "| kernel | dtype | d tile | " + " | ".join(f"sm_{a} regs | sm_{a} spill st / ld" for a in archs) + " |"
    lines = [head, "|---|---|---:|" + "---:|---:|" * len(archs)]
    order = {k: i for i, k in enumerate(KERNELS.values())}
    for key in sorted(rows, key=lambda k: (order.get(k[0], 99), k[1], -int(k[2]) if k[2].isdigit() else 0)):
        cells = []
        for a in archs:
            r = rows[key].get(a)
            cells += ["-", "-"] if r is None else [str(r["regs"]), f"{r['spill_st']} / {r['spill_ld']}"]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["80", "90"])
    p.add_argument("--out", default=None, help="also write the parsed records as JSON")
    args = p.parse_args(argv)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in SOURCES:
            res = subprocess.run(nvcc_command(source, args.arch, os.path.join(tmp, source + ".o")),
                                 capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"nvcc failed on {source}:\n{res.stderr[-4000:]}")
            records += parse(res.stdout + res.stderr)
    print(table(records, args.arch))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
