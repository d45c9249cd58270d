"""Hopper resources of the Triton kernels, measured without a GPU: compile, then read the cubin.

Every variant the GPU autotuner can pick (kernel × dtype × dot precision × candidate tile
config × the constexpr flags the host sets; aligned inputs, d a multiple of 16) is compiled
ahead of time for sm_90 (H100/H200) with Triton's own bundled ptxas, and the cubin's
registers per thread, stack bytes per thread (where ptxas puts spilled registers:
``cuobjdump`` reports them as STACK, while LOCAL stays 0) and static shared memory are read
back with the bundled ``cuobjdump``; Triton's metadata gives the dynamic shared memory, and
its IR how many loads became asynchronous copies (software pipelining: without them each tile
waits on global memory). fp32 is compiled both ways: with TF32 and as PyTorch's default
(``allow_tf32=False``), the "ieee" dots on the FMA units. What this shows: that the real GPU
code path compiles (the CPU tests run the interpreter, which never does), which configs could
not launch (shared memory over the 227 KiB a block may use) and which spill (more than
``MAX_STACK_BYTES`` a thread counts as a failure). What it cannot show: speed. Registers above
255 per thread are impossible; above ~128 with 8 warps, occupancy drops.

Needs only the ``triton`` wheel (its NVIDIA backend ships ptxas and cuobjdump on Linux x86).
From the repository root:

    python -m bench.kernel_resources            # every variant (2-25 s each, --jobs in parallel), JSON under bench/results/
    python -m bench.kernel_resources --quick    # one config per kernel and dtype
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter cannot compile; must precede the kernels' import

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench.common import RESULTS_DIR  # noqa: E402
from dcr_fast import atomic  # noqa: E402
from dcr_fast.kernels import circle_loss as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED_BYTES = 227 * 1024  # per block on sm_90 (H100, H200)
MAX_STACK_BYTES = 1024  # spilled bytes a thread may have in a launchable variant
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

_POINTER = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "float64": "*fp64"}
_SIZES = ("B", "M", "D", "stride_x", "stride_r", "stride_out", "stride_ds", "SIZE_CLASS", "row0", "n_rows",
          "self_offset")
_MARGINS = ("o_p", "o_n", "delta_p", "delta_n", "gamma")  # run-time float64 arguments
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compilation: a kernel, its input dtype, a tile config and the host-set flags."""

    kernel: str  # fwd | bwd | ds (the keys of K.CONFIGS)
    dtype: str
    config: triton.Config
    flags: tuple[tuple[str, object], ...]  # constexprs the host sets (beyond tiles and dtype)

    def name(self) -> str:
        tiles = "x".join(str(self.config.kwargs[k]) for k in ("BM", "BN", "BLOCK_D"))
        flags = ",".join(f"{k}={v}" for k, v in self.flags)
        return f"{self.kernel} {self.dtype} {tiles} w{self.config.num_warps}s{self.config.num_stages} {flags}"


def variants(quick: bool = False) -> list[Variant]:
    """Every variant the autotuner may launch: the candidates of ``K.candidates`` for each kernel,
    dtype and dot precision (fp32: TF32 and PyTorch's default, IEEE); ``quick``: the first
    candidate config of each."""
    out = []
    for kernel in K.CONFIGS:
        for dtype in _DTYPES:
            for precision in ("tf32", "ieee") if dtype == "float32" else ("ieee",):
                candidates = K.candidates(kernel, _DTYPES[dtype], precision)
                for config in candidates[:1] if quick else candidates:
                    for flags in _flag_sets(kernel, dtype, precision):
                        out.append(Variant(kernel, dtype, config, flags))
    return out


def _flag_sets(kernel: str, dtype: str, precision: str) -> list[tuple[tuple[str, object], ...]]:
    base = (("PRECISION", precision), ("EXCLUDE_SELF", True))
    if kernel != "fwd":  # the backward kernels scale dS for fp16 (a pointer argument more)
        base += (("SCALE_DS", dtype == "float16"),)
    resident = [(("RESIDENT", True),), (("RESIDENT", False),)]
    if kernel == "bwd":  # dX̂; dR̂; dR̂ added onto dX̂ (self-reference)
        sides = [(("FOR_REF", False), ("ACCUMULATE", False)), (("FOR_REF", True), ("ACCUMULATE", False)),
                 (("FOR_REF", True), ("ACCUMULATE", True))]
        return [base + s + r for s in sides for r in resident]
    return [base + r for r in resident]


