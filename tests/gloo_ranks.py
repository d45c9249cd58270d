"""Several torch.distributed ranks on one CPU (gloo), for the tests of what runs under torchrun.

``run_ranks(world, fn, *args)`` calls ``fn(*args)`` in ``world`` processes that share a gloo
group (one torch thread each), and raises if any of them fails. The processes fork from a
server that imported torch, transformers, peft and dcr_fast once per test session, so a run
costs seconds where fresh interpreters would spend tens of seconds importing on 2 busy cores.
``fn`` must be importable by name (a module-level function of a test module).
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_PRELOAD = [
    "torch", "transformers", "transformers.models.qwen2.modeling_qwen2", "transformers.models.llama.modeling_llama",
    "peft", "dcr_fast.tiny", "dcr_fast.ntk", "dcr_fast.train.dcr", "dcr_fast.train.sft", "gloo_ranks",
]


def run_ranks(world: int, fn: Callable[..., None], *args) -> None:
    """``fn(*args)`` on ``world`` gloo ranks; ``torch.multiprocessing.ProcessExitedException`` (or
    ``ProcessRaisedException``) when one dies, after the others are stopped."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)  # used when the server starts
    with tempfile.TemporaryDirectory() as tmp:
        rendezvous = os.path.join(tmp, "rendezvous")
        mp.start_processes(_rank, args=(world, rendezvous, fn, args), nprocs=world, start_method="forkserver")


def _rank(rank: int, world: int, rendezvous: str, fn: Callable[..., None], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()
