"""Build dcr-fast and its compiled extension ``dcr_fast._C``.

Sources are globbed from ``csrc/`` (the same rule CMakeLists.txt uses): every ``*.cpp`` always,
every ``*.cu`` only when the installed torch is a CUDA build and nvcc is found, so a CPU-only
machine still gets the CPU kernels. Environment knobs (all documented by torch):
``TORCH_CUDA_ARCH_LIST`` for the CUDA archs, ``MAX_JOBS`` for parallel compile jobs.
Set ``DCR_FAST_NO_EXT=1`` to skip the extension entirely (pure-Python install).
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("DCR_FAST_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT))
    cu = sorted(glob.glob("csrc/*.cu", root_dir=ROOT))
    if not cpp:
        return [], {}
    with_cuda = bool(torch.version.cuda and CUDA_HOME and cu)
    cxx = ["-O3"]
    if with_cuda:
        ext = CUDAExtension(
            "dcr_fast._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx + ["-DDCR_FAST_WITH_CUDA"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        )
    else:
        ext = CppExtension("dcr_fast._C", cpp, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["dcr_fast", "dcr_fast.kernels"] + ["dcr_fast." + p for p in find_packages("dcr_fast")],
    package_dir={"dcr_fast": "dcr_fast", "dcr_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
