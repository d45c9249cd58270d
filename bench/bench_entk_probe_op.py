"""probe_linear benchmark: the compiled op vs its PyTorch reference vs per-direction weights.

The batched FD eNTK evaluates every tail linear layer under P = 2·(probe prompts)·k directions
±εDᵀA at once (:mod:`dcr_fast.ntk.probe_ops`). Three ways to do it are timed side by side:

* ``probe_linear``  - ``torch.ops.dcr_fast.probe_linear``: one shared GEMM x Wᵀ, u = x Aᵀ, and a
  fused C++ (or CUDA) update y += s (u D + d_bias);
* ``reference``     - ``probe_linear_reference``: the same maths as separate torch ops;
* ``materialized``  - W + s DᵀA formed per direction (P weight copies), then one bmm: what
  running the layer with substituted parameters costs.

Each non-reference row records ``speedup`` (the reference's median time over its own) and
``max_abs_err`` against the reference. Rows go to ``bench/results/entk_probe_op-<device>.json``
(see ``bench/common.py``). Run from the repository root:

    python -m bench.bench_entk_probe_op                # CPU grid, ~1 minute on 2 cores
    python -m bench.bench_entk_probe_op --device cuda
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import torch

from bench.common import RESULTS_DIR, ResultsFile, Row, format_table, measure
from dcr_fast.config import add_config_arguments, config_from_args
from dcr_fast._extension import require_extension
from dcr_fast.ntk.probe_ops import probe_linear_reference

BENCH = "entk_probe_op"


@dataclass
class ProbeOpBenchConfig:
    """What to measure; every field is a command-line flag."""

    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    dtypes: tuple[str, ...] = field(default=("float32", "bfloat16"), metadata={"help": "input dtypes"})
    widths: tuple[int, ...] = field(default=(256, 1024), metadata={"help": "d_in = d_out of the layer"})
    directions: tuple[int, ...] = field(default=(20, 80), metadata={"help": "P: 2 x probe prompts x k"})
    queries: int = field(default=2, metadata={"help": "query prompts per direction"})
    tokens: int = field(default=32, metadata={"help": "prompt length: rows per query and the rank T"})
    budget_s: float = field(default=1.0, metadata={"help": "seconds of timed calls per measurement"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (torch.set_num_threads)"})
    results_dir: str = field(default=str(RESULTS_DIR), metadata={"help": "where the results JSON goes"})


def materialized(x, weight, bias, a, d, d_bias, scale):
    """Every direction's weight written out, as a substituted-parameter forward would use."""
    f = a.shape[0]
    index = torch.arange(x.shape[0], device=x.device) % f
    scale = scale.to(x.dtype)
    weights = weight + scale[:, None, None] * (d.transpose(1, 2) @ a)[index]
    biases = bias + scale[:, None] * d_bias[index]
    return torch.baddbmm(biases[:, None, :], x, weights.transpose(1, 2))


def run(config: ProbeOpBenchConfig) -> list[Row]:
    require_extension("bench_entk_probe_op")
    device = torch.device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    results = ResultsFile(BENCH, device, results_dir=config.results_dir)
    print(f"probe_linear on {results.run['env']['device']} -> {results.path}", flush=True)
    impls = {"probe_linear": torch.ops.dcr_fast.probe_linear, "materialized": materialized}
    rows = []
    for dtype_name in config.dtypes:
        dtype = getattr(torch, dtype_name)
        for width in config.widths:
            for p in config.directions:
                f, m, t = p // 2, config.queries * config.tokens, config.tokens
                g = torch.Generator(device=device).manual_seed(0)

                def rand(*shape):
                    return torch.randn(*shape, generator=g, device=device).to(dtype)

                args = (rand(p, m, width), rand(width, width), rand(width), rand(f, t, width), rand(f, t, width),
                        rand(f, width), torch.linspace(-1e-3, 1e-3, p, device=device))
                case = {"P": p, "M": m, "T": t, "d": width, "dtype": dtype_name}
                flops = 2 * p * m * width * width + 4 * p * m * t * width
                expected = probe_linear_reference(*args)
                reference = measure(lambda: probe_linear_reference(*args), bench=BENCH, impl="reference",
                                    mode="fwd", case=case, device=device, budget_s=config.budget_s)
                if reference.ok:
                    reference.metrics["gflops"] = flops / reference.ms_median / 1e6
                block = [results.add(reference)]
                for name, fn in impls.items():
                    row = measure(lambda fn=fn: fn(*args), bench=BENCH, impl=name, mode="fwd", case=case,
                                  device=device, budget_s=config.budget_s)
                    if row.ok and reference.ok:
                        row.metrics["gflops"] = flops / row.ms_median / 1e6
                        row.metrics["speedup"] = reference.ms_median / row.ms_median
                        row.metrics["max_abs_err"] = (fn(*args).float() - expected.float()).abs().max().item()
                    block.append(results.add(row))
                print(format_table(block, ("gflops", "speedup", "max_abs_err")), flush=True)
                rows += block
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, ProbeOpBenchConfig)
    run(config_from_args(ProbeOpBenchConfig, parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