def compile_variant(variant: Variant) -> dict:
    """Compile for sm_90; registers, spills and shared memory of the cubin, async loads of the IR."""
    fn = {"fwd": K._circle_fwd_kernel, "bwd": K._circle_bwd_kernel, "ds": K._circle_ds_kernel}[variant.kernel]
    acc = "float64" if variant.dtype == "float64" else "float32"
    ds_dtype = "float32" if variant.dtype == "float32" else variant.dtype
    pointers = dict(X=variant.dtype, R=variant.dtype, LSE_P=acc, LSE_N=acc, G_P=acc, G_N=acc, OUT=acc, DS=ds_dtype)
    flags = dict(variant.flags)
    if flags.get("SCALE_DS"):
        pointers["DS_SCALE"] = "float32"
    constexprs = dict(**variant.config.kwargs, **flags, UPCAST=False, DS_SCALE=None,
                      ACC=tl.float64 if acc == "float64" else tl.float32, BLOCK_DO=128)
    signature = {}
    for name in fn.arg_names:
        if name in pointers:
            signature[name] = _POINTER[pointers[name]]
        elif name in _MARGINS:
            signature[name] = "fp64"
        elif name in ("Ylab", "Rlab"):
            signature[name] = "*i64"
        elif name in _SIZES:
            signature[name] = "i32"
        else:
            signature[name] = "constexpr"
    missing = [n for n, t in signature.items() if t == "constexpr" and n not in constexprs]
    if missing:
        raise ValueError(f"{variant.name()}: no value for constexpr {missing}")
    # As Triton specializes a launch on 16-byte aligned tensors with d (and so the row strides)
    # a multiple of 16, the common case (d = 128, 1,536, 4,096): it decides vector widths and
    # whether loads can be asynchronous copies into shared memory.
    aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
               if t.startswith("*") or n == "D" or n.startswith("stride")}
    source = ASTSource(fn=fn, signature=signature, attrs=aligned,
                       constexprs={(fn.arg_names.index(n),): constexprs[n] for n, t in signature.items() if t == "constexpr"})
    start = time.perf_counter()
    compiled = triton.compile(source, target=TARGET, options=dict(num_warps=variant.config.num_warps,
                                                                  num_stages=variant.config.num_stages))
    seconds = time.perf_counter() - start
    usage = _resource_usage(compiled.asm["cubin"])
    shared = compiled.metadata.shared + usage["shared_static"]
    return dict(variant=variant.name(), kernel=variant.kernel, dtype=variant.dtype, tiles=dict(variant.config.kwargs),
                num_warps=variant.config.num_warps, num_stages=variant.config.num_stages, flags=dict(variant.flags),
                registers=usage["registers"], stack_bytes=usage["stack"], shared_bytes=shared,
                launchable=shared <= MAX_SHARED_BYTES, spills=usage["stack"] > MAX_STACK_BYTES,
                async_loads=compiled.asm["ttgir"].count("async_copy_global_to_local"), compile_s=round(seconds, 2))


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(TOOLS / "cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    registers, stack, shared, local = map(int, found.groups())
    return dict(registers=registers, stack=stack + local, shared_static=shared)


def available() -> str | None:
    """None when this Triton can compile for sm_90 here, else why not."""
    if not (TOOLS / "ptxas").exists() or not (TOOLS / "cuobjdump").exists():
        return f"this triton wheel has no bundled ptxas/cuobjdump under {TOOLS}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first candidate config of each kernel and dtype")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel (processes)")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    reason = available()
    if reason:
        print(reason)
        return 1
    rows = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(compile_variant, variants(quick=args.quick)):
            rows.append(row)
            print(f"{row['variant']:<90} regs {row['registers']:>3}  stack {row['stack_bytes']:>5} B  "
                  f"smem {row['shared_bytes'] / 1024:>6.1f} KiB  async loads {row['async_loads']}"
                  f"{'' if row['launchable'] else '  NOT LAUNCHABLE'}{'  SPILLS' if row['spills'] else ''}", flush=True)
    path = Path(args.results_dir) / "kernel_resources-sm90.json"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    atomic.write_json(path, {"what": __doc__.split("\n\n")[0], "target": "sm_90 (cuda, warp 32)",
                             "triton": triton.__version__, "git_commit": commit,
                             "max_stack_bytes": MAX_STACK_BYTES, "rows": rows}, indent=1)
    print(f"results: {path}")
    spilling = [r["variant"] for r in rows if r["launchable"] and r["spills"]]
    if spilling:
        print(f"{len(spilling)} launchable variants spill more than {MAX_STACK_BYTES} B a thread:", *spilling, sep="\n  ")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
