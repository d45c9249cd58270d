"""The Circle loss across ranks: each rank's rows against every rank's embeddings.

Inside an initialized process group each rank passes its local batch. The reference set is
all ranks' embeddings concatenated in rank order (batch sizes may differ), gathered with
gradient flow back to the rank that owns each row, so every pair of the global batch counts:

* the value on every rank is the single-process loss on the concatenated batch (PML's mean
  over rows whose loss is > 0 needs the global sum and count: one all-reduce of two numbers);
* ``backward()`` leaves on each rank's embeddings exactly its rows of the single-process
  gradient: each rank differentiates its own rows' terms, and the gather's backward sums the
  gradients of the reference columns over ranks (an all-reduce of B_global×d);
* memory per rank is O(B_local·d + B_global·d) with the fused and chunked backends (local rows
  against the gathered columns, row i's self pair excluded at its global column).

Under DDP, which averages parameter gradients over ranks, multiply the loss by the world size
before ``backward()`` (the per-rank gradients here already add up to the full gradient).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dcr_fast.circle_loss.backends import Implementation


def check_distributed(indices_tuple, ref_emb, ref_labels, labels) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialized torch.distributed process group "
                         "(torchrun, or torch.distributed.init_process_group)")
    if indices_tuple is not None or ref_emb is not None or ref_labels is not None:
        raise ValueError("distributed=True takes embeddings and labels only: the reference set is every rank's "
                         "embeddings, and indices_tuple, ref_emb and ref_labels would index one rank's batch")
    if labels is None:
        raise ValueError("distributed=True needs labels")


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """Every rank's rows of ``x`` concatenated in rank order, and this rank's first row in it.

    Differentiable: the backward sums the gathered tensor's gradient over ranks and returns this
    rank's rows. Sizes are exchanged first (a host sync: they may differ between ranks)."""
    sizes = _all_sizes(x.shape[0], x.device)
    rank = dist.get_rank()
    return _GatherRows.apply(x, sizes), sum(sizes[:rank])


def _all_sizes(n: int, device: torch.device) -> list[int]:
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    return [int(s) for s in torch.cat(sizes).tolist()]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        widest = max(sizes)
        # all_gather wants equal shapes on every backend: pad to the largest batch, then strip.
        padded = x.new_zeros(widest, *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start:start + ctx.sizes[ctx.rank]], None


def distributed_circle_loss(embeddings: Tensor, labels: Tensor, impl: Implementation, margins,
                            row_losses) -> Tensor:
    """The loss of the global batch (see the module docstring); ``row_losses`` is the shared epilogue."""
    ref_emb, offset = gather_rows(embeddings)
    with torch.no_grad():
        ref_labels, _ = gather_rows(labels)
    zero = embeddings.sum() * 0
    n_global = ref_emb.shape[0]
    if n_global * (n_global - 1) <= 2:  # PML: at most one pair of each kind gives zero
        return zero
    lse_p, lse_n = impl.labels(embeddings, ref_emb, labels, ref_labels, offset, margins)
    rows = row_losses(lse_p, lse_n)
    local = torch.stack([rows.sum(), (rows > 0).sum().to(rows.dtype)])
    total = local.detach().clone()
    dist.all_reduce(total)
    count = total[1].clamp(min=1)
    mine = local[0] / count  # this rank's share, the only part its backward differentiates
    loss = mine + (total[0] / count - mine).detach()
    return torch.where(total[1] > 0, loss, zero.to(loss.dtype)).to(embeddings.dtype)
