"""Circle loss across ranks (``distributed=True``), with 2 and 3 gloo processes on the CPU.

Each rank holds an odd-sized slice of one global batch (a class lives on one rank only, another
is a singleton); every rank's loss must equal the single-process loss of the concatenated batch,
and each rank's gradient its rows of the single-process gradient, in every backend (float64:
to round-off). Under DDP, the loss times the world size gives the single-process parameter
gradient. ``indices_tuple``, ``ref_emb`` and ``ref_labels`` are refused.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import assert_close
from dcr_fast import CircleLoss, circle_loss

BACKENDS = ("torch", "chunked", "triton")
SIZES = {2: (7, 4), 3: (5, 8, 3)}
D = 6


def _global_batch(sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings, labels and DDP inputs of the whole batch, the same in every process."""
    gen = torch.Generator().manual_seed(len(sizes))
    n = sum(sizes)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    y[-2:] = 9  # a class on the last rank only
    y[0] = 7  # a singleton: no positive anywhere
    inputs = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    return x, y, inputs


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Linear(5, D, dtype=torch.float64)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sizes = SIZES[world]
        x_all, y_all, inputs_all = _global_batch(sizes)
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        results = {}
        for backend in BACKENDS:
            x = x_all[rows].clone().requires_grad_()
            loss = circle_loss(x, y_all[rows], backend=backend, distributed=True)
            (loss * 1.7).backward()
            results[backend] = (loss.detach(), x.grad)
        refused = []
        for extra in (dict(indices_tuple=(torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))),
                      dict(ref_emb=x_all[rows]), dict(ref_labels=y_all[rows])):
            try:
                CircleLoss(distributed=True)(x_all[rows], y_all[rows], **extra)
            except ValueError as exc:
                refused.append(str(exc))
        results["refused"] = refused
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        loss = circle_loss(ddp(inputs_all[rows]), y_all[rows], distributed=True)
        (loss * world).backward()  # DDP averages gradients over ranks
        results["ddp"] = (loss.detach(), [p.grad for p in model.parameters()])
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_loss_equals_one_process_on_the_concatenated_batch(world, tmp_path):
    mp.start_processes(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
                       start_method="spawn")
    sizes = SIZES[world]
    x_all, y_all, inputs_all = _global_batch(sizes)
    x = x_all.clone().requires_grad_()
    expected = circle_loss(x, y_all, backend="torch")
    (expected * 1.7).backward()
    model = _model()
    circle_loss(model(inputs_all), y_all).backward()
    tol = dict(rtol=1e-10, atol=1e-12)
    for rank in range(world):
        got = torch.load(tmp_path / f"{rank}.pt")
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        for backend in BACKENDS:
            loss, grad = got[backend]
            assert_close(loss, expected, **tol, what=f"rank {rank} {backend} loss")
            assert_close(grad, x.grad[rows], **tol, what=f"rank {rank} {backend} grad")
        assert len(got["refused"]) == 3 and all("distributed=True takes" in m for m in got["refused"])
        _, ddp_grads = got["ddp"]
        for g, p in zip(ddp_grads, model.parameters()):
            assert_close(g, p.grad, **tol, what=f"rank {rank} DDP parameter grad")


def test_distributed_needs_a_process_group():
    with pytest.raises(ValueError, match="initialized torch.distributed process group"):
        circle_loss(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), distributed=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_pairs_at_an_offset_match_the_reference(backend):
    """A rank's rows against the gathered batch: row i's own embedding sits at column
    offset + i, and only that column leaves the positives (one process, no communication)."""
    from dcr_fast.circle_loss import CircleMargins, backends, reference

    x_all, y_all, _ = _global_batch((5, 8, 3))
    offset, rows = 5, slice(5, 13)
    impl = backends.IMPLEMENTATIONS[backend]
    got = impl.labels(x_all[rows], x_all, y_all[rows], y_all, offset, CircleMargins())
    x_hat, r_hat = reference.unit_rows(x_all, None)
    pos, neg = reference.dense_label_masks(y_all, y_all, 0)
    want = reference.circle_lse_reference(x_hat[rows], r_hat, pos[rows], neg[rows], CircleMargins())
    for a, b in zip(got, want):
        assert_close(a.nan_to_num(neginf=-1e300), b.nan_to_num(neginf=-1e300), rtol=1e-12, atol=1e-12,
                     what=f"{backend} lse")
