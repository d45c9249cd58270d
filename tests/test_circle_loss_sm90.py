"""The fused Circle loss kernels compile for Hopper (sm_90) here, without a GPU.

The other kernel tests run Triton's interpreter, which never compiles; this compiles the
real GPU code path with Triton's bundled ptxas (``bench/kernel_resources.py``) for one tile
config of each kernel and each host-set flag, and checks what would stop a launch or slow it
down: shared memory over a block's limit, and registers spilled to the stack (more than
1 KB a thread). The full sweep over every candidate config is ``python -m bench.kernel_resources``,
whose committed record is checked here to cover exactly the variants the autotuner can launch.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "bench" / "results" / "kernel_resources-sm90.json"


def _child(code: str) -> str:
    """Runs ``code`` in a child process: compiling needs TRITON_INTERPRET unset before the kernels
    are imported."""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_each_kernel_variant_compiles_for_sm90_fits_a_block_and_does_not_spill():
    probe = _child("import bench.kernel_resources as k; print(k.available() or '')")
    if probe.strip():
        pytest.skip(probe.strip())
    # bf16 (the tensor-core path), fp64, and fp32 without TF32 (PyTorch's default: the FMA
    # dots, whose 64×64×64 resident backward spilled 8-14 KB a thread), one config of each.
    code = """
import json, sys
import bench.kernel_resources as k
rows = []
for v in k.variants(quick=True):
    flags = dict(v.flags)
    if v.dtype in ("bfloat16", "float64") or (v.dtype == "float32" and flags["PRECISION"] == "ieee"
                                                  and (v.kernel != "bwd" or flags["RESIDENT"])):
        rows.append(k.compile_variant(v))
json.dump(rows, sys.stdout)
"""
    rows = json.loads(_child(code))
    kernels = {(r["kernel"], r["dtype"], r["flags"]["PRECISION"]) for r in rows}
    assert {("fwd", "bfloat16", "ieee"), ("bwd", "bfloat16", "ieee"), ("ds", "bfloat16", "ieee"),
            ("fwd", "float64", "ieee"), ("bwd", "float32", "ieee")} <= kernels
    for row in rows:
        assert row["launchable"], f"{row['variant']}: {row['shared_bytes']} B of shared memory"
        assert not row["spills"], f"{row['variant']}: {row['stack_bytes']} B of stack a thread"


def test_committed_resource_record_covers_every_launchable_variant():
    """bench/results/kernel_resources-sm90.json was measured for the variants the autotuner can
    launch now (stack bytes read, fp32 IEEE included), and none of its launchable rows spills."""
    names = _child("import bench.kernel_resources as k; print('\\n'.join(v.name() for v in k.variants()))")
    record = json.loads(RECORD.read_text())
    assert sorted(r["variant"] for r in record["rows"]) == sorted(names.split("\n")[:-1])
    assert all("stack_bytes" in r for r in record["rows"])
    spilling = [r["variant"] for r in record["rows"] if r["launchable"] and r["stack_bytes"] > record["max_stack_bytes"]]
    assert not spilling, spilling
