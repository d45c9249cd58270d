"""Build dcr-fast and its compiled extension ``dcr_fast._C``.

Sources are globbed from ``csrc/`` (the same rule CMakeLists.txt uses): every ``*.cpp`` always,
every ``*.cu`` only when the installed torch is a CUDA build and nvcc is found, so a CPU-only
machine still gets the CPU kernels. Environment knobs (all documented by torch):
``TORCH_CUDA_ARCH_LIST`` for the CUDA archs (default: the GPU that is visible, else
:data:`DEFAULT_CUDA_ARCHS`), ``MAX_JOBS`` for parallel compile jobs. Set ``DCR_FAST_NO_EXT=1``
to skip the extension entirely (pure-Python install). The extension must be built against the
torch it will run with: see ``build_backend/dcr_fast_build.py`` for what ``pip install .``
puts in its isolated build environment, and README "Install".
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Built when no GPU is visible (a build host, CI, a container build) and TORCH_CUDA_ARCH_LIST is
# unset: A100, A10/RTX 30xx, L4/RTX 40xx, H100/H200, and PTX that newer GPUs (Blackwell) JIT-compile.
# torch itself would fail here (an IndexError on the empty list of visible GPUs).
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _extensions():
    if os.environ.get("DCR_FAST_NO_EXT") == "1":
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT))
    cu = sorted(glob.glob("csrc/*.cu", root_dir=ROOT))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # an sdist, or a build environment without torch: nothing to compile against
        print("dcr-fast: torch is not importable here; building without the compiled extension")
        return [], {}
    if not cpp:
        return [], {}
    with_cuda = bool(torch.version.cuda and CUDA_HOME and cu)
    cxx = ["-O3"]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            print(f"dcr-fast: no GPU visible and TORCH_CUDA_ARCH_LIST unset; building for {DEFAULT_CUDA_ARCHS}")
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS  # read by torch's build, in this process only
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
