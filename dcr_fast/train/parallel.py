"""Training across the ranks of torch.distributed's default group: DDP or FSDP, by ``--sharding``.

``dcr-fast dcr`` and ``dcr-fast sft`` under torchrun run one rank per GPU. Each rank
computes its share of every optimizer step's global batch (the stages cut the batches); the
shares' losses are scaled so that they **sum** to the single-process loss of the step, and
gradients are summed across ranks rather than averaged, so the step is the single-process
step on the same global batch (tested on 2 gloo ranks: every step's loss and gradient norm,
the parameters and the AdamW moments).

* ``ddp`` (default): torch's ``DistributedDataParallel`` replicates the model and all-reduces
  the gradients of the trainable parameters, once per optimizer step (earlier micro-batches
  run under ``no_sync``). For LoRA and for models whose weights, gradients and AdamW state
  fit on one GPU.
* ``fsdp``: torch's ``fully_shard`` (FSDP2) on every decoder layer and on the root, so each
  rank holds 1/W of the parameters, gradients and optimizer state: full-parameter DCR of a
  7B/8B model. Gradients are reduce-scattered after every micro-batch (memory over
  communication). Not with LoRA (the config refuses it): adapters are a few MB, DDP serves them.

In one process :func:`parallelize` wraps nothing and every method is the identity.

The stages run their losses through :meth:`Parallel.__call__` (``parallel(fn, *args)`` is
``fn(model, *args)``) so that DDP's and FSDP's hooks see every forward, whichever submodules
``fn`` calls. Checkpoints hold full (unsharded) tensors keyed by parameter name, gathered and
written by rank 0 (:func:`full_state`, :func:`load_full_state`), so a run resumes under any
world size and either sharding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dcr_fast import distributed
from dcr_fast.train.config import SHARDINGS


class _Forward(nn.Module):
    """Runs a function of the model as its forward, so a wrapper's hooks run around it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


@dataclass
class Parallel:
    """The model as this rank trains it: ``wrapper`` is DDP or the FSDP root (None in one process)."""

    model: nn.Module
    device: torch.device
    sharding: str = "none"
    wrapper: nn.Module | None = None

    @property
    def rank(self) -> int:
        return distributed.rank()

    @property
    def world(self) -> int:
        return distributed.world_size()

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(model, *args, **kwargs)``, through the wrapper's forward."""
        if self.wrapper is None:
            return fn(self.model, *args, **kwargs)
        return self.wrapper(fn, *args, **kwargs)

    def accumulating(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward: DDP defers its all-reduce to the
        step's last micro-batch (``sync``); FSDP reduce-scatters every time."""
        if self.sharding == "ddp" and not sync:
            return self.wrapper.no_sync()
        return contextlib.nullcontext()

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over ranks (the identity in one process)."""
        return distributed.all_sum(values, self.device)


def parallelize(model: nn.Module, sharding: str, device: torch.device) -> Parallel:
    """Wrap ``model`` for the default group's ranks by ``sharding``; in one process, do nothing.

    Call it after freezing and after attaching adapters, and create the optimizer after it:
    FSDP replaces the parameters by sharded ones.
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding: expected one of {SHARDINGS}, got {sharding!r}")
    if distributed.world_size() == 1:
        return Parallel(model, device)
    if sharding == "ddp":
        wrapper = nn.parallel.DistributedDataParallel(
            _Forward(model), device_ids=[device.index] if device.type == "cuda" else None
        )
        wrapper.register_comm_hook(None, _sum_gradients)
        return Parallel(model, device, sharding, wrapper)
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        FSDPModule = None
    if not hasattr(FSDPModule, "set_gradient_divide_factor"):
        raise ValueError(f"sharding: fsdp needs FSDP2's fully_shard with set_gradient_divide_factor, which torch "
                         f"{torch.__version__} lacks; use --sharding ddp, or a newer torch (2.13 has it)")
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    units = [*model.get_decoder().layers, _Forward(model)]
    for unit in units:
        fully_shard(unit, mesh=mesh)
        unit.set_gradient_divide_factor(1.0)  # shares sum to the step's loss: sum, not average
    return Parallel(model, device, sharding, units[-1])


def _sum_gradients(_state, bucket):  # unannotated: DDP checks annotations, and this module's are strings
    """DDP communication hook: all-reduce a ``dist.GradBucket`` as a sum (DDP's own hook averages)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda done: done.value()[0])


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP parameter (the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of an FSDP parameter or gradient norm, gathered (a collective: every rank calls it)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Trainable parameters and optimizer state as full CPU tensors keyed by parameter name.

    A collective under FSDP; rank 0 receives the tensors, other ranks empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return {
        "trainable": get_model_state_dict(model, options=options),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
    }


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what :func:`full_state` saved (under any world size) into this rank's model and optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, state["trainable"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the whole model's state gathered to rank 0's CPU (a collective); else None,
    the model's own parameters being whole."""
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
