"""Circle loss benchmark: fused Triton kernel vs the torch reference vs chunked vs PML.

For each case (batch B, embedding width d, dtype) and mode (``fwd``: loss only, inputs without
grad; ``fwd+bwd``: loss and ``backward()``) every implementation is timed, its peak memory
taken, and out-of-memory recorded as a row with status "oom":

* ``triton``  - ``dcr_fast.circle_loss(backend="triton")``, the fused kernels (CUDA only; the
  CPU interpreter exists for tests and is far too slow to time);
* ``torch``   - the materialized pure-PyTorch reference (``backend="torch"``);
* ``chunked`` - the row-block streaming path with O(chunk·B) memory (``backend="chunked"``);
* ``compile`` - ``torch.compile`` of the torch reference (GPU sweeps);
* ``pml``     - ``pytorch_metric_learning.losses.CircleLoss`` (variant "original" only);
* ``matmul``  - the products no implementation can avoid, timed with ``torch.matmul`` in the
  same run: S = X̂·R̂ᵀ for ``fwd``; S, dX̂ = dS·R̂ and dR̂ = dSᵀ·X̂ for ``fwd+bwd``, in row
  chunks of at most 16,384 so that B = 131,072 fits. Every other row reports ``x_matmul``,
  its time over this lower bound.

Each implementation's loss and input gradient are also compared once per case with an fp32
reference on the same (dtype-rounded) inputs: the torch reference up to B = 16,384, the
chunked path above (where the reference cannot fit), as ``loss_rel_err`` and
``grad_rel_err`` (relative Frobenius error).

Rows go to ``bench/results/circle_loss-<device>.json`` (see ``bench/common.py``); a verdict
table for the project's GPU targets is printed at the end. Run from the repository root:

    python -m bench.bench_circle_loss --threads 1          # CPU grid, ~16 minutes on 2 cores
    python -m bench.bench_circle_loss --preset quick       # ~1 minute
    python -m bench.bench_circle_loss --device cuda --preset targets
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import time
import unittest.mock
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from bench.common import (
    RESULTS_DIR,
    Candidate,
    ResultsFile,
    Row,
    format_table,
    measure_side_by_side,
    release_memory,
    render_table,
    skipped,
)
from dcr_fast.config import add_config_arguments, config_from_args

BENCH = "circle_loss"
# matmul first: others divide by it. chunked-torch: the chunked path with its PyTorch row
# epilogue, the reference of the fused C++ row kernels that "chunked" uses on the CPU.
IMPLS = ("matmul", "triton", "torch", "chunked", "chunked-torch", "compile", "pml")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MATMUL_CHUNK = 16384
REFERENCE_MAX_B = 16384  # above this the fp32 reference for the error check is the chunked path
METRIC_KEYS = ("x_matmul", "speedup_vs_pml", "speedup_vs_torch", "gpairs_per_s", "tflops", "loss_rel_err",
               "grad_rel_err")


@dataclass(frozen=True)
class Preset:
    cases: tuple[tuple[int, int, str], ...]  # (B, d, dtype)
    impls: tuple[str, ...]
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")


def _grid(batch_sizes: tuple[int, ...], dims: tuple[int, ...], dtypes: tuple[str, ...]) -> tuple:
    """Cases ordered dtype, d, then ascending B, so an OOM at some B can skip the larger ones."""
    return tuple((b, d, t) for t, d, b in itertools.product(dtypes, dims, sorted(batch_sizes)))


PRESETS = {
    "quick": Preset(_grid((1024, 2048), (128,), ("float32",)), ("matmul", "torch", "chunked", "chunked-torch", "pml")),
    "cpu": Preset(_grid((1024, 4096, 8192), (128, 1536), ("float32",)),
                  ("matmul", "torch", "chunked", "chunked-torch", "pml")),
    "gpu": Preset(_grid((1024, 4096, 16384, 65536, 131072), (128, 1536, 4096), ("bfloat16", "float32")),
                  ("matmul", "triton", "torch", "compile", "pml")),
    "targets": Preset(((16384, 128, "bfloat16"), (16384, 4096, "bfloat16"), (131072, 1536, "bfloat16")),
                      ("matmul", "triton", "torch", "pml"), ("fwd+bwd",)),
}


@dataclass
class CircleBenchConfig:
    """What to measure; every field is a command-line flag (``batch_sizes`` -> ``--batch-sizes``)."""

    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    preset: str = field(default="auto", metadata={"help": f"auto (cpu or gpu by device) or one of {tuple(PRESETS)}"})
    batch_sizes: tuple[int, ...] | None = field(default=None, metadata={"help": "B values, with --dims and --dtypes "
                                                                                "replacing the preset's cases"})
    dims: tuple[int, ...] | None = field(default=None, metadata={"help": "embedding widths d"})
    dtypes: tuple[str, ...] | None = field(default=None, metadata={"help": f"subset of {tuple(DTYPES)}"})
    impls: tuple[str, ...] | None = field(default=None, metadata={"help": f"subset of {IMPLS}"})
    modes: tuple[str, ...] | None = field(default=None, metadata={"help": "fwd and/or fwd+bwd"})
    variant: str = field(default="original", metadata={"help": "original (PML) or dcr"})
    m: float = field(default=0.4, metadata={"help": "Circle-loss margin"})
    gamma: float = field(default=80.0, metadata={"help": "Circle-loss scale"})
    num_classes: int = field(default=2, metadata={"help": "labels drawn uniformly from this many classes"})
    budget_s: float = field(default=1.0, metadata={"help": "seconds of timed calls per measurement"})
    max_call_s: float = field(default=30.0, metadata={"help": "skip larger B for an impl slower than this per call"})
    max_minutes: float | None = field(default=None, metadata={"help": "stop starting new cases after this long"})
    check: bool = field(default=True, metadata={"help": "compare each impl's loss and gradient with fp32"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (torch.set_num_threads); on a shared "
                                                                  "machine 1 keeps other jobs from stalling parallel ops"})
    seed: int = field(default=0, metadata={"help": "seed of the random inputs"})
    results_dir: str = field(default=str(RESULTS_DIR), metadata={"help": "where the results JSON goes"})

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.preset != "auto" and self.preset not in PRESETS:
            raise ValueError(f"preset must be 'auto' or one of {tuple(PRESETS)}, got {self.preset!r}")
        for name, allowed in (("dtypes", DTYPES), ("impls", IMPLS), ("modes", ("fwd", "fwd+bwd"))):
            bad = [v for v in getattr(self, name) or () if v not in allowed]
            if bad:
                raise ValueError(f"{name} must be a subset of {tuple(allowed)}, got {bad}")
        if self.variant not in ("original", "dcr"):
            raise ValueError(f"variant must be 'original' or 'dcr', got {self.variant!r}")
        if (self.batch_sizes is None) != (self.dims is None):
            raise ValueError("batch_sizes and dims must be given together (dtypes defaults to float32)")
        if self.num_classes < 1 or self.budget_s <= 0 or (self.threads is not None and self.threads < 1):
            raise ValueError(f"num_classes and threads must be ≥ 1 and budget_s > 0, got {self.num_classes}, "
                             f"{self.threads}, {self.budget_s}")

    def plan(self) -> Preset:
        """The cases, implementations and modes this config asks for."""
        name = self.preset if self.preset != "auto" else ("cpu" if self.device == "cpu" else "gpu")
        preset = PRESETS[name]
        cases = preset.cases
        if self.batch_sizes is not None:
            cases = _grid(self.batch_sizes, self.dims, self.dtypes or ("float32",))
        elif self.dtypes is not None:
            cases = tuple(c for c in cases if c[2] in self.dtypes)
        impls = tuple(i for i in IMPLS if i in (self.impls or preset.impls))
        return Preset(cases, impls, self.modes or preset.modes)


def run(config: CircleBenchConfig) -> list[Row]:
    """Measure every (case, mode, impl) of the config, save rows as they come, print tables."""
    device = torch.device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    plan = config.plan()
    results = ResultsFile(BENCH, device, results_dir=config.results_dir, extra_packages=("pytorch-metric-learning",))
    print(f"{len(plan.cases)} cases x {plan.modes} x {plan.impls} on {results.run['env']['device']}"
          f" -> {results.path}", flush=True)
    start = time.monotonic()
    gave_up: dict[tuple, str] = {}  # (impl, mode, d, dtype) -> why larger B are skipped
    rows: list[Row] = []
    for B, d, dtype in tqdm(plan.cases, desc="circle_loss cases", file=sys.stdout):
        if config.max_minutes is not None and time.monotonic() - start > 60 * config.max_minutes:
            print(f"max_minutes={config.max_minutes} reached; not starting B={B} d={d} {dtype} and later cases")
            break
        case = {"B": B, "d": d, "dtype": dtype, "variant": config.variant, "classes": config.num_classes}
        x, labels = _inputs(B, d, DTYPES[dtype], device, config)
        errors = _check_errors(x, labels, plan.impls, config) if config.check else {}
        for mode in plan.modes:
            candidates, skip_reasons = [], {}
            for impl in plan.impls:
                candidate = gave_up.get((impl, mode, d, dtype)) or _candidate(impl, mode, x, labels, device, config)
                if isinstance(candidate, str):
                    skip_reasons[impl] = candidate
                else:
                    candidates.append(candidate)
            measured = {r.impl: r for r in measure_side_by_side(
                candidates, bench=BENCH, mode=mode, case=case, device=device, budget_s=config.budget_s)}
            case_rows = []
            for impl in plan.impls:
                row = measured.get(impl) or skipped(bench=BENCH, impl=impl, mode=mode, case=case,
                                                    reason=skip_reasons.get(impl, ""))
                if row.status == "oom":
                    gave_up[(impl, mode, d, dtype)] = f"oom at smaller B={B}"
                elif row.ok and row.ms_median > 1e3 * config.max_call_s:
                    gave_up[(impl, mode, d, dtype)] = f"slower than max_call_s={config.max_call_s} at B={B}"
                row.metrics.update(errors.get(impl, {}))
                case_rows.append(row)
            _add_ratios(case_rows, B, d, mode)
            for row in case_rows:
                results.add(row)
            rows += case_rows
            tqdm.write(format_table(case_rows, METRIC_KEYS) + "\n", file=sys.stdout)
        del x, labels
    print(summary_table(rows))
    if device.type == "cuda":
        print(verdict_table(rows))
    if "triton" in plan.impls and rows:
        from dcr_fast.kernels.circle_loss import tuned_configs

        results.run["triton_tiles"] = tuned_configs()  # what the autotuner picked per shape class
        results.save()
    print(f"results: {results.path}")
    return rows


def summary_table(rows: list[Row]) -> str:
    """One line per (case, mode): median ms of each impl, and the speedup of each over PML."""
    impls = [i for i in IMPLS if any(r.impl == i for r in rows)]
    compared = [i for i in impls if i not in ("pml", "matmul")]
    lines = [["B", "d", "dtype", "mode", *(f"{i} ms" for i in impls), *(f"{i} vs pml" for i in compared)]]
    groups: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r.case["B"], r.case["d"], r.case["dtype"], r.mode), {})[r.impl] = r

    def time_cell(r: Row | None) -> str:
        return "-" if r is None else (f"{r.ms_median:.4g}" if r.ok else r.status)

    def speedup_cell(r: Row | None) -> str:
        return f"{r.metrics['speedup_vs_pml']:.2f}x" if r is not None and "speedup_vs_pml" in r.metrics else "-"

    for (B, d, dtype, mode), by_impl in groups.items():
        lines.append([str(B), str(d), dtype, mode, *(time_cell(by_impl.get(i)) for i in impls),
                      *(speedup_cell(by_impl.get(i)) for i in compared)])
    return render_table(lines, align="right")


def loss_function(impl: str, config: CircleBenchConfig, device: torch.device) -> Callable | str:
    """The callable ``(embeddings, labels) -> loss`` of an implementation, or why it is skipped."""
    kwargs = {"m": config.m, "gamma": config.gamma, "variant": config.variant}
    if impl in ("triton", "torch", "chunked", "compile"):
        import dcr_fast

        if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "the fused kernels are timed on CUDA only (TRITON_INTERPRET=1 runs them on the CPU, for tests)"
        fn = functools.partial(dcr_fast.circle_loss, backend="torch" if impl == "compile" else impl, **kwargs)
        if impl == "compile":
            torch._dynamo.reset()  # a fresh cache per case: no recompilation limit, no stale graphs
            return torch.compile(fn)
        return fn
    if impl == "chunked-torch":
        from dcr_fast.circle_loss import chunked, circle_loss

        def chunked_torch(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            # the backward follows the forward's choice (kept on the autograd node)
            with unittest.mock.patch.object(chunked, "fused_rows_available", lambda _: False):
                return circle_loss(embeddings, labels, backend="chunked", **kwargs)
        return chunked_torch
    if impl == "pml":
        if config.variant != "original":
            return "pytorch-metric-learning has only the original variant"
        try:
            from pytorch_metric_learning.losses import CircleLoss as PMLCircleLoss
        except ImportError:
            return "pytorch-metric-learning is not installed"
        return PMLCircleLoss(m=config.m, gamma=config.gamma)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def unavoidable_products(x_hat: torch.Tensor, mode: str) -> torch.Tensor:
    """The matrix products any Circle loss needs, B×d×B each, in row chunks of ``MATMUL_CHUNK``.

    ``fwd``: S = X̂·X̂ᵀ. ``fwd+bwd``: also dX̂ = dS·X̂ and dR̂ = dSᵀ·X̂ (S stands in for dS: same
    shapes, same work).
    """
    B = x_hat.shape[0]
    s = torch.empty(min(B, MATMUL_CHUNK), B, dtype=x_hat.dtype, device=x_hat.device)
    dx = torch.empty_like(x_hat) if mode == "fwd+bwd" else None
    dr = torch.zeros_like(x_hat) if mode == "fwd+bwd" else None
    for i in range(0, B, MATMUL_CHUNK):
        rows = x_hat[i:i + MATMUL_CHUNK]
        s_rows = s[: rows.shape[0]]
        torch.matmul(rows, x_hat.mT, out=s_rows)
        if mode == "fwd+bwd":
            torch.matmul(s_rows, x_hat, out=dx[i:i + MATMUL_CHUNK])
            dr.addmm_(s_rows.mT, rows)
    return s


def product_flops(B: int, d: int, mode: str) -> float:
    return 2.0 * B * B * d * (1 if mode == "fwd" else 3)


def verdict_table(rows: list[Row]) -> str:
    """Pass/fail of the GPU targets (H100, bf16, fwd+bwd) from whichever rows were measured."""
    def find(impl: str, B: int, d: int) -> Row | None:
        return next((r for r in rows if r.impl == impl and r.mode == "fwd+bwd" and r.case["B"] == B
                     and r.case["d"] == d and r.case["dtype"] == "bfloat16"), None)

    def ms(row: Row | None) -> float | None:
        return row.ms_median if row is not None and row.ok else None

    lines = ["target (bf16, fwd+bwd)                          measured                         verdict"]

    def add(name: str, measured: str, ok: bool | None) -> None:
        verdict = "not measured" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"{name:<48}{measured:<33}{verdict}")

    fused, pml, ref = (ms(find(i, 16384, 128)) for i in ("triton", "pml", "torch"))
    add("(a) B=16384 d=128: >=10x faster than PML", _ratio_text(pml, fused), _at_least(pml, fused, 10))
    add("(a) B=16384 d=128: >=3x faster than torch ref", _ratio_text(ref, fused), _at_least(ref, fused, 3))
    fused, products = ms(find("triton", 16384, 4096)), ms(find("matmul", 16384, 4096))
    add("(b) B=16384 d=4096: <=1.5x the matmuls", _ratio_text(fused, products),
        None if fused is None or products is None else fused <= 1.5 * products)
    big, big_ref = find("triton", 131072, 1536), find("torch", 131072, 1536)
    if big is None or not big.ok or big.peak_mb is None:
        add("(c) B=131072 d=1536: <=2 GB, reference OOM", "fused: " + (big.status if big else "-"),
            None if big is None else False)
    else:
        ref_state = "-" if big_ref is None else (big_ref.reason if big_ref.status == "skipped" else big_ref.status)
        ref_oom = big_ref is not None and (big_ref.status == "oom" or big_ref.reason.startswith("oom at"))
        add("(c) B=131072 d=1536: <=2 GB, reference OOM", f"{big.peak_mb:.0f} MiB, ref {ref_state}",
            big.peak_mb <= 2048 and ref_oom)
    checked = [r for r in rows if r.impl == "triton" and "grad_rel_err" in r.metrics]
    worst = max((max(r.metrics["loss_rel_err"], r.metrics["grad_rel_err"]) for r in checked), default=None)
    add("(d) same numbers as the fp32 reference", "-" if worst is None else f"worst rel err {worst:.2e}",
        None if worst is None else all(_within_tolerance(r, rows) for r in checked))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, CircleBenchConfig)
    run(config_from_args(CircleBenchConfig, parser.parse_args(argv)))
    return 0


def _inputs(B: int, d: int, dtype: torch.dtype, device: torch.device,
            config: CircleBenchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    x = torch.randn(B, d, generator=gen).to(device=device, dtype=dtype)
    labels = torch.randint(0, config.num_classes, (B,), generator=gen).to(device)
    return x, labels


def _candidate(impl: str, mode: str, x: torch.Tensor, labels: torch.Tensor, device: torch.device,
               config: CircleBenchConfig) -> Candidate | str:
    """One call of ``impl`` in ``mode`` on these inputs, or why it is skipped."""
    if impl == "matmul":
        x_hat = torch.nn.functional.normalize(x, dim=1)
        return Candidate(impl, lambda: unavoidable_products(x_hat, mode))
    loss_fn = loss_function(impl, config, device)
    if isinstance(loss_fn, str):
        return loss_fn
    if mode == "fwd":
        return Candidate(impl, lambda: loss_fn(x, labels))
    leaf = x.detach().requires_grad_(True)

    def step() -> torch.Tensor:
        loss = loss_fn(leaf, labels)
        loss.backward()
        return loss
    return Candidate(impl, step, (leaf,))


def _check_errors(x: torch.Tensor, labels: torch.Tensor, impls: tuple[str, ...],
                  config: CircleBenchConfig) -> dict[str, dict[str, float]]:
    """Relative loss and gradient errors of each impl against an fp32 reference on the same inputs."""
    reference = "torch" if x.shape[0] <= REFERENCE_MAX_B else "chunked"
    ref = _loss_and_grad(loss_function(reference, config, x.device), x.float(), labels)
    if ref is None:
        return {}
    errors = {}
    for impl in impls:
        loss_fn = loss_function(impl, config, x.device) if impl != "matmul" else "no loss"
        got = None if isinstance(loss_fn, str) else _loss_and_grad(loss_fn, x, labels)
        if got is not None:
            errors[impl] = {
                "loss_rel_err": abs(got[0] - ref[0]) / max(abs(ref[0]), 1e-30),
                "grad_rel_err": float((got[1] - ref[1]).norm() / ref[1].norm().clamp_min(1e-30)),
            }
    return errors


def _loss_and_grad(loss_fn: Callable | str, x: torch.Tensor,
                   labels: torch.Tensor) -> tuple[float, torch.Tensor] | None:
    """(loss, fp32 gradient) of one call, or None when it fails (the timed rows then say why)."""
    if isinstance(loss_fn, str):
        return None
    leaf = x.detach().requires_grad_(True)
    try:
        loss = loss_fn(leaf, labels)
        loss.backward()
    except Exception as exc:  # noqa: BLE001 - an OOM or a failing impl must not stop the benchmark
        release_memory(x.device)
        tqdm.write(f"error check skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return None
    return float(loss.detach()), leaf.grad.float()


def _add_ratios(rows: list[Row], B: int, d: int, mode: str) -> None:
    by_impl = {r.impl: r.ms_median for r in rows if r.ok}
    for r in rows:
        if not r.ok:
            continue
        r.metrics["gpairs_per_s"] = B * B / (r.ms_median * 1e-3) / 1e9
        if r.impl == "matmul":
            r.metrics["tflops"] = product_flops(B, d, mode) / (r.ms_median * 1e-3) / 1e12
            continue
        if "matmul" in by_impl:
            r.metrics["x_matmul"] = r.ms_median / by_impl["matmul"]
        for base in ("pml", "torch"):
            if base in by_impl and base != r.impl:
                r.metrics[f"speedup_vs_{base}"] = by_impl[base] / r.ms_median


def _tolerance(dtype: str) -> float:
    """Error allowed against the fp32 reference when no same-dtype torch error is at hand."""
    return {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}[dtype]


def _within_tolerance(row: Row, rows: list[Row]) -> bool:
    """flash-attention's rule: at most twice the torch reference's own error in the same dtype."""
    same = next((r for r in rows if r.impl == "torch" and r.case == row.case and "grad_rel_err" in r.metrics), None)
    for key in ("loss_rel_err", "grad_rel_err"):
        allowed = max(_tolerance(row.case["dtype"]), 2 * same.metrics[key] if same else 0.0)
        if not row.metrics[key] <= allowed:
            return False
    return True


def _at_least(slow: float | None, fast: float | None, factor: float) -> bool | None:
    return None if slow is None or fast is None else slow >= factor * fast


def _ratio_text(num: float | None, den: float | None) -> str:
    if num is None or den is None:
        return "-"
    return f"{num:.3g} / {den:.3g} ms = {num / den:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
