"""The fused Circle loss kernels compile for Hopper (sm_90) here, without a GPU.

The other kernel tests run Triton's interpreter, which never compiles; this compiles the
real GPU code path with Triton's bundled ptxas (``bench/kernel_resources.py``) for one tile
config of each kernel and each host-set flag, and checks what would stop a launch. The
full sweep over every candidate config is ``python -m bench.kernel_resources``.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_each_kernel_variant_compiles_for_sm90_and_fits_a_block():
    probe = subprocess.run([sys.executable, "-c", "import bench.kernel_resources as k; print(k.available() or '')"],
                           cwd=ROOT, capture_output=True, text=True, check=True)
    if probe.stdout.strip():
        pytest.skip(probe.stdout.strip())
    # A child process: compiling needs TRITON_INTERPRET unset before the kernels are imported.
    code = """
import json, sys
import bench.kernel_resources as k
rows = []
for v in k.variants(quick=True):
    if v.dtype in ("bfloat16", "float64") or (v.dtype == "float32" and v.kernel == "ds"):
        rows.append(k.compile_variant(v))
json.dump(rows, sys.stdout)
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout)
    kernels = {(r["kernel"], r["dtype"]) for r in rows}
    assert {("fwd", "bfloat16"), ("bwd", "bfloat16"), ("ds", "bfloat16"), ("fwd", "float64")} <= kernels
    for row in rows:
        assert row["launchable"], f"{row['variant']}: {row['shared_bytes']} B of shared memory"
