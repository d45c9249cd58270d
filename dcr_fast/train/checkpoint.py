"""Checkpoints and the step log: what ``--resume`` restores, written atomically."""

from __future__ import annotations

import json
import os
import random
from typing import Any

import torch

from dcr_fast import atomic, distributed
from dcr_fast.config import config_to_dict
from dcr_fast.data.files import read_jsonl
from dcr_fast.train.parallel import full_state, load_full_state


def save_checkpoint(path: str, model, optimizer, config, step: int) -> None:
    """Full tensors by parameter name (gathered across ranks), each rank's RNG; rank 0 writes."""
    state = {
        "step": step,
        "config": config_to_dict(config),
        **full_state(model, optimizer),
        "rng": distributed.all_gather_objects(
            {"python": random.getstate(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        ),
    }
    if distributed.is_main():
        atomic.write(path, lambda tmp: torch.save(state, tmp))


# Fields that may differ between an interrupted run and its resumption.
_RESUME_FREE = {"resume", "overwrite", "max_steps", "save_every", "progress", "sharding"}


def restore(path: str, model, optimizer, config) -> int:
    """Load a checkpoint written under any world size. Each rank takes its own RNG state when
    the world size is the one that wrote it, else rank 0's (what every rank starts from)."""
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    saved, now = state["config"], config_to_dict(config)
    changed = sorted(k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k])
    if changed:
        raise ValueError(f"resume: the checkpoint {path!r} was written with different settings for {changed}")
    load_full_state(model, optimizer, state)
    rngs = state["rng"]
    rng = rngs[distributed.rank()] if len(rngs) == distributed.world_size() else rngs[0]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    atomic.append_line(path, json.dumps(record))


def truncate_log(path: str, step: int) -> None:
    """Keep the log's records up to ``step`` (the checkpoint's), for a resumed run to continue it.

    A last line cut short by a kill is dropped with a warning rather than failing every resume.
    """
    if not os.path.exists(path):
        return
    kept = [row for row in read_jsonl(path, "resume: the step log", torn_tail=True) if row.get("step", 0) <= step]
    atomic.write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
