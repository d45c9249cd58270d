"""The CMake build of dcr_fast._C (CMakeLists.txt + Torch's CMake config) works from scratch:
configure and build into a temporary directory, then import the result in a fresh interpreter
(its PyInit stub and TORCH_LIBRARY registrations) and run the op there.

A fresh interpreter because a process that already loaded the pip-built ``dcr_fast._C`` cannot
register the ``dcr_fast`` library a second time. About 20 s on 2 cores; skipped without a
CMake >= 3.26 (``pip install cmake``, as CI does)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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
