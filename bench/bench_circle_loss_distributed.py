"""Circle loss across ranks (``distributed=True``): scaling with world size, correctness, bytes moved.

Every rank holds ``--local-batch`` rows of one global batch (the same on every rank count, so
a world of W processes the global batch W × local); each step is the distributed loss's
forward and backward. Rows report, per world size: the loss and gradient error against one
process on the concatenated batch (``--check``: relative Frobenius error of this rank's
gradient rows, max over ranks), the communication each rank does per step (computed from the
collectives the loss issues: the all-gathers of sizes, embeddings and labels, padded to the
largest rank's batch; the all-reduce of the gathered embeddings' gradient; the all-reduce of
the loss's sum and count), and on CUDA the step time (median over ``--iters`` steps, slowest
rank). On the CPU (gloo, several processes sharing two cores) times say nothing about scaling
and are not recorded. Rows go to ``bench/results/circle_loss_distributed-<device>.json``.

    torchrun --nproc_per_node 8 -m bench.bench_circle_loss_distributed --device cuda --local-batch 16384 --dim 128
    python -m bench.bench_circle_loss_distributed --world-sizes 1 2 3    # CPU: spawns gloo processes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import RESULTS_DIR, ResultsFile, Row, format_table
from dcr_fast import circle_loss

BENCH = "circle_loss_distributed"
METRIC_KEYS = ("world", "global_batch", "loss_rel_err", "grad_rel_err", "gathered_mb", "all_reduce_mb",
               "pairs_per_rank")


def communication_bytes(sizes: list[int], d: int, elem: int) -> dict[str, float]:
    """Bytes one rank receives per step in the gathers, and the all-reduce payload (a ring
    all-reduce moves about twice the payload through each rank)."""
    world, widest, total = len(sizes), max(sizes), sum(sizes)
    gathered = world * (8 + widest * d * elem + widest * 8)  # sizes, embeddings, labels (int64)
    reduced = total * d * elem + 2 * elem  # the gathered embeddings' gradient; the loss's sum and count
    return {"gathered_mb": gathered / 2**20, "all_reduce_mb": reduced / 2**20}


def _global_batch(sizes: list[int], d: int, classes: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(sizes), d, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, classes, (sum(sizes),), generator=gen).to(device)
    return x, y


def rank_step(args: argparse.Namespace, device: torch.device) -> Row | None:
    """One world size, run on every rank; rank 0 returns the row."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [args.local_batch] * world
    dtype = getattr(torch, args.dtype)
    x_all, y_all = _global_batch(sizes, args.dim, args.classes, dtype, device)
    rows = slice(rank * args.local_batch, (rank + 1) * args.local_batch)
    x = x_all[rows].clone().requires_grad_()
    kwargs = dict(m=args.m, gamma=args.gamma, variant=args.variant, backend=args.backend)

    def step() -> torch.Tensor:
        x.grad = None
        loss = circle_loss(x, y_all[rows], distributed=True, **kwargs)
        loss.backward()
        return loss.detach()

    loss = step()
    metrics: dict[str, float] = {"world": world, "global_batch": sum(sizes),
                                 "pairs_per_rank": float(args.local_batch * sum(sizes)),
                                 **communication_bytes(sizes, args.dim, x.element_size())}
    if args.check:
        ref_x = x_all.detach().float().requires_grad_()  # the single-process loss, in fp32
        ref = circle_loss(ref_x, y_all, **{**kwargs, "backend": "chunked" if device.type == "cpu" else "auto"})
        ref.backward()
        ref = ref.detach()
        errors = torch.tensor([float((loss.float() - ref).abs() / ref.abs().clamp_min(1e-30)),
                               float((x.grad.float() - ref_x.grad[rows]).norm() / ref_x.grad[rows].norm())],
                              device=device)
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        metrics.update(loss_rel_err=float(errors[0]), grad_rel_err=float(errors[1]))
    row = Row(bench=BENCH, impl=f"distributed-{args.backend}", mode="fwd+bwd",
              case={"B_local": args.local_batch, "d": args.dim, "dtype": args.dtype, "world": world},
              metrics=metrics)
    if device.type == "cuda":
        times = []
        for i in range(args.warmup + args.iters):
            dist.barrier()
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            torch.cuda.synchronize(device)
            if i >= args.warmup:
                times.append((time.perf_counter() - start) * 1e3)
        slowest = torch.tensor([statistics.median(times)], device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        row.ms_median, row.repeats = float(slowest), args.iters
    else:
        row.status, row.reason = "skipped", "CPU processes share two cores: no timing, correctness and volume only"
    return row if rank == 0 else None


def _spawned(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        row = rank_step(args, torch.device("cpu"))
        if row is not None:
            torch.save(row, out)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (spawns gloo processes) or cuda (under torchrun, NCCL)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 3], help="CPU only: worlds to spawn")
    parser.add_argument("--local-batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch", "chunked"))
    parser.add_argument("--variant", default="original", choices=("original", "dcr"))
    parser.add_argument("--m", type=float, default=0.4)
    parser.add_argument("--gamma", type=float, default=80.0)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the single-process comparison")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        dist.init_process_group("nccl")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        try:
            rows = [rank_step(args, device)]
        finally:
            dist.destroy_process_group()
        if rows[0] is None:
            return 0
    else:
        device = torch.device("cpu")
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for world in args.world_sizes:
                out = os.path.join(tmp, f"row{world}.pt")
                mp.start_processes(_spawned, args=(world, os.path.join(tmp, f"store{world}"), args, out),
                                   nprocs=world, start_method="spawn")
                rows.append(torch.load(out, weights_only=False))
    results = ResultsFile(BENCH, device, results_dir=args.results_dir)
    for row in rows:
        results.add(row)
    print(format_table(rows, METRIC_KEYS))
    print(f"results: {results.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
