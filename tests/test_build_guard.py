"""The extension keeps building on the oldest torch it is checked against (MIN_TORCH).

The GPU image has torch 2.11, whose headers and cpp_extension compile C++ as
C++17; CI builds against a newer torch whose headers need C++20, so a C++20
feature or an ATen API added after 2.11 would pass CI and break the one GPU
run. Three layers (docs/cuda.md, "Building on torch 2.11"):

1. (always, ~1 s) no C++20-only construct in csrc/: a scan of the sources,
   comments and string literals removed, for C++20 syntax, headers and std::
   names (test_scanner_catches_planted_cxx20_features shows what it finds).
2. (always) every torch name csrc/ uses (at::, c10::, torch:: names, TORCH_/
   C10_/AT_ macros, and member-call names) is on a list checked against torch
   2.11's headers. A new name fails here until someone checks it exists in
   2.11 and adds it (layer 3 does the checking).
3. (when torch <= 2.11 headers are at hand: the installed torch if it is that
   old, or BARRIER_OPS_MIN_TORCH_INCLUDE=/path/to/torch/include, e.g. from
   ``pip download torch==2.11.0 --no-deps`` and ``unzip 'torch/include/*'``)
   every list entry is found in those headers, and every .cpp in csrc/ and
   csrc/cpu/ (and csrc/cuda/register_cuda.cpp where the CUDA headers are)
   passes ``g++ -std=c++17 -fsyntax-only`` against them, as torch 2.11's
   cpp_extension would compile it. The .cu files are covered by layers 1-2
   only (nvcc takes ~1 min a file; docs/cuda.md has the command).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# The oldest torch the build is checked against: the GPU image's. Keep in step with
# benchmarks/gpu_check_kit.py (its pre-flight warns below it) and docs/cuda.md.
MIN_TORCH = (2, 11)

# torch names used by csrc/, each found in torch 2.11.0's headers (layer 3 checks
# this list, not only what csrc/ uses today). Add a name only after that check.
TORCH_NAMES_CHECKED = {
    "at::Device", "at::ScalarType", "at::Tag::pt2_compliant_tag", "at::Tensor",
    "at::TensorOptions", "at::cat", "at::cuda::getCurrentCUDAStream",
    "at::cuda::getCurrentDeviceProperties", "at::empty", "at::from_blob", "at::full",
    "at::isFloatingType", "at::kBFloat16", "at::kBool", "at::kDouble", "at::kFloat", "at::kHalf",
    "at::kLong", "at::parallel_for", "at::sum", "at::where", "at::zeros", "c10::BFloat16",
    "c10::CppTypeToScalarType", "c10::Half", "c10::cuda::CUDAGuard", "c10::cuda::OptionalCUDAGuard",
    "c10::string_view",
    "AT_DISPATCH_FLOATING_TYPES", "AT_DISPATCH_FLOATING_TYPES_AND2", "C10_CUDA_CHECK",
    "C10_CUDA_KERNEL_LAUNCH_CHECK", "TORCH_CHECK", "TORCH_CHECK_TYPE", "TORCH_CHECK_VALUE",
    "TORCH_LIBRARY", "TORCH_LIBRARY_IMPL",
}
# Names called as members (x.name(...), x->name(...)): tensor methods and the like,
# each found in torch 2.11.0's headers or declared in csrc/ itself.
MEMBER_CALLS_CHECKED = {
    "B", "H", "R", "T", "abs", "addmm_", "amax", "begin", "clamp_min_", "const_data_ptr", "contiguous",
    "d", "data", "data_ptr", "def", "defined", "device", "dim", "div_", "dtype", "end", "has_value",
    "impl", "logical_not", "has_row_set", "mask_ptr", "masked_fill", "mul_", "narrow", "options", "positions_ptr", "scalar_type",
    "select", "size", "sizes", "slice", "sum", "t", "take", "to", "view",
}

# C++20-only constructs (C++17 compilers reject them, or accept them only as extensions).
CXX20_PATTERNS = [
    (r"<=>", "three-way comparison <=>"),
    (r"\b(concept|requires|consteval|constinit|co_await|co_yield|co_return|char8_t)\b", "C++20 keyword"),
    (r"#\s*include\s*<(span|ranges|concepts|bit|format|numbers|source_location|compare|coroutine|"
     r"barrier|latch|semaphore|stop_token|syncstream)>", "C++20 header"),
    (r"\bstd::(span|ranges|views|bit_cast|format|numbers|popcount|countl_zero|countr_zero|countl_one|"
     r"countr_one|bit_width|bit_ceil|bit_floor|has_single_bit|midpoint|lerp|to_array|ssize|erase_if|"
     r"is_constant_evaluated|source_location|remove_cvref|remove_cvref_t|type_identity|"
     r"type_identity_t|endian|assume_aligned|jthread|cmp_equal|cmp_less|cmp_greater|in_range|"
     r"make_shared_for_overwrite|bind_front|identity|unreachable)\b", "C++20 library name"),
    (r"\.\s*(starts_with|ends_with|contains)\s*\(", "C++20 member (starts_with/ends_with/contains)"),
    (r"\[\[\s*(likely|unlikely|no_unique_address)\s*\]\]", "C++20 attribute"),
    (r"\busing\s+enum\b", "using enum"),
    (r"[{,(]\s*\.[A-Za-z_]\w*\s*=(?!=)", "designated initializer"),
    (r"\]\s*<\s*(typename|class|auto|int|size_t|bool)\b", "lambda with a template parameter list"),
    (r"\bexplicit\s*\(", "conditional explicit(bool)"),
    (r"\b(?!(?:if|for|while|switch|return|sizeof|decltype)\b)[A-Za-z_]\w*"
     r"\s*\(\s*(const\s+)?auto\b\s*[&*]*\s*\w+\s*[,)=]",
     "abbreviated function template (auto parameter)"),
]

_COMMENT_OR_STRING = re.compile(
    r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'", re.S)


def strip_comments_and_strings(src: str) -> str:
    """Comments become blanks (newlines kept, so line numbers hold), literals become ""."""
    def blank(m):
        text = m.group(0)
        if text.startswith("/"):
            return re.sub(r"[^\n]", " ", text)
        return '""'
    return _COMMENT_OR_STRING.sub(blank, src)


def cxx20_findings(src: str, where: str = "") -> list:
    code = strip_comments_and_strings(src)
    found = []
    for pattern, what in CXX20_PATTERNS:
        for m in re.finditer(pattern, code):
            line = code.count("\n", 0, m.start()) + 1
            found.append(f"{where}:{line}: {what}: {m.group(0).strip()!r}")
    return found


def torch_names(src: str) -> set:
    code = strip_comments_and_strings(src)
    names = set(re.findall(r"\b(?:at|c10|torch)::(?:\w+::)*\w+", code))
    names |= set(re.findall(r"\b(?:TORCH|C10|AT)_[A-Z0-9_]+\b", code))
    return names


def member_calls(src: str) -> set:
    code = strip_comments_and_strings(src)
    return set(re.findall(r"(?:\.|->)\s*([A-Za-z_]\w*)\s*(?:<[^<>()]*>)?\s*\(", code))


def csrc_files(exts=("cpp", "h", "cu", "cuh")) -> list:
    files = []
    for ext in exts:
        files += glob.glob(os.path.join(CSRC, "**", f"*.{ext}"), recursive=True)
    return sorted(files)


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


# ---------------------------------------------------------------------------
# Layers 1 and 2: always
# ---------------------------------------------------------------------------


def test_csrc_uses_no_cxx20_feature():
    files = csrc_files()
    assert files, f"no sources under {CSRC}"
    found = []
    for path in files:
        found += cxx20_findings(_read(path), os.path.relpath(path, ROOT))
    assert not found, ("C++20-only constructs in csrc/ (torch <= 2.11 builds extensions as C++17; "
                       "the GPU image has torch 2.11):\n" + "\n".join(found))


def test_csrc_torch_names_are_checked_against_the_minimum_torch():
    used, members = set(), set()
    for path in csrc_files():
        src = _read(path)
        used |= torch_names(src)
        members |= member_calls(src)
    new = sorted(used - TORCH_NAMES_CHECKED)
    assert not new, (f"csrc/ uses torch names not yet checked against torch "
                     f"{'.'.join(map(str, MIN_TORCH))}: {new}. Check that each exists in that "
                     "version's headers (this file's docstring, layer 3), then add it to "
                     "TORCH_NAMES_CHECKED.")
    new_members = sorted(members - MEMBER_CALLS_CHECKED)
    assert not new_members, (f"csrc/ calls members not yet checked against torch "
                             f"{'.'.join(map(str, MIN_TORCH))}: {new_members}. Check each "
                             "(tensor methods: ATen/core/TensorBody.h of that version), then add it "
                             "to MEMBER_CALLS_CHECKED.")


def test_scanner_catches_planted_cxx20_features():
    """The scan can fail: each planted C++20 construct is found, C++17 look-alikes are not."""
    planted = {
        "auto operator<=>(const P&) const = default;": "three-way",
        "template <typename T> concept Small = sizeof(T) < 4;": "keyword",
        "template <typename T> void f(T) requires Small<T>;": "keyword",
        "#include <span>": "header",
        "std::span<const float> s(p, n);": "library name",
        "auto y = std::bit_cast<uint32_t>(x);": "library name",
        "if (name.starts_with(\"x\")) {}": "member",
        "if (m.contains(k)) {}": "member",
        "if (n > 0) [[likely]] { run(); }": "attribute",
        "Opts o{.causal = 1, .scale = 2.0f};": "designated",
        "auto g = []<typename T>(T x) { return x; };": "lambda",
        "void h(auto x) {}": "abbreviated",
        "switch (e) { using enum Mode; }": "using enum",
    }
    for code, what in planted.items():
        found = cxx20_findings(code)
        assert found, f"not caught: {code}"
        assert any(what in f for f in found), (code, found)
    cxx17 = [
        "auto g = [](auto x) { return x; };",  # generic lambda (C++14)
        "if (auto it = m.find(k); it != m.end()) {}",  # init-statement (C++17)
        "for (const auto& x : v) {}",
        "const char* s = \"a <=> b, std::span, requires\"; // concept <span>",
        "/* [[likely]] .contains( */ int a = b == c;",
        "TORCH_CHECK(x.dim() == 4, \"q must be [B, H, T, d]\");",
        "auto [a, b] = pair;",  # structured bindings (C++17)
        "if constexpr (std::is_same_v<T, double>) {}",
        "return f(auto_tune, x);",
    ]
    for code in cxx17:
        assert not cxx20_findings(code), (code, cxx20_findings(code))


def test_minimum_torch_is_the_same_everywhere():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_check_kit", os.path.join(ROOT, "benchmarks", "gpu_check_kit.py"))
    kit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit)
    assert kit.MIN_TORCH == MIN_TORCH
    version = ".".join(map(str, MIN_TORCH))
    assert f"torch {version}" in _read(os.path.join(ROOT, "docs", "cuda.md"))


# ---------------------------------------------------------------------------
# Layer 3: against the minimum torch's own headers, where they are at hand
# ---------------------------------------------------------------------------


def _torch_version(include: str):
    """(major, minor) of the torch whose headers are in `include` (torch/version.h)."""
    text = _read(os.path.join(include, "torch", "csrc", "api", "include", "torch", "version.h")) \
        if os.path.exists(os.path.join(include, "torch", "csrc", "api", "include", "torch", "version.h")) else ""
    major = re.search(r"TORCH_VERSION_MAJOR\s+(\d+)", text)
    minor = re.search(r"TORCH_VERSION_MINOR\s+(\d+)", text)
    if major and minor:
        return int(major.group(1)), int(minor.group(1))
    return None


def _min_torch_include():
    """torch/include of a torch no newer than MIN_TORCH, or None."""
    env = os.environ.get("BARRIER_OPS_MIN_TORCH_INCLUDE")
    if env:
        if not os.path.isdir(os.path.join(env, "ATen")):
            pytest.fail(f"BARRIER_OPS_MIN_TORCH_INCLUDE={env!r} is not a torch/include directory "
                        "(no ATen/ in it)")
        return env
    from torch.utils.cpp_extension import include_paths

    installed = include_paths()[0]
    version = _torch_version(installed)
    if version is not None and version <= MIN_TORCH:
        return installed
    return None


@pytest.fixture(scope="module")
def min_torch_include():
    include = _min_torch_include()
    if include is None:
        pytest.skip(f"no torch <= {'.'.join(map(str, MIN_TORCH))} headers: installed torch is "
                    f"{torch.__version__}; set BARRIER_OPS_MIN_TORCH_INCLUDE=/path/to/torch/include")
    version = _torch_version(include)
    assert version is None or version <= MIN_TORCH, f"{include} is torch {version}"
    return include


@pytest.fixture(scope="module")
def header_words(min_torch_include):
    words = set()
    for path in glob.glob(os.path.join(min_torch_include, "**", "*.h*"), recursive=True) + \
            glob.glob(os.path.join(min_torch_include, "**", "*.cuh"), recursive=True):
        words.update(re.findall(r"\b[A-Za-z_]\w*\b", _read(path)))
    return words


def test_checked_names_exist_in_the_minimum_torch_headers(header_words):
    own = set()
    for path in csrc_files(("h", "cuh", "cpp", "cu")):
        own.update(re.findall(r"\b[A-Za-z_]\w*\b", strip_comments_and_strings(_read(path))))
    missing = [n for n in sorted(TORCH_NAMES_CHECKED) if n.split("::")[-1] not in header_words]
    assert not missing, f"not in the minimum torch's headers: {missing}"
    # Member names: torch's, or declared by csrc/ itself (KappaProblem's fields and the like).
    missing = [n for n in sorted(MEMBER_CALLS_CHECKED) if n not in header_words]
    missing = [n for n in missing if not re.search(
        rf"\b{n}\b\s*[;=({{]", "".join(strip_comments_and_strings(_read(p)) for p in csrc_files(("h",))))]
    assert not missing, f"member calls found neither in the minimum torch's headers nor csrc/*.h: {missing}"


def _cxx17_sources():
    files = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    files.append(os.path.join(CSRC, "cuda", "register_cuda.cpp"))
    return [os.path.relpath(f, ROOT) for f in files]


@pytest.mark.parametrize("source", _cxx17_sources())
def test_csrc_compiles_as_cxx17_against_the_minimum_torch_headers(source, min_torch_include):
    """g++ -std=c++17 -fsyntax-only with torch 2.11's flags (cpp_extension: -std=c++17,
    the C++11 ABI, the extension defines; setup.py: -fopenmp, BARRIER_OPS_WITH_CUDA for
    the CUDA registration file). ~10-15 s a file."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-fopenmp", "-fopenmp-simd",
           "-D_GLIBCXX_USE_CXX11_ABI=1", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
           f"-I{CSRC}", "-isystem", min_torch_include,
           "-isystem", os.path.join(min_torch_include, "torch", "csrc", "api", "include"),
           "-isystem", sysconfig.get_paths()["include"]]
    if source.startswith(os.path.join("csrc", "cuda")):
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        if not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime_api.h")):
            pytest.skip("no CUDA headers (CUDA_HOME)")
        cmd += ["-DBARRIER_OPS_WITH_CUDA", "-isystem", os.path.join(cuda_home, "include")]
    proc = subprocess.run(cmd + [source], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} {source}\n{proc.stderr[-4000:]}"
