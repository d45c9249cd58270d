"""torch.distributed as dcr-fast uses it: the group torchrun describes, and a few collectives.

Everything that runs across ranks (``entk_matrix``, ``dcr-fast ntk``, ``dcr-fast dcr`` and
``dcr-fast sft``) works on torch.distributed's default process group. The commands open it
with :func:`process_group` when torchrun launched them (``WORLD_SIZE`` > 1 in the
environment); library callers may open it themselves. Outside a group every helper here
behaves as the one-process identity, so single-process code calls them unconditionally.

One group serves both kinds of tensor: ``cpu:gloo,cuda:nccl`` when the ranks use GPUs (CUDA
tensors go over NCCL, host tensors such as offloaded eNTK features over gloo), gloo alone on
the CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dcr_fast.runtime import resolve_device

T = TypeVar("T")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def is_main() -> bool:
    """Rank 0 (or no group): the process that prints and writes shared outputs."""
    return rank() == 0


def launched() -> bool:
    """True when torchrun (or another launcher setting its variables) started several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_device(name: str) -> torch.device:
    """The device of this rank: ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` under a launcher.

    A fixed ``cuda:N`` is refused there, since every rank would take the same GPU.
    """
    if not launched():
        return resolve_device(name)
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if name not in ("auto", "cuda"):
        raise ValueError(f"device: {name!r} names one GPU, but under torchrun each rank takes cuda:LOCAL_RANK; "
                         "pass --device cuda (or auto)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[torch.device]:
    """Open the default group when launched by torchrun, and yield this rank's device.

    Without a launcher, or inside a group the caller opened, only the device is resolved and
    nothing is opened or closed.
    """
    device = rank_device(device_name)
    if not launched() or initialized():
        yield device
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum over ranks of a few numbers (float64, on ``device``: CUDA under NCCL)."""
    if not initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on some rank."""
    return all_sum([float(flag)], device)[0] > 0


def all_gather_objects(obj: T) -> list[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects, small)."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its ``ValueError``) to every rank.

    For work on shared files that one rank must do (checking a run's identity, listing what
    is done): the others wait for it and agree on the outcome, rather than hanging in the
    next collective when rank 0 fails.
    """
    if not initialized():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except ValueError as err:
            box[0] = ("error", str(err))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ValueError(value)
    return value


def barrier() -> None:
    if initialized():
        dist.barrier()


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0; backward hands each rank the sum over ranks of its rows' gradient."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        local = torch.empty_like(grad[: grad.shape[0] // world_size()])
        dist.reduce_scatter(local, list(grad.contiguous().chunk(world_size())))
        return local


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """The rows of every rank, in rank order, with gradient flowing back to their owners.

    Every rank must pass the same shape. The gradient each rank receives for its rows is the
    sum, over ranks, of the gradients that rank's loss puts on them: a loss computed
    identically on every rank and scaled by ``1 / world_size()`` gives each row exactly its
    single-process gradient. Outside a group: ``local`` itself.
    """
    if world_size() == 1:
        return local
    return _GatherRows.apply(local)
