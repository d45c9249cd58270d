"""The CMake build of dcr_fast._C (CMakeLists.txt + Torch's CMake config) works from scratch:
configure and build into a temporary directory, then import the result in a fresh interpreter
(its PyInit stub and TORCH_LIBRARY registrations) and run the op there.

A fresh interpreter because a process that already loaded the pip-built ``dcr_fast._C`` cannot
register the ``dcr_fast`` library a second time. About 20 s on 2 cores; skipped without a
CMake >= 3.26 (``pip install cmake``, as CI does)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child: load the built module by file, then check the op against the weight
# perturbation written out (the child must not import dcr_fast, which loads the installed _C).
CHILD = r"""
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
g = torch.Generator().manual_seed(0)
x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(4, 5, 6), (3, 6), (3,)])
a, d, db = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(2, 2, 6), (2, 2, 3), (2, 3)])
scale = torch.tensor([1e-2, 2e-2, -1e-2, -2e-2], dtype=torch.float64)
y = torch.ops.dcr_fast.probe_linear(x, w, b, a, d, db, scale)
expected = torch.stack([x[p] @ (w + scale[p] * d[p % 2].T @ a[p % 2]).T + b + scale[p] * db[p % 2] for p in range(4)])
print(json.dumps({"module": module.__name__, "max_err": float((y - expected).abs().max())}))
"""


def _cmake() -> str | None:
    try:
        import cmake

        candidates = [os.path.join(cmake.CMAKE_BIN_DIR, "cmake")]
    except ImportError:
        candidates = []
    candidates.append(shutil.which("cmake"))
    for path in filter(None, candidates):
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        version = re.search(r"(\d+)\.(\d+)", out)
        if version and (int(version[1]), int(version[2])) >= (3, 26):
            return path
    return None


@pytest.mark.skipif(_cmake() is None, reason="needs CMake >= 3.26 (pip install cmake)")
def test_cmake_build_imports_and_runs(tmp_path):
    build = tmp_path / "build"
    configure = [
        _cmake(), "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython3_EXECUTABLE={sys.executable}",
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for command in (configure, [_cmake(), "--build", str(build), "-j", str(os.cpu_count() or 1)]):
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"

    built = sorted(build.glob("_C*.so"))
    assert len(built) == 1, f"expected one _C*.so in {build}, found {built}"
    run = subprocess.run([sys.executable, "-c", CHILD, str(built[0])], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["module"] == "_C"
    assert result["max_err"] < 1e-12, result


# ----------------------------------------------------------------------------- loading the build

def test_extension_records_the_torch_it_was_built_against():
    from dcr_fast import _extension

    if not _extension.HAS_EXTENSION:
        pytest.skip("dcr_fast._C is not built")
    assert _extension._C.built_with_torch == _extension._release(torch.__version__)


class _Module:
    built_with_torch = "1.0.0"


def _raising(exc):
    def import_module(name):
        raise exc
    return import_module


@pytest.mark.parametrize("import_module,reason", [
    (_raising(ImportError("dcr_fast/_C.so: undefined symbol: _ZN3c1017RegisterOperators")), "undefined symbol"),
    (_raising(OSError("dcr_fast/_C.so: invalid ELF header")), "invalid ELF header"),
    (lambda name: _Module, "built against torch 1.0.0"),
])
def test_a_build_for_another_torch_is_not_used(import_module, reason):
    from dcr_fast import _extension

    module, why = _extension._load(import_module)
    assert module is None and reason in why


def test_no_build_is_silent():
    from dcr_fast import _extension

    exc = ModuleNotFoundError("No module named 'dcr_fast._C'", name="dcr_fast._C")
    assert _extension._load(_raising(exc)) == (None, None)


# A fresh interpreter in which dcr_fast._C fails as an ABI-mismatched build does.
MISMATCHED = r"""
import importlib.abc, sys, warnings

