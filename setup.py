"""Build of barrier_ops._C: the C++ ops, plus the CUDA kernels where they are wanted.

Which sources are compiled follows the convention of PyTorch extensions:

    BARRIER_OPS_CUDA=1      compile the CUDA kernels too (fails if there is no CUDA
                            toolkit or torch is a CPU build). CI sets it, to compile
                            them on machines without a GPU.
    BARRIER_OPS_CUDA=0      the CPU ops only, whatever else is set.
    unset (or "auto")       the CUDA kernels when a GPU is visible
                            (torch.cuda.is_available()) or TORCH_CUDA_ARCH_LIST is set,
                            and a toolkit and a CUDA build of torch are there;
                            otherwise the CPU ops only.
    TORCH_CUDA_ARCH_LIST    GPU architectures; default "8.0;9.0+PTX" (Ampere, Hopper,
                            and PTX that newer GPUs compile at load time).
    MAX_JOBS                parallel compile jobs (ninja).
    BARRIER_OPS_DEBUG=1     -O0 -g builds for debugging.

On 2 cores the CPU ops take about 2 minutes and the CUDA kernels about 8 more.
Object files stay in build/temp.* between installs (see BuildExt), so installing
the same checkout again only relinks. `pip install -v` shows ninja's [n/N]
counter with each compiler command.
"""

import glob
import os
import sys
import sysconfig

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# setuptools' own name for the directory (what `python setup.py build_ext` uses too).
BUILD_TEMP = os.path.join(ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")


def _log(msg: str) -> None:
    # stderr, unbuffered: pip shows it with -v (and in the error report of a failed build).
    print(f"barrier_ops build: {msg}", file=sys.stderr, flush=True)


def _want_cuda() -> bool:
    mode = os.environ.get("BARRIER_OPS_CUDA", "auto").strip().lower()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    why_not = f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
    if mode in ("0", "false", "no", "off"):
        _log("BARRIER_OPS_CUDA=0: CPU ops only")
        return False
    if mode in ("1", "true", "yes", "on"):
        if not possible:
            raise RuntimeError(f"BARRIER_OPS_CUDA=1 but no CUDA build is possible: {why_not}")
        _log("BARRIER_OPS_CUDA=1: CPU ops and CUDA kernels")
        return True
    if mode not in ("", "auto"):
        raise ValueError(f"BARRIER_OPS_CUDA must be auto, 1 or 0, got {mode!r}")
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        reason = f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r} is set"
    elif possible and torch.cuda.is_available():
        reason = "a GPU is visible"
    else:
        _log("no GPU visible and TORCH_CUDA_ARCH_LIST unset: CPU ops only "
             "(BARRIER_OPS_CUDA=1 compiles the CUDA kernels too)")
        return False
    if not possible:
        _log(f"{reason}, but the CUDA kernels cannot be compiled ({why_not}): CPU ops only")
        return False
    _log(f"{reason}: CPU ops and CUDA kernels (BARRIER_OPS_CUDA=0 skips them)")
    return True


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
        _log(f"{len(sources)} sources, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r}")
        return CUDAExtension(
            "barrier_ops._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra,
            extra_link_args=openmp,
        )
    _log(f"{len(sources)} sources")
    return CppExtension(
        "barrier_ops._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=openmp,
    )


class BuildExt(BuildExtension):
    """torch's BuildExtension with object files that outlive the install.

    An editable install (PEP 660, `pip install -e .`) runs build_ext with a
    fresh temporary build_temp each time, so ninja found no objects and no
    .ninja_log and recompiled every source. Pinning build_temp to the checkout's
    build/ directory lets ninja see what is up to date: installing the same
    checkout again compiles nothing and relinks in seconds; an edited source
    recompiles alone.
    """

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = BUILD_TEMP

    def build_extensions(self):
        if self.use_ninja:
            jobs = os.environ.get("MAX_JOBS", "all cores")
            _log(f"compiling with ninja (MAX_JOBS={jobs}) in {os.path.relpath(self.build_temp, ROOT)}; "
                 "up-to-date objects are reused")
        else:
            _log("ninja not found: every source compiles one after the other, and again at every install. "
                 "`python3 -m pip install ninja` makes builds parallel and incremental")
        super().build_extensions()


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt},
)
