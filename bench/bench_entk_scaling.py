"""eNTK matrix across ranks: how ``entk_matrix`` scales with the world size, and what it sends.

For each world size W of ``--worlds`` this script starts W processes (one GPU each over NCCL
on CUDA, gloo on a CPU), which compute the same N×N ``exact`` matrix of ``bench_entk``'s
prompts and model (a preset architecture with random weights) through
:mod:`dcr_fast.ntk.sharded`. One row per W records:

* correctness: ``max_rel_diff_vs_first``, the largest relative difference of the matrix from
  the first world size's (the list starts at 1: one process);
* communication: ``sent_mb_max`` (the most a rank sent), ``sent_mb_total``, and
  ``feature_mb_per_prompt`` (the probe features that travel);
* balance: ``pairs_imbalance``, the largest rank's pairs over the mean;
* on a GPU only: the matrix's wall time (rank 0, between barriers, warm), ``pairs_per_s``,
  ``speedup_vs_first`` and ``efficiency`` (speed-up over W / W_first), and the slowest rank's
  seconds per phase (``seconds_<phase>``). CPU rows carry no times: W processes on a few
  shared cores measure the cores, not the method.

With ``--plan-prompts M`` (3,000 by default) it also reports, without running anything, what
a run on M prompts would send per rank for each W of ``--plan-worlds`` (``impl="plan"``): the
ring's schedule from :func:`dcr_fast.ntk.sharded.plan_ring` times the feature bytes a prompt
(measured on the first chunk). ``--worlds 1`` is enough for that: on a CPU, the 1.5B
architecture's plan needs one process (~7 GB) rather than W of them.

Rows go to ``bench/results/entk_scaling-<device>.json``. From the repository root:

    python -m bench.bench_entk_scaling                          # CPU: tiny model, W = 1, 2, 3
    python -m bench.bench_entk_scaling --device cuda            # GPUs: 1.5B architecture, W = 1, 2, 4, 8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.bench_entk import EntkBenchConfig, build_model, make_groups, max_rel_diff, resolve
from bench.common import RESULTS_DIR, ResultsFile, Row, format_table
from dcr_fast.config import add_config_arguments, config_from_args
from dcr_fast.ntk.exact import prompt_probes
from dcr_fast.ntk.matrix import entk_matrix
from dcr_fast.ntk.sharded import PHASES, plan_ring
from dcr_fast.ntk.tail import tail_spec

BENCH = "entk_scaling"
METRICS = ("max_rel_diff_vs_first", "sent_mb_max", "sent_mb_total", "pairs_imbalance", "pairs_per_s",
           "speedup_vs_first", "efficiency")
DEFAULTS = {"cpu": dict(preset="cpu-tiny", prompts=24, chunk_size=4, worlds=(1, 2, 3)),
            "cuda": dict(preset="qwen2.5-1.5b", prompts=512, chunk_size=32, worlds=(1, 2, 4, 8))}


@dataclass
class ScalingConfig:
    """What to measure; every field is a command-line flag."""

    device: str = field(default="cpu", metadata={"help": "cpu (gloo) or cuda (NCCL, one GPU a rank)"})
    worlds: tuple[int, ...] = field(default=(), metadata={"help": "world sizes, first one the baseline (default by device)"})
    preset: str = field(default="", metadata={"help": "bench_entk preset (default by device)"})
    prompts: int = field(default=0, metadata={"help": "N prompts (default by device)"})
    chunk_size: int = field(default=0, metadata={"help": "prompts a chunk; keep several chunks a rank (default by device)"})
    tokens: int = field(default=32, metadata={"help": "typical prompt length"})
    k: int = field(default=5, metadata={"help": "top-k probes per prompt"})
    tail_layers: int = field(default=2, metadata={"help": "decoder layers in θ_S (+ lm_head)"})
    plan_prompts: int = field(default=3000, metadata={"help": "also plan the communication of this many prompts (0: no)"})
    plan_worlds: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata={"help": "world sizes of the planned rows"})
    results_dir: str = field(default=str(RESULTS_DIR), metadata={"help": "where the results JSON goes"})


def resolve_scaling(config: ScalingConfig) -> ScalingConfig:
    defaults = DEFAULTS["cuda" if config.device.startswith("cuda") else "cpu"]
    chosen = {key: getattr(config, key) or value for key, value in defaults.items()}
    return replace(config, **chosen)


def run(config: ScalingConfig) -> list[Row]:
    config = resolve_scaling(config)
    cuda = config.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_entk_scaling: --device cuda but CUDA is not available")
    model_config = resolve(EntkBenchConfig(device=config.device, preset=config.preset, prompts=config.prompts,
                                           tokens=config.tokens, k=config.k, tail_layers=config.tail_layers,
                                           chunk_size=config.chunk_size, large_prompts=0))
    results = ResultsFile(BENCH, torch.device(config.device), results_dir=config.results_dir)
    print(f"eNTK scaling on {results.run['env']['device']}, preset {config.preset}, N = {config.prompts}, "
          f"chunks of {config.chunk_size} -> {results.path}", flush=True)
    rows: list[Row] = []
    first: dict | None = None
    per_prompt = None
    for world in config.worlds:
        case = {"preset": config.preset, "N": config.prompts, "W": world, "chunk_size": config.chunk_size,
                "k": config.k, "tail_layers": config.tail_layers, "dtype": model_config.dtype}
        if cuda and world > torch.cuda.device_count():
            rows.append(results.add(Row(bench=BENCH, impl="exact", mode="fwd+bwd", case=case, status="skipped",
                                        reason=f"{torch.cuda.device_count()} GPU(s) visible")))
            continue
        measured = launch(model_config, world)
        first = first or measured
        metrics = {"max_rel_diff_vs_first": max_rel_diff(measured["normalized"], first["normalized"])}
        per_prompt = measured["feature_bytes_per_prompt"]
        metrics["feature_mb_per_prompt"] = per_prompt / 1e6
        ranks = measured["ranks"]  # None for W = 1: one process takes entk_matrix's own path
        if ranks is not None:
            pairs = [r["pairs"] for r in ranks]
            metrics.update({
                "sent_mb_max": max(r["sent_bytes"] for r in ranks) / 1e6,
                "sent_mb_total": sum(r["sent_bytes"] for r in ranks) / 1e6,
                "pairs_imbalance": max(pairs) / (sum(pairs) / world),
            })
        times = {}
        if cuda:
            seconds = measured["seconds"]
            metrics.update({
                "pairs_per_s": config.prompts**2 / seconds,
                "speedup_vs_first": first["seconds"] / seconds,
                "efficiency": first["seconds"] / seconds * first["world"] / world,
            })
            if ranks is not None:
                metrics.update({f"seconds_{p}": max(r["seconds"][p] for r in ranks) for p in PHASES})
            times = dict(ms_median=seconds * 1e3, ms_p20=seconds * 1e3, ms_p80=seconds * 1e3, repeats=1)
        rows.append(results.add(Row(bench=BENCH, impl="exact", mode="fwd+bwd", case=case, metrics=metrics, **times)))
        print(format_table(rows[-1:], METRICS), flush=True)
    if config.plan_prompts and per_prompt:
        for world in config.plan_worlds:
            rows.append(results.add(planned(config, world, per_prompt)))
    print(format_table(rows, METRICS), flush=True)
    return rows


def planned(config: ScalingConfig, world: int, per_prompt: float) -> Row:
    """What a run on ``plan_prompts`` prompts would send: the ring's schedule, no model run."""
    n_chunks = -(-config.plan_prompts // config.chunk_size)
    plan = plan_ring([(i, j) for i in range(n_chunks) for j in range(i, n_chunks)], world, symmetric=True)
    sent = [plan.sent_chunks(r) * config.chunk_size * per_prompt for r in range(world)]
    blocks = [sum(len(b) for (r, _), b in plan.work.items() if r == rank) for rank in range(world)]
    case = {"preset": config.preset, "N": config.plan_prompts, "W": world, "chunk_size": config.chunk_size}
    metrics = {"sent_mb_max": max(sent) / 1e6, "sent_mb_total": sum(sent) / 1e6, "feature_mb_per_prompt": per_prompt / 1e6,
               "blocks_imbalance": max(blocks) / (sum(blocks) / world)}
    return Row(bench=BENCH, impl="plan", mode="fwd+bwd", case=case, metrics=metrics)


def launch(model_config: EntkBenchConfig, world: int) -> dict:
    """Run the matrix on ``world`` fresh processes; rank 0's matrix, reports and wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(world, tmp, model_config), nprocs=world, start_method="spawn")
        return torch.load(os.path.join(tmp, "rank0.pt"), weights_only=False)


def _rank(rank: int, world: int, tmp: str, config: EntkBenchConfig) -> None:
    cuda = config.device.startswith("cuda")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world, **({"device_id": device} if cuda else {}))
    try:
        model = build_model(config, device)
        groups = make_groups(config.prompts, config.tokens, config.vocab, device)
        settings = dict(k=config.k, tail_layers=config.tail_layers, chunk_size=config.chunk_size, progress=False)
        warm = {name: prompts[:1] for name, prompts in list(groups.items())[:2]}
        entk_matrix(model, None, warm, **{**settings, "chunk_size": 1})  # kernels, allocator, communicators
        dist.barrier()
        started = time.perf_counter()
        result = entk_matrix(model, None, groups, **settings)
        dist.barrier()
        seconds = time.perf_counter() - started
        if rank == 0:
            torch.save({"normalized": np.asarray(result.normalized), "ranks": result.ranks, "seconds": seconds,
                        "world": world, "feature_bytes_per_prompt": feature_bytes_per_prompt(model, groups, config)},
                       os.path.join(tmp, "rank0.pt"))
    finally:
        dist.destroy_process_group()


def feature_bytes_per_prompt(model, groups: dict, config: EntkBenchConfig) -> float:
    """Bytes of probe features a prompt, measured on the first chunk (what travels on the ring)."""
    prompts = [p for items in groups.values() for p in items][: config.chunk_size]
    _, _, features = prompt_probes(model, tail_spec(model, config.tail_layers, True), prompts, k=config.k)
    sizes: list[int] = []
    features.map(lambda t: sizes.append(t.numel() * t.element_size()) or t)
    return sum(sizes) / len(prompts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, ScalingConfig)
    run(config_from_args(ScalingConfig, parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