class Mismatched(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "dcr_fast._C":
            raise ImportError(f"{name}: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")

sys.meta_path.insert(0, Mismatched())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import dcr_fast
    from dcr_fast import _extension
    from dcr_fast.ntk.probe_ops import probe_linear, probe_linear_reference
    loss = dcr_fast.circle_loss(torch.randn(12, 5), torch.randint(0, 3, (12,)), backend="chunked")
    args = (torch.randn(2, 3, 4), torch.randn(5, 4), None, torch.randn(1, 2, 4), torch.randn(1, 2, 5), None,
            torch.tensor([0.1, -0.1]))
    assert torch.equal(probe_linear(*args), probe_linear_reference(*args))
import json
print(json.dumps({"has_extension": _extension.HAS_EXTENSION, "loss": float(loss),
                  "warnings": [str(w.message) for w in caught if "dcr_fast._C" in str(w.message)]}))
"""


def test_abi_mismatch_degrades_to_pytorch_with_one_warning():
    run = subprocess.run([sys.executable, "-c", MISMATCHED], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["has_extension"] and result["loss"] == result["loss"], result  # a number, not NaN
    (message,) = result["warnings"]
    assert "pip install --no-build-isolation" in message and "undefined symbol" in message, message


# ----------------------------------------------------------------------------- pip's isolated build

def _backend():
    spec = importlib.util.spec_from_file_location("dcr_fast_build", ROOT / "build_backend" / "dcr_fast_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("installed,requirement", [
    ("2.13.0+cpu", "torch==2.13.0"), ("2.11.0+cu130", "torch==2.11.0"), ("2.14.0a0+git1234", "torch==2.14.0a0"),
    (None, "torch>=2.4"),
])
def test_isolated_build_gets_the_installed_torch_release(installed, requirement, monkeypatch):
    backend = _backend()
    monkeypatch.setattr(backend, "installed_torch_version", lambda: installed)
    assert backend.torch_requirement() == requirement
    assert requirement in backend.get_requires_for_build_wheel()
    assert requirement in backend.get_requires_for_build_editable()


def test_isolated_build_reads_the_target_environment_torch():
    """From inside pip's build environment (whose PYTHONPATH hides the target's site-packages), the
    probe still finds the torch installed where pip installs; here: this interpreter's."""
    hidden = dict(os.environ, PYTHONPATH="/nonexistent", PYTHONNOUSERSITE="1")
    code = "import sys; sys.path.insert(0, 'build_backend'); import dcr_fast_build as b; print(b.installed_torch_version())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=hidden)
    assert run.stdout.strip() == torch.__version__, run.stderr[-2000:]


# A CUDA torch, nvcc, no visible GPU, no TORCH_CUDA_ARCH_LIST: what pip's build environment saw.
NO_GPU_BUILD = r"""
import os, runpy, sys
import setuptools, torch
import torch.utils.cpp_extension as cpp_extension

os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
torch.version.cuda, cpp_extension.CUDA_HOME = "13.0", "/usr/local/cuda"
torch.cuda.is_available = lambda: False
try:
    cpp_extension._get_cuda_arch_flags([])
    crashed = False
except IndexError:
    crashed = True
setuptools.setup = lambda **kwargs: None
built = runpy.run_path(sys.argv[1])
print(crashed, os.environ["TORCH_CUDA_ARCH_LIST"], built["ext_modules"][0].sources[-1].endswith(".cu"))
print(" ".join(cpp_extension._get_cuda_arch_flags([])))
"""


def test_cuda_build_without_a_visible_gpu_uses_the_default_arch_list():
    run = subprocess.run([sys.executable, "-c", NO_GPU_BUILD, str(ROOT / "setup.py")], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    first, flags = run.stdout.strip().splitlines()[-2:]
    assert first == "True 8.0;8.6;8.9;9.0+PTX True", run.stdout  # torch alone raises; setup.py does not
    assert "code=sm_80" in flags and "code=sm_90" in flags and "code=compute_90" in flags, flags
