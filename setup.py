"""Build of adaperceiver: the Python package, ``adaperceiver.kernels`` mapped from ``kernels/``,
and the compiled extension ``adaperceiver._C`` from ``csrc/`` when its sources are there.

C++ (CPU kernels) is always compiled when ``csrc/`` has sources, unless
``ADAPERCEIVER_BUILD_EXT=0`` (a pure-Python build in seconds: every op then runs on its reference
or Triton backend; the packaging tests use it). CUDA is compiled when ``ADAPERCEIVER_BUILD_CUDA=1``,
or when torch was built with CUDA and a toolkit is found (``ADAPERCEIVER_BUILD_CUDA=0`` turns it
off). ``MAX_JOBS`` bounds parallel compile jobs.

Every package under ``adaperceiver/`` ships (``find_packages``), so a subpackage added later is in
the wheel without editing this file; ``kernels/`` ships as ``adaperceiver.kernels``.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    flag = os.environ.get("ADAPERCEIVER_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.version.cuda is not None and CUDA_HOME is not None


def _want_ext():
    flag = os.environ.get("ADAPERCEIVER_BUILD_EXT", "1")
    if flag not in ("0", "1"):
        raise ValueError(f"ADAPERCEIVER_BUILD_EXT={flag!r} is not allowed; allowed: '1' (build "
                         "adaperceiver._C, the default) or '0' (pure-Python package)")
    return flag == "1"


def _extensions():
    if not _want_ext():
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not cpp:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    cu = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    with_cuda = bool(cu) and _want_cuda()
    # torch >= 2.10 headers need C++20
    # -fno-trapping-math: lets GCC vectorize the row kernels of csrc/cpu/vec_math.h (floor and
    # float->int in exp); no FP traps are enabled in torch, so results are unchanged
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]
    macros = [("ADAPERCEIVER_WITH_CUDA", "1" if with_cuda else "0")]
    if with_cuda:
        # no GPU to detect here: default to the two targets we support (A100 and H100)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "adaperceiver._C", cpp + cu, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "-Xptxas=-v",
                                                      "-DADAPERCEIVER_WITH_CUDA=1"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("adaperceiver._C", cpp, include_dirs=[os.path.join(ROOT, "csrc")],
                           define_macros=macros, extra_compile_args={"cxx": cxx},
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["adaperceiver", "adaperceiver.*"]) + ["adaperceiver.kernels"],
    package_dir={"adaperceiver.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
