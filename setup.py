"""Build of barrier_ops._C: the C++ ops, plus the CUDA kernels when possible.

CUDA sources (csrc/cuda/) are compiled whenever a CUDA toolkit and a CUDA
build of torch are present, with or without a GPU. Switches:

    BARRIER_OPS_CUDA=auto|1|0   auto (default) builds CUDA when possible;
                                1 requires it (fails if impossible); 0 skips it.
    TORCH_CUDA_ARCH_LIST        defaults to "8.0;9.0+PTX" (Ampere, Hopper, and PTX
                                that newer GPUs compile at load time).
    MAX_JOBS                    parallel compile jobs (ninja).
    BARRIER_OPS_DEBUG=1         -O0 -g builds for debugging.
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("BARRIER_OPS_CUDA", "auto").strip().lower()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if mode in ("0", "false", "no", "off"):
        return False
    if mode in ("1", "true", "yes", "on"):
        if not possible:
            raise RuntimeError(
                "BARRIER_OPS_CUDA=1 but no CUDA build is possible: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
            )
        return True
    if mode != "auto":
        raise ValueError(f"BARRIER_OPS_CUDA must be auto, 1 or 0, got {mode!r}")
    return possible


def _openmp_flags() -> list:
    """-fopenmp when torch's intra-op pool is OpenMP.

    at::parallel_for is inlined from ATen's headers: without -fopenmp its
    `omp parallel` region is compiled out and every CPU kernel runs on one
    thread, whatever torch.set_num_threads says. The extension then links the
    libgomp.so.1 that libtorch_cpu has already loaded (same soname), so torch
    and the kernels share one OpenMP runtime and one thread count.
    """
    if sys.platform == "darwin" or not torch.backends.openmp.is_available():
        return []
    return ["-fopenmp"]


def _extension():
    debug = os.environ.get("BARRIER_OPS_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    openmp = _openmp_flags()
    # -fopenmp-simd honours the kernels' `omp simd` loop pragmas (vectorized
    # reductions) even where there is no OpenMP runtime to link.
    extra = {"cxx": opt + openmp + ["-fopenmp-simd", "-fdiagnostics-color=always"]}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        extra["cxx"].append("-DBARRIER_OPS_WITH_CUDA")
        extra["nvcc"] = opt + ["-lineinfo", "-DBARRIER_OPS_WITH_CUDA", "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "barrier_ops._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra,
            extra_link_args=openmp,
            libraries=["cublasLt", "cublas"],
        )
    return CppExtension(
        "barrier_ops._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=openmp,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
