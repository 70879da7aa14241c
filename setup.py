"""Builds the one extension, ``ef21._C``.

CUDA sources are compiled iff torch is a CUDA build and a CUDA toolkit is found (not whether a GPU
is visible, so GPU-less machines can still build them). Overrides: ``EF21_FORCE_CUDA=1`` /
``EF21_FORCE_CPU=1``; ``TORCH_CUDA_ARCH_LIST`` picks the archs (default 9.0).
"""

import glob
import os

# torch guesses the CUDA root from `which nvcc`, which is a wrapper script on some machines.
if "CUDA_HOME" not in os.environ and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    if os.environ.get("EF21_FORCE_CPU") == "1":
        return False
    if os.environ.get("EF21_FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _pip_cuda_includes() -> list:
    """Headers of the CUDA libraries torch's wheel depends on (cuSPARSE, cuBLAS, ...), which a
    compiler-only CUDA toolkit lacks."""
    try:
        import nvidia

        return [p for root in nvidia.__path__ for p in glob.glob(os.path.join(root, "cu*", "include"))]
    except ImportError:
        return []


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/hook/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if cuda_sources and _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += cuda_sources
        # --fmad=false: no fused multiply-add, so CUDA results equal the CPU kernels' bit for bit.
        nvcc = ["-O3", "--expt-relaxed-constexpr", "--fmad=false"]
        return CUDAExtension(
            "ef21._C",
            sources,
            include_dirs=_pip_cuda_includes(),
            define_macros=[("EF21_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("ef21._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    name="ef21",
    version="0.1.0",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
